"""The compiled engine of :mod:`amalab.convex.training`: which mixers the numba kernel of
:mod:`amalab.convex.compiled_steps` runs, a training state and its mixer as the kernel's flat per-row arrays,
and the mixer left afterwards in the state the numpy loop's steps would leave it in.

The kernel draws no random numbers itself: :func:`compiled_advance` draws the uniforms the numpy loop would
draw, in its order, and hands them over, so both engines give the same numbers (to rounding).
"""

from __future__ import annotations

import numpy as np

from amalab.convex.compiled_steps import AMA_R, AMA_S, CLIP_KINDS, FIXED, LOSS_KINDS, run_steps
from amalab.mixers import AMAR, AMAS, FixedMixture


def compiled_kind(mixer) -> int | None:
    """The kernel's kind for ``mixer``, or None if the kernel does not run it (then numpy does)."""
    if len(mixer.batch_shape) != 1:
        return None
    if type(mixer) is AMAR:
        return AMA_R
    if type(mixer) is AMAS and mixer.draw_per == "example":
        return AMA_S
    if type(mixer) is FixedMixture:
        return FIXED
    return None


def _mixer_arrays(mixer, kind: int, n_rows: int) -> dict:
    """The mixer's state and hyperparameters as the kernel's flat per-row arrays (copies)."""
    k = mixer.k
    zeros = np.zeros(n_rows)
    if kind == AMA_R:
        return dict(log_w=mixer.eg.log_weights.copy(), w_sum=mixer.alpha_sum.copy(), eta=mixer.eg.eta[:, 0].copy(),
                    smoothing=mixer.eg.smoothing[:, 0].copy(), gamma=zeros, scale=zeros.copy(), running=False,
                    mixture=np.zeros(k), sampling=False, update_first=mixer.update_first,
                    simultaneous=mixer.simultaneous, objective_loss=mixer.objective == "loss")
    if kind == AMA_S:
        return dict(log_w=mixer.exp3.log_weights.copy(), w_sum=mixer.probs_sum.copy(),
                    eta=mixer.exp3.eta[:, 0].copy(), smoothing=zeros, gamma=mixer.exp3.gamma[:, 0].copy(),
                    scale=mixer.scale[:, 0].copy(), running=mixer.running_scale, mixture=np.zeros(k),
                    sampling=True, update_first=False, simultaneous=False, objective_loss=False)
    return dict(log_w=np.zeros((n_rows, k)), w_sum=np.zeros((n_rows, k)), eta=zeros, smoothing=zeros,
                gamma=zeros, scale=zeros.copy(), running=False, mixture=mixer.mixture.copy(),
                sampling=mixer.sampling, update_first=False, simultaneous=False, objective_loss=False)


def _store_mixer_arrays(mixer, kind: int, arrays: dict, last_g: np.ndarray, n_steps: int, clipped: int) -> None:
    """Leave ``mixer`` in the state the numpy loop's ``n_steps`` calls of ``mixer.step`` would."""
    mixer.steps = np.asarray(int(mixer.steps) + n_steps, dtype=np.int64)
    if kind == AMA_R:
        mixer.eg.log_weights, mixer.alpha_sum, mixer.last_excess = arrays["log_w"], arrays["w_sum"], last_g
    elif kind == AMA_S:
        mixer.exp3.log_weights, mixer.probs_sum, mixer.last_excess = arrays["log_w"], arrays["w_sum"], last_g
        mixer.scale = arrays["scale"][:, None].copy()
        mixer.clipped_gains = np.asarray(int(mixer.clipped_gains) + clipped, dtype=np.int64)


def compiled_advance(state, n_steps: int) -> None:
    """Advance a :class:`amalab.convex.training.TrainingState` by ``n_steps`` steps with the kernel."""
    problem, mixer = state.problem, state.mixer
    kind = compiled_kind(mixer)
    n_rows = state.u.shape[0]
    arrays = _mixer_arrays(mixer, kind, n_rows)
    full_batch = state.batch_size is None
    if full_batch:
        draws = np.zeros((0, 1, n_rows, 1))
    else:  # the uniforms the numpy loop draws, in its order: task draws (if sampled), then examples
        per_step = 2 if arrays["sampling"] else 1
        draws = state.rng.random((n_steps, per_step, n_rows, state.batch_size))
    refs = np.zeros(0) if state.refs is None else np.ascontiguousarray(state.refs, dtype=float)
    last_g = np.zeros((n_rows, mixer.k))
    bad_step, clipped = run_steps(
        kind, LOSS_KINDS.index(problem.loss.name), CLIP_KINDS.index(getattr(mixer, "clip", "none")), full_batch,
        arrays["sampling"], arrays["update_first"], arrays["simultaneous"], arrays["objective_loss"],
        np.ascontiguousarray(problem.features, dtype=float), np.ascontiguousarray(problem.targets, dtype=float),
        np.ascontiguousarray(problem.task, dtype=np.int64), np.ascontiguousarray(problem.offsets, dtype=np.int64),
        np.ascontiguousarray(problem.sizes, dtype=np.int64), refs, float(problem.beta), float(problem.radius),
        np.ascontiguousarray(state.lr[:, 0]), state.u, state.u_sum, arrays["log_w"], arrays["w_sum"], last_g,
        arrays["eta"], arrays["smoothing"], arrays["gamma"], arrays["scale"], arrays["running"],
        arrays["mixture"], draws, n_steps, state.batch_size or 0, state.done)
    if bad_step >= 0:
        raise ValueError(f"step {bad_step + 1}: a loss or baseline loss is not finite")
    _store_mixer_arrays(mixer, kind, arrays, last_g, n_steps, clipped)
    state.done += n_steps
