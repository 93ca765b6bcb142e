"""`SWSCConfig`: the quantization config that selects and persists a shared-weight compression."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .allocation import fill_budget, uniform_choice
from .core.spec import CLUSTER_DIMS, LayerSpec, fitting_scale_group, rank_for_ratio

FORMAT_VERSION = 1
METHODS = ("swsc", "weight_clustering", "basis_sharing")

# Named settings. The three papers' own recipes, and ours (short segments + per-group scales + calibration).
PRESETS: dict[str, dict[str, Any]] = {
    # SWSC (arXiv 2501.08631): whole output channels K-Means'd to half as many representatives, top-32 SVD.
    "swsc-paper": dict(method="swsc", n_clusters=0.5, segment_length=None, cluster_dim="output", rank=32,
                       scale_group_size=0),
    # Weight clustering (arXiv 2603.17917): every matrix reduced to K=16 shared scalars, affine correction.
    "weight-clustering-paper": dict(method="weight_clustering", n_clusters=16, segment_length=1, rank=0,
                                    scale_group_size=0, affine_correction=True),
    # Basis Sharing (arXiv 2410.03765): 20% parameters removed, q/k/v/up/gate shared by groups of 2 layers.
    "basis-sharing-paper": dict(method="basis_sharing", n_clusters=0, rank=0, parameter_ratio=0.8,
                                share_group_size=2,
                                share_types=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"]),
    # Ours: 16 shared values per matrix over rows scaled per 128 weights (~4.1 bits/weight).
    "swsc-4bit": dict(method="swsc", n_clusters=16, segment_length=1, rank=0, scale_group_size=128),
    # Ours: pairs of weights from a 64-entry codebook per matrix, scaled per 128 weights (~3.1 bits/weight).
    "swsc-3bit": dict(method="swsc", n_clusters=64, segment_length=2, rank=0, scale_group_size=128),
    # Ours: quadruples of weights from a 256-entry codebook per matrix, scaled per 128 weights (~2.2 bits).
    "swsc-2bit": dict(method="swsc", n_clusters=256, segment_length=4, rank=0, scale_group_size=128),
    # The best measured recipes at about 4.25, 3.25, 3.2 and 2.2 bits (figures, and the alternatives measured:
    # docs/results.md, docs/design.md): calibrated, so they need `dataset=` (names ending in "-cal"), and tuned toward
    # the dense model after fitting (tune_* fields). From 4.25 to 3.2 bits each layer's layout, scalar or vector table,
    # is chosen by measured sensitivity (`bits=`); at 2.2 bits quadruples everywhere measured better than that choice.
    # All fit on 64 calibration windows. Tuning draws a fresh window per step, except at 4.25 bits, where 64 steps
    # cycling 16 windows measured as well; the step counts are those measured best within 30 minutes of compression
    # for SmolLM2-135M on 2 CPU cores. The 4.25-, 3.25- and 2.2-bit presets also refit their tables to each layer's
    # output error before tuning (4 rounds; at 2.2 bits with a ridge, `refit_damp`, without which 4 rounds measured
    # no better on a second domain), and tune with bfloat16 products where the hardware multiplies them natively
    # (`tune_dtype="auto"`: no quality cost measured, half the time per step). At 2.2 bits the scales step three
    # times the default (`tune_scales_lr`), which measured better there, and the down projections are scaled per 64
    # weights (`layer_overrides`: 2.22 bits on SmolLM2 instead of 2.19), which measured better on the second domain,
    # and its residual stream is rotated before compression (`rotate_residual`), its norms left as fitted, which
    # measured better on both domains (docs/design.md).
    "swsc-4.25b-cal": dict(bits=4.25, n_samples=64, seq_len=512, tune_samples=16, refit_rounds=4, tune_dtype="auto"),
    "swsc-3.25b-cal": dict(bits=3.25, n_samples=64, seq_len=512, tune_steps=256, refit_rounds=4, tune_dtype="auto"),
    "swsc-3.2b-cal": dict(bits=3.2, n_samples=64, seq_len=512, tune_steps=96),
    "swsc-2.2b-cal": dict(method="swsc", n_clusters=256, segment_length=4, rank=0, scale_group_size=128,
                          n_samples=64, seq_len=512, tune_steps=640, tune_scales_lr=6e-3, refit_rounds=4,
                          refit_damp=0.1, layer_overrides={"down_proj": {"scale_group_size": 64}},
                          rotate_residual=True, tune_dtype="auto"),
}
# Presets whose recipe includes calibration: compressing with them without `dataset=` is refused.
CALIBRATED_PRESETS = frozenset(name for name in PRESETS if name.endswith("-cal"))

DEFAULTS: dict[str, Any] = dict(
    method="swsc", n_clusters=0.5, segment_length=None, cluster_dim="output", rank=32, scale_group_size=0,
    rows_per_codebook=0, affine_correction=False, kmeans_iters=25, seed=0, error_feedback=True, refit_rounds=0,
    refit_damp=0.0, rotate_residual=False, parameter_ratio=None, share_group_size=1, share_types=None,
    share_selection="types", bits_ladder="all", layer_overrides={},
    n_samples=64, seq_len=512, table_dtype="float16", int8_codebooks=False,
    layer_tune_steps=0, layer_tune_lr=1e-3, tune_steps=64, tune_lr=1e-3, tune_scales_lr=2e-3, tune_norms_lr=0.0,
    tune_positions=0, tune_samples=0, tune_dtype="float32", time_budget=None, head_bits=None,
    embedding_from_head=False,
)
TABLE_DTYPES = ("float16", "bfloat16", "float32", "auto")
TUNE_DTYPES = ("float32", "bfloat16", "auto")
SHARE_SELECTIONS = ("types", "loss")
BITS_LADDERS = ("all", "scalar")
# A layer's layout fields: what `bits=` chooses for every layer, and what `layer_overrides` may set for some.
LAYOUT_FIELDS = ("n_clusters", "segment_length", "scale_group_size", "rows_per_codebook", "rank")

DEFAULT_NOT_CONVERT = ["lm_head", "embed_tokens", "embed_out", "wte", "wpe"]
# The output heads among them, compressed when `head_bits` is set.
HEAD_NAMES = ("lm_head", "embed_out")
# The output head's layout with `head_bits`: a table of 2**head_bits scalars per matrix, scales per 128 weights.
HEAD_SCALE_GROUP = 128
# Bounds that keep a config from a stranger from costing minutes before it fails (a 70B dense model has 560 linears;
# the largest mixture-of-experts models about 70 000 expert matrices).
MAX_COMPRESSED_LAYERS = 1 << 17
MAX_SAMPLES, MAX_SEQ_LEN, MAX_KMEANS_ITERS, MAX_TUNE_STEPS = 1 << 16, 1 << 20, 10_000, 1 << 20
MAX_REFIT_ROUNDS = 64
MAX_REFIT_DAMP = 1e6  # beyond this the refit is a plain weight-error fit


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    """An int (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)


