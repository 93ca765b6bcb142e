"""Fit the shared terms of one weight matrix (codebooks, codes, scales, low-rank factors) for a `LayerSpec`.

Data-free, every segment goes to its nearest codeword. With a Hessian H = X^T X of the layer's inputs
(calibration), the codebook is fitted with each weight's sensitivity (diag H) as its K-Means weight and codes are
chosen GPTQ-style: input columns are fixed in order and the error of each is pushed onto the columns not yet fixed
through the inverse Hessian, so later choices correct earlier ones; the residual is then compensated by a low-rank
term in the whitened space (minimising the output error ||(W - W') X^T||, not the weight error). With
`refit_rounds`, the scales and codebook are then refitted by least squares to that same output error with the codes
held, alternating with a fresh error-feedback assignment against the refitted tables (GPTVQ's codebook update,
extended to the scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kmeans import assign, kmeans, kmeans_1d
from .lowrank import fit_low_rank, output_loss
from .spec import LayerSpec

# K-Means for codebooks runs on at most max(this, 64 per codeword) segments per codebook (a random subsample);
# every segment is then assigned.
MAX_FIT_SEGMENTS = 1 << 16
# Columns fixed between two lazy (matmul) updates of the rest of the matrix, as in GPTQ; small blocks keep the
# per-column updates cheap.
GPTQ_BLOCK = 32
# The integers of `int8_grid_codebook`: a book's values as integer multiples of its largest magnitude / 127.
INT8_GRID_MAX = 127


@dataclass
class CompressedWeight:
    """The fitted terms of one matrix, in float32 with unpacked int64 codes of shape (channels, segments)."""

    spec: LayerSpec
    codebook: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None

    def codebook_term(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Channels `start:stop` of the channel matrix rebuilt from the codebook term."""
        return reconstruct_channels(self.spec, self.codebook, self.codes[start:stop], self.scales, start)

    def dense(self) -> torch.Tensor:
        """The full (out x in) weight this compression represents."""
        spec = self.spec
        weight = torch.zeros(spec.out_features, spec.in_features, device=_device_of(self), dtype=torch.float32)
        if spec.n_clusters:
            weight += to_weight(self.codebook_term(), spec)
        if spec.rank:
            weight += self.lowrank_a @ self.lowrank_b
        return weight


def _device_of(cw: CompressedWeight) -> torch.device:
    return next(t for t in (cw.codebook, cw.lowrank_a) if t is not None).device


