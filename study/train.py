"""Train a standard network and its linearization at initialization from the same w0 and batches.

Two models of one pair, both trained by SGD on the L2 loss:

- ``standard``: f(w, x), with w starting at w0.
- ``linearized``: f_lin(u, x) = f(w0, x) + J(x) u, with u starting at 0, matrix-free: f0 + J u on
  a batch comes from one forward pass at w0 carrying u as a tangent (forward-mode AD, what
  ``torch.func.jvp`` does) and the loss gradient Jᵀ r / |B| from one backward pass with the
  residual r as cotangent (a vjp), so no Jacobian is formed; a step costs about two standard steps.

Conventions, shared with the ``sgd`` solver on a stored Jacobian so the three agree batch for batch:

    loss_B(θ) = (1/|B|) Σ_{i∈B} ½‖f(x_i) − y_i‖²             (sum over outputs, mean over samples)
    g ← ∇loss_B(θ) + wd·θ;  b ← g at the first step, else m·b + g;  θ ← θ − lr_e·b
    lr_e = step_learning_rate(lr, e, lr_step_epochs, 0.1)      (epoch e = 0, 1, …)
    batches of epoch e: solvers.minibatches.minibatches(n_train, batch_size, batch_seed, e)

θ = w for the standard network (exactly ``torch.optim.SGD(lr, momentum=m, weight_decay=wd)``) and
θ = u for the linearized one (weight decay on u, not on w0 + u). w0 is
``create_model(arch, width, in_channels, n_outputs, image_size, seed=model_seed)`` for both, cast to
the run's dtype, so the pair starts from bit-identical weights.

With a run directory, a checkpoint (weights or u, momentum buffers, completed epochs, history,
config) is written atomically after every epoch; rerunning resumes from the last completed epoch
and gives bit-identical results to an uninterrupted run on the same device.

Command line: ``bin/train --help``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from jacobian_store.architectures import available_models, create_model
from jacobian_store.device import resolve_device
from jacobian_store.provenance import jsonable
from jacobian_store.functional import (initial_parameters, jvp_outputs, parameter_layout,
                                       unflatten, vjp_flat)
from jacobian_store.progress import progress_bar
from solvers.minibatches import minibatches, step_learning_rate

MODEL_KINDS = ("standard", "linearized")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
_CHECKPOINT_FORMAT = 1
# Fields a resumed run may change: how many epochs to reach, where to run, and the evaluation
# batch size (evaluation only; the trained weights do not depend on it). Every other field changes
# the trajectory, so a mismatch with the checkpoint is an error. Bit-identical resumption assumes
# the same device.
_RESUMABLE_FIELDS = ("epochs", "device", "eval_batch_size")


@dataclass
class TrainConfig:
    """Every setting that determines a training run (dataset aside).

    ``lr_step_epochs``: divide the learning rate by 10 every that many epochs (None or 0: never).
    ``batch_seed``: seed of the mini-batch order; None means ``model_seed``.
    ``device``: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ….
    """
    arch: str
    width: float
    model_seed: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int = 32
    lr_step_epochs: int | None = None
    momentum: float = 0.9
    dtype: str = "float32"
    device: str = "auto"
    batch_seed: int | None = None
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.batch_seed is None:
            self.batch_seed = self.model_seed
        if self.lr_step_epochs == 0:
            self.lr_step_epochs = None  # one spelling of "no decay", so resuming compares equal
        if self.arch not in available_models():
            raise ValueError(f"unknown architecture {self.arch!r}; known architectures: {', '.join(available_models())}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "eval_batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise ValueError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.lr_step_epochs is not None and self.lr_step_epochs < 0:
            raise ValueError(f"lr_step_epochs must be positive (or None/0 for no decay), got {self.lr_step_epochs!r}")


@dataclass
class TrainResult:
    """What one run produced.

    ``history``: one dict per completed epoch: ``epoch`` (epochs completed, 1-based), ``lr`` (used
    during that epoch), ``train_loss``/``train_acc``/``test_loss``/``test_acc`` (full splits, at the
    end of the epoch), ``batch_loss`` (mean of the epoch's mini-batch losses), ``distance``,
    ``seconds`` (training steps only) and ``eval_seconds``. ``initial``: the same metrics at w0 (equal
    for both models of a pair). ``distance``: ‖w − w0‖ for the standard network, ‖u‖ for the
    linearized one (its weights are w0 + u). ``model``: the trained network (standard) or the network
    at w0 (linearized); ``u``: the trained flat u (linearized only). ``predict(x)`` gives outputs.
    """
    config: TrainConfig
    model_kind: str
    dataset: dict
    history: list[dict]
    initial: dict
    distance: float
    w0_norm: float
    n_parameters: int
    device: str
    diverged: bool
    model: nn.Module = field(repr=False)
    u: torch.Tensor | None = field(default=None, repr=False)

    @property
    def final(self) -> dict:
        """Metrics after the last completed epoch (the initial ones when no epoch ran)."""
        return dict(self.history[-1]) if self.history else {"epoch": 0, **self.initial}

    def predict(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Outputs of the trained model (f(w, x) or f_lin(u, x)) on x, returned on the CPU."""
        return _outputs(self.model, self.u, x, batch_size or self.config.eval_batch_size)

    def to_dict(self) -> dict:
        return {
            "model_kind": self.model_kind,
            "config": asdict(self.config),
            "dataset": self.dataset,
            "n_parameters": self.n_parameters,
            "device": self.device,
            "initial": self.initial,
            "final": self.final,
            "distance": self.distance,
            "w0_norm": self.w0_norm,
            "diverged": self.diverged,
            "history": self.history,
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
        }


# --------------------------------------------------------------------------------------------------
# Losses and steps


def l2_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_i ½‖outputs_i − targets_i‖²: summed over outputs, averaged over samples."""
    return 0.5 * (outputs - targets).pow(2).sum() / outputs.shape[0]


def linearized_l2_gradient(model: nn.Module, params: dict[str, torch.Tensor], u: torch.Tensor,
                           x: torch.Tensor, y: torch.Tensor, layout=None,
                           method: str = "forward-ad") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∇_u loss) of the linearized network on one batch, without forming J.

    f_lin = f0 + J u, residual r = f_lin − y, loss = ½‖r‖²/|B| and ∇_u loss = Jᵀ r / |B| (no weight
    decay here). Two implementations, equal to rounding (bit for bit on the CPU in our tests):

    - "forward-ad" (default): one forward pass at w0 carrying u as the tangent (dual numbers) while
      autograd records the primal graph gives f0 and J u together; one backward pass of f0 with r
      as its gradient gives Jᵀ r. Cost: a forward, a tangent forward, a backward.
    - "jvp-vjp": ``torch.func.jvp`` then ``torch.func.vjp``, each with its own primal forward: one
      forward more; kept as the plain reference.
    """
    if method not in _GRADIENTS:
        raise ValueError(f"method must be one of {', '.join(_GRADIENTS)}, got {method!r}")
    layout = layout if layout is not None else parameter_layout(model)
    residual, grad = _GRADIENTS[method](model, params, unflatten(u, layout), x, y)
    batch = x.shape[0]
    return 0.5 * residual.pow(2).sum() / batch, grad.div_(batch)


def _gradient_jvp_vjp(model, params, tangent, x, y):
    f0, ju = jvp_outputs(model, params, x, tangent)
    residual = f0 + ju - y
    return residual, vjp_flat(model, params, x, residual)


def _gradient_forward_ad(model, params, tangent, x, y):
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        with fwAD.dual_level():
            dual = {name: fwAD.make_dual(leaves[name], tangent[name]) for name in leaves}
            f0, ju = fwAD.unpack_dual(functional_call(model, dual, (x,)))
            residual = f0.detach() + ju.detach() - y
        grads = torch.autograd.grad(f0, list(leaves.values()), grad_outputs=residual)
    return residual, torch.cat([g.reshape(-1) for g in grads])


_GRADIENTS = {"forward-ad": _gradient_forward_ad, "jvp-vjp": _gradient_jvp_vjp}


def _sgd_update(theta: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor | None, lr: float,
                momentum: float, weight_decay: float) -> torch.Tensor | None:
    """One step of torch.optim.SGD (no dampening, no Nesterov), in its order of operations."""
    if weight_decay != 0:
        grad = grad.add(theta, alpha=weight_decay)
    if momentum != 0:
        if buffer is None:
            buffer = grad.detach().clone()
        else:
            buffer.mul_(momentum).add_(grad)
        grad = buffer
    theta.add_(grad, alpha=-lr)
    return buffer


class _StandardTrainer:
    """w ← torch.optim.SGD on the L2 loss."""

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)

    def step(self, x, y, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = l2_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @property
    def u(self):
        return None

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def distance(self, w0: dict[str, torch.Tensor]) -> float:
        total = 0.0
        for name, p in self.model.named_parameters():
            total += (p.detach().cpu().double() - w0[name].double()).pow(2).sum().item()
        return math.sqrt(total)


class _LinearizedTrainer:
    """u ← SGD on the L2 loss of f0 + J u, matrix-free (one jvp and one vjp per batch)."""

    def __init__(self, model: nn.Module, config: TrainConfig):
        self.model = model
        self.config = config
        for p in model.parameters():
            p.requires_grad_(False)  # w0 is fixed; only u is trained
        self.params = initial_parameters(model)
        self.layout = parameter_layout(model)
        first = next(iter(self.params.values()))
        self.u = torch.zeros(sum(s.size for s in self.layout), dtype=first.dtype, device=first.device)
        self.buffer: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, x, y, lr: float) -> torch.Tensor:
        loss, grad = linearized_l2_gradient(self.model, self.params, self.u, x, y, self.layout)
        self.buffer = _sgd_update(self.u, grad, self.buffer, lr, self.config.momentum, self.config.weight_decay)
        return loss

    def state_dict(self) -> dict:
        return {"u": self.u, "momentum_buffer": self.buffer}

    def load_state_dict(self, state: dict):
        self.u.copy_(state["u"])
        self.buffer = None if state["momentum_buffer"] is None else state["momentum_buffer"].to(self.u).clone()

    def distance(self, w0) -> float:
        return self.u.double().norm().item()


