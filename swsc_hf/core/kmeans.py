"""K-Means clustering for codebook construction.

Rows of a matrix are clustered with Lloyd's algorithm, optionally weighted per row or per element (a diagonal
metric, as sensitivity-weighted clustering needs); scalars are clustered with an exact 1-D variant. Neither ever
materialises an ``n x k x d`` tensor, and row clustering bounds its ``n x k`` distance blocks by ``chunk_elems``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_PP_MIN_SAMPLE = 10_000  # k-means++ seeds on at most max(20 * k, this) rows
_SAMPLE_1D = 2**20  # values on which kmeans_1d converges before refining on all values
_SAMPLE_ITERS = 1000  # cap on the Lloyd iterations on that sample (each O(k log m))
_CHUNK_1D = 2**20  # values processed at once by kmeans_1d


def _check_inputs(x: Tensor, k: int, weights: Tensor | None) -> Tensor | None:
    """Validate ``x`` [n, d], ``k`` and ``weights``; return the weights on ``x``'s device."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty 2-D tensor [n, d], got shape {tuple(x.shape)}")
    if weights is None:
        return None
    if tuple(weights.shape) not in ((x.shape[0],), tuple(x.shape)):
        raise ValueError(f"weights must have shape ({x.shape[0]},) or {tuple(x.shape)}, got {tuple(weights.shape)}")
    if (weights < 0).any():
        raise ValueError("weights must be non-negative")
    return weights.to(x.device)


def _centroid_sq(c: Tensor, w: Tensor | None) -> Tensor:
    """``c * c`` [k, d] for per-element weights, else the squared norms [k] (no k x d temporary)."""
    return c * c if w is not None and w.dim() == 2 else torch.linalg.vector_norm(c, dim=1).square()


def _sq_dist(xc: Tensor, wc: Tensor | None, c: Tensor, c_sq: Tensor) -> Tensor:
    """Squared distances [rows, k] of float32 rows ``xc`` to centroids ``c`` (``c_sq`` from ``_centroid_sq``).

    Expanded as ||x||^2 - 2 x c^T + ||c||^2 so that only matmuls run. Per-element weights ``wc`` [rows, d] give
    the diagonal metric sum_j w_j (x_j - c_j)^2; per-row weights do not move the nearest centroid, so the caller
    applies them to the minimum only.
    """
    if wc is not None and wc.dim() == 2:
        wx = wc * xc
        dist = wc @ c_sq.T
        dist.addmm_(wx, c.T, alpha=-2).add_((wx * xc).sum(1, keepdim=True))
    else:
        dist = torch.addmm(c_sq[None], xc, c.T, alpha=-2).add_((xc * xc).sum(1, keepdim=True))
    return dist.clamp_min_(0)


