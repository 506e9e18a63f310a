"""Training of the standard network and its matrix-free linearization (study/train.py)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import study.train as train_module
from jacobian_store.architectures import create_model
from jacobian_store.functional import flatten, initial_parameters, jacobian_rows
from solvers.minibatches import minibatches, step_learning_rate
from study.train import TrainConfig, linearized_l2_gradient, train


def synthetic_dataset(n_train=24, n_test=8, n_outputs=3, image_size=16, seed=0):
    """A Dataset-shaped stand-in: Gaussian 1×16×16 images, random labels, one-hot targets."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.randint(0, n_outputs, (n,), generator=g)
        return SimpleNamespace(x=torch.randn(n, 1, image_size, image_size, generator=g), labels=labels,
                               targets=F.one_hot(labels, n_outputs).float(), indices=np.arange(n))

    return SimpleNamespace(name="synthetic", train=split(n_train), test=split(n_test), n_outputs=n_outputs,
                           in_channels=1, image_size=image_size, class_names=[str(c) for c in range(n_outputs)],
                           spec={"seed": seed})


def config(**overrides) -> TrainConfig:
    base = dict(arch="lenet", width=0.5, model_seed=3, epochs=2, lr=0.05, weight_decay=1e-3, batch_size=8,
                dtype="float64", device="cpu")
    return TrainConfig(**{**base, **overrides})


def flat_params(model) -> torch.Tensor:
    return flatten(initial_parameters(model))


def without_timings(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "eval_seconds")} for h in history]


def record_batches(monkeypatch) -> list:
    """Make study.train's minibatches log (seed, epoch, indices) of every batch it hands out."""
    log = []

    def recording(n_samples, batch_size, seed, epoch):
        for indices in minibatches(n_samples, batch_size, seed, epoch):
            log.append((seed, epoch, indices.tolist()))
            yield indices

    monkeypatch.setattr(train_module, "minibatches", recording)
    return log


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pair_shares_w0_and_batches(monkeypatch, dtype):
    data = synthetic_dataset()
    log = record_batches(monkeypatch)
    std = train(config(dtype=dtype), data, "standard", progress=False)
    std_log, log[:] = list(log), []
    lin = train(config(dtype=dtype), data, "linearized", progress=False)
    assert std_log == log and len(log) == 2 * 3  # 2 epochs of ⌈24/8⌉ batches
    expected = [(3, e, b.tolist()) for e in range(2) for b in minibatches(24, 8, 3, e)]
    assert log == expected

    # The linearized model holds w0; an untrained standard model is w0; both equal create_model's draw.
    w0_std = flat_params(train(config(dtype=dtype, epochs=0), data, "standard", progress=False).model)
    w0_lin = flat_params(lin.model)
    reference = flat_params(create_model("lenet", 0.5, 1, 3, 16, seed=3)).to(getattr(torch, dtype))
    assert torch.equal(w0_std, w0_lin) and torch.equal(w0_lin, reference)
    assert not torch.equal(flat_params(std.model), w0_std)  # and training did move the standard one
    assert std.initial == lin.initial


def test_first_step_is_identical_and_follows_the_l2_convention():
    """At u = 0 the linearized gradient is the standard one: after one full-batch step u = w1 − w0 = −lr·(Jᵀr/n + wd·w0) for the standard net, −lr·Jᵀr/n for u."""
    data = synthetic_dataset(n_train=8)
    cfg = config(epochs=1, batch_size=8, lr=0.1, weight_decay=0.0)
    std = train(cfg, data, "standard", progress=False)
    lin = train(cfg, data, "linearized", progress=False)
    model = create_model("lenet", 0.5, 1, 3, 16, seed=3).double()
    params = initial_parameters(model)
    x = data.train.x.double()
    jac = jacobian_rows(model, params, x)
    residual = (model(x) - data.train.targets.double()).detach().reshape(-1)
    step = -0.1 * jac.T @ residual / 8
    torch.testing.assert_close(flat_params(std.model) - flatten(params), step, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lin.u, step, rtol=1e-9, atol=1e-12)