_TRAINERS = {"standard": _StandardTrainer, "linearized": _LinearizedTrainer}


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _outputs(model: nn.Module, u: torch.Tensor | None, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """f(w, x) (u None) or f0 + J u (u given), batch by batch on the model's device; CPU result."""
    first = next(model.parameters())
    params = initial_parameters(model) if u is not None else None
    tangent = unflatten(u.to(first), parameter_layout(model)) if u is not None else None
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device=first.device, dtype=first.dtype)
        if u is None:
            out = model(xb)
        else:
            f0, ju = jvp_outputs(model, params, xb, tangent)
            out = f0 + ju
        parts.append(out.cpu())
    model.train(was_training)
    return torch.cat(parts)


def _split_metrics(model, u, split, batch_size: int, prefix: str) -> dict:
    from study.metrics import accuracy

    outputs = _outputs(model, u, split.x, batch_size)
    targets = split.targets.to(outputs.dtype)
    return {f"{prefix}_loss": l2_loss(outputs.double(), targets.double()).item(),
            f"{prefix}_acc": float(accuracy(outputs, targets))}


def _evaluate(model, u, dataset, batch_size: int) -> dict:
    return {**_split_metrics(model, u, dataset.train, batch_size, "train"),
            **_split_metrics(model, u, dataset.test, batch_size, "test")}


