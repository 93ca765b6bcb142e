"""Refitting a matrix's scales and codebook to its output error (`refit_rounds`), against a brute-force solve."""

from __future__ import annotations

import copy

import pytest
import torch

from swsc_hf.core.compress import compress_weight, reconstruct_channels, refit_tables, to_weight
from swsc_hf.core.lowrank import output_loss
from swsc_hf.core.spec import LayerSpec

LAYOUTS = {
    "scalar": dict(n_clusters=4, segment_length=1, scale_group_size=8),
    "vector": dict(n_clusters=4, segment_length=2, scale_group_size=8),
    "rows per codebook": dict(n_clusters=4, segment_length=1, scale_group_size=8, rows_per_codebook=12),
    "input channels": dict(n_clusters=4, segment_length=1, scale_group_size=8, cluster_dim="input"),
    "no scales": dict(n_clusters=6, segment_length=1),
}


def correlated_problem(out_features: int = 24, in_features: int = 16, seed: int = 0):
    """A weight and the Hessian X^T X of inputs with correlated, unevenly sized features (as real activations)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=gen) * 0.4 + torch.eye(in_features)
    x = torch.randn(512, in_features, generator=gen) @ mix * (torch.rand(in_features, generator=gen) * 3 + 0.1)
    return torch.randn(out_features, in_features, generator=gen), x.t() @ x


def brute_force_codebook(weight, fitted, hessian):
    """The codebook minimising tr((W - W') H (W - W')^T) with codes and scales held: each codebook entry's
    contribution to W' built one at a time, then the normal equations solved in float64."""
    spec = fitted.spec
    bases = []
    for entry in range(fitted.codebook.numel()):
        unit = torch.zeros(fitted.codebook.numel())
        unit[entry] = 1.0
        bases.append(to_weight(reconstruct_channels(spec, unit.reshape(fitted.codebook.shape), fitted.codes,
                                                    fitted.scales), spec).double())
    h = hessian.double()
    normal = torch.stack([torch.stack([(bi @ h * bj).sum() for bj in bases]) for bi in bases])
    rhs = torch.stack([(weight.double() @ h * b).sum() for b in bases])
    return torch.linalg.solve(normal, rhs).reshape(fitted.codebook.shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_round_leaves_the_least_squares_codebook_for_the_codes(layout):
    weight, hessian = correlated_problem()
    spec = LayerSpec(24, 16, **LAYOUTS[layout])
    fitted = compress_weight(weight, spec, hessian=hessian)
    refitted = copy.copy(fitted)
    refit_tables(weight, refitted, hessian, rounds=1)
    assert torch.equal(refitted.codes, fitted.codes)  # one round holds the codes
    expected = brute_force_codebook(weight, refitted, hessian).float()
    torch.testing.assert_close(refitted.codebook, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_refit_rounds_lower_the_output_error(layout):
    """Scales carry most of the gain (here 17-45% less error); a lone codebook, already K-Means-weighted by
    diag(H), gains least."""
    weight, hessian = correlated_problem(seed=1)
    spec = LayerSpec(24, 16, **LAYOUTS[layout])
    plain = output_loss(weight, compress_weight(weight, spec, hessian=hessian).dense(), hessian)
    refitted = output_loss(weight, compress_weight(weight, spec, hessian=hessian, refit_rounds=3).dense(), hessian)
    assert refitted < (0.999 if layout == "no scales" else 0.9) * plain


@pytest.mark.parametrize("layout", ["scalar", "vector"])
def test_refit_damp_solves_against_the_ridged_hessian(layout):
    """`damp` adds that fraction of H's mean diagonal to H: one round leaves the least-squares codebook for that
    ridged H, and damp=0 is the plain refit exactly."""
    weight, hessian = correlated_problem(seed=3)
    spec = LayerSpec(24, 16, **LAYOUTS[layout])
    fitted = compress_weight(weight, spec, hessian=hessian)
    plain, zero, damped = copy.copy(fitted), copy.copy(fitted), copy.copy(fitted)
    refit_tables(weight, plain, hessian, rounds=2)
    refit_tables(weight, zero, hessian, rounds=2, damp=0.0)
    assert torch.equal(zero.codebook, plain.codebook) and torch.equal(zero.scales, plain.scales)
    refit_tables(weight, damped, hessian, rounds=1, damp=0.5)
    ridged = hessian + 0.5 * hessian.diagonal().mean() * torch.eye(16)
    expected = brute_force_codebook(weight, damped, ridged).float()
    torch.testing.assert_close(damped.codebook, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    assert not torch.allclose(damped.codebook, brute_force_codebook(weight, damped, hessian).float(), atol=1e-3)


def test_refit_damp_keeps_the_weight_closer_where_calibration_saw_few_directions():
    """With a Hessian of 6 inputs for 16 features, the undamped refit may move the weight freely along the 10 unseen
    directions; the ridge holds it near the weight there (lower weight error)."""
    weight, _ = correlated_problem(seed=4)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    hessian = x.t() @ x
    spec = LayerSpec(24, 16, **LAYOUTS["scalar"])

    def weight_error(damp: float) -> float:
        return (weight - compress_weight(weight, spec, hessian=hessian, refit_rounds=3, refit_damp=damp).dense()
                ).square().sum().item()

    assert weight_error(1.0) < 0.8 * weight_error(0.0)


def test_refit_keeps_the_plain_fit_when_it_is_already_exact():
    """Weights that are exactly `scale * table[code]`: nothing to gain, and the fit must come back unchanged."""
    gen = torch.Generator().manual_seed(2)
    table = torch.tensor([-1.0, -0.25, 0.5, 1.0])
    weight = table[torch.randint(0, 4, (8, 16), generator=gen)]
    weight[:, 0] = 1.0  # every group's absmax is 1, so the plain fit's scales are exact
    hessian = torch.eye(16) + 0.1
    spec = LayerSpec(8, 16, n_clusters=4, segment_length=1, scale_group_size=16)
    plain = compress_weight(weight, spec, hessian=hessian)
    refitted = compress_weight(weight, spec, hessian=hessian, refit_rounds=3)
    assert output_loss(weight, plain.dense(), hessian) < 1e-8
    torch.testing.assert_close(refitted.dense(), weight, rtol=0, atol=1e-5)


def test_input_channel_layout_with_more_outputs_than_inputs_fits_with_calibration():
    """Error feedback over input channels when the matrix has more rows than channels (an MLP's up projection)."""
    weight, hessian = correlated_problem(out_features=40, in_features=16, seed=3)
    spec = LayerSpec(40, 16, n_clusters=4, segment_length=1, scale_group_size=8, cluster_dim="input")
    fitted = compress_weight(weight, spec, hessian=hessian)
    assert fitted.codes.shape == (16, 40)
    assert output_loss(weight, fitted.dense(), hessian) < output_loss(weight, compress_weight(weight, spec).dense(),
                                                                        hessian)
