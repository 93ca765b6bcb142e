"""The opt-in integer kernels (set_integer_dot: AVX-512 quadruples, AVX2 4-bit tables) against a model of their
arithmetic and the float path."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import KERNEL_LAYOUTS
from test_kernels import make_layer_tensors, oracle_weight

from swsc_hf.core.spec import LayerSpec
from swsc_hf.kernels import (
    GEMV_MAX_TOKENS,
    codebook_matmul,
    cpu_gemv_kernel,
    cpu_isa,
    integer_dot_available,
    limit_cpu_isa,
    load_cpu_kernels,
    set_integer_dot,
)

pytestmark = pytest.mark.skipif(not load_cpu_kernels(), reason="the CPU kernels could not be built here")
needs_vbmi = pytest.mark.skipif(not (cpu_isa() == "avx512" and integer_dot_available()),
                                reason="this CPU lacks AVX-512 VBMI and VNNI, which the quadruple kernel needs")
needs_avx2 = pytest.mark.skipif(cpu_isa() == "portable", reason="this CPU lacks AVX2, which the 4-bit kernel needs")

BOOK_MAX, ACT_MAX, NIBBLE_ACT_MAX, UNIT = 127, 127 * 128, 64 * 128, 32

# 8-bit codes of 4-dim vectors over output channels: the layouts the integer kernel takes
INTEGER_LAYOUTS = [
    (37, 128, 256, 4, "output", 128, 0),  # swsc-2bit (groups of 128), odd rows
    (48, 576, 256, 4, "output", 96, 0),   # SmolLM2's 576-wide layers (groups of 96: units straddle blocks)
    (40, 64, 200, 4, "output", 32, 5),    # fewer codewords, a codebook per 5 rows (packs never mix books)
    (13, 192, 256, 4, "output", 0, 0),    # no scales
    (9, 256, 256, 4, "output", 64, 2),    # a codebook per 2 rows
]

# 4-bit scalar tables over output channels: the layouts the AVX2 integer kernel takes
NIBBLE_LAYOUTS = [
    (48, 576, 16, 1, "output", 96, 0),    # swsc-4bit on SmolLM2's 576-wide layers (groups of 96)
    (37, 64, 12, 1, "output", 64, 4),     # fewer codes, odd rows, a codebook per 4 rows
    (13, 128, 16, 1, "output", 0, 0),     # no scales
    (66, 1536, 16, 1, "output", 128, 0),  # SmolLM2's down projection
    (8, 96, 16, 1, "output", 32, 3),      # a scale per unit, a codebook per 3 rows
]


@pytest.fixture
def integer_dot():
    previous = set_integer_dot(True)
    yield
    set_integer_dot(previous)


def random_layer(layout: tuple):
    """A layout tuple's LayerSpec, random codes (unpacked and packed), codebook and scales, and its float64 weight."""
    out_f, in_f, k, seg, dim, group, rows = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim=dim, scale_group_size=group,
                     rows_per_codebook=rows)
    codes, packed, codebook, scales = make_layer_tensors(spec)
    return spec, codes, packed, codebook, scales, oracle_weight(spec, codes, codebook, scales)