def to_channels(weight: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """The channel matrix: rows are the channels that are clustered."""
    return weight if spec.cluster_dim == "output" else weight.t()


def to_weight(channels: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return channels if spec.cluster_dim == "output" else channels.t()


def reconstruct_channels(
    spec: LayerSpec, codebook: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None, start: int = 0,
    channel_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild channel rows `start:start+len(codes)`, or the rows `channel_ids` (int64, one per row of codes), from
    (n_books, K, v) codebooks and (rows, segments) codes."""
    if channel_ids is None:
        channel_ids = torch.arange(start, start + codes.shape[0], device=codes.device)
    segments = codebook[(channel_ids // spec.channels_per_codebook)[:, None], codes]  # (rows, segments, v)
    channels = segments.reshape(-1, spec.channel_length)
    if scales is not None:
        scale = scales[channel_ids].repeat_interleave(spec.scale_group_size, dim=1)
        channels = channels * scale.to(channels.dtype)
    return channels


def group_absmax(values: torch.Tensor, group: int) -> torch.Tensor:
    """Per row and group of `group` columns, the largest magnitude (1 where a group is all zero)."""
    scales = values.reshape(values.shape[0], -1, group).abs().amax(dim=2)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def int8_grid_codebook(codebook: torch.Tensor) -> torch.Tensor:
    """`codebook` (n_books, K, v) with each book's values rounded to integers in [-127, 127] times one step, the book's
    largest magnitude as stored / 127, returned in the codebook's dtype.

    That grid is what the CPU kernels' integer dot products compute on, so they read such a book exactly (to the
    dtype's rounding of the multiples) and run it by default. A value moves by at most half a step, 1/254 of the
    book's largest magnitude.
    """
    values = codebook.float()
    top = values.abs().amax(dim=tuple(range(1, values.dim())), keepdim=True)
    step = torch.where(top > 0, top / INT8_GRID_MAX, torch.ones_like(top))
    return (torch.round(values / step).clamp(-INT8_GRID_MAX, INT8_GRID_MAX) * step).to(codebook.dtype)


def compress_weight(
    weight: torch.Tensor,
    spec: LayerSpec,
    *,
    hessian: torch.Tensor | None = None,
    kmeans_iters: int = 25,
    seed: int = 0,
    affine_correction: bool = False,
    error_feedback: bool = True,
    refit_rounds: int = 0,
    refit_damp: float = 0.0,
) -> CompressedWeight:
    """Compress `weight` (out x in) into the terms `spec` describes, on the weight's own device.

    `hessian` (in x in, the sum of x^T x over calibration inputs) makes the fit data-aware; with it and
    `error_feedback`, `refit_rounds` > 0 refits the tables to the output error (see `refit_tables`, with its
    ridge `refit_damp`).
    """
    if tuple(weight.shape) != (spec.out_features, spec.in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)} but the spec expects "
                         f"({spec.out_features}, {spec.in_features})")
    work = weight.detach().to(torch.float32)
    if not torch.isfinite(work).all():
        raise ValueError("weight contains NaN or Inf values; compress a finite checkpoint")
    result = CompressedWeight(spec)
    residual = work
    if spec.n_clusters:
        importance = hessian.diagonal().to(work.device, torch.float32) if hessian is not None else None
        channels = to_channels(work, spec)
        scales = group_absmax(channels, spec.scale_group_size) if spec.scale_groups else None
        result.codebook = fit_codebooks(channels, spec, scales, importance, kmeans_iters, seed)
        if hessian is not None and error_feedback:
            result.codes, result.scales = _assign_with_error_feedback(work, spec, result.codebook, hessian)
        else:
            result.scales = scales
            result.codes = assign_codes(channels, spec, result.codebook, scales)
        if hessian is not None and error_feedback and refit_rounds:
            refit_tables(work, result, hessian, refit_rounds, damp=refit_damp)
        if affine_correction:
            _apply_affine_correction(result, channels)
        residual = work - to_weight(result.codebook_term(), spec)
    if spec.rank:
        result.lowrank_a, result.lowrank_b = fit_low_rank(residual, spec.rank, hessian, seed=seed)
    return result


def _segments(channels: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return channels.reshape(channels.shape[0], spec.segments_per_channel, spec.segment_length)


def _normalized_segments(
    channels: torch.Tensor, spec: LayerSpec, scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments divided by their scale, and the squared scale of each segment (its weight in the original space)."""
    segs = _segments(channels, spec)
    if scales is None:
        return segs, torch.ones(segs.shape[:2], device=segs.device)
    seg_scale = scales.repeat_interleave(spec.scale_group_size // spec.segment_length, dim=1)
    return segs / seg_scale[..., None], seg_scale.square()


def _element_importance(spec: LayerSpec, importance: torch.Tensor | None, seg_weight: torch.Tensor) -> torch.Tensor:
    """Per-element K-Means weights (channels, segments, v): scale^2 times the input's sensitivity diag(H)."""
    weights = seg_weight[..., None].expand(*seg_weight.shape, spec.segment_length)
    if importance is None:
        return weights
    if spec.cluster_dim == "output":  # element (row, seg, j) multiplies input column seg * v + j
        per_input = importance.reshape(1, spec.segments_per_channel, spec.segment_length)
    else:  # channel = input column
        per_input = importance.reshape(-1, 1, 1)
    return weights * per_input.clamp_min(1e-8 * importance.mean().clamp_min(1e-30))


def fit_codebooks(
    channels: torch.Tensor,
    spec: LayerSpec,
    scales: torch.Tensor | None,
    importance: torch.Tensor | None,
    iters: int,
    seed: int,
) -> torch.Tensor:
    """K-Means codebooks (n_books, K, v) over the normalized segments of each group of channels."""
    segs, seg_weight = _normalized_segments(channels, spec, scales)
    weights = _element_importance(spec, importance, seg_weight)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    books = []
    step = spec.channels_per_codebook
    for book in range(spec.n_codebooks):
        points = segs[book * step : (book + 1) * step].reshape(-1, spec.segment_length)
        point_weights = weights[book * step : (book + 1) * step].reshape(-1, spec.segment_length)
        limit = max(MAX_FIT_SEGMENTS, 64 * spec.n_clusters)
        if points.shape[0] > limit:
            pick = torch.randperm(points.shape[0], generator=generator)[:limit].to(points.device)
            points, point_weights = points[pick], point_weights[pick]
        if spec.segment_length == 1:
            centroids, _ = kmeans_1d(points[:, 0], spec.n_clusters, weights=point_weights[:, 0], iters=iters)
            centroids = centroids[:, None]
        else:
            centroids, _ = kmeans(points, spec.n_clusters, weights=point_weights, iters=iters, seed=seed + book)
        books.append(centroids)
    return torch.stack(books)


def assign_codes(
    channels: torch.Tensor, spec: LayerSpec, codebook: torch.Tensor, scales: torch.Tensor | None
) -> torch.Tensor:
    """Nearest codeword (plain Euclidean in the normalized space) for every segment: (channels, segments)."""
    segs, _ = _normalized_segments(channels, spec, scales)
    codes = torch.empty(segs.shape[:2], dtype=torch.int64, device=segs.device)
    step = spec.channels_per_codebook
    for book in range(spec.n_codebooks):
        rows = slice(book * step, (book + 1) * step)
        codes[rows] = _nearest(segs[rows].reshape(-1, spec.segment_length), codebook[book]).reshape(codes[rows].shape)
    return codes


def _nearest_scalar(values: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a (K, 1) scalar codebook for every value: a binary search between sorted midpoints."""
    sorted_book, order = book[:, 0].sort()
    midpoints = (sorted_book[1:] + sorted_book[:-1]) / 2
    return order[torch.bucketize(values.contiguous(), midpoints)]


def _nearest(vectors: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Nearest codeword of each vector (n, v) in a shared (K, v) codebook or its own (n, K, v) one."""
    if books.dim() == 2 and books.shape[1] == 1:
        return _nearest_scalar(vectors[:, 0], books)
    if books.dim() == 2:
        return assign(vectors, books)  # distances by one matmul, chunked for large codebooks
    return (vectors[:, None, :] - books).square().sum(dim=-1).argmin(dim=1)


def _inverse_hessian_factor(hessian: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian (GPTQ's formulation), dead inputs made harmless."""
    hess = hessian.to(torch.float64).clone()
    hess[dead, dead] = 1.0
    hess.diagonal().add_(0.01 * hess.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hess)), upper=True).float()


def _assign_with_error_feedback(
    weight: torch.Tensor,
    spec: LayerSpec,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    fixed_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPTQ-style assignment: fix input columns in order, pushing each one's error onto the later columns.

    Output clustering fixes `segment_length` columns at a time (the segment's values lie along a row), most
    sensitive columns first when segments are scalars (GPTQ's act-order, with scales fixed up front from the
    original weights); input clustering fixes one input column (one channel) at a time, with its scales taken from
    the updated weights. `fixed_scales` replaces both choices of scales (a refit's). (Re-fitting the codebook to
    the error-fed targets afterwards was tried: no measurable gain; `refit_tables` fits it to the output error.)
    """
    out_f, in_f = weight.shape
    device = weight.device
    dead = hessian.diagonal() == 0
    output_mode = spec.cluster_dim == "output"
    act_order = output_mode and spec.segment_length == 1
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(in_f, device=device)
    work = weight.clone()
    work[:, dead] = 0.0
    work = work[:, order]
    inv_chol = _inverse_hessian_factor(hessian.to(device)[order][:, order], dead[order])

    codes = torch.empty(spec.channels, spec.segments_per_channel, dtype=torch.int64, device=device)
    scales = fixed_scales
    if spec.scale_groups and scales is None:
        scales = group_absmax(weight, spec.scale_group_size) if output_mode else torch.empty(
            spec.channels, spec.scale_groups, device=device)
    step = spec.segment_length if output_mode else 1
    block = max(GPTQ_BLOCK // step, 1) * step
    rows = torch.arange(out_f, device=device)
    books_of_rows = codebook[rows // spec.channels_per_codebook] if output_mode else None  # rows are channels
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        w_block = work[:, b0:b1].clone()
        errors = torch.zeros_like(w_block)
        u_block = inv_chol[b0:b1, b0:b1]
        for c0 in range(0, b1 - b0, step):
            col = b0 + c0
            if output_mode:
                source = int(order[col])  # original index of the first column of this segment
                scale = scales[:, source // spec.scale_group_size, None] if scales is not None else torch.ones(
                    out_f, 1, device=device)
                vectors = w_block[:, c0 : c0 + step] / scale
                chosen = _nearest(vectors, codebook[0]) if spec.n_codebooks == 1 else _nearest(vectors, books_of_rows)
                codes[:, source // step] = chosen
                fixed = books_of_rows[rows, chosen] * scale
            else:
                column = w_block[:, c0]
                col_scale = torch.ones(spec.segments_per_channel, device=device)
                if scales is not None:
                    if fixed_scales is None:
                        scales[col] = group_absmax(column[None], spec.scale_group_size)[0]
                    col_scale = scales[col].repeat_interleave(spec.scale_group_size // spec.segment_length)
                vectors = column.reshape(spec.segments_per_channel, spec.segment_length) / col_scale[:, None]
                book = codebook[col // spec.channels_per_codebook]
                chosen = _nearest(vectors, book)
                codes[col] = chosen
                fixed = (book[chosen] * col_scale[:, None]).reshape(out_f, 1)
            for j in range(fixed.shape[1]):
                c = c0 + j
                err = (w_block[:, c] - fixed[:, j]) / u_block[c, c]
                w_block[:, c:] -= err[:, None] * u_block[c, c:][None, :]
                errors[:, c] = err
        work[:, b1:] -= errors @ inv_chol[b0:b1, b1:]
    return codes, scales


def refit_tables(weight: torch.Tensor, result: CompressedWeight, hessian: torch.Tensor, rounds: int,
                 cg_steps: int = 8, damp: float = 0.0) -> None:
    """Refit `result`'s scales and codebook to the output error tr((W - W') H (W - W')^T), `rounds` times.

    Each round solves for the scales, then the codebook, by least squares with the codes held (both enter W'
    linearly; `cg_steps` conjugate-gradient steps from the current values); between rounds the codes are chosen
    again by error feedback against the refitted tables. The state with the lowest output error is kept, so the
    result is never worse than the plain fit on that loss (ridged, with `damp`). `damp` > 0 adds that fraction of
    H's mean diagonal to H for the whole refit (codes included), a ridge toward the plain weight error: the tables
    then fit the calibration inputs less closely, which is what carries to other text.
    """
    spec = result.spec
    eye = torch.eye(spec.in_features, device=weight.device)
    raw = hessian.to(weight.device, torch.float32)  # error feedback finds dead inputs by their zero diagonal
    if damp:
        raw = raw + damp * raw.diagonal().mean() * eye
    hessian = raw + 1e-6 * raw.diagonal().mean().clamp_min(1e-30) * eye

    def state() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return result.codes, result.codebook, result.scales

    def error() -> float:
        return output_loss(weight, to_weight(result.codebook_term(), spec), hessian)

    weight_times_hessian = weight @ hessian  # the normal equations' right-hand side, the same in every solve
    best, best_error = state(), error()
    for round_index in range(rounds):
        if round_index:
            result.codes, result.scales = _assign_with_error_feedback(
                weight, spec, result.codebook, raw, fixed_scales=result.scales)
        if result.scales is not None:
            result.scales = _least_squares_tables(weight_times_hessian, result, hessian, "scales", cg_steps)
        result.codebook = _least_squares_tables(weight_times_hessian, result, hessian, "codebook", cg_steps)
        current = error()
        if current < best_error:
            best, best_error = state(), current
    result.codes, result.codebook, result.scales = best


def _least_squares_tables(
    weight_times_hessian: torch.Tensor, result: CompressedWeight, hessian: torch.Tensor, field: str, steps: int
) -> torch.Tensor:
    """The `field` ("scales" or "codebook") minimising the output error with everything else held: conjugate
    gradient on the normal equations J^T (J(x) H) = J^T (W H), where J(x) is the weight rebuilt with `field` = x."""
    spec = result.spec
    device = weight_times_hessian.device
    rows = torch.arange(spec.channels, device=device)
    book_of_segment = (rows // spec.channels_per_codebook)[:, None] * spec.n_clusters + result.codes
    unscaled = reconstruct_channels(spec, result.codebook, result.codes, None) if field == "scales" else None
    scale_of_element = (result.scales.repeat_interleave(spec.scale_group_size, dim=1)
                        if field == "codebook" and result.scales is not None else None)  # the codebook's adjoint

    def rebuild(x: torch.Tensor) -> torch.Tensor:
        if field == "scales":
            return to_weight(unscaled * x.repeat_interleave(spec.scale_group_size, dim=1), spec)
        return to_weight(reconstruct_channels(spec, x, result.codes, result.scales), spec)

    def adjoint(product: torch.Tensor) -> torch.Tensor:
        channels = to_channels(product, spec)
        if field == "scales":
            return (channels * unscaled).reshape(spec.channels, spec.scale_groups, spec.scale_group_size).sum(-1)
        if scale_of_element is not None:
            channels = channels * scale_of_element
        segments = channels.reshape(-1, spec.segment_length)
        summed = torch.zeros(spec.n_codebooks * spec.n_clusters, spec.segment_length, device=device)
        summed.index_add_(0, book_of_segment.reshape(-1), segments)
        return summed.reshape(result.codebook.shape)

    def normal(x: torch.Tensor) -> torch.Tensor:
        return adjoint(rebuild(x) @ hessian)

    start = result.scales if field == "scales" else result.codebook
    x = start.clone()
    residual = adjoint(weight_times_hessian) - normal(x)
    direction = residual.clone()
    norm = residual.square().sum()
    for _ in range(steps):
        curved = normal(direction)
        step = norm / (direction * curved).sum()
        if not torch.isfinite(step) or step <= 0:
            break
        x = x + step * direction
        residual = residual - step * curved
        new_norm = residual.square().sum()
        direction = residual + (new_norm / norm) * direction
        norm = new_norm
    return x if torch.isfinite(x).all() else start


def _apply_affine_correction(result: CompressedWeight, channels: torch.Tensor) -> None:
    """w' = a*w + b with a > 0 so the clustered matrix keeps the original mean and standard deviation.

    Folded into the stored tables, so it costs nothing: into the codebook when there are no scales, else `a` goes
    into the scales (the offset is dropped there: scaled segments are near zero-mean).
    """
    rebuilt = result.codebook_term()
    a = (channels.std() / rebuilt.std().clamp_min(1e-12)).clamp_min(1e-6)
    if result.scales is None:
        b = channels.mean() - a * rebuilt.mean()
        result.codebook = result.codebook * a + b
    else:
        result.scales = result.scales * a