def test_small_learning_rate_trajectories_agree_to_first_order():
    """f_std − f_lin = O(lr²) while both move O(lr) away from f0: halving lr quarters the gap.

    Weight decay is 0: it acts on w0 + u for the standard net but on u for the linearized one, which
    would add a first-order gap lr·wd·w0. The data seed is one where no ReLU or max-pool switch is
    crossed at these step sizes; a crossing adds a non-smooth term and blurs the factor 4.
    """
    data = synthetic_dataset(n_train=16, seed=1)
    f0 = create_model("lenet", 0.5, 1, 3, 16, seed=3).double()(data.train.x.double()).detach()
    gaps, moves = [], []
    for lr in (1e-4, 5e-5):
        std = train(config(lr=lr, weight_decay=0.0), data, "standard", progress=False)
        lin = train(config(lr=lr, weight_decay=0.0), data, "linearized", progress=False)
        f_std, f_lin = std.predict(data.train.x), lin.predict(data.train.x)
        gaps.append((f_std - f_lin).norm().item())
        moves.append(min((f_std - f0).norm().item(), (f_lin - f0).norm().item()))
    assert gaps[0] < 1e-2 * moves[0] and gaps[1] < 1e-2 * moves[1]
    assert 1.9 < moves[0] / moves[1] < 2.1  # change from f0: first order in lr
    assert 3.5 < gaps[0] / gaps[1] < 4.5  # gap: second order in lr


