"""Mini-batch SGD with momentum on the linearized model, batch for batch like network training.

Objective of one mini-batch B of samples (all L rows of a sample together, J_i its L × p rows):

    ℓ_B(u) = (1/|B|) Σ_{i∈B} ½ ‖J_i u − r_i‖²  +  ½ · wd · ‖u‖²

Update, exactly ``torch.optim.SGD(momentum=μ, weight_decay=wd)`` without dampening or Nesterov
(the first step initializes the buffer to the gradient, which equals μ·0 + g):

    g = (1/|B|) J_Bᵀ (J_B u − r_B) + wd · u
    b ← μ b + g
    u ← u − η_e b,        η_e = step_learning_rate(lr, epoch e, lr_step, lr_gamma)

The batches of epoch e are ``solvers.minibatches.minibatches(n, batch_size, seed, e)``: the same
order the standard and the matrix-free linearized networks use, so the three runs see the same
samples at the same step. μ = 0.9 and batch size 32 by default, as in the study.

Stationary point. Averaged over an epoch of equal-sized batches the gradient is the full-batch
gradient (1/n) Jᵀ(J u − r) + wd·u, which vanishes, and at a fixed point the momentum buffer is
g/(1 − μ) = 0, exactly when

    (JᵀJ + n·wd·I) u = Jᵀ r,

i.e. at the ridge solution with λ = n · wd. With a small or decaying step SGD approaches it
(exactly so for full batches); with wd = 0 and u₀ = 0 it stays in range(Jᵀ) and approaches the
minimum-norm least-squares solution. Epochs are the implicit regularizer; ``sgd_path`` snapshots
u at requested epochs of one run.

``loss_curve[e]`` is the mean over epoch e's batches of the data term of ℓ_B before each step
(without the weight-decay term), as a training loop logs it; it is monitoring, not a stopping rule.

Stopping rule and what "converged" means (stop codes of ``solvers.result``): SGD runs all its
epochs (code 5; code 4 for a path's epoch counts). It converged when, besides, the full-data
residual did not grow:

    ‖J u_E − r‖ ≤ ‖J u₀ − r‖          (u₀ = 0 unless warm-started: ‖J u₀ − r‖ = ‖r‖)

Otherwise the step was too large and the run diverged: a non-finite loss or u stops the run at
once, and a final residual above the initial one is caught after the last epoch; both raise
``SolverDivergedError`` naming the learning rate, never a result that could be saved. (An SGD
run whose loss only fell over the epochs but is still large is not diverged: it converged in this
sense and its ‖J u − r‖ says how far it got.)
"""
from __future__ import annotations

import numpy as np

from jacobian_store.device import module_for_device, scalar
from jacobian_store.progress import progress_bar
from .minibatches import minibatches, step_learning_rate
from .result import ALL_EPOCHS, KNOB_REACHED, SolverDivergedError, finish


