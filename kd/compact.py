"""The compact soft-label format: top-k logits + the tail's log-partition on a grid of 1/T.

A top-k cache renormalised over its k logits optimises another objective as soon as
T != 1 (the tail's share of p_T grows fast with T: BENCHMARKS.md, soft labels). This
format keeps, per token, the teacher's k largest raw logits z_S (fp16) and their ids,
plus the log-partition of the *rest* of the vocabulary

    B(b) = logsumexp_{j not in S} (b * z_j)          and its slope   B'(b) = E_{tail, b}[z]

at a grid of inverse temperatures b = 1/T (fp32, 8 bytes per grid point). At a training
temperature T on the grid, with b = 1/T and A(b) = logaddexp(logsumexp(b * z_S), B(b))
the full log-partition,

    head  log p_T(i) = b z_i - A(b)        exact for every kept token,
    tail  log p_T(tail) = B(b) - A(b)      exact (no 1 - sum cancellation),

so every divergence of :mod:`kd.losses` is computed exactly on the k + 1 buckets (the kept
tokens and one tail bucket; the student's bucket is its mass outside S). The issue asks
for A(b); storing the tail's B(b) is the same information (A = logaddexp(head, B)) with a
tail mass that keeps its relative precision when it is tiny (T < 1).

Between grid points B is interpolated by a cubic Hermite spline in b (B is convex in b,
a log-partition function; B' gives the slopes). The error is measured by
``bench/topk_exactness.py`` (``interp`` rows); a temperature outside the grid is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def temperature_grid(t_min: float, t_max: float, points: int) -> tuple[float, ...]:
    """Inverse temperatures b = 1/T, ascending, geometric from 1/t_max to 1/t_min.

    Geometric because B's curvature in b grows as b -> 0 no faster than the spacing
    shrinks, and sweeps sample T on a log scale. ``points = 1`` needs t_min = t_max.
    """
    if not 0 < t_min <= t_max:
        raise ValueError(f"temperature grid [{t_min}, {t_max}] is not allowed: need 0 < t_min <= t_max")
    if points < 1 or (points == 1 and t_min != t_max) or (points > 1 and t_min == t_max):
        raise ValueError(f"grid points={points} is not allowed for [{t_min}, {t_max}]: need >= 2 (1 when t_min = t_max)")
    if points == 1:
        return (1.0 / t_min,)
    lo, hi = math.log(1.0 / t_max), math.log(1.0 / t_min)
    return tuple(math.exp(lo + (hi - lo) * i / (points - 1)) for i in range(points))


def tail_log_partition(logits: Tensor, indices: Tensor, betas: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """B(b) and B'(b) of the logits outside the kept ids, at each b of ``betas``.

    Args:
        logits: raw teacher logits (N, V), any float dtype (computed in fp32; pass the
            fp16-rounded logits to match what a dense fp16 cache would hold).
        indices: the kept ids (N, k) int64.
        betas: inverse temperatures (G,).

    Returns:
        ``(lse (N, G), slope (N, G))`` fp32; an empty tail (k = V, or only -inf logits
        outside S) has lse = -inf and slope = 0.
    """
    z = logits.float().scatter(-1, indices, -math.inf)  # (N, V): the tail only
    lse, slope = [], []
    for b in betas:
        bz = z * b
        a = torch.logsumexp(bz, dim=-1, keepdim=True)  # (N, 1)
        w = (bz - torch.where(torch.isfinite(a), a, 0.0)).exp_()  # tail softmax at b; 0 on S
        lse.append(a.squeeze(-1))
        slope.append(torch.where(w > 0, w * z, 0.0).sum(-1))  # E_b[z] over the tail, 0 * -inf -> 0
    return torch.stack(lse, -1), torch.stack(slope, -1)


def compress(logits: Tensor, k: int, betas: tuple[float, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(values (N, k) fp16, indices (N, k) int64, tail_lse (N, G), tail_slope (N, G))``.

    The tail is that of the fp16-rounded logits, so head and tail describe one vector.
    """
    z = logits.half().float()
    values, indices = z.topk(k, dim=-1)
    lse, slope = tail_log_partition(z, indices, betas)
    return values.half(), indices, lse, slope


def interpolate(tail_lse: Tensor, tail_slope: Tensor | None, betas: tuple[float, ...], b: float) -> Tensor:
    """B(b) from its grid: exact at a grid point, cubic Hermite in between.

    Args:
        tail_lse: (..., G) B at ``betas``.
        tail_slope: (..., G) B' at ``betas``; None allows grid points only.
        betas: the grid (G,), ascending.
        b: 1 / temperature.

    Returns:
        (...,) fp32.

    Raises:
        ValueError: ``b`` outside the grid, or between points without slopes.
    """
    for g, beta in enumerate(betas):
        if math.isclose(b, beta, rel_tol=1e-9):
            return tail_lse[..., g].float()
    if not betas[0] < b < betas[-1]:
        raise ValueError(f"temperature={1 / b:g} is not allowed: the soft-label cache's grid covers "
                         f"T in [{1 / betas[-1]:g}, {1 / betas[0]:g}] "
                         "(teacher.grid_min_temperature, teacher.grid_max_temperature)")
    if tail_slope is None:
        raise ValueError(f"temperature={1 / b:g} is not on the grid {[round(1 / x, 4) for x in betas]} "
                         "and the cache stores no slopes to interpolate with")
    g = max(i for i, beta in enumerate(betas) if beta < b)
    b0, b1 = betas[g], betas[g + 1]
    h, t = b1 - b0, (b - b0) / (b1 - b0)
    y0, y1 = tail_lse[..., g].float(), tail_lse[..., g + 1].float()
    d0, d1 = tail_slope[..., g].float(), tail_slope[..., g + 1].float()
    empty = ~(torch.isfinite(y0) & torch.isfinite(y1))  # no tail: nothing to interpolate
    y0, y1 = torch.where(empty, 0.0, y0), torch.where(empty, 0.0, y1)
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    out = h00 * y0 + h10 * h * d0 + h01 * y1 + h11 * h * d1
    return torch.where(empty, -math.inf, out)


