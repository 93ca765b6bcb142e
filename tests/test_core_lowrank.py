"""Tests of swsc_hf.core.lowrank: (randomized) truncated SVD and activation-whitened low-rank fitting."""

from __future__ import annotations

import logging

import pytest
import torch

from swsc_hf.core.lowrank import cholesky_whitening, low_rank, whitened_low_rank


def _decaying(m: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Matrix with singular values 0.97^i and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    s = 0.97 ** torch.arange(min(m, n), dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def _correlated_activations(tokens: int = 2000, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated and very differently scaled channels."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mix = torch.randn(8, n, generator=g)
    scales = torch.logspace(-2, 1, n)
    return (latent @ mix + 0.05 * torch.randn(tokens, n, generator=g)) * scales


def test_full_rank_is_exact():
    m = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    for rank in (20, 25):
        a, b = low_rank(m, rank)
        assert a.shape == (30, 20) and b.shape == (20, 20)
        torch.testing.assert_close(a @ b, m, atol=1e-4, rtol=1e-4)


def test_rank_zero_and_dtypes():
    a, b = low_rank(torch.randn(7, 5), 0)
    assert a.shape == (7, 0) and b.shape == (0, 5)
    m = torch.randn(12, 9, dtype=torch.float64)
    a, b = low_rank(m, 9)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close((a.double() @ b.double()), m, atol=1e-5, rtol=1e-5)
    a, b = low_rank(m.half(), 3)
    assert a.dtype == torch.float32 and a.shape == (12, 3)
    with pytest.raises(ValueError):
        low_rank(m, -1)


def test_exact_truncation_is_eckart_young():
    m = _decaying(60, 40)
    a, b = low_rank(m, 15)
    s = torch.linalg.svdvals(m.double())
    assert torch.isclose(torch.linalg.norm(m - a @ b).double(), s[15:].norm(), rtol=1e-4)


def test_randomized_matches_exact(caplog):
    m = _decaying(600, 400, seed=2)
    with caplog.at_level(logging.DEBUG, logger="swsc_hf.core.lowrank"):
        a, b = low_rank(m, 20)
    assert "randomized" in caplog.text
    optimal = torch.linalg.svdvals(m.double())[20:].norm()
    err = torch.linalg.norm((m - a @ b).double())
    assert err <= optimal * 1.01
    a2, b2 = low_rank(m, 20)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_cholesky_whitening_factorises_damped_gram():
    x = _correlated_activations().double()
    gram = x.T @ x
    chol = cholesky_whitening(gram, damping=0.01)
    assert chol.dtype == torch.float64 and torch.equal(chol, chol.tril())
    lam = 0.01 * gram.diagonal().mean()
    torch.testing.assert_close(chol @ chol.T, gram + lam * torch.eye(64, dtype=torch.float64))


def test_cholesky_whitening_singular_and_dead_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 50, generator=g)  # rank 10 < 50
    x[:, [3, 17]] = 0  # dead channels
    gram = x.T @ x
    for damping in (0.01, 0.0):
        chol = cholesky_whitening(gram, damping=damping)
        assert torch.isfinite(chol).all() and (chol.diagonal() > 0).all()
    zeros = cholesky_whitening(torch.zeros(4, 4))
    torch.testing.assert_close(zeros @ zeros.T, 1.01 * torch.eye(4, dtype=torch.float64))
    # Indefinite: needs damping raised from 0.01 to 10 (eigenvalue -1 of [[1, 2], [2, 1]]).
    chol = cholesky_whitening(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    assert torch.isfinite(chol).all()
    with pytest.raises(ValueError, match="not positive definite"):
        cholesky_whitening(torch.full((3, 3), float("nan")))


def test_whitened_low_rank_reduces_output_error():
    x = _correlated_activations()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    chol = cholesky_whitening(x.T.double() @ x.double(), damping=1e-6)
    rank = 6
    a, b = whitened_low_rank(w, rank, chol)
    assert a.shape == (48, rank) and b.shape == (rank, 64) and b.dtype == torch.float32
    a0, b0 = low_rank(w, rank)
    err_white = torch.linalg.norm((w - a @ b) @ x.T)
    err_plain = torch.linalg.norm((w - a0 @ b0) @ x.T)
    assert err_white < 0.5 * err_plain
    # Optimal: equals the tail of the singular values of W L.
    optimal = torch.linalg.svdvals(w.double() @ chol)[rank:].norm()
    assert torch.isclose(err_white.double(), optimal, rtol=1e-3)
    a, b = whitened_low_rank(w, 0, chol)
    assert a.shape == (48, 0) and b.shape == (0, 64)


def test_whitened_factors_survive_float16_with_massive_activations():
    """LLM activations have a few channels ~1e3 larger than the rest: unbalanced whitened factors then hold values
    below float16's normal range on one side and large ones on the other (this made calibrated Basis Sharing of
    SmolLM2 produce NaN). Balanced factors round-trip through float16 with a small relative error."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=gen) * 0.02
    x = torch.randn(8192, 128, generator=gen)
    x[:, :4] *= 3000.0
    a, b = whitened_low_rank(weight, 32, cholesky_whitening(x.t() @ x))
    exact = a @ b
    rounded = a.half().float() @ b.half().float()
    assert torch.isfinite(rounded).all()
    assert float((rounded - exact).norm() / exact.norm()) < 1e-2
    assert float(a.norm(dim=0).max() / b.norm(dim=1).max()) < 10  # both sides on one scale
