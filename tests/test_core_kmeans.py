"""Tests of swsc_hf.core.kmeans: row K-Means (plain, weighted, chunked) and exact 1-D K-Means."""

from __future__ import annotations

import pytest
import torch

from swsc_hf.core import kmeans as km
from swsc_hf.core.kmeans import assign, kmeans, kmeans_1d


def _planted(n_per: int = 60, k: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian blobs: points [k * n_per, d] and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 10
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centers[truth] + 0.1 * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], truth[perm]


def _brute_labels(x: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    diff2 = (x.double()[:, None, :] - c.double()[None]) ** 2
    if w is not None:
        diff2 = diff2 * (w.double()[:, None, :] if w.dim() == 2 else w.double()[:, None, None])
    return diff2.sum(-1).argmin(1)


def test_planted_clusters_recovered():
    x, truth = _planted()
    c, labels = kmeans(x, 8, seed=3)
    assert c.shape == (8, 16) and c.dtype == torch.float32
    assert labels.shape == truth.shape and labels.dtype == torch.int64
    mapping = {}
    for t in range(8):
        found = labels[truth == t].unique()
        assert found.numel() == 1, f"true cluster {t} split into {found.tolist()}"
        mapping[t] = int(found)
    assert len(set(mapping.values())) == 8


def test_labels_are_nearest_centroids():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    c, labels = kmeans(x, 20, iters=3)
    assert torch.equal(labels, _brute_labels(x, c))
    assert torch.equal(assign(x, c), labels)


def test_deterministic_for_seed():
    x = torch.randn(3000, 12, generator=torch.Generator().manual_seed(2))
    c1, l1 = kmeans(x, 40, seed=7)
    c2, l2 = kmeans(x, 40, seed=7)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)


def test_k_at_least_n_is_exact():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(3)).half()
    c, labels = kmeans(x, 50)
    assert torch.equal(labels, torch.arange(50)) and torch.equal(c[labels], x.float())
    c, labels = kmeans(x, 64)
    assert c.shape == (64, 4) and torch.equal(c[labels], x.float())


def test_k_at_least_distinct_rows_is_exact():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(10, 5, generator=g)
    x = rows[torch.randint(10, (400,), generator=g)]
    c, labels = kmeans(x, 12)
    assert torch.equal(c[labels], x)


def test_empty_cluster_repair():
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g) + 10])
    init = torch.tensor([[0.0, 0.0], [10.0, 10.0], [1000.0, 1000.0]])
    assert torch.bincount(assign(x, init), minlength=3)[2] == 0  # the init leaves cluster 2 empty
    c, labels = kmeans(x, 3, init=init, iters=10)
    assert (torch.bincount(labels, minlength=3) > 0).all()
    assert c.abs().max() < 100


def test_chunking_gives_identical_result():
    x = torch.randn(1003, 8, generator=torch.Generator().manual_seed(6))
    c_small, l_small = kmeans(x, 16, iters=8, chunk_elems=128)  # blocks of 8 rows, the last one of 3
    c_big, l_big = kmeans(x, 16, iters=8)
    assert torch.equal(l_small, l_big)
    torch.testing.assert_close(c_small, c_big)


def test_memory_bounded_by_chunk_elems(monkeypatch):
    largest = 0
    orig = km._sq_dist

    def recording(xc, wc, c, c2):
        nonlocal largest
        out = orig(xc, wc, c, c2)
        largest = max(largest, out.numel(), xc.numel())
        return out

    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(7))
    _, ref = kmeans(x, 256, iters=1)
    monkeypatch.setattr(km, "_sq_dist", recording)
    _, labels = kmeans(x, 256, iters=1, chunk_elems=4096)
    assert 0 < largest <= 4096
    assert torch.equal(labels, ref)


def test_row_weights_weighted_mean():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 3, generator=g)
    w = torch.rand(300, generator=g)
    c, _ = kmeans(x, 1, weights=w)
    torch.testing.assert_close(c[0], (w[:, None] * x).sum(0) / w.sum())


def test_per_element_weights_weighted_mean_and_metric():
    x, _ = _planted(n_per=40, k=4, d=6, seed=9)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(10)) + 0.05
    c, labels = kmeans(x, 4, weights=w, iters=50)
    for j in range(4):
        members = labels == j
        expected = (w[members] * x[members]).sum(0) / w[members].sum(0)
        torch.testing.assert_close(c[j], expected)
    assert torch.equal(labels, _brute_labels(x, c, w))
    assert torch.equal(assign(x, c, weights=w, chunk_elems=16), labels)


def test_per_element_weights_change_the_metric():
    # Two candidate centroids: the first is closer in coordinate 0, the second in coordinate 1.
    x = torch.tensor([[0.0, 0.0]])
    c = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    assert assign(x, c, weights=torch.tensor([[1.0, 0.01]])).item() == 0
    assert assign(x, c, weights=torch.tensor([[0.01, 1.0]])).item() == 1


def test_invalid_inputs():
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(5, 2), 0)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.empty(0, 3), 2)
    with pytest.raises(ValueError, match="weights must have shape"):
        kmeans(torch.randn(5, 2), 2, weights=torch.ones(4))
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(torch.randn(5, 2), 2, init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="k must be"):
        kmeans_1d(torch.randn(5), 0)
    with pytest.raises(ValueError, match="empty"):
        kmeans_1d(torch.empty(0), 4)


def test_kmeans_1d_lossless_when_few_distinct():
    g = torch.Generator().manual_seed(11)
    levels = torch.randn(10, generator=g)
    values = levels[torch.randint(10, (5000,), generator=g)].half()
    c, labels = kmeans_1d(values, 16)
    uniq = torch.unique(values.float())
    assert torch.equal(c[:10], uniq) and torch.equal(c[10:], uniq[-1].expand(6))
    assert torch.equal(c[labels], values.float())


def test_kmeans_1d_lossless_beyond_sample():
    # More values than the sample, with one rare value the sample may miss.
    values = torch.tensor([-1.0, 0.0, 2.0]).repeat((2**20 + 90) // 3)
    values[12345] = 7.0
    c, labels = kmeans_1d(values, 4)
    assert torch.equal(c, torch.tensor([-1.0, 0.0, 2.0, 7.0]))
    assert torch.equal(c[labels], values)


def test_kmeans_1d_matches_brute_force():
    g = torch.Generator().manual_seed(12)
    values = torch.randn(20000, generator=g) ** 3
    weights = torch.rand(20000, generator=g)
    for w in (None, weights):
        c, labels = kmeans_1d(values, 16, weights=w)
        assert c.shape == (16,) and torch.all(c[1:] > c[:-1])
        brute = (values.double()[:, None] - c.double()[None]).abs().argmin(1)
        assert torch.equal(labels, brute)
        ww = torch.ones_like(values) if w is None else w
        for j in range(16):  # converged: every centroid is the weighted mean of its cluster
            m = labels == j
            torch.testing.assert_close(c[j], (ww[m] * values[m]).sum() / ww[m].sum(), rtol=1e-5, atol=1e-6)


def test_kmeans_1d_large_near_optimal():
    """5M values (its speed is measured in benchmarks/compression_time.py, not asserted here)."""
    values = torch.randn(5_000_000, generator=torch.Generator().manual_seed(13))
    c, labels = kmeans_1d(values, 16)
    mse = float(((values - c[labels]) ** 2).mean())
    assert mse < 0.0096  # Lloyd-Max optimum for a unit Gaussian at 16 levels is 0.009497