def integer_model(spec: LayerSpec, codes, codebook, scales, x: torch.Tensor, act_max: int = ACT_MAX) -> torch.Tensor:
    """y from a kernel's arithmetic: the same float32 roundings to integers (activations to [-act_max, act_max]),
    exact integer sums per 32 values."""
    books = codebook.float()
    amax = books.abs().amax(dim=(1, 2))
    step = torch.where(amax > 0, amax / BOOK_MAX, torch.ones_like(amax))
    q_books = torch.round(books / step[:, None, None]).clamp(-BOOK_MAX, BOOK_MAX).double()
    book_of = torch.arange(spec.channels) // spec.channels_per_codebook
    w = q_books[book_of[:, None], codes].reshape(spec.channels, -1, UNIT)  # (channels, units, 32)
    xu = x.float().reshape(x.shape[0], -1, UNIT)
    xmax = xu.abs().amax(-1, keepdim=True)
    inv = torch.where(xmax > 0, act_max / xmax, torch.zeros_like(xmax))
    xq = torch.round(xu * inv).clamp(-act_max, act_max).double()
    xstep = torch.where(xmax > 0, xmax / act_max, torch.zeros_like(xmax)).double()[..., 0]
    dots = torch.einsum("cuk,buk->bcu", w, xq)
    group_scale = (scales.double().repeat_interleave(spec.scale_group_size // UNIT, dim=1) if scales is not None
                   else torch.ones(spec.channels, w.shape[1], dtype=torch.float64))
    return (dots * group_scale * step.double()[book_of][:, None] * xstep[:, None, :]).sum(-1)


@needs_vbmi
@pytest.mark.parametrize("layout", INTEGER_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_integer_kernel_equals_its_arithmetic_and_stays_near_the_float_path(layout, integer_dot):
    spec, codes, packed, codebook, scales, weight = random_layer(layout)
    g = torch.Generator().manual_seed(2)
    for tokens in range(1, GEMV_MAX_TOKENS + 1):
        uneven = torch.rand(spec.in_features, generator=g) * 4  # blocks of different ranges
        x = torch.randn(tokens, spec.in_features, generator=g) * uneven
        with torch.no_grad():
            got = codebook_matmul(x, packed, codebook, scales, spec)
        model = integer_model(spec, codes, codebook, scales, x)
        scale = float(model.abs().max())
        torch.testing.assert_close(got.double(), model, rtol=0, atol=3e-5 * scale)  # float32 sums of the units
        exact = x.double() @ weight.t()
        error = float((got.double() - exact).norm() / exact.norm())
        assert 0 < error <= 3e-2  # mostly the codebook rounded to 8 bits; 0: the float path ran


@needs_vbmi
def test_integer_kernel_takes_bfloat16_activations_and_leading_dims(integer_dot):
    spec = LayerSpec(37, 128, n_clusters=256, segment_length=4, scale_group_size=128)
    codes, packed, codebook, scales = make_layer_tensors(spec, seed=3)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = codebook_matmul(x.bfloat16(), packed, codebook, scales, spec)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 37)
    model = integer_model(spec, codes, codebook, scales, x.bfloat16().float().reshape(6, 128)).reshape(2, 3, 37)
    torch.testing.assert_close(got.double(), model, rtol=1e-2, atol=1e-2 * float(model.abs().max()))


@needs_avx2
@pytest.mark.parametrize("layout", NIBBLE_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_avx2_integer_kernel_equals_its_arithmetic_and_stays_near_the_float_path(layout, integer_dot):
    spec, codes, packed, codebook, scales, weight = random_layer(layout)
    g = torch.Generator().manual_seed(6)
    previous = limit_cpu_isa("avx2")  # AVX-512 CPUs keep their float kernels: the cap runs this one there too
    try:
        assert cpu_gemv_kernel(packed, codebook, scales, spec) == "integer_nibbles"
        for tokens in range(1, GEMV_MAX_TOKENS + 1):
            uneven = torch.rand(spec.in_features, generator=g) * 4  # units of different ranges
            x = torch.randn(tokens, spec.in_features, generator=g) * uneven
            with torch.no_grad():
                got = codebook_matmul(x, packed, codebook, scales, spec)
            model = integer_model(spec, codes, codebook, scales, x, act_max=NIBBLE_ACT_MAX)
            # float32 sums of the units, and the table offset taken out in float per scale group
            torch.testing.assert_close(got.double(), model, rtol=0, atol=3e-5 * float(model.abs().max()))
            exact = x.double() @ weight.t()
            error = float((got.double() - exact).norm() / exact.norm())
            assert 0 < error <= 3e-2  # mostly the table rounded to 8 bits; 0: the float path ran
    finally:
        limit_cpu_isa(previous)


@pytest.mark.parametrize("layout", KERNEL_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_layouts_and_cpus_without_the_integer_kernel_keep_exact_results(layout, integer_dot):
    """Opting in changes nothing where no integer kernel applies: other layouts, and the instruction sets without
    one for the layout (capped here: AVX2 for quadruples, the portable code for 4-bit tables)."""
    spec, codes, packed, codebook, scales, weight = random_layer(layout)
    x = torch.randn(3, spec.in_features, generator=torch.Generator().manual_seed(5))
    expected = x.double() @ weight.t()
    output = spec.cluster_dim == "output" and spec.scale_group_size % UNIT == 0
    quadruples = output and spec.segment_length == 4 and spec.code_bits == 8 and spec.in_features % 64 == 0
    nibbles = output and spec.segment_length == 1 and spec.code_bits == 4 and spec.in_features % UNIT == 0
    previous = limit_cpu_isa("avx2" if quadruples else "portable") if quadruples or nibbles else None
    try:
        with torch.no_grad():
            got = codebook_matmul(x, packed, codebook, scales, spec)
    finally:
        if previous is not None:
            limit_cpu_isa(previous)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_integer_dot_is_off_by_default_and_returns_the_previous_setting():
    assert set_integer_dot(False) is False
    assert set_integer_dot(True) is False
    assert set_integer_dot(False) is True


def test_opting_in_where_the_cpu_lacks_the_integer_kernel_warns(caplog):
    previous_isa = limit_cpu_isa("portable")
    try:
        with caplog.at_level(logging.WARNING, logger="swsc_hf"):
            previous = set_integer_dot(True)
        assert "use AVX2" in caplog.text and "VBMI" in caplog.text and "portable" in caplog.text
        assert not integer_dot_available()
    finally:
        set_integer_dot(previous)
        limit_cpu_isa(previous_isa)