@pytest.mark.parametrize("method", ["forward-ad", "jvp-vjp"])
def test_matrix_free_gradient_equals_explicit_jacobian(method):
    model = create_model("lenet", 0.5, 1, 3, 16, seed=1).double()
    params = initial_parameters(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    jac = jacobian_rows(model, params, x)
    u = 0.01 * torch.randn(jac.shape[1], generator=g, dtype=torch.float64)
    residual = model(x).detach().reshape(-1) + jac @ u - y.reshape(-1)
    loss, grad = linearized_l2_gradient(model, params, u, x, y, method=method)
    torch.testing.assert_close(grad, jac.T @ residual / 5, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * residual.pow(2).sum() / 5, rtol=1e-12, atol=0)


def explicit_sgd(jac, f0, targets, cfg: TrainConfig) -> torch.Tensor:
    """SGD on ½‖J_B u − (y_B − f0_B)‖²/|B| + momentum, on a stored J (the sgd solver's contract)."""
    n, n_out = targets.shape
    rows = jac.reshape(n, n_out, -1)
    u = torch.zeros(jac.shape[1], dtype=jac.dtype)
    buffer = None
    for epoch in range(cfg.epochs):
        lr = step_learning_rate(cfg.lr, epoch, cfg.lr_step_epochs, 0.1)
        for batch in minibatches(n, cfg.batch_size, cfg.batch_seed, epoch):
            jb = rows[batch].reshape(-1, jac.shape[1])
            residual = f0[batch].reshape(-1) + jb @ u - targets[batch].reshape(-1)
            grad = jb.T @ residual / len(batch) + cfg.weight_decay * u
            buffer = grad.clone() if buffer is None else cfg.momentum * buffer + grad
            u = u - lr * buffer
    return u


def test_linearized_sgd_equals_sgd_on_the_stored_jacobian():
    data = synthetic_dataset(n_train=20)  # batches of 6: the last one is short
    cfg = config(epochs=3, batch_size=6, lr=0.05, weight_decay=0.01, lr_step_epochs=2, batch_seed=11)
    lin = train(cfg, data, "linearized", progress=False)
    model = create_model("lenet", 0.5, 1, 3, 16, seed=3).double()
    params = initial_parameters(model)
    x = data.train.x.double()
    jac = jacobian_rows(model, params, x)
    f0 = model(x).detach()
    expected = explicit_sgd(jac, f0, data.train.targets.double(), cfg)
    assert expected.norm() > 1e-3
    torch.testing.assert_close(lin.u, expected, rtol=0, atol=1e-10)
    # The solvers' sgd on the stored J follows the same contract.
    from solvers import solve

    stored = solve(jac.numpy(), (data.train.targets.double() - f0).reshape(-1).numpy(), method="sgd", n_outputs=3,
                   device="cpu", lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                   batch_size=cfg.batch_size, lr_step=cfg.lr_step_epochs, momentum=cfg.momentum, seed=cfg.batch_seed)
    torch.testing.assert_close(lin.u, torch.from_numpy(np.asarray(stored.u)), rtol=0, atol=1e-10)
    # The trained outputs are f0 + J u.
    torch.testing.assert_close(lin.predict(data.train.x).reshape(-1), f0.reshape(-1) + jac @ expected,
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["standard", "linearized"])
def test_killed_run_resumes_bit_identically(tmp_path, monkeypatch, kind):
    data = synthetic_dataset()
    cfg = config(epochs=4, dtype="float32", lr_step_epochs=3)
    whole = train(cfg, data, kind, run_dir=tmp_path / "whole", progress=False)

    run_dir = tmp_path / "killed"
    train(config(epochs=2, dtype="float32", lr_step_epochs=3), data, kind, run_dir=run_dir, progress=False)

    def killed(n_samples, batch_size, seed, epoch):  # dies in the middle of the third epoch
        for i, indices in enumerate(minibatches(n_samples, batch_size, seed, epoch)):
            if epoch == 2 and i == 1:
                raise KeyboardInterrupt
            yield indices

    monkeypatch.setattr(train_module, "minibatches", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, kind, run_dir=run_dir, progress=False)
    monkeypatch.setattr(train_module, "minibatches", minibatches)
    resumed = train(cfg, data, kind, run_dir=run_dir, progress=False)

    assert torch.equal(flat_params(resumed.model), flat_params(whole.model))
    if kind == "linearized":
        assert torch.equal(resumed.u, whole.u) and resumed.u.norm() > 0
    assert without_timings(resumed.history) == without_timings(whole.history)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.distance == whole.distance
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.json"]  # no temporary left
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["final"]["epoch"] == 4 and saved["config"]["lr"] == cfg.lr and saved["model_kind"] == kind

    # A finished run asked again does not train again and returns the same result.
    again = train(cfg, data, kind, run_dir=run_dir, progress=False)
    assert without_timings(again.history) == without_timings(whole.history)


def test_resume_rejects_a_different_run(tmp_path):
    data = synthetic_dataset()
    train(config(epochs=2), data, "linearized", run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr=0.05.*lr=0.1"):
        train(config(epochs=3, lr=0.1), data, "linearized", run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="model_kind"):
        train(config(epochs=3), data, "standard", run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_seed"):
        train(config(epochs=3, batch_seed=4), data, "linearized", run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="dataset"):
        train(config(epochs=3), synthetic_dataset(seed=1), "linearized", run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds 2 epochs"):
        train(config(epochs=1), data, "linearized", run_dir=tmp_path, progress=False)
    # Allowed: more epochs, another eval batch size; resume=False starts over.
    assert len(train(config(epochs=3, eval_batch_size=5), data, "linearized", run_dir=tmp_path,
                     progress=False).history) == 3
    assert len(train(config(epochs=1, lr=0.1), data, "linearized", run_dir=tmp_path, resume=False,
                     progress=False).history) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="known architectures"):
        config(arch="resnet")
    with pytest.raises(ValueError, match="dtype"):
        config(dtype="float16")
    with pytest.raises(ValueError, match="model_kind"):
        train(config(), synthetic_dataset(), "kernel")
    assert config(batch_seed=None).batch_seed == 3  # defaults to model_seed
    assert config(lr_step_epochs=0).lr_step_epochs is None


def test_cli_trains_the_pair_writes_metrics_and_resumes(tmp_path, capsys):
    from study.train import main

    def argv(epochs):
        return ["--dataset", "digits", "--n-train", "30", "--n-test", "20", "--arch", "lenet", "--width", "0.25",
                "--model", "both", "--epochs", str(epochs), "--lr", "0.01", "--weight-decay", "1e-4",
                "--batch-size", "8", "--seed", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path)]

    first = main(argv(1))
    out = capsys.readouterr().out
    assert [r.model_kind for r in first] == ["standard", "linearized"]
    assert "test acc" in out and "linearized" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["model_kind"] for run in summary["runs"]] == ["standard", "linearized"]
    assert summary["runs"][0]["config"]["lr_step_epochs"] is None  # digits: no step schedule by default
    for kind in ("standard", "linearized"):
        metrics = json.loads((tmp_path / kind / "metrics.json").read_text())
        assert metrics["final"]["epoch"] == 1 and metrics["dataset"]["name"] == "digits"
        assert metrics["n_parameters"] == first[0].n_parameters
    assert torch.equal(flat_params(first[1].model),  # the linearized model holds w0
                       flat_params(create_model("lenet", 0.25, 1, 10, 28, seed=2)))

    # Same command with more epochs: continues epoch 1's checkpoint instead of starting over.
    second = main(argv(2))
    for a, b in zip(first, second):
        assert without_timings(b.history[:1]) == without_timings(a.history)
        assert len(b.history) == 2


def test_cli_binary_task_and_help(tmp_path, capsys):
    from study.train import main

    (run,) = main(["--dataset", "digits", "--n-train", "20", "--n-test", "10", "--binary", "3", "--width", "0.25",
                   "--model", "linearized", "--epochs", "1", "--float64", "--device", "cpu", "--quiet"])
    assert run.u.dtype == torch.float64 and run.predict(torch.zeros(2, 1, 28, 28)).shape == (2, 1)
    assert 0.0 <= run.final["test_acc"] <= 1.0
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--weight-decay" in capsys.readouterr().out