def sgd_run(op, r, *, lr, weight_decay=0.0, epochs=1, batch_size=32, lr_step=None, lr_gamma=0.1,
            momentum=0.9, seed=0, x0=None, device="cpu", snapshot_epochs=(), progress=False):
    """Run SGD; return (u, info, {epoch: u snapshot}) where epoch e means after e epochs."""
    xp = module_for_device(device)
    L, n, p = op.n_outputs, op.n_samples, op.shape[1]
    r = xp.asarray(r, dtype=np.float64)
    u = xp.zeros(p, dtype=np.float64) if x0 is None else xp.array(x0, dtype=np.float64)
    buf = None
    offsets = np.arange(L)
    snapshot_epochs = set(int(e) for e in snapshot_epochs)
    snapshots = {0: u.copy()} if 0 in snapshot_epochs else {}
    loss_curve, lrs = [], []
    done = 0
    n_batches = -(-n // batch_size)
    bar = progress_bar(total=epochs * n_batches, desc="SGD", unit="batch", enabled=progress)
    for epoch in range(epochs):
        eta = step_learning_rate(lr, epoch, lr_step, lr_gamma)
        lrs.append(eta)
        total = 0.0
        for batch in minibatches(n, batch_size, seed, epoch):
            rows = (batch[:, None] * L + offsets).ravel()
            JB = xp.asarray(op.take_rows(rows)).astype(np.float64, copy=False)
            err = JB @ u - r[xp.asarray(rows)]
            g = (JB.T @ err) / len(batch)
            loss = 0.5 * scalar(err @ err) / len(batch)
            if weight_decay:
                g += weight_decay * u
            buf = g if buf is None else momentum * buf + g
            u -= eta * buf
            total += loss
            bar.update(1)
        done = epoch + 1
        loss_curve.append(total / n_batches)
        if done in snapshot_epochs:
            snapshots[done] = u.copy()
        if not (np.isfinite(loss_curve[-1]) and bool(xp.isfinite(u).all())):
            bar.close()
            raise SolverDivergedError(
                f"sgd diverged in epoch {epoch} (mean batch loss {loss_curve[-1]:.3g}, non-finite u or loss): "
                f"the step is too large; lower lr (currently {lr}, epoch {epoch} used {eta:g}) or momentum "
                f"(currently {momentum})")
    bar.close()
    info = {"loss_curve": loss_curve, "learning_rates": lrs, "epochs_run": done, "n_steps": done * n_batches}
    return u, info, snapshots


def _initial_residual_norm(op, r, x0, xp) -> float:
    """‖J u₀ − r‖: ‖r‖ from u₀ = 0, else one product with J."""
    r = xp.asarray(r, dtype=np.float64)
    if x0 is None:
        return scalar(xp.linalg.norm(r))
    return scalar(xp.linalg.norm(op.matvec(xp.asarray(x0, dtype=np.float64)) - r))


def _raise_if_loss_rose(final: float, initial: float, epochs: int, lr, momentum) -> None:
    if final > initial:
        raise SolverDivergedError(
            f"sgd diverged: after {epochs} epochs ‖J u − r‖ = {final:.4g} is above its initial {initial:.4g} "
            f"(the loss rose by {(final / initial) ** 2 if initial else float('inf'):.3g}×); the step is too "
            f"large: lower lr (currently {lr}) or momentum (currently {momentum})")


def _solve_sgd(op, r, *, lr, weight_decay=0.0, epochs=1, batch_size=32, lr_step=None, lr_gamma=0.1,
               momentum=0.9, seed=0, x0=None, device="cpu", progress=False):
    u, info, _ = sgd_run(op, r, lr=lr, weight_decay=weight_decay, epochs=epochs, batch_size=batch_size,
                         lr_step=lr_step, lr_gamma=lr_gamma, momentum=momentum, seed=seed, x0=x0,
                         device=device, progress=progress)
    extras = {k: info[k] for k in ("loss_curve", "learning_rates", "epochs_run", "n_steps")}
    extras["equivalent_ridge_lambda"] = weight_decay * op.n_samples  # stationary point: ridge, λ = n·wd
    initial = _initial_residual_norm(op, r, x0, module_for_device(device))
    extras["initial_residual_norm"] = initial
    result = finish(op, r, u, None, method="sgd", form="minibatch", stop_code=ALL_EPOCHS,
                    stop_reason=f"all epochs run ({epochs})", n_iter=info["n_steps"], extras=extras)
    _raise_if_loss_rose(result.residual_norm, initial, epochs, lr, momentum)
    return result


def sgd_path(op, r, epochs_list, *, device="cpu", progress=False, **options):
    """u after each number of epochs in ``epochs_list``, from one run of max(epochs_list) epochs."""
    epochs_list = [int(e) for e in epochs_list]
    options.pop("epochs", None)
    _, info, snaps = sgd_run(op, r, epochs=max(epochs_list), snapshot_epochs=epochs_list, device=device,
                             progress=progress, **options)
    xp = module_for_device(device)
    n_batches = -(-op.n_samples // options.get("batch_size", 32))
    initial = _initial_residual_norm(op, r, options.get("x0"), xp)
    F = op.matmat(xp.stack([snaps[e] for e in epochs_list], axis=1))
    residuals = [scalar(xp.linalg.norm(F[:, j] - xp.asarray(r))) for j in range(len(epochs_list))]
    # the run as a whole diverged when its last iterate sits above the start; an earlier epoch
    # count above it (momentum overshoot) is reported as not converged
    _raise_if_loss_rose(residuals[epochs_list.index(max(epochs_list))], initial, max(epochs_list),
                        options.get("lr"), options.get("momentum", 0.9))
    out = []
    for j, e in enumerate(epochs_list):
        ok = residuals[j] <= initial
        why = f"requested epoch count reached ({e})" + ("" if ok else "; loss above the initial loss")
        out.append(finish(op, r, snaps[e], F[:, j], method="sgd", form="minibatch", stop_code=KNOB_REACHED,
                          stop_reason=why, converged=ok, n_iter=e * n_batches,
                          extras={"epochs": e, "loss_curve": info["loss_curve"][:e], "initial_residual_norm": initial,
                                  "equivalent_ridge_lambda": options.get("weight_decay", 0.0) * op.n_samples}))
    return out