# --------------------------------------------------------------------------------------------------
# Setup, checkpoints


def initial_model(config: TrainConfig, dataset, device: torch.device | str = "cpu") -> nn.Module:
    """The network at w0 for this config and dataset, in the run's dtype, on ``device``.

    Both models of a pair start here, so they share w0 bit for bit (float64 runs share the float32
    draw of ``create_model`` cast exactly to float64).
    """
    model = create_model(config.arch, config.width, in_channels=dataset.in_channels,
                         n_outputs=dataset.n_outputs, image_size=dataset.image_size, seed=config.model_seed)
    return model.to(device=device, dtype=_DTYPES[config.dtype])


def dataset_fingerprint(dataset) -> dict:
    """What identifies the training problem: name, spec (less local paths), shapes, label hash."""
    spec = {k: v for k, v in (getattr(dataset, "spec", None) or {}).items()
            if not any(word in k for word in ("root", "path", "download"))}
    digest = hashlib.sha256()
    for split in (dataset.train, dataset.test):
        digest.update(np.ascontiguousarray(split.labels.numpy() if torch.is_tensor(split.labels) else split.labels,
                                           dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(split.targets.numpy(), dtype=np.float32).tobytes())
    return jsonable({
        "name": dataset.name,
        "spec": spec,
        "train_shape": list(dataset.train.x.shape),
        "test_shape": list(dataset.test.x.shape),
        "n_outputs": dataset.n_outputs,
        "labels_sha256": digest.hexdigest()[:16],
    })


def _check_resumable(checkpoint: dict, config: TrainConfig, model_kind: str, fingerprint: dict, path: Path):
    def mismatch(name, old, new):
        raise ValueError(f"{path} was made with {name}={old!r}, but this run asks for {name}={new!r}; "
                         f"use the same {name}, another run directory, or resume=False (--no-resume) to start over")

    if checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {checkpoint.get('format')!r}, expected {_CHECKPOINT_FORMAT}")
    if checkpoint["model_kind"] != model_kind:
        mismatch("model_kind", checkpoint["model_kind"], model_kind)
    saved, wanted = checkpoint["config"], asdict(config)
    for name in wanted:
        if name not in _RESUMABLE_FIELDS and saved.get(name) != wanted[name]:
            mismatch(name, saved.get(name), wanted[name])
    for name in fingerprint:
        old, new = checkpoint["dataset"].get(name), fingerprint[name]
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):  # name the field of the spec, not the whole spec
                name = next(f"{name}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
                old, new = old.get(name.split(".", 1)[1]), new.get(name.split(".", 1)[1])
            mismatch(f"dataset.{name}", old, new)
    if checkpoint["epochs_done"] > config.epochs:
        raise ValueError(f"{path} already holds {checkpoint['epochs_done']} epochs, more than the {config.epochs} asked "
                         f"for; ask for at least {checkpoint['epochs_done']} epochs or use another run directory")


def _load_checkpoint(path: Path, device) -> dict:
    """The checkpoint at ``path``; a truncated or damaged file is named as such, with the way out."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path} is truncated or damaged ({type(error).__name__}: {error}); checkpoints are written "
                         f"whole, so it was cut or altered after it was saved: delete it (or rerun with --no-resume) "
                         f"to start this run over") from None


def _atomic_write(path: Path, write):
    """Write through ``write(file)`` to a temporary file, then rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict):
    _atomic_write(path, lambda f: f.write((json.dumps(payload, indent=1) + "\n").encode()))