def bucket_log_probs(values: Tensor, tail_lse: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's tempered (k + 1)-bucket log-probs: head (N, k) and tail (N,).

    Args:
        values: raw top-k logits (N, k).
        tail_lse: B(1/T) (N,), the tail's log-partition at this temperature.
    """
    head = values.float() / temperature  # (N, k)
    log_a = torch.logaddexp(torch.logsumexp(head, -1), tail_lse)  # (N,) full log-partition A(1/T)
    return head - log_a.unsqueeze(-1), tail_lse - log_a


# --- The sampled tail (RS-KD, Anshumann et al. 2025) -------------------------------------
#
# The k + 1 buckets give the tail its exact mass but no shape: at T >= 4 most of p_T is in
# the tail, and the bucket divergence cannot tell the student which tail tokens to raise
# (grad_cos 0.52 at T = 4, V = 32k, k = 64: BENCHMARKS.md). So the format may also keep, per
# token, S ids drawn with replacement from the teacher's tail at a proposal temperature
# T_p (r(j) proportional to exp(z_j / T_p) outside the kept ids) with their raw logits. At a
# training temperature T the tail's part of p_T is then estimated by self-normalised
# importance weights: sample s gets p_tail * w_s / sum(w), w_s = exp((1/T - 1/T_p) z_s)
# (r's normaliser cancels, so nothing more is stored). The estimate of the tail's gradient
# is consistent and its bias O(1/S); at T = T_p the weights are equal (RS-KD's own case)
# and the estimate is unbiased. The head and the tail's mass stay exact. The loss adds a
# control variate to that estimate's gradient (the student's own tail, known exactly, minus
# its estimate from the same samples: :mod:`kd.losses_fused`), which cut its variance at
# high T by a large factor (grad_cos at T = 8 from 0.23-0.95 to 0.72-0.998: BENCHMARKS.md).


def sample_tail(logits: Tensor, indices: Tensor, samples: int, proposal_temperature: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``samples`` ids per row drawn from the teacher's tail at ``proposal_temperature``.

    Args:
        logits: raw teacher logits (N, V) (their fp16 rounding is used, as in :func:`compress`).
        indices: the kept ids (N, k) int64, excluded from the draw.
        samples: S >= 1 draws per row, with replacement.
        proposal_temperature: T_p > 0 of the proposal r(j) ~ exp(z_j / T_p) on the tail.
        generator: for reproducible draws (a cache must not change between builds).

    Returns:
        ``(ids (N, S) int64, values (N, S) fp16)``: the drawn ids and their raw logits. A row
        whose tail is empty (only -inf logits outside S) gets the first kept id with a -inf
        value, which carries zero weight.
    """
    z16 = logits.half().float()  # what the head and the grid were computed from
    log_r = torch.log_softmax(z16.scatter(-1, indices, -math.inf) / proposal_temperature, dim=-1)  # tail only
    empty = ~torch.isfinite(log_r).any(-1)  # (N,)
    probs = torch.where(empty.unsqueeze(-1), 1.0, log_r.exp())  # any valid rows for multinomial
    ids = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (N, S)
    ids = torch.where(empty.unsqueeze(-1), indices[:, :1], ids)
    values = torch.where(empty.unsqueeze(-1), -math.inf, z16.gather(-1, ids))
    return ids, values.half()


def sampled_targets(values: Tensor, tail_lse: Tensor, sample_values: Tensor, temperature: float,
                    proposal_temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's tempered target on the kept ids and the tail samples, (N, k + S) each.

    Returns:
        ``(p, log_p, log_r)``: ``p`` the target's probability per slot (head: p_T exact;
        samples: the tail's mass p_tail(T) split by self-normalised importance weights; a
        slot may repeat an id, scatter-adding is the intended sum), ``log_p`` the teacher's
        exact tempered log-probability of the slot's token, log p_T(j) = z_j / T - A(1/T),
        and ``log_r`` (N, S) each sample's log proposal weight up to its row's constant,
        z_s / T_p (-inf for an empty tail), which the loss's control variate needs (the
        student's own importance weights, :mod:`kd.losses_fused`). Rows of ``p`` sum to 1
        (up to rounding) unless the tail is empty, where the head alone sums to 1.
    """
    head = values.float() / temperature  # (N, k)
    log_a = torch.logaddexp(torch.logsumexp(head, -1), tail_lse).unsqueeze(-1)  # (N, 1): A(1/T)
    log_head, log_tail = head - log_a, tail_lse.unsqueeze(-1) - log_a  # (N, k), (N, 1)
    z = sample_values.float()
    finite = torch.isfinite(z)
    log_samples = torch.where(finite, z / temperature - log_a, -math.inf)  # (N, S) exact log p_T
    log_w = torch.where(finite, (1.0 / temperature - 1.0 / proposal_temperature) * z, -math.inf)
    w = torch.softmax(log_w, dim=-1).nan_to_num_(0.0)  # an all -inf row (empty tail): no weight
    log_r = torch.where(finite, z / proposal_temperature, -math.inf)
    return torch.cat([log_head.exp(), log_tail.exp() * w], -1), torch.cat([log_head, log_samples], -1), log_r