def _scan(
    x: Tensor, w: Tensor | None, c: Tensor, rows: int, accumulate: bool = False
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One pass over ``x`` in blocks of ``rows`` rows.

    Returns nearest-centroid labels, each row's (weighted) error and, if ``accumulate``, the float64 weighted
    sums ``num`` [k, d] and weight totals ``den`` ([k] or [k, d]) needed for the centroid update. Float64 makes
    the mean of identical rows exactly that row, so clusterings with zero error stay exact.
    """
    n, d = x.shape
    k = c.shape[0]
    c_sq = _centroid_sq(c, w)
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    err = torch.empty(n, dtype=torch.float32, device=x.device)
    num = den = None
    if accumulate:
        num = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        den = torch.zeros((k, d) if w is not None and w.dim() == 2 else (k,), dtype=torch.float64, device=x.device)
    for lo in range(0, n, rows):
        xc = x[lo : lo + rows].float()
        wc = None if w is None else w[lo : lo + rows].float()
        dist = _sq_dist(xc, wc, c, c_sq)
        lab = dist.argmin(1)  # argmin + gather: min(dim) is far slower on small blocks
        e = dist.gather(1, lab[:, None]).squeeze(1)
        if wc is not None and wc.dim() == 1:
            e = e * wc
        labels[lo : lo + rows] = lab
        err[lo : lo + rows] = e
        if accumulate:
            xd = xc.double()
            if wc is None:
                num.index_add_(0, lab, xd)
                den.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
            else:
                wd = wc.double()
                num.index_add_(0, lab, xd * (wd if wd.dim() == 2 else wd[:, None]))
                den.index_add_(0, lab, wd)
    return labels, err, num, den


def _update(x: Tensor, c: Tensor, labels: Tensor, err: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """Weighted-mean centroid update with deterministic empty-cluster repair.

    Coordinates without weight keep their previous value. Each empty cluster is re-seeded at one of the rows
    with the largest current error (largest first, ties broken by row index), which splits the worst clusters.
    """
    den_b = den if den.dim() == 2 else den[:, None]
    new = torch.where(den_b > 0, num.div_(den_b).float(), c)
    empty = torch.nonzero(torch.bincount(labels, minlength=c.shape[0]) == 0).flatten()
    if empty.numel():
        far = torch.argsort(err, descending=True, stable=True)[: empty.numel()]
        new[empty] = x[far].float()
        logger.debug("kmeans: re-seeded %d empty clusters", empty.numel())
    return new


def _sample_index(prob: Tensor, gen: torch.Generator) -> Tensor:
    """Draw one index [1] with probability proportional to ``prob`` (the last index if ``prob`` is all zero)."""
    cum = prob.double().cumsum(0)
    u = torch.rand(1, generator=gen, device=prob.device, dtype=torch.float64) * cum[-1]
    return torch.searchsorted(cum, u, right=True).clamp_max_(prob.numel() - 1)


def _kmeanspp(x: Tensor, k: int, w: Tensor | None, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling under the weighted metric) on at most max(20 k, 10000) random rows."""
    n, d = x.shape
    m = min(n, max(20 * k, _PP_MIN_SAMPLE))
    idx = torch.randperm(n, generator=gen, device=x.device)[:m] if m < n else slice(None)
    s = x[idx].float()
    ws = None if w is None else w[idx].float()
    row_w = ws if ws is not None and ws.dim() == 1 else None
    if ws is not None and ws.dim() == 2:
        a, b = ws * s, ws  # distance to c: r - 2 a c + b c^2
        r, mass = (a * s).sum(1), ws.sum(1)
    else:
        a, b = s, None
        r, mass = (s * s).sum(1), row_w
    centers = torch.empty(k, d, dtype=torch.float32, device=x.device)
    best = torch.full((m,), float("inf"), dtype=torch.float32, device=x.device)
    prob = torch.ones_like(best) if mass is None else mass
    for j in range(k):
        c = s.index_select(0, _sample_index(prob, gen)).squeeze(0)
        centers[j] = c
        dist = r - 2 * (a @ c) + (b @ (c * c) if b is not None else c @ c)
        best = torch.minimum(best, dist.clamp_min_(0))
        prob = best if row_w is None else best * row_w
    return centers


def kmeans(
    x: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    iters: int = 25,
    seed: int = 0,
    chunk_elems: int = 2**24,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` [n, d] into ``k`` centroids with k-means++ seeding and Lloyd iterations.

    Args:
        x: points as rows; fp16/bf16 are upcast to float32 block by block on ``x``'s own device.
        k: number of centroids.
        weights: None, per-row [n] (weighted means) or per-element [n, d] (diagonal metric
            sum_j w_ij (x_ij - c_j)^2 with per-coordinate weighted-mean updates), non-negative.
        iters: maximum Lloyd iterations; stops early once the labels no longer change.
        seed: seeds the torch.Generator (on ``x``'s device) used by k-means++.
        chunk_elems: bound on the elements of any temporary block (``rows * max(k, d)``).
        init: optional initial centroids [k, d]; skips the k-means++ seeding.

    Returns:
        ``(centroids [k, d] float32, labels [n] int64)``; the labels are always the nearest centroids of the
        returned centroids. If ``k >= n`` the rows themselves are returned (repeated to fill ``k``) with
        ``labels = arange(n)``; if ``k`` is at least the number of distinct rows the result has zero error.

    Memory: besides ``x`` and ``weights``, the peak is about ``chunk_elems * 4`` bytes times a small constant
    (about 6, 12 with per-element weights) for the blocks of distances, upcast rows and float64 sums, about
    ``20 * k * d`` bytes (32 with per-element weights) for the centroids, their float64 sums and the update,
    ``12 * n`` bytes for labels and errors, and during seeding a float32 copy of the ``min(n, max(20 k, 10000))``
    sampled rows (twice that with per-element weights). Rows as points of a 8192 x 28672 matrix with k = 4096
    thus take about 0.4 GB of blocks, 2.3 GB of centroid buffers and 0.9 GB of seeding sample.
    On CUDA, bitwise reproducibility additionally requires ``torch.use_deterministic_algorithms(True)``
    because ``index_add_`` accumulates with atomics there.
    """
    w = _check_inputs(x, k, weights)
    n, d = x.shape
    if k >= n:
        return x[torch.arange(k, device=x.device) % n].float(), torch.arange(n, device=x.device)
    rows = max(1, chunk_elems // max(k, d))
    if init is None:
        c = _kmeanspp(x, k, w, torch.Generator(device=x.device).manual_seed(seed))
    elif tuple(init.shape) != (k, d):
        raise ValueError(f"init must have shape ({k}, {d}), got {tuple(init.shape)}")
    else:
        c = init.to(device=x.device, dtype=torch.float32).clone()
    prev = None
    for it in range(iters):
        labels, err, num, den = _scan(x, w, c, rows, accumulate=True)
        if prev is not None and torch.equal(labels, prev):
            logger.debug("kmeans: converged after %d iterations", it)
            break
        c, prev = _update(x, c, labels, err, num, den), labels
    else:
        labels = _scan(x, w, c, rows)[0]
    return c, labels


def assign(x: Tensor, centroids: Tensor, *, weights: Tensor | None = None, chunk_elems: int = 2**24) -> Tensor:
    """Nearest-centroid labels [n] int64 of the rows of ``x`` under the same (weighted) metric as :func:`kmeans`."""
    w = _check_inputs(x, centroids.shape[0], weights)
    if centroids.dim() != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must have shape (k, {x.shape[1]}), got {tuple(centroids.shape)}")
    rows = max(1, chunk_elems // max(centroids.shape[0], x.shape[1]))
    return _scan(x, w, centroids.to(device=x.device, dtype=torch.float32), rows)[0]


def _exact_labels(v: Tensor, uniq: Tensor) -> Tensor | None:
    """Labels of ``v`` into the sorted ``uniq`` if every value occurs there exactly, else None."""
    labels = torch.searchsorted(uniq, v).clamp_max_(uniq.numel() - 1)
    return labels if torch.equal(uniq[labels], v) else None


def _midpoints(c: Tensor) -> Tensor:
    """Float64 midpoints of sorted float32 centroids; exact, so assignments are exact nearest centroids."""
    c64 = c.double()
    return (c64[1:] + c64[:-1]) / 2


def _scan_1d(v: Tensor, w: Tensor | None, c: Tensor) -> tuple[Tensor, Tensor]:
    """Labels of ``v`` against sorted ``c`` (ties to the smaller centroid) and float64 stats [3, k]: weight,
    weighted sum and weighted sum of squares per cluster, accumulated with bincount in blocks of values."""
    mid = _midpoints(c)
    labels = torch.empty(v.numel(), dtype=torch.int64, device=v.device)
    stats = torch.zeros(3, c.numel(), dtype=torch.float64, device=v.device)
    for lo in range(0, v.numel(), _CHUNK_1D):
        vc = v[lo : lo + _CHUNK_1D].double()
        wc = None if w is None else w[lo : lo + _CHUNK_1D].double()
        lab = torch.bucketize(vc, mid)
        labels[lo : lo + _CHUNK_1D] = lab
        wv = vc if wc is None else wc * vc
        stats[0] += torch.bincount(lab, wc, minlength=c.numel())
        stats[1] += torch.bincount(lab, wv, minlength=c.numel())
        stats[2] += torch.bincount(lab, wv * vc, minlength=c.numel())
    return labels, stats


def _update_1d(c: Tensor, stats: Tensor) -> Tensor:
    """Weighted means; an empty cluster takes mean + std of a cluster with large spread (largest first)."""
    cnt, s1, s2 = stats
    mean = torch.where(cnt > 0, s1 / cnt, c.double())
    var = torch.where(cnt > 0, s2 / cnt - mean * mean, 0).clamp_min_(0)
    new = mean.float()
    empty = torch.nonzero(cnt == 0).flatten()
    if empty.numel():
        donors = torch.argsort(var * cnt, descending=True, stable=True)[: empty.numel()]
        split = (mean[donors] + var[donors].sqrt()).float()
        ok = split != new[donors]
        new[empty[ok]] = split[ok]
    return new


def _companded_init(s: Tensor, cum_w: Tensor, k: int) -> Tensor:
    """Initial centroids for sorted values ``s`` with weight prefix sums ``cum_w`` [m + 1].

    Places the centroids at equal-mass points of the companded density p^(1/3) (Panter-Dite), the asymptotically
    optimal centroid density, estimated from groups of consecutive sorted values: far closer to Lloyd's optimum
    than plain quantiles, from which Lloyd converges very slowly for large k. Falls back to weighted quantiles if
    every group has zero width.
    """
    m = s.numel()
    groups = max(1, min(m // 16, 8 * k))
    edges = torch.arange(groups + 1, device=s.device) * (m - 1) // groups
    width = s[edges[1:]] - s[edges[:-1]]
    mass = cum_w[edges[1:]] - cum_w[edges[:-1]]
    comp = mass.clamp_min(0) ** (1 / 3) * width ** (2 / 3)
    if comp.sum() <= 0:
        comp = mass
    cum = torch.cat([comp.new_zeros(1), comp.cumsum(0)])
    targets = (torch.arange(k, dtype=torch.float64, device=s.device) + 0.5) * (cum[-1] / k)
    j = (torch.searchsorted(cum, targets, right=True) - 1).clamp_(0, groups - 1)
    frac = ((targets - cum[j]) / comp[j]).nan_to_num_(0).clamp_(0, 1)
    return (s[edges[j]] + frac * width[j]).float()


def _lloyd_1d(stats_fn: Callable[[Tensor], Tensor], c: Tensor, iters: int, tol: float) -> Tensor:
    """Lloyd iterations on ``stats_fn(sorted centroids) -> [3, k] stats`` until the centroids are a fixed point
    or the weighted squared error improves by at most ``tol`` (relative). Returns sorted centroids."""
    prev_sse = float("inf")
    for it in range(iters):
        c = c.sort().values
        cnt, s1, s2 = stats = stats_fn(c)
        c64 = c.double()
        sse = float((s2 - 2 * c64 * s1 + c64 * c64 * cnt).sum())
        new = _update_1d(c, stats)
        if torch.equal(new, c) or prev_sse - sse <= tol * sse:
            logger.debug("kmeans_1d: stopped after %d iterations (sse %.6g)", it + 1, sse)
            return new.sort().values
        c, prev_sse = new, sse
    return c.sort().values


def kmeans_1d(
    values: Tensor, k: int, *, weights: Tensor | None = None, iters: int = 50, tol: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """Exact-assignment 1-D K-Means for scalar codebooks of up to billions of values.

    A random sample of at most 2**20 values is sorted once; centroids start at equal-mass points of its companded
    density (see ``_companded_init``) and Lloyd iterations run to a fixed point on the sample (at most 1000,
    each O(k log m) through prefix sums). Then at most ``iters`` Lloyd iterations on all values refine them, each
    an O(n log k) bucketize against the centroid midpoints (no n x k matrix) plus bincounts of float64 weighted
    sums, in blocks of 2**20 values, until a fixed point or until the weighted squared error improves by at most
    ``tol`` (relative) in an iteration. If the data holds at most ``k`` distinct values these are returned exactly
    (padded with the last one), so the codebook is lossless. Extra memory: the int64 labels, a float32 copy of
    non-float32 input and O(2**20 + k).

    Returns:
        ``(centroids [k] float32 ascending, labels [n] int64)`` of the flattened ``values``; the labels are the
        nearest centroids.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    v = values.reshape(-1).float()
    n = v.numel()
    if n == 0:
        raise ValueError("values must not be empty")
    w = None
    if weights is not None:
        if weights.numel() != n:
            raise ValueError(f"weights must have {n} elements, got {weights.numel()}")
        if (weights < 0).any():
            raise ValueError("weights must be non-negative")
        w = weights.reshape(-1).to(v.device)
    gen = torch.Generator(device=v.device).manual_seed(0)
    idx = torch.randint(n, (_SAMPLE_1D,), generator=gen, device=v.device) if n > _SAMPLE_1D else slice(None)
    s = v[idx]

    uniq = torch.unique(s)
    if uniq.numel() <= k:  # few distinct values: a lossless codebook may exist
        labels = _exact_labels(v, uniq)
        if labels is None and s.numel() < n:
            uniq = torch.unique(v)
            labels = _exact_labels(v, uniq) if uniq.numel() <= k else None
        if labels is not None:
            return torch.cat([uniq, uniq[-1:].expand(k - uniq.numel())]), labels

    s, order = s.double().sort()
    sw = torch.ones_like(s) if w is None else w[idx].double()[order]
    if sw.sum() <= 0:
        sw = torch.ones_like(s)
    prefix = torch.zeros(3, s.numel() + 1, dtype=torch.float64, device=v.device)
    torch.cumsum(torch.stack([sw, sw * s, sw * s * s]), dim=1, out=prefix[:, 1:])
    c = _companded_init(s, prefix[0], k)

    def sample_stats(c: Tensor) -> Tensor:
        cut = torch.searchsorted(s, _midpoints(c), right=True)
        bounds = torch.cat([cut.new_zeros(1), cut, cut.new_full((1,), s.numel())])
        return prefix[:, bounds[1:]] - prefix[:, bounds[:-1]]

    c = _lloyd_1d(sample_stats, c, _SAMPLE_ITERS, 0.0)
    if s.numel() < n:
        c = _lloyd_1d(lambda c: _scan_1d(v, w, c)[1], c, iters, tol)
    return c, _scan_1d(v, w, c)[0]
