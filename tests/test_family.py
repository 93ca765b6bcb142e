"""The three papers as configurations of one mechanism: weight clustering, Basis Sharing, data-aware SWSC."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import SWSCConfig, SWSCLinear, compression_report
from swsc_hf.allocation import allocate, fisher_diagonals, ladder, lower_hull, spec_bits
from swsc_hf.core.compress import compress_weight
from swsc_hf.core.lowrank import low_rank
from swsc_hf.core.spec import LayerSpec


def test_weight_clustering_with_k_distinct_values_is_lossless():
    values = torch.tensor([-0.3, -0.1, 0.0, 0.05, 0.2, 0.4, 0.7, 1.1])
    weight = values[torch.randint(0, 8, (32, 48), generator=torch.Generator().manual_seed(0))]
    fitted = compress_weight(weight, LayerSpec(32, 48, n_clusters=8, segment_length=1))
    assert torch.equal(fitted.dense(), weight)


def test_affine_correction_keeps_mean_and_std():
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.003
    spec = LayerSpec(64, 96, n_clusters=4, segment_length=1)
    plain = compress_weight(weight, spec).dense()
    corrected = compress_weight(weight, spec, affine_correction=True).dense()
    assert abs(plain.std() / weight.std() - 1) > 0.05  # K-Means shrinks the spread...
    torch.testing.assert_close(corrected.std(), weight.std(), rtol=1e-4, atol=0)  # ...the correction restores it
    torch.testing.assert_close(corrected.mean(), weight.mean(), rtol=0, atol=1e-6)


def test_error_feedback_lowers_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)
    x = torch.randn(2048, 64, generator=gen) @ mix * torch.rand(64, generator=gen) * 3
    weight = torch.randn(48, 64, generator=gen) * 0.05
    spec = LayerSpec(48, 64, n_clusters=8, segment_length=1, scale_group_size=16)

    def output_error(fitted):
        return float(((weight - fitted.dense()) @ x.t()).norm())

    assert output_error(compress_weight(weight, spec, hessian=x.t() @ x)) < 0.85 * output_error(
        compress_weight(weight, spec))


def test_whitened_compensation_lowers_output_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 64, generator=gen) @ (torch.randn(64, 64, generator=gen) * 0.5 + torch.eye(64))
    weight = torch.randn(48, 64, generator=gen)
    spec = LayerSpec(48, 64, n_clusters=6, segment_length=64, rank=8)

    def output_error(fitted):
        return float(((weight - fitted.dense()) @ x.t()).norm())

    whitened = compress_weight(weight, spec, hessian=x.t() @ x, error_feedback=False)
    assert output_error(whitened) < output_error(compress_weight(weight, spec))


def test_shared_basis_beats_per_layer_svd_on_planted_common_basis():
    """Layers built on one common 16-dim input basis: a shared rank-16 basis is exact, per-layer SVD at the same
    parameter count (rank 12 each) is not."""
    gen = torch.Generator().manual_seed(2)
    basis = torch.randn(16, 128, generator=gen)
    weights = [torch.randn(64, 16, generator=gen) @ basis + 0.01 * torch.randn(64, 128, generator=gen)
               for _ in range(4)]
    shared_a, shared_b = low_rank(torch.cat(weights), 16)
    shared_params = shared_b.numel() + shared_a.numel()
    per_layer_rank = shared_params // (4 * (64 + 128))
    shared_error = (torch.cat(weights) - shared_a @ shared_b).norm()

    def per_layer_residual(weight):
        a, b = low_rank(weight, per_layer_rank)
        return (weight - a @ b).norm()

    per_layer_error = torch.stack([per_layer_residual(w) for w in weights]).norm()
    assert per_layer_rank < 16 and shared_error < 0.2 * per_layer_error


def test_basis_sharing_full_rank_is_lossless(tiny_dense_dir, input_ids):
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    config = SWSCConfig(method="basis_sharing", n_clusters=0, rank=64, share_group_size=2,
                        share_types=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"], table_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=config)
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("calibrated", [False, True])
def test_basis_sharing_stores_each_basis_once(tiny_dense_dir, input_ids, tmp_path, calibration, calibrated):
    config = SWSCConfig(preset="basis-sharing-paper", **(calibration if calibrated else {}))
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=config)
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert q0.spec.shared_basis == q1.spec.shared_basis == "q_proj_0_1"
    assert q0.basis is q1.basis
    assert model.model.layers[0].self_attn.o_proj.spec.shared_basis is None  # o/down stay per layer
    logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    basis_keys = [k for k in keys if "bases" in k]
    assert sorted(basis_keys) == sorted(f"swsc_shared_bases.bases.{t}_0_1" for t in config.share_types)
    assert not any(k.endswith("q_proj.lowrank_b") for k in keys)
    report = compression_report(model)
    assert report.model_stored_bytes < report.model_dense_bytes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded(input_ids).logits, logits)
    assert reloaded.model.layers[0].self_attn.q_proj.basis is reloaded.model.layers[1].self_attn.q_proj.basis


@pytest.mark.parametrize("preset", ["swsc-paper", "weight-clustering-paper", "swsc-3bit"])
def test_calibrated_compression_on_load_reloads(tiny_dense_dir, input_ids, tmp_path, calibration, preset):
    config = SWSCConfig(preset=preset, **calibration)
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=config)
    assert all(isinstance(m, SWSCLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids).logits, logits)


def test_calibration_lowers_output_error_of_the_model(tiny_dense_dir, calibration):
    held_out = calibration["tokenizer"]("Another sentence about the compression of language models.").input_ids
    dense = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    reference = dense(held_out).logits
    errors = {}
    for name, extra in [("data-free", {}), ("calibrated", calibration)]:
        model = AutoModelForCausalLM.from_pretrained(
            tiny_dense_dir, quantization_config=SWSCConfig(n_clusters=4, segment_length=1, rank=0,
                                                           scale_group_size=16, **extra))
        errors[name] = float((model(held_out).logits - reference).norm())
    assert errors["calibrated"] < errors["data-free"], errors


def test_compress_model_accepts_an_explicit_tokenizer(tiny_dense_dir, calibration):
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    tokenizer = calibration.pop("tokenizer")
    swsc_hf.compress_model(model, SWSCConfig(preset="swsc-4bit", **calibration), tokenizer=tokenizer)
    assert isinstance(model.model.layers[1].mlp.down_proj, SWSCLinear)


def test_bits_target_data_free_stays_within_budget(tiny_dense_dir, input_ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, quantization_config=SWSCConfig(bits=3.5))
    report = compression_report(model)
    assert 3.0 < report.compressed_bits_per_weight <= 3.5
    logits = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids).logits, logits)


SAME_SHAPE = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "o_proj")]  # all 64 x 64


@pytest.mark.parametrize("sensitive", SAME_SHAPE[:3])
def test_allocation_gives_more_bits_to_the_layer_with_larger_sensitivity(tiny_dense_dir, sensitive):
    """Four layers of one shape, one with a thousand-fold Fisher information: it alone gets the extra bits (and it
    follows the Fisher, not the layer's place or name)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    fisher = {n: torch.full_like(model.get_submodule(n).weight, 1e-6) for n in SAME_SHAPE}
    fisher[sensitive] = torch.full_like(fisher[sensitive], 1e-3)
    layouts = allocate(model, SAME_SHAPE, 4.0, fisher)
    bits = {name: spec_bits(spec) for name, spec in layouts.items()}
    assert all(bits[sensitive] > bits[name] for name in SAME_SHAPE if name != sensitive), bits
    assert sum(bits.values()) / len(bits) <= 4.0


def test_bits_target_calibrated_follows_measured_sensitivity(tiny_dense_dir, calibration):
    """With layer 1's o_proj zeroed, layer 1's v_proj cannot change the loss: its measured Fisher information is
    zero, so `bits=` calibration leaves it the cheapest layout while the budget goes to layers that matter."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    torch.nn.init.zeros_(model.model.layers[1].self_attn.o_proj.weight)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    config = SWSCConfig(bits=4.0, **calibration)
    batches = swsc_hf.calibration_batches(config, calibration["tokenizer"], torch.device("cpu"))
    fisher = fisher_diagonals(model, names, batches)
    assert fisher[names[1]].abs().max() == 0 and fisher[names[0]].abs().max() > 0

    swsc_hf.compress_model(model, config)
    report = compression_report(model)
    assert report.compressed_bits_per_weight <= 4.0
    specs = {name: m.spec for name, m in model.named_modules() if isinstance(m, SWSCLinear)}
    spec = specs[names[1]]
    assert spec == ladder(spec.out_features, spec.in_features, near=4.0, vectors=True)[0]  # its cheapest layout
    assert spec_bits(specs[names[0]]) > spec_bits(spec)  # same shape, measured sensitivity: more bits


def test_lower_hull_keeps_exactly_the_layouts_some_price_per_bit_prefers():
    """Brute-force oracle: an option is on the hull iff it minimises loss + price * cost for some price >= 0."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        costs, losses = torch.rand(n, generator=gen).tolist(), torch.rand(n, generator=gen).tolist()
        options = [(LayerSpec(8, 8, n_clusters=i + 1, segment_length=1), cost, loss)
                   for i, (cost, loss) in enumerate(zip(costs, losses, strict=True))]
        hull = lower_hull(options)
        prices = [0.0] + torch.logspace(-4, 4, 4001).tolist()
        preferred = {min(options, key=lambda o, p=p: (o[2] + p * o[1], o[1]))[0] for p in prices}
        assert {o[0] for o in hull} == preferred, trial
        assert [o[1] for o in hull] == sorted(o[1] for o in hull)
        gains = [(a[2] - b[2]) / (b[1] - a[1]) for a, b in zip(hull, hull[1:], strict=False)]
        assert all(g > 0 for g in gains) and gains == sorted(gains, reverse=True)


def test_calibrated_bits_picks_a_vector_table_where_it_fits_better(tiny_dense_dir):
    """One 64 x 64 layer made of pairs drawn from 16 points: a 16-entry pair table holds it exactly at ~2.4 bits,
    scalar tables of 2-4 bits cannot. `bits=2.5` gives that layer the pair table; `vectors=False` cannot."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.tensor([[1.0, -0.9]]), torch.rand(15, 2, generator=gen) * 1.6 - 0.8])
    pairs = points[torch.randint(0, 16, (64, 32), generator=gen)]
    pairs[:, 0] = points[0]  # every row holds the largest value: its scale is 1 and the table exact
    planted = SAME_SHAPE[1]
    with torch.no_grad():
        model.get_submodule(planted).weight.copy_(pairs.reshape(64, 64) * 0.05)
    fisher = {n: torch.ones_like(model.get_submodule(n).weight) for n in SAME_SHAPE}
    layouts = allocate(model, SAME_SHAPE, 2.5, fisher)
    assert (layouts[planted].segment_length, layouts[planted].n_clusters) == (2, 16), layouts[planted]
    assert sum(spec_bits(spec) for spec in layouts.values()) / len(layouts) <= 2.5
    scalar = allocate(model, SAME_SHAPE, 2.5, fisher, vectors=False)
    assert all(spec.segment_length == 1 for spec in scalar.values())


def test_share_selection_by_loss_shares_only_where_it_pays(tiny_dense_dir, input_ids, tmp_path):
    """q_proj of both layers built on one rank-16 input basis (sharing is exact at rank 16, separate factors get
    rank 10 each for the same parameters); k_proj of each layer of rank 10 with its own basis (separate factors are
    exact, a shared rank-16 basis cannot hold 20 directions). Selection by loss shares q_proj only."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir)
    gen = torch.Generator().manual_seed(3)
    common = torch.randn(16, 64, generator=gen)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.copy_(torch.randn(64, 16, generator=gen) @ common / 8)
            layer.self_attn.k_proj.weight.copy_(torch.randn(32, 10, generator=gen) @ torch.randn(10, 64, generator=gen)
                                                / 8)
    model.save_pretrained(tmp_path / "planted")
    config = SWSCConfig(method="basis_sharing", n_clusters=0, rank=16, share_group_size=2,
                        share_types=["q_proj", "k_proj"], share_selection="loss", table_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "planted", quantization_config=config)
    attention = [layer.self_attn for layer in model.model.layers]
    assert [a.q_proj.spec.shared_basis for a in attention] == ["q_proj_0_1", "q_proj_0_1"]
    assert [(a.k_proj.spec.shared_basis, a.k_proj.spec.rank) for a in attention] == [(None, 10), (None, 10)]
    assert all(a.k_proj.relative_error < 1e-4 for a in attention)
    assert list(model.swsc_shared_bases.bases) == ["q_proj_0_1"]
    logits = model(input_ids).logits
    model.save_pretrained(tmp_path / "compressed")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")(input_ids).logits, logits)
