"""Low-rank approximation for compensating quantization error.

``low_rank`` gives the best rank-r factors in Frobenius norm (exact or randomized SVD); ``whitened_low_rank`` gives
the best factors in the output norm ||E X^T||_F of a layer with inputs X, using a Cholesky factor of X^T X;
``output_loss`` measures that norm (squared) for any fit, low-rank or not.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SMALL_DIM = 256  # below this min(m, n) an exact SVD is cheap enough


def _low_rank(
    matrix: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors (U S, V^T) of ``matrix`` in its own (float) dtype."""
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    m, n = matrix.shape
    r = min(rank, m, n)
    if r == 0:
        return matrix.new_zeros(m, 0), matrix.new_zeros(0, n)
    small = min(m, n)
    if 4 * r >= small or small <= _SMALL_DIM or r + oversample >= small:
        u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    else:
        # Randomized SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).
        gen = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn(n, r + oversample, generator=gen, device=matrix.device, dtype=matrix.dtype)
        q = torch.linalg.qr(matrix @ omega).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(matrix.T @ q).Q
            q = torch.linalg.qr(matrix @ q).Q
        ub, s, vt = torch.linalg.svd(q.T @ matrix, full_matrices=False)
        u = q @ ub
        logger.debug("low_rank: randomized SVD of %dx%d at rank %d", m, n, r)
    return u[:, :r] * s[:r], vt[:r]


def low_rank(
    matrix: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` approximation ``a @ b`` of ``matrix`` [m, n]: ``a = U_r S_r`` [m, r], ``b = V_r^T`` [r, n].

    An exact SVD is used when ``rank >= min(m, n) / 4`` or the matrix is small, a seeded randomized SVD with
    ``power_iters`` QR-orthonormalised power iterations and ``oversample`` extra columns otherwise. Computes in
    float32 (float64 for float64 input) and returns float32; rank 0 gives empty factors and
    ``rank >= min(m, n)`` an exact reconstruction up to rounding.
    """
    work = matrix.double() if matrix.dtype == torch.float64 else matrix.float()
    a, b = _low_rank(work, rank, oversample=oversample, power_iters=power_iters, seed=seed)
    return a.float(), b.float()


def cholesky_whitening(gram: Tensor, *, damping: float = 0.01) -> Tensor:
    """Lower-triangular float64 ``L`` [n, n] with ``L L^T = gram + lambda I`` for an activation Gram X^T X.

    Computed in float64 with ``lambda = damping * mean(diag(gram))``, multiplied by 10 (up to 10 attempts)
    while the matrix is not numerically positive definite. Dead input channels (zero diagonal, i.e. always-zero
    activations) have all-zero rows and columns and would make the factor singular without large damping;
    their diagonal is set to 1 first, which leaves them uncoupled from the live channels: their weights do not
    affect the layer's output, so any finite positive scale is correct, and 1 keeps L invertible.

    Raises:
        ValueError: if ``gram`` is not square or no damping up to 10**9 times the initial one makes it
            positive definite (e.g. it contains NaN/inf or is strongly indefinite).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    g = gram.double()
    g = (g + g.T) / 2
    diag = g.diagonal()
    diag[diag <= 0] = 1.0
    scale = float(diag.mean())
    lam = damping * scale
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for attempt in range(10):
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            if attempt:
                logger.debug("cholesky_whitening: needed damping %.3g after %d retries", lam, attempt)
            return chol
        lam = lam * 10 if lam > 0 else 1e-6 * scale
    raise ValueError(
        f"gram is not positive definite even with damping {lam / 10:.3g} "
        f"(after 10 attempts); it may contain NaN/inf or be strongly indefinite"
    )


def whitened_low_rank(matrix: Tensor, rank: int, chol: Tensor, **kw: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors minimising ||(matrix - a @ b) X^T||_F, with ``chol`` from :func:`cholesky_whitening`.

    Since ||E X^T||_F = ||E L||_F for X^T X = L L^T, take the SVD ``matrix @ L = U S V^T`` and set
    ``a = U_r S_r``, ``b = V_r^T L^{-1}`` (a triangular solve, no explicit inverse), then rescale each rank-one
    term so its two sides have equal norms. ``kw`` goes to :func:`low_rank`. Returns float32.
    """
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    n = matrix.shape[1]
    if tuple(chol.shape) != (n, n):
        raise ValueError(f"chol must have shape ({n}, {n}), got {tuple(chol.shape)}")
    l64 = chol.double()
    whitened = matrix.double() @ l64
    a, bt = _low_rank(whitened if matrix.dtype == torch.float64 else whitened.float(), rank, **kw)
    b = torch.linalg.solve_triangular(l64, bt.double(), upper=False, left=False)
    # a carries the activation scale and b its inverse (values near 1e-5 on channels with large activations, below
    # float16's normal range); give each rank-one term equal norms on both sides so both survive float16 tables.
    balance = (a.double().norm(dim=0) / b.norm(dim=1).clamp_min(1e-300)).sqrt().clamp_min(1e-30)
    return (a.double() / balance).float(), (b * balance[:, None]).float()


def fit_low_rank(matrix: Tensor, rank: int, gram: Tensor | None = None, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``matrix``: minimising the output error ||E X^T||_F when the activation Gram
    ``gram`` = X^T X is given (:func:`whitened_low_rank`), the plain Frobenius error otherwise (:func:`low_rank`)."""
    if gram is None:
        return low_rank(matrix, rank, seed=seed)
    return whitened_low_rank(matrix, rank, cholesky_whitening(gram.to(matrix.device)), seed=seed)


def output_loss(residual: Tensor, fitted: Tensor, gram: Tensor | None) -> float:
    """||(R - fit) X^T||_F^2 = tr(D G D^T) with the layer's activation Gram G; plain ||R - fit||_F^2 without data."""
    error = residual.float() - fitted.float()
    if gram is None:
        return float(error.square().sum())
    return float(((error @ gram.to(error.device, error.dtype)) * error).sum())
