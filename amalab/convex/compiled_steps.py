"""The training loop of :mod:`amalab.convex.training`, compiled with numba: the same steps, no Python per step.

The numpy loop (:func:`amalab.convex.training.numpy_advance`) is the reference: it runs the mixers of
:mod:`amalab.mixers` as they are. This kernel does the same arithmetic on the same random numbers, one
example at a time, for the mixers the convex lab builds (AMA-R and its simultaneous and DoReMi-style
presets, AMA-S and ODM, fixed mixtures); :mod:`amalab.convex.compiled_engine` hands it a training state as
flat arrays and stores the result back. Its numbers agree with the reference's to rounding
(tests/convex/test_convex_lab.py checks 1e-12 relative on every algorithm and loss): the order of a few
float sums differs (numpy's pairwise sums), and the DPO and logistic losses take their value and slope
from one exponential.

Per step and row, with the random numbers the numpy loop draws, in its order (docs/maths.md sections 3, 4,
5 and 8): draw the batch's tasks (inverse CDF of the mixer's distribution, or task-balanced) and examples;
margins m = u . a_z, losses l and slopes phi'(m); per-task (count, sum max(l - s, 0), sum l - s); the
mixer's coefficients c_z and update (AMA-R: exponentiated gradient on the clipped excess, before or after
the coefficients; AMA-S: EXP3 on the scaled excess); then u <- Proj(u - lr sum_z c_z phi'(m_z) a_z).
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: mixer kinds
AMA_R, AMA_S, FIXED = 0, 1, 2
#: the losses the kernel computes (its ``loss_kind`` is the index in this tuple)
LOSS_KINDS = ("dpo", "ipo", "hinge", "least_squares", "logistic")
#: the clips (``clip_kind``), in the order of amalab.mixers.excess.CLIPS
CLIP_KINDS = ("example", "task", "none")


@numba.njit(cache=True, error_model="numpy", inline="always")
def _softplus_and_sigmoid(x):
    """log(1 + exp(-x)) (numpy's logaddexp(0, -x)) and sigmoid(-x), from one exponential."""
    e = math.exp(-abs(x))
    if x > 0.0:
        return math.log1p(e), e / (1.0 + e)
    return -x + math.log1p(e), 1.0 / (1.0 + e)


@numba.njit(cache=True, error_model="numpy", inline="always")
def _loss_and_slope(loss_kind, m, y, beta):
    """phi(m) and phi'(m) of amalab.convex.losses (equal to rounding: one exponential for both)."""
    if loss_kind == 0:  # dpo: softplus(-h), slope -beta sigmoid(-h), h = beta m
        value, sigmoid = _softplus_and_sigmoid(beta * m)
        return value, beta * -sigmoid
    if loss_kind == 1:  # ipo: (h / beta - 1 / (2 beta))^2
        h = beta * m
        r = h / beta - 0.5 / beta
        return r ** 2, beta * (2.0 * r / beta)
    if loss_kind == 2:  # hinge: max(0, 1 - h), slope -1 left of the kink
        h = beta * m
        return max(0.0, 1.0 - h), beta * (-1.0 if h < 1.0 else 0.0)
    if loss_kind == 3:  # least squares
        return (m - y) ** 2, 2.0 * (m - y)
    value, sigmoid = _softplus_and_sigmoid(y * m)  # logistic: log(1 + exp(-y m)), slope -y sigmoid(-y m)
    return value, -y * sigmoid


@numba.njit(cache=True, error_model="numpy", inline="always")
def _task_excess(clip_kind, count, excess_sum, diff_sum):
    n = max(count, 1.0)
    if clip_kind == 0:
        return excess_sum / n
    diff = diff_sum / n
    return max(diff, 0.0) if clip_kind == 1 else diff


# The two sums below (margins, gradient) run four independent sums at once, each held in a register and
# summed in the order of the plain loop (so the numbers are bit for bit those of one sum at a time): one sum
# at a time is a chain of dependent additions, each waiting for the last, and costs about twice as long.

@numba.njit(cache=True, error_model="numpy", inline="always")
def _margins(u, r, features, rows, margins):
    """margins[r, j] = u_r . a_{rows[r, j]}, each summed over d = 0, 1, ... in order."""
    B, dim = rows.shape[1], u.shape[1]
    j = 0
    while j + 4 <= B:
        z0, z1, z2, z3 = rows[r, j], rows[r, j + 1], rows[r, j + 2], rows[r, j + 3]
        m0 = m1 = m2 = m3 = 0.0
        for d in range(dim):
            ud = u[r, d]
            m0 += ud * features[z0, d]
            m1 += ud * features[z1, d]
            m2 += ud * features[z2, d]
            m3 += ud * features[z3, d]
        margins[r, j], margins[r, j + 1], margins[r, j + 2], margins[r, j + 3] = m0, m1, m2, m3
        j += 4
    for j in range(j, B):
        m = 0.0
        for d in range(dim):
            m += u[r, d] * features[rows[r, j], d]
        margins[r, j] = m


@numba.njit(cache=True, error_model="numpy", inline="always")
def _gradient(weights, r, features, rows, grad):
    """grad[d] = sum_j weights[r, j] a_{rows[r, j], d}, each summed over j = 0, 1, ... in order."""
    B, dim = rows.shape[1], grad.shape[0]
    d = 0
    while d + 4 <= dim:
        g0 = g1 = g2 = g3 = 0.0
        for j in range(B):
            w, z = weights[r, j], rows[r, j]
            g0 += w * features[z, d]
            g1 += w * features[z, d + 1]
            g2 += w * features[z, d + 2]
            g3 += w * features[z, d + 3]
        grad[d], grad[d + 1], grad[d + 2], grad[d + 3] = g0, g1, g2, g3
        d += 4
    for d in range(d, dim):
        g = 0.0
        for j in range(B):
            g += weights[r, j] * features[rows[r, j], d]
        grad[d] = g


# Each phase below loops over every row itself: a call per step, not per row and step, because numba
# counts references to the arrays a call is given (atomic operations that would cost more than the step).

@numba.njit(cache=True, error_model="numpy")
def _draw_batches(kind, sampling, draws, t, log_w, gamma, mixture, probs, cdf, balanced, offsets, sizes, ids, rows):
    """Task and example of every slot of every row, from the uniforms the numpy loop draws: the inverse CDF
    of the mixer's distribution (EXP3's (1 - gamma) softmax(log w) + gamma / k, or the mixture), or balanced."""
    n_rows, B = ids.shape
    k = cdf.shape[0]
    last = draws.shape[1] - 1
    for r in range(n_rows):
        if kind == AMA_S:
            top = -np.inf
            for i in range(k):
                top = max(top, log_w[r, i])
            total = 0.0
            for i in range(k):
                probs[r, i] = math.exp(log_w[r, i] - top)
                total += probs[r, i]
            for i in range(k):
                probs[r, i] = (1.0 - gamma[r]) * (probs[r, i] / total) + gamma[r] / k
        elif sampling:
            for i in range(k):
                probs[r, i] = mixture[i]
        if sampling:
            acc = 0.0
            for i in range(k):
                acc += probs[r, i]
                cdf[i] = acc
            cdf[k - 1] = np.inf  # rounding must never push a draw past the last task
        for j in range(B):
            if sampling:
                x = draws[t, 0, r, j]
                c = 0
                for i in range(k):
                    if x >= cdf[i]:
                        c += 1
            else:
                c = balanced[j]
            ids[r, j] = c
            rows[r, j] = offsets[c] + np.int64(draws[t, last, r, j] * sizes[c])


@numba.njit(cache=True, error_model="numpy")
def _losses_and_statistics(loss_kind, clip_kind, u, features, targets, refs, beta, ids, rows, losses, slopes, base,
                           stats, last_g):
    """Losses, slopes and baseline losses of every row's batch, its per-task (count, excess sum, difference
    sum) and the estimate g of E_i; returns whether every loss and baseline loss is finite."""
    n_rows, B = ids.shape
    dim, k = u.shape[1], stats.shape[2]
    finite = True
    for r in range(n_rows):
        for i in range(k):
            stats[r, 0, i] = 0.0
            stats[r, 1, i] = 0.0
            stats[r, 2, i] = 0.0
        _margins(u, r, features, rows, losses)
        for j in range(B):
            z = rows[r, j]
            losses[r, j], slopes[r, j] = _loss_and_slope(loss_kind, losses[r, j], targets[z], beta)
            base[r, j] = refs[z] if refs.shape[0] else 0.0
            finite = finite and np.isfinite(losses[r, j]) and np.isfinite(base[r, j])
            i = ids[r, j]
            stats[r, 0, i] += 1.0
            stats[r, 1, i] += max(losses[r, j] - base[r, j], 0.0)
            stats[r, 2, i] += losses[r, j] - base[r, j]
        for i in range(k):
            last_g[r, i] = _task_excess(clip_kind, stats[r, 0, i], stats[r, 1, i], stats[r, 2, i])
    return finite


@numba.njit(cache=True, error_model="numpy")
def _ama_r(update_first, simultaneous, log_w, w_sum, g, eta, smoothing, stats, coeff):
    """Exponentiated gradient on g (amalab.mixers.exponentiated_gradient), the running sum of the alphas
    theta steps with (alpha_t simultaneous, alpha_{t+1} sequential) and the per-task coefficients a_i / n_i."""
    n_rows, k = log_w.shape
    for r in range(n_rows):
        if not update_first:
            for i in range(k):
                coeff[r, i] = math.exp(log_w[r, i])
            if simultaneous:
                for i in range(k):
                    w_sum[r, i] += coeff[r, i]
        top = -np.inf
        for i in range(k):
            log_w[r, i] = log_w[r, i] + eta[r] * g[r, i]
            top = max(top, log_w[r, i])
        total = 0.0
        for i in range(k):
            log_w[r, i] -= top
            total += math.exp(log_w[r, i])
        log_total = math.log(total)
        for i in range(k):
            log_w[r, i] -= log_total
            if smoothing[r] > 0.0:  # numpy's logaddexp(log(1 - c) + log w, log(c / k))
                a, b = math.log1p(-smoothing[r]) + log_w[r, i], math.log(smoothing[r] / k)
                log_w[r, i] = a + math.log1p(math.exp(b - a)) if a > b else b + math.log1p(math.exp(a - b))
        if update_first:
            for i in range(k):
                coeff[r, i] = math.exp(log_w[r, i])
                w_sum[r, i] += coeff[r, i]
        for i in range(k):
            coeff[r, i] = coeff[r, i] / max(stats[r, 0, i], 1.0)


@numba.njit(cache=True, error_model="numpy")
def _ama_s(log_w, w_sum, probs, g, stats, eta, scale, running, coeff):
    """EXP3 on x_i = n_i g_i / (B scale), clipped into [0, 1] (amalab.mixers.ama_s), ``probs`` the p the
    batch was drawn from, and the coefficients 1 / B; returns the number of gains clipped."""
    n_rows, k = log_w.shape
    clipped = 0
    for r in range(n_rows):
        batch = 0.0
        for i in range(k):
            batch += stats[r, 0, i]
        if running:
            for i in range(k):
                scale[r] = max(scale[r], g[r, i])
        divisor = batch * (scale[r] if scale[r] > 0.0 else 1.0)
        top = -np.inf
        for i in range(k):
            coeff[r, i] = 1.0 / batch
            x = stats[r, 0, i] * g[r, i] / divisor
            if x < 0.0 or x > 1.0 + 1e-12:
                clipped += 1
            w_sum[r, i] += probs[r, i]
            log_w[r, i] = log_w[r, i] + eta[r] * (min(max(x, 0.0), 1.0) / probs[r, i])
            top = max(top, log_w[r, i])
        for i in range(k):
            log_w[r, i] -= top
    return clipped


@numba.njit(cache=True, error_model="numpy")
def _projected_steps(checks_active, clip_kind, features, ids, rows, losses, slopes, base, stats, coeff, lr, radius,
                     u, u_sum):
    """grad = sum_z c_z phi'(m_z) a_z (c_z = 0 where the clipped excess is flat), u_sum += u (the points the
    gradients were taken at), then u <- Proj(u - lr grad) onto the ball ||u|| <= radius, for every row."""
    n_rows, B = ids.shape
    dim = u.shape[1]
    grad = np.empty(dim)
    for r in range(n_rows):
        for j in range(B):  # c_z phi'(m_z), into slopes (not needed after this step)
            i = ids[r, j]
            c = coeff[r, i]
            if checks_active:
                if clip_kind == 0 and not losses[r, j] > base[r, j]:
                    c = 0.0
                elif clip_kind == 1 and not stats[r, 2, i] / max(stats[r, 0, i], 1.0) > 0.0:
                    c = 0.0
            slopes[r, j] = c * slopes[r, j]
        _gradient(slopes, r, features, rows, grad)
        norm2 = 0.0
        for d in range(dim):
            u_sum[r, d] += u[r, d]
            u[r, d] = u[r, d] - lr[r] * grad[d]
            norm2 += u[r, d] * u[r, d]
        shrink = min(1.0, radius / max(math.sqrt(norm2), 1e-300))
        for d in range(dim):
            u[r, d] = u[r, d] * shrink


@numba.njit(cache=True, error_model="numpy")
def run_steps(kind, loss_kind, clip_kind, full_batch, sampling, update_first, simultaneous, objective_loss,
              features, targets, task_of, offsets, sizes, refs, beta, radius, lr,
              u, u_sum, log_w, w_sum, last_g, eta, smoothing, gamma, scale, running, mixture,
              draws, n_steps, batch_size, first_step):
    """``n_steps`` steps of every row, in place; ``draws`` (steps, 2 or 1, rows, B) holds the uniforms
    the numpy loop draws (task draws first when ``sampling``). Returns (first step with a non-finite
    loss or -1, gains clipped)."""
    n_rows = u.shape[0]
    k = sizes.shape[0]
    B = task_of.shape[0] if full_batch else batch_size
    ids, rows = np.empty((n_rows, B), np.int64), np.empty((n_rows, B), np.int64)
    for r in range(n_rows):
        for j in range(B):
            ids[r, j], rows[r, j] = (task_of[j], j) if full_batch else (0, 0)
    balanced = np.arange(B) // max(B // k, 1)
    losses, slopes, base = np.empty((n_rows, B)), np.empty((n_rows, B)), np.empty((n_rows, B))
    stats, probs, cdf, coeff = np.zeros((n_rows, 3, k)), np.zeros((n_rows, k)), np.empty(k), np.empty((n_rows, k))
    clipped_total, bad_step = 0, -1
    checks_active = kind == AMA_S or (kind == AMA_R and not objective_loss)
    for t in range(n_steps):
        if not full_batch:
            _draw_batches(kind, sampling, draws, t, log_w, gamma, mixture, probs, cdf, balanced, offsets, sizes,
                          ids, rows)
        if not _losses_and_statistics(loss_kind, clip_kind, u, features, targets, refs, beta, ids, rows, losses,
                                      slopes, base, stats, last_g) and bad_step < 0:
            bad_step = first_step + t
        # the mixer: its coefficients and its update (AMA-R sequential: update first)
        if kind == AMA_R:
            _ama_r(update_first, simultaneous, log_w, w_sum, last_g, eta, smoothing, stats, coeff)
        elif kind == AMA_S:
            clipped_total += _ama_s(log_w, w_sum, probs, last_g, stats, eta, scale, running, coeff)
        else:
            for r in range(n_rows):
                total = 0.0
                for i in range(k):
                    total += stats[r, 0, i]
                for i in range(k):
                    coeff[r, i] = 1.0 / total if sampling else mixture[i] / max(stats[r, 0, i], 1.0)
        _projected_steps(checks_active, clip_kind, features, ids, rows, losses, slopes, base, stats, coeff, lr,
                         radius, u, u_sum)
    return bad_step, clipped_total