class SWSCConfig(QuantizationConfigMixin):
    """Configuration of swsc_hf compression, passed as `quantization_config=` to `from_pretrained`.

    Every compressed layer is `scales * codebook[codes] + lowrank_a @ lowrank_b` (see `swsc_hf.core.spec`);
    the fields choose the sizes of those terms. `preset=` fills the fields from a named setting (see `PRESETS`);
    explicit arguments override it. With `dataset` set, compression is calibrated (data-aware) and runs after the
    dense weights are loaded, layer by layer on the activations of the already-compressed earlier layers.

    The fields, by purpose (all are saved in config.json unless marked "not saved"):

    What to compress and how large (the layout of every layer):
        preset: a named setting (see `PRESETS`); explicit arguments override its fields. Names ending in "-cal"
            are calibrated recipes and need `dataset=`.
        bits: target average bits per compressed weight; chooses every layer's layout (codebooks over segments
            scaled per 128 weights), spread over layers by measured sensitivity when calibrating, uniform
            otherwise. Not combinable with explicit layout fields or a layout preset.
        bits_ladder: the layouts calibrated `bits=` chooses from: "all" (scalar tables of 2^b values and 2- and
            4-dim vector tables, each layer the one that loses least per stored bit: the best quality) or
            "scalar" (scalar tables only: the fastest kernels). Data-free `bits=` has no loss to compare layouts
            by and uses scalar tables.
        n_clusters: codewords per codebook: an int, or a float in (0, 1] = that fraction of the channels.
        segment_length: values per codeword; None = a whole channel (SWSC's layout), 1 = scalar clustering.
        cluster_dim: "output" (rows of W are the channels) or "input" (columns).
        rank: rank of the low-rank term (SWSC's SVD error compensation); 0 disables it.
        scale_group_size: one scale per channel and this many values; 0 = no scales, -1 = one per channel. Rounded
            down to a size that divides the channel length into whole segments.
        rows_per_codebook: channels sharing one codebook; 0 = one codebook per matrix.
        layer_overrides: layout fields for some layers, {layer: {field: value}} (as HQQ's per-module configs and
            GPTQ's `dynamic`), e.g. {"down_proj": {"scale_group_size": 64}}; a key matches the layers whose dotted
            name contains its dotted parts in a row ("down_proj", "mlp.down_proj", "layers.0.mlp.down_proj"),
            later keys winning. Fields: n_clusters, segment_length, scale_group_size, rows_per_codebook, rank. Not
            combinable with `bits` (which chooses every layer's layout). Given explicitly, it replaces a preset's
            overrides as a whole (copy `PRESETS[name]["layer_overrides"]` into it to keep them). Layers sharing a
            basis (`share_group_size` > 1) take its rank from `rank`/`parameter_ratio`, not from an override.
        table_dtype: dtype of the stored float tables (codebooks, scales, factors): "float16" (default, also for
            float32 models, so sizes match what is published), "bfloat16", "float32", or "auto" (the model's).
        int8_codebooks: round every codebook, once compression (tuning included) is done, to integers in [-127, 127]
            times one step per codebook, stored in `table_dtype` (`core.compress.int8_grid_codebook`). The CPU
            kernels' integer dot products compute on that grid, so they read such layers exactly and run them by
            default: 4-bit scalar tables on AVX2 CPUs, 256 quadruples on AVX-512 VBMI ones (`set_integer_dot` makes
            them round any codebook instead). A value moves by at most 1/254 of its codebook's largest magnitude.
            Needs float16 or float32 tables: bfloat16 rounds the grid's multiples too coarsely to be read as it (so
            with table_dtype="auto" on a bfloat16 model the layers keep the float kernels).
        modules_to_not_convert: module names (or suffixes) kept dense; defaults keep lm_head and embeddings
            (and only the embeddings with `head_bits`).
        head_bits: compress the output head (`get_output_embeddings()`, e.g. lm_head) with a table of
            2**head_bits scalars scaled per 128 weights, whatever the other layers' layout (as llama.cpp's
            `--output-tensor-type`); an int from 2 to 8, None = the head stays as `modules_to_not_convert` says. Its
            inputs calibrate it like any layer; a tied input embedding stays dense and is untied; a `bits=` budget
            leaves it out. The head is read in full for every generated token (SmolLM2-135M: 21% of the weights).
        embedding_from_head: where the input embeddings are tied to a compressed output head, read them from the
            head's tables (`SWSCEmbedding`: each token's row decoded on look-up, as a GGUF file stores one
            quantized token_embd for both) instead of keeping a dense copy. The tied matrix is then stored once,
            compressed: Gemma-3-270M's is 62% of its weights. The embeddings take the head's compression error
            (SmolLM2, `swsc-4bit` with its head in that layout: perplexity +1.5%; with `head_bits=6`: +0.1%). With
            `head_bits=8` the tied matrix takes about a quarter of its float32 bytes, and on CPUs with AVX-512 VBMI
            its GEMV reads it about 2.6x faster than the dense float32 head's (docs/design.md).

    Basis Sharing (layers sharing one input-side basis):
        parameter_ratio: fraction of a layer's parameters kept by its low-rank term.
        share_group_size, share_types: layers per shared basis and the projections that share.
        share_selection: "types" (every group of `share_types` shares) or "loss" (a group shares only where its
            measured loss, output error with calibration and Frobenius error without, is lower than separate
            per-layer factors with the same number of parameters).

    How the terms are fitted:
        affine_correction: rescale clustered values to keep each matrix's mean and std (w' = a*w + b).
        kmeans_iters, seed: K-Means iterations and the seed that makes compression deterministic.
        error_feedback: with calibration, GPTQ-style error feedback while assigning codes.
        refit_rounds: with calibration and error feedback, rounds of least-squares refits of each matrix's scales
            and codebook to its output error, codes chosen again between rounds (0 = off).
        refit_damp: the refit's ridge, a fraction of each Hessian's mean diagonal added to it (0 = none): it
            pulls the refit toward the weight error, so the tables fit the calibration text less closely.
        rotate_residual: before compressing, rotate the decoder's residual stream by a random Hadamard matrix
            (QuaRot, SpinQuant), the layer norms' gains folded into the weights that read them (`swsc_hf.rotation`;
            Llama-style decoders): the same model, with weights whose large entries are spread over every input.
            Saved with the checkpoint (the rotation's signs), applied at run time by two small products per token.

    Calibration (not saved):
        dataset, tokenizer, n_samples, seq_len: calibration text (list of strings, a file path, or "wikitext2"),
            the tokenizer, the number of sequences and their length.

    Tuning toward the dense model (calibrated compression only; `layer_tuning`, `distill.distill_tables`):
        layer_tune_steps, layer_tune_lr: Adam steps per decoder layer, right after it is fitted, training its
            codebooks (step size `layer_tune_lr`) and scales (`tune_scales_lr`) to reproduce the dense layer's
            outputs on the calibration windows (0 = off).
        tune_steps: steps of table distillation after compression, on the calibration windows (0 = off). Each
            step runs the dense teacher (the replaced dense layers, swapped back in) and the compressed model.
        tune_lr, tune_scales_lr, tune_norms_lr: Adam step sizes for the codebooks, the per-group scales and the
            layer norms (0 = that part stays as fitted); the scales' is relative, a fraction of each layer's mean
            scale, since scales are weight magnitudes and those differ between models.
        tune_positions: positions per calibration window whose logits are matched (0 = all of them).
        tune_samples: calibration windows tuning draws, each step taking the next (0 = one fresh window per step,
            `tune_steps` of them). Drawn like the fitting windows, which they include; fresh windows keep the
            tables from fitting a few repeated windows (measured: 16 windows seen 4 times tuned worse than 64 seen
            once, and 128 steps on 16 worse than 64).
        tune_dtype: the precision of the end-to-end tuning's (`tune_steps`) matrix products: "float32" (default),
            "bfloat16" (autocast; the tables, their gradients and the loss stay float32), or "auto" (bfloat16 where
            the device multiplies it natively: CPUs with AVX-512 BF16 or AMX, CUDA GPUs with bfloat16; float32
            elsewhere, where bfloat16 would be emulated and slower).
        time_budget: seconds for the whole compression; tuning gets what fitting leaves and stops early (None =
            no limit).

    Labels and the saved result:
        method: "swsc", "weight_clustering" or "basis_sharing": a label of which paper the layout follows, set by
            the presets and recorded in model cards. It selects no code path; it only makes "basis_sharing" require
            `parameter_ratio` or `rank`.
        compressed_layers: per-layer resolved layouts, filled in by compression and saved in config.json; a
            checkpoint's shells are built from it.
        format_version: the checkpoint format this config describes.
    """

    def __init__(
        self,
        method: str | None = None,
        n_clusters: int | float | None = None,
        segment_length: int | None = ...,  # type: ignore[assignment]
        cluster_dim: str | None = None,
        rank: int | None = None,
        scale_group_size: int | None = None,
        rows_per_codebook: int | None = None,
        affine_correction: bool | None = None,
        kmeans_iters: int | None = None,
        seed: int | None = None,
        error_feedback: bool | None = None,
        refit_rounds: int | None = None,
        refit_damp: float | None = None,
        rotate_residual: bool | None = None,
        parameter_ratio: float | None = ...,  # type: ignore[assignment]
        share_group_size: int | None = None,
        share_types: list[str] | None = None,
        share_selection: str | None = None,
        bits_ladder: str | None = None,
        layer_overrides: dict[str, dict[str, Any]] | None = None,
        dataset: str | list[str] | None = None,
        tokenizer: Any = None,
        n_samples: int | None = None,
        seq_len: int | None = None,
        table_dtype: str | None = None,
        int8_codebooks: bool | None = None,
        layer_tune_steps: int | None = None,
        layer_tune_lr: float | None = None,
        tune_steps: int | None = None,
        tune_lr: float | None = None,
        tune_scales_lr: float | None = None,
        tune_norms_lr: float | None = None,
        tune_positions: int | None = None,
        tune_samples: int | None = None,
        tune_dtype: str | None = None,
        time_budget: float | None = ...,  # type: ignore[assignment]
        head_bits: int | None = None,
        embedding_from_head: bool | None = None,
        bits: float | None = None,
        preset: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        compressed_layers: dict[str, dict] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.quant_method = "swsc"
        if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
            raise ValueError(f"SWSCConfig.preset={preset!r} is unknown; use one of {sorted(PRESETS)}")
        if isinstance(compressed_layers, dict) and len(compressed_layers) > MAX_COMPRESSED_LAYERS:
            raise ValueError(f"SWSCConfig.compressed_layers lists {len(compressed_layers)} layers, more than the "
                             f"{MAX_COMPRESSED_LAYERS} any supported model has: the config is corrupted")
        optional_none = ("segment_length", "parameter_ratio", "time_budget")  # None is a meaningful value here
        given = {
            k: v for k, v in locals().items()
            if k in DEFAULTS and v is not ... and (v is not None or k in optional_none)
        }
        # A saved checkpoint's config (it lists its layers) holds every field as it was resolved: its preset records
        # where they came from and is not expanded again, so redefining a preset never changes how old checkpoints
        # load.
        saved = bool(compressed_layers)
        preset_fields = dict(PRESETS[preset]) if preset and not saved else {}
        preset_bits = preset_fields.pop("bits", None)
        if preset_bits is not None:
            if bits is not None and bits != preset_bits:
                raise ValueError(f"SWSCConfig.bits={bits!r} conflicts with preset {preset!r}, which is bits="
                                 f"{preset_bits}; drop one of them")
            bits = preset_bits
        values = copy.deepcopy({**DEFAULTS, **preset_fields, **given})  # no dict shared with PRESETS or DEFAULTS
        for key, value in values.items():
            setattr(self, key, value)
        if bits is not None:
            chosen = sorted([k for k in LAYOUT_FIELDS if given.get(k) is not None]
                            + (["layer_overrides"] if given.get("layer_overrides") else []))
            if chosen or (preset is not None and preset_bits is None and not saved):
                raise ValueError(f"SWSCConfig.bits={bits!r} chooses every layer's layout itself; drop "
                                 f"{chosen or ['preset']} or drop bits")
            for key in LAYOUT_FIELDS:
                setattr(self, key, None)
        self.bits = bits
        self.preset = preset
        self.dataset = dataset
        self.tokenizer = tokenizer
        keep_dense = modules_to_not_convert
        if keep_dense is None:
            keep_dense = [name for name in DEFAULT_NOT_CONVERT if not (self.head_bits and name in HEAD_NAMES)]
        # anything but a list or tuple is left for post_init to reject
        self.modules_to_not_convert = list(keep_dense) if isinstance(keep_dense, (list, tuple)) else keep_dense
        self.compressed_layers = dict(compressed_layers) if isinstance(compressed_layers, dict) else (
            compressed_layers or {})
        self.format_version = format_version
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"SWSCConfig got unknown fields {sorted(unknown)}; see help(SWSCConfig) (a checkpoint's "
                             "config.json with fields this swsc_hf does not know was written by a newer one: upgrade "
                             "swsc_hf to load it)")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; the message names the field and what is allowed."""

        def fail(field: str, allowed: str) -> None:
            raise ValueError(f"SWSCConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        if isinstance(self.format_version, bool) or self.format_version != FORMAT_VERSION:
            fail("format_version", f"this swsc_hf reads format {FORMAT_VERSION}; upgrade swsc_hf to load this model")
        for field, allowed in (("method", METHODS), ("cluster_dim", CLUSTER_DIMS), ("table_dtype", TABLE_DTYPES),
                               ("share_selection", SHARE_SELECTIONS), ("bits_ladder", BITS_LADDERS),
                               ("tune_dtype", TUNE_DTYPES)):
            if not isinstance(getattr(self, field), str) or getattr(self, field) not in allowed:
                fail(field, f"use one of {allowed}")
        for field in ("affine_correction", "error_feedback", "rotate_residual", "int8_codebooks",
                      "embedding_from_head"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "use True or False")
        for field in ("modules_to_not_convert", "share_types"):
            value = getattr(self, field)
            if not (value is None and field == "share_types") and (
                    not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                fail(field, "use a list of module names")
        if self.embedding_from_head and self.rotate_residual:
            fail("embedding_from_head", "a rotated residual stream (rotate_residual=True) rotates the dense input "
                 "embedding's output; use one of them")
        if self.int8_codebooks and self.table_dtype == "bfloat16":
            fail("int8_codebooks", "bfloat16 tables cannot hold the 8-bit grid exactly; use table_dtype='float16' "
                 "(the default) or 'float32', or int8_codebooks=False")
        if not isinstance(self.compressed_layers, dict):
            fail("compressed_layers", "use a dict of layer name -> layout, as swsc_hf writes it")
        if self.preset is not None and (not isinstance(self.preset, str) or self.preset not in PRESETS):
            fail("preset", f"use one of {sorted(PRESETS)}")
        if self.bits is None:
            self._validate_layout(fail, self._layout())
        elif isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not 1.5 <= self.bits <= 16:
            fail("bits", "use a number of bits per weight between 1.5 and 16")
        self._validate_overrides()
        if not _is_int(self.kmeans_iters, 1, MAX_KMEANS_ITERS):
            fail("kmeans_iters", f"use an int from 1 to {MAX_KMEANS_ITERS}")
        if not _is_int(self.refit_rounds, 0, MAX_REFIT_ROUNDS):
            fail("refit_rounds", f"use an int from 0 (off) to {MAX_REFIT_ROUNDS}")
        damp = self.refit_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= MAX_REFIT_DAMP:
            fail("refit_damp", f"use a number from 0 (no ridge) to {MAX_REFIT_DAMP}")
        if not _is_int(self.seed, 0, 2**63 - 1):
            fail("seed", "use an int from 0 to 2**63 - 1")
        if self.parameter_ratio is not None and (isinstance(self.parameter_ratio, bool) or not isinstance(
                self.parameter_ratio, (int, float)) or not 0 < self.parameter_ratio <= 1):
            fail("parameter_ratio", "use None or a float in (0, 1] (fraction of parameters kept)")
        if not _is_int(self.share_group_size, 1):
            fail("share_group_size", "use an int >= 1 (layers sharing one basis)")
        for field, high in (("n_samples", MAX_SAMPLES), ("seq_len", MAX_SEQ_LEN)):
            if not _is_int(getattr(self, field), 1, high):
                fail(field, f"use an int from 1 to {high}")
        for field, high in (("layer_tune_steps", MAX_TUNE_STEPS), ("tune_steps", MAX_TUNE_STEPS),
                            ("tune_positions", MAX_SEQ_LEN)):
            if not _is_int(getattr(self, field), 0, high):
                fail(field, f"use an int from 0 (off) to {high}")
        if self.head_bits is not None and not _is_int(self.head_bits, 2, 8):
            fail("head_bits", "use None (the head stays as modules_to_not_convert says) or an int from 2 to 8 (a "
                 "table of 2**head_bits values)")
        if not _is_int(self.tune_samples, 0, MAX_SAMPLES):
            fail("tune_samples", f"use an int from 0 (a fresh window per tuning step) to {MAX_SAMPLES}")
        for field in ("layer_tune_lr", "tune_lr", "tune_scales_lr", "tune_norms_lr"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e3:
                fail(field, "use a step size >= 0 (0 = not tuned)")
        budget = self.time_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or
                                   not 0 < budget < math.inf):
            fail("time_budget", "use None (no limit) or a number of seconds > 0")
        if self.dataset is not None and not isinstance(self.dataset, (str, list)):
            fail("dataset", 'use a list of strings, a path to a text file, or "wikitext2"')
        for name, layer in self.compressed_layers.items():
            try:
                LayerSpec.from_dict(layer)
            except (TypeError, ValueError) as err:
                raise ValueError(f"SWSCConfig.compressed_layers[{name!r}] is invalid: {err}") from None

    def _validate_layout(self, fail, layout: dict[str, Any]) -> None:
        """Check the layout fields `layout` (the config's own, or with a layer's overrides applied)."""
        n, rank = layout["n_clusters"], layout["rank"]
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0 or (
                isinstance(n, float) and n > 1):
            fail("n_clusters", "use an int >= 1 (clusters per codebook), a float in (0, 1] (fraction of channels), "
                 "or 0 (no codebook term)")
        if layout["segment_length"] is not None and not _is_int(layout["segment_length"], 1):
            fail("segment_length", "use None (a whole channel) or an int >= 1")
        for field in ("rank", "rows_per_codebook"):
            if not _is_int(layout[field], 0):
                fail(field, "use an int >= 0")
        if not _is_int(layout["scale_group_size"], -1):
            fail("scale_group_size", "use 0 (no scales), -1 (one per channel) or a group size >= 1")
        if self.method == "basis_sharing" and self.parameter_ratio is None and not rank:
            fail("parameter_ratio", "basis_sharing needs parameter_ratio (or rank) to size the shared basis")
        if n == 0 and not rank and self.parameter_ratio is None:
            fail("n_clusters", "n_clusters=0 needs a low-rank term (rank > 0 or parameter_ratio)")

    def _validate_overrides(self) -> None:
        """`layer_overrides` is {layer: {layout field: value}} and every overridden layout is valid."""
        overrides = self.layer_overrides
        if not isinstance(overrides, dict) or not all(
                isinstance(key, str) and key and isinstance(fields, dict) for key, fields in overrides.items()):
            raise ValueError(f"SWSCConfig.layer_overrides={overrides!r} is invalid: use a dict of layer name -> "
                             'dict of layout fields, e.g. {"down_proj": {"scale_group_size": 64}}')
        if len(overrides) > MAX_COMPRESSED_LAYERS:
            raise ValueError(f"SWSCConfig.layer_overrides lists {len(overrides)} layers, more than the "
                             f"{MAX_COMPRESSED_LAYERS} any supported model has: the config is corrupted")
        for key, fields in overrides.items():
            unknown = sorted(set(fields) - set(LAYOUT_FIELDS))
            if unknown:
                raise ValueError(f"SWSCConfig.layer_overrides[{key!r}] sets {unknown}, which are not layout fields; "
                                 f"use some of {list(LAYOUT_FIELDS)}")
            layout = {**self._layout(), **fields}

            def fail(field: str, allowed: str, key: str = key, layout: dict = layout) -> None:
                raise ValueError(f"SWSCConfig.layer_overrides[{key!r}] gives {field}={layout.get(field)!r}, which "
                                 f"is invalid: {allowed}")

            self._validate_layout(fail, layout)

    def _layout(self, name: str | None = None) -> dict[str, Any]:
        """The layout fields (`LAYOUT_FIELDS`) for layer `name`: the config's, with the `layer_overrides` whose key
        matches `name` applied in order (none when `name` is None)."""
        layout = {field: getattr(self, field) for field in LAYOUT_FIELDS}
        if name is not None:
            parts = name.split(".")
            for key, fields in self.layer_overrides.items():
                wanted = key.split(".")
                if any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1)):
                    layout.update(fields)
        return layout

    # ---- resolution ----------------------------------------------------------------------------------------
    def layer_spec(self, name: str, out_features: int, in_features: int,
                   allocation: dict[str, LayerSpec] | None = None) -> LayerSpec:
        """The layout of module `name`: the saved one if compressed already, else the one `allocation` chose for
        `bits=` (calibrated), else resolved from the fields and the `layer_overrides` that match `name`."""
        if name in self.compressed_layers:
            spec = LayerSpec.from_dict(self.compressed_layers[name])
            if (spec.out_features, spec.in_features) != (out_features, in_features):
                raise ValueError(
                    f"quantization_config.compressed_layers[{name!r}] is for a ({spec.out_features}, "
                    f"{spec.in_features}) weight but the model's layer is ({out_features}, {in_features}); the "
                    "checkpoint's config does not match its architecture"
                )
            return spec
        if self.bits is not None:
            return (allocation or {}).get(name) or uniform_choice(out_features, in_features, self.bits)
        layout = self._layout(name)
        channels, length = (out_features, in_features) if self.cluster_dim == "output" else (in_features, out_features)
        n = layout["n_clusters"]
        k = max(1, round(n * channels)) if isinstance(n, float) else min(n, 2**16)
        segment = length if layout["segment_length"] is None else layout["segment_length"]
        if n and length % segment:
            raise ValueError(f"SWSCConfig.segment_length={segment} does not divide the {length}-long channels of "
                             f"{name}; pick a divisor or add {name!r} to modules_to_not_convert")
        group = {0: 0, -1: length}.get(layout["scale_group_size"], layout["scale_group_size"])
        if n and group:
            group = fitting_scale_group(group, length, segment)
        rank = layout["rank"]
        if self.parameter_ratio is not None and not n:
            rank = max(1, rank_for_ratio(self.parameter_ratio, out_features, in_features))
        return LayerSpec(
            out_features=out_features, in_features=in_features, n_clusters=k if n else 0, segment_length=segment,
            cluster_dim=self.cluster_dim, rank=min(rank, out_features, in_features),
            scale_group_size=group if n else 0, rows_per_codebook=layout["rows_per_codebook"],
        )

    def head_spec(self, out_features: int, in_features: int) -> LayerSpec:
        """The output head's layout with `head_bits`: 2**head_bits scalars per matrix, scales per 128 weights."""
        return LayerSpec(out_features, in_features, n_clusters=2**self.head_bits, segment_length=1,
                         scale_group_size=fitting_scale_group(HEAD_SCALE_GROUP, in_features))

    def check_compressible(self) -> None:
        """Refuse to compress with a calibrated preset (a name ending in "-cal") but no calibration text."""
        if self.preset in CALIBRATED_PRESETS and not self.is_calibrated:
            raise ValueError(f"SWSCConfig.preset={self.preset!r} is a calibrated recipe and needs calibration text: "
                             'pass dataset= (a list of strings, a text file, or "wikitext2") and tokenizer=, or use '
                             "a data-free preset such as 'swsc-4bit'")

    def plan_bits(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Data-free `bits=`: resolve the layouts of the layers `shapes` (name -> (out, in)) together so their average
        fills the budget (`allocation.fill_budget`), recorded in `compressed_layers` before compression. Layers
        with a recorded layout (a head sized by `head_bits`) are left out. No-op for other configs, calibrated
        `bits=` (sized by measured sensitivity) or a config whose layers all have layouts."""
        if self.bits is None or self.is_calibrated:
            return
        unplanned = {name: shape for name, shape in shapes.items() if name not in self.compressed_layers}
        if unplanned:
            self.compressed_layers.update(
                (name, spec.to_dict()) for name, spec in fill_budget(unplanned, self.bits).items())

    def table_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype compressed tables are stored in for a model of `model_dtype`."""
        return model_dtype if self.table_dtype == "auto" else getattr(torch, self.table_dtype)

    def fit_options(self) -> dict[str, Any]:
        """The keyword arguments of `core.compress.compress_weight` this config sets."""
        return dict(kmeans_iters=self.kmeans_iters, seed=self.seed, affine_correction=self.affine_correction,
                    error_feedback=self.error_feedback, refit_rounds=self.refit_rounds,
                    refit_damp=self.refit_damp)

    @property
    def is_calibrated(self) -> bool:
        return self.dataset is not None

    @property
    def tunes(self) -> bool:
        """Whether compression ends with distillation toward the dense model (calibrated, tune_steps > 0, and
        something to tune)."""
        return self.is_calibrated and self.tune_steps > 0 and (self.tune_lr > 0 or self.tune_scales_lr > 0
                                                                 or self.tune_norms_lr > 0)

    @property
    def shares_bases(self) -> bool:
        """Whether some projections share a basis across layers (Basis Sharing)."""
        return bool(self.share_types) and self.share_group_size > 1

    def shares_basis(self, name: str) -> bool:
        """Whether module `name` shares its basis with the same projection of adjacent layers."""
        return self.shares_bases and name.rsplit(".", 1)[-1] in self.share_types

    @property
    def compresses_after_load(self) -> bool:
        """Calibration, basis sharing and the stream's rotation need whole layers (or the whole model), so they run
        after loading."""
        return self.is_calibrated or self.shares_bases or self.rotate_residual

    # ---- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the model; calibration inputs (dataset, tokenizer) are not persisted."""
        transient = ("dataset", "tokenizer")
        out = copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in transient})
        out["quant_method"] = "swsc"
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        return f"{self.__class__.__name__} {self.to_json_string(use_diff=False)}"
