"""The integer kernels (AVX-512 quadruples, AVX2 4-bit tables) against a model of their arithmetic and the float
path: by default for codebooks on their 8-bit grid (`int8_codebooks`), for every codebook with set_integer_dot."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import KERNEL_LAYOUTS
from test_kernels import make_layer_tensors, oracle_weight

from swsc_hf import SWSCConfig
from swsc_hf.core.compress import int8_grid_codebook
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


def random_layer(layout: tuple, dtype: torch.dtype = torch.float16, on_grid: bool = False):
    """A layout tuple's LayerSpec, random codes (unpacked and packed), codebook (on its 8-bit grid with `on_grid`)
    and scales in `dtype`, and its float64 weight."""
    out_f, in_f, k, seg, dim, group, rows = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, cluster_dim=dim, scale_group_size=group,
                     rows_per_codebook=rows)
    codes, packed, codebook, scales = make_layer_tensors(spec, dtype=dtype)
    if on_grid:
        codebook = int8_grid_codebook(codebook)
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


def assert_integer_outputs(layer: tuple, x: torch.Tensor, act_max: int, max_error: float) -> None:
    """`codebook_matmul` of `layer` (as `random_layer` gives it) on x equals a model of the integer arithmetic (float32
    sums of the units, the table offset taken out per scale group) and lies within `max_error` (relative) of the
    float64 oracle, but not on it (0: the float path ran)."""
    spec, codes, packed, codebook, scales, weight = layer
    with torch.no_grad():
        got = codebook_matmul(x, packed, codebook, scales, spec)
    model = integer_model(spec, codes, codebook, scales, x, act_max=act_max)
    torch.testing.assert_close(got.double(), model, rtol=0, atol=3e-5 * float(model.abs().max()))
    exact = x.double() @ weight.t()
    assert 0 < float((got.double() - exact).norm() / exact.norm()) <= max_error


def uneven_activations(tokens: int, features: int, g: torch.Generator) -> torch.Tensor:
    """Random activations whose units of 32 values span different ranges."""
    return torch.randn(tokens, features, generator=g) * (torch.rand(features, generator=g) * 4)


@needs_vbmi
@pytest.mark.parametrize("layout", INTEGER_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_integer_kernel_equals_its_arithmetic_and_stays_near_the_float_path(layout, integer_dot):
    layer = random_layer(layout)
    g = torch.Generator().manual_seed(2)
    for tokens in range(1, GEMV_MAX_TOKENS + 1):
        # mostly the codebook rounded to 8 bits
        assert_integer_outputs(layer, uneven_activations(tokens, layer[0].in_features, g), ACT_MAX, 3e-2)


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
    layer = spec, _, packed, codebook, scales, _ = random_layer(layout)
    g = torch.Generator().manual_seed(6)
    previous = limit_cpu_isa("avx2")  # AVX-512 CPUs keep their float kernels: the cap runs this one there too
    try:
        assert cpu_gemv_kernel(packed, codebook, scales, spec) == "integer_nibbles"
        for tokens in range(1, GEMV_MAX_TOKENS + 1):
            # mostly the table rounded to 8 bits
            assert_integer_outputs(layer, uneven_activations(tokens, spec.in_features, g), NIBBLE_ACT_MAX, 3e-2)
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


def assert_grid_books_run_integer_by_default(layout, dtype, kernel: str, act_max: int) -> None:
    """With set_integer_dot off, a codebook on its grid runs `kernel` and gives the float64 oracle's outputs up to
    the activations' rounding; the same codebook off the grid (as random, with one value nudged, or with a value
    the grid would round to zero) runs a float kernel (whose exactness the float kernels' tests check)."""
    layer = spec, codes, packed, codebook, scales, _ = random_layer(layout, dtype, on_grid=True)
    assert set_integer_dot(False) is False  # the default
    assert cpu_gemv_kernel(packed, codebook, scales, spec) == kernel
    g = torch.Generator().manual_seed(7)
    for tokens in (1, 3, GEMV_MAX_TOKENS):
        # the activations rounded to 14-15 bits alone, and float16's rounding of the books (measured 1e-4 to 2e-4)
        assert_integer_outputs(layer, uneven_activations(tokens, spec.in_features, g), act_max, 5e-4)
    step = float(codebook.float().abs().amax(dim=(1, 2))[0]) / BOOK_MAX
    nudged, tiny = codebook.clone(), codebook.clone()
    nudged.view(-1)[3] += step * 0.3
    tiny.view(-1)[3] = step * 0.01
    for off_grid in (make_layer_tensors(spec, dtype=dtype)[2], nudged, tiny):
        assert cpu_gemv_kernel(packed, off_grid, scales, spec) not in ("integer", "integer_nibbles")


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", NIBBLE_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_avx2_tables_on_their_grid_run_integer_by_default(layout, dtype):
    previous = limit_cpu_isa("avx2")
    try:
        assert_grid_books_run_integer_by_default(layout, dtype, "integer_nibbles", NIBBLE_ACT_MAX)
    finally:
        limit_cpu_isa(previous)


@needs_vbmi
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", INTEGER_LAYOUTS, ids=lambda t: "-".join(map(str, t)))
def test_quadruples_on_their_grid_run_integer_by_default(layout, dtype):
    assert_grid_books_run_integer_by_default(layout, dtype, "integer", ACT_MAX)


@needs_avx2
def test_int8_codebooks_compress_every_layer_onto_the_grid_and_the_integer_kernel(tiny_dense_dir, input_ids):
    """Data-free on load and calibrated with tuning after it: every codebook ends on its grid, the layers run the
    integer kernel by default, and the model's outputs stay within the grid's rounding of the float tables'."""
    from transformers import AutoModelForCausalLM

    def load(**fields):
        return AutoModelForCausalLM.from_pretrained(
            tiny_dense_dir, quantization_config=SWSCConfig(preset="swsc-4bit", **fields)).eval()

    plain, grid = load(), load(int8_codebooks=True)
    layers = [m for m in grid.modules() if hasattr(m, "codebook")]
    assert layers and all(torch.equal(m.codebook, int8_grid_codebook(m.codebook)) for m in layers)
    assert not all(torch.equal(m.codebook, int8_grid_codebook(m.codebook))
                   for m in plain.modules() if hasattr(m, "codebook"))
    previous = limit_cpu_isa("avx2")
    try:
        assert {cpu_gemv_kernel(m.codes, m.codebook, m.scales, m.spec) for m in layers} == {"integer_nibbles"}
        with torch.no_grad():
            ids = input_ids[:1, :GEMV_MAX_TOKENS]  # decode-sized: the GEMV runs
            expected, got = plain(ids).logits, grid(ids).logits
    finally:
        limit_cpu_isa(previous)
    assert float((got - expected).norm() / expected.norm()) < 2e-2


def test_int8_codebooks_hold_for_each_group_compressed_apart(tiny_dense_dir):
    """Multi-process compression installs group by group (`compress_group`) and ships the layers as installed."""
    from transformers import AutoModelForCausalLM

    from swsc_hf.compression import compress_group, compression_groups, target_names

    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    config = SWSCConfig(preset="swsc-4bit", int8_codebooks=True)
    groups = compression_groups(target_names(model, config), config)[:3]
    for group in groups:
        compress_group(model, group, config)
    layers = [model.get_submodule(name) for group in groups for name in group]
    assert len(layers) == 3 and all(torch.equal(m.codebook, int8_grid_codebook(m.codebook)) for m in layers)


def test_round_codebooks_to_int8_puts_trained_codebooks_back_on_the_grid(tiny_dense_dir):
    from transformers import AutoModelForCausalLM

    import swsc_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=SWSCConfig(
        preset="swsc-4bit", int8_codebooks=True))
    layers = [m for m in model.modules() if hasattr(m, "codebook")]
    with torch.no_grad():
        for m in layers:  # what centroid training does to them
            m.codebook.add_(torch.randn(m.codebook.shape, generator=torch.Generator().manual_seed(0)).half() * 1e-2)
    assert not any(torch.equal(m.codebook, int8_grid_codebook(m.codebook)) for m in layers)
    swsc_hf.round_codebooks_to_int8(model)
    assert all(torch.equal(m.codebook, int8_grid_codebook(m.codebook)) for m in layers)


def test_int8_codebooks_hold_after_tuning(tiny_dense_dir, calibration):
    from transformers import AutoModelForCausalLM

    from swsc_hf import compress_model

    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    compress_model(model, SWSCConfig(preset="swsc-4bit", int8_codebooks=True, tune_steps=2, tune_lr=1e-1,
                                     **calibration))
    layers = [m for m in model.modules() if hasattr(m, "codebook")]
    assert layers and all(torch.equal(m.codebook, int8_grid_codebook(m.codebook)) for m in layers)


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