# --------------------------------------------------------------------------------------------------
# Training


def train(config: TrainConfig, dataset, model_kind: str = "standard", run_dir: str | os.PathLike | None = None,
          resume: bool = True, progress: bool = True) -> TrainResult:
    """Train the ``model_kind`` network ("standard" or "linearized") of ``config`` on ``dataset``.

    ``run_dir``: where the checkpoint (``checkpoint.pt``, after every epoch) and ``metrics.json``
    go; with ``resume`` an existing checkpoint is continued from its last completed epoch (its
    config must match this one except for epochs, device and eval_batch_size), without it the run
    starts over. ``progress``: a tqdm bar per epoch and one line per epoch on stderr.
    """
    if model_kind not in MODEL_KINDS:
        raise ValueError(f"model_kind must be one of {', '.join(MODEL_KINDS)}, got {model_kind!r}")
    run_device = resolve_device(config.device)
    with run_device.exact_float32():
        return _train(config, dataset, model_kind, run_dir, resume, progress, run_device.torch)


def _train(config: TrainConfig, dataset, model_kind: str, run_dir, resume: bool, progress: bool,
           device: torch.device) -> TrainResult:
    dtype = _DTYPES[config.dtype]
    model = initial_model(config, dataset, device)
    w0 = {name: p.detach().cpu().clone() for name, p in model.named_parameters()} if model_kind == "standard" else None
    w0_norm = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))
    trainer = _TRAINERS[model_kind](model, config)
    fingerprint = dataset_fingerprint(dataset)

    history, initial, diverged, epochs_done = [], None, False, 0
    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoint_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and checkpoint_path.exists():
            checkpoint = _load_checkpoint(checkpoint_path, device)
            _check_resumable(checkpoint, config, model_kind, fingerprint, checkpoint_path)
            trainer.load_state_dict(checkpoint["state"])
            history, initial = checkpoint["history"], checkpoint["initial"]
            diverged, epochs_done = checkpoint["diverged"], checkpoint["epochs_done"]

    def result() -> TrainResult:
        return TrainResult(config=config, model_kind=model_kind, dataset=fingerprint, history=history,
                           initial=initial, distance=trainer.distance(w0), w0_norm=w0_norm,
                           n_parameters=sum(p.numel() for p in model.parameters()), device=str(device),
                           diverged=diverged, model=model, u=trainer.u)

    if initial is None:
        initial = _evaluate(model, trainer.u, dataset, config.eval_batch_size)
    x_train, y_train = dataset.train.x, dataset.train.targets
    n_train = x_train.shape[0]
    n_batches = math.ceil(n_train / config.batch_size)
    for epoch in range(epochs_done, config.epochs):
        if diverged:
            break
        lr = step_learning_rate(config.lr, epoch, config.lr_step_epochs, 0.1)
        _synchronize(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        batches = minibatches(n_train, config.batch_size, config.batch_seed, epoch)
        batches = progress_bar(batches, enabled=progress, total=n_batches, leave=False,
                               desc=f"{model_kind} epoch {epoch + 1}/{config.epochs}")
        for indices in batches:
            index = torch.from_numpy(indices)
            x = x_train[index].to(device=device, dtype=dtype)
            y = y_train[index].to(device=device, dtype=dtype)
            loss_sum += trainer.step(x, y, lr).double() * len(indices)
        _synchronize(device)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        metrics = _evaluate(model, trainer.u, dataset, config.eval_batch_size)
        entry = {"epoch": epoch + 1, "lr": lr, **metrics, "batch_loss": loss_sum.item() / n_train,
                 "distance": trainer.distance(w0), "seconds": seconds,
                 "eval_seconds": time.perf_counter() - start}
        history.append(entry)
        if not all(math.isfinite(entry[k]) for k in ("train_loss", "batch_loss")):
            diverged = True
            warnings.warn(f"{model_kind} training diverged in epoch {epoch + 1} (train loss {entry['train_loss']}); "
                          f"stopping. Lower the learning rate (currently lr={config.lr}).", RuntimeWarning, stacklevel=2)
        if progress:
            print(_epoch_line(model_kind, entry), file=sys.stderr, flush=True)
        if run_dir is not None:
            state = {"format": _CHECKPOINT_FORMAT, "model_kind": model_kind, "config": asdict(config),
                     "dataset": fingerprint, "epochs_done": epoch + 1, "history": history, "initial": initial,
                     "diverged": diverged, "state": trainer.state_dict()}
            _atomic_write(checkpoint_path, lambda f: torch.save(state, f))
            _write_json(run_dir / METRICS_NAME, result().to_dict())
    out = result()
    if run_dir is not None:
        _write_json(run_dir / METRICS_NAME, out.to_dict())
    return out


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_line(model_kind: str, entry: dict) -> str:
    return (f"{model_kind:>10} epoch {entry['epoch']:>3}  lr {entry['lr']:.3g}  "
            f"train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.4f}  "
            f"test loss {entry['test_loss']:.4f} acc {entry['test_acc']:.4f}  "
            f"dist {entry['distance']:.4g}  {entry['seconds']:.1f}s")


# --------------------------------------------------------------------------------------------------
# Command line


def default_lr_step_epochs(dataset_name: str) -> int | None:
    """The study's schedule: ÷10 every 30 epochs for CIFAR-10 and snakes, none for MNIST and digits."""
    name = dataset_name.lower()
    return 30 if name.startswith(("cifar", "snake")) else None


def build_parser() -> argparse.ArgumentParser:
    from jacobian_store.arguments import add_data_arguments

    parser = argparse.ArgumentParser(
        prog="bin/train",
        description="Train a standard CNN and/or its linearization at initialization, "
                    "f_lin(u, x) = f(w0, x) + J(x) u (matrix-free: one jvp and one vjp per batch), "
                    "with SGD + momentum on the L2 loss to one-hot targets. Both models of a pair start from "
                    "the same w0 (--seed) and visit the same mini-batches.",
        epilog="Example: bin/train --dataset mnist --n-train 1000 --arch lenet --width 5 --model both "
               "--epochs 20 --lr 0.01 --out runs/lenet5. Rerunning the same command resumes from the last "
               "completed epoch; --epochs N on a finished run continues it to N epochs.")
    group = parser.add_argument_group("model and training")
    group.add_argument("--arch", default="lenet", choices=available_models(), help="architecture (default: lenet)")
    group.add_argument("--width", type=float, default=1.0, help="width factor k: multiplies every hidden channel and unit count (default: 1)")
    group.add_argument("--model", default="both", choices=("standard", "linearized", "both"),
                       help="which network to train; 'both' trains the pair, one after the other (default: both)")
    group.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    group.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default: 0.01)")
    group.add_argument("--weight-decay", type=float, default=0.0,
                       help="weight decay wd: adds wd·w to the gradient of the standard network, wd·u (not wd·(w0 + u)) "
                            "to that of the linearized one (default: 0)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, as torch.optim.SGD (no dampening, no Nesterov) (default: 0.9)")
    group.add_argument("--batch-size", type=int, default=32, help="mini-batch size; the last batch of an epoch may be shorter (default: 32)")
    group.add_argument("--lr-step", type=int, default=None,
                       help="divide the learning rate by 10 every this many epochs; 0: never; "
                            "default: 30 for CIFAR-10 and snakes, never for MNIST and digits")
    group.add_argument("--seed", type=int, default=0, help="seed of w0 and, unless --batch-seed is given, of the mini-batch order (default: 0)")
    group.add_argument("--batch-seed", type=int, default=None, help="seed of the mini-batch order (default: --seed)")
    group.add_argument("--float64", action="store_true", help="train in float64 (w0 is the float32 draw, cast exactly) (default: float32)")
    group.add_argument("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', … (default: auto)")
    group.add_argument("--eval-batch-size", type=int, default=256, help="batch size for evaluating the full splits after each epoch (default: 256)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, default=None,
                       help="run directory: OUT/<model>/checkpoint.pt (after every epoch), OUT/<model>/metrics.json "
                            "and OUT/summary.json; a rerun resumes from the last completed epoch (default: write nothing)")
    group.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    group.add_argument("--quiet", action="store_true", help="no progress bar and per-epoch lines")
    add_data_arguments(parser)
    return parser


def _summary_table(results: list[TrainResult]) -> str:
    header = f"{'model':>10} {'epochs':>6} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} " \
             f"{'distance':>10} {'s/epoch':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        final = r.final
        per_epoch = sum(h["seconds"] for h in r.history) / max(1, len(r.history))
        lines.append(f"{r.model_kind:>10} {final['epoch']:>6} {final['train_loss']:>10.4f} {final['train_acc']:>9.4f} "
                     f"{final['test_loss']:>9.4f} {final['test_acc']:>8.4f} {r.distance:>10.4g} {per_epoch:>8.2f}")
    return "\n".join(lines)


# Copies of the weights a training run holds: w (or w0 and u), the gradient, the momentum buffer,
# w0 kept for the distance, and the forward-mode tangents of the linearized step.
TRAIN_COPIES_PER_PARAMETER = 5


def main(argv: list[str] | None = None) -> list[TrainResult]:
    """bin/train: bad data, configuration or run directory exits with status 2 and one line saying why."""
    from jacobian_store.datasets import DatasetError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    except (DatasetError, ValueError, OSError) as error:
        parser.exit(2, f"bin/train: error: {error}\n")


def _main(parser, args) -> list[TrainResult]:
    from jacobian_store.build import check_model_fits
    from jacobian_store.datasets import dataset_from_args

    if not (math.isfinite(args.width) and args.width > 0):
        parser.error(f"--width must be a positive number, got {args.width}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a run directory (created if missing)")
    dataset = dataset_from_args(args)
    lr_step = args.lr_step if args.lr_step is not None else default_lr_step_epochs(dataset.name)
    config = TrainConfig(arch=args.arch, width=args.width, model_seed=args.seed, epochs=args.epochs, lr=args.lr,
                         weight_decay=args.weight_decay, batch_size=args.batch_size, lr_step_epochs=lr_step or None,
                         momentum=args.momentum, dtype="float64" if args.float64 else "float32", device=args.device,
                         batch_seed=args.batch_seed, eval_batch_size=args.eval_batch_size)
    check_model_fits(config.arch, config.width, dataset, TRAIN_COPIES_PER_PARAMETER * _DTYPES[config.dtype].itemsize,
                     "training", resolve_device(config.device).torch, "lower --width")
    kinds = MODEL_KINDS if args.model == "both" else (args.model,)
    if args.out is not None:
        _prepare_run_directory(args.out, kinds)
    results = []
    for kind in kinds:
        run_dir = args.out / kind if args.out is not None else None
        results.append(train(config, dataset, kind, run_dir=run_dir, resume=not args.no_resume,
                             progress=not args.quiet))
    print(f"{config.arch} ×{config.width:g} on {dataset.name} ({dataset.train.x.shape[0]} train, "
          f"{dataset.test.x.shape[0]} test), {results[0].n_parameters} parameters, {results[0].device}, {config.dtype}")
    print(_summary_table(results))
    if args.out is not None:
        _write_json(args.out / "summary.json", {"runs": [r.to_dict() for r in results]})
        print(f"metrics written to {args.out}")
    return results


def _prepare_run_directory(out: Path, kinds) -> None:
    """Create OUT and OUT/<model>, refusing (before any training) a path that cannot hold them."""
    for folder in (out, *(out / kind for kind in kinds)):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file, not a run directory; choose another --out")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the run directory {folder} ({error.strerror}); choose a writable --out") \
                from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"the run directory {folder} is not writable; choose a writable --out")


if __name__ == "__main__":
    main()
