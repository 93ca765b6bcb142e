"""The benchmark's method registry (`METHODS`) and `apply_method`, shared by quality.py, speed.py and
compression_time.py.

To add or change a method, edit `METHODS`: name -> (family, kwargs). For family "swsc_hf" the kwargs go to
`SWSCConfig(...)` as they are (a `dataset` makes it calibrated; the tokenizer is filled in at run time). Names that
differ only in a bit count (`-4bit`, `-4b`) are drawn as one line in the plot.
"""

from __future__ import annotations

import time
from typing import Any

import common
import torch
from torch import nn

# The rows measured before 2026-12-05 add the tuning step sizes of that time: codebooks 3e-3, scales 2e-4 of their
# magnitude (about the absolute 1e-4 they took then on SmolLM2's scales, ~0.5). The defaults since are 1e-3 and 2e-3.
FIRST_TUNING = dict(tune_lr=3e-3, tune_scales_lr=2e-4)

# The 4.25-, 3.25- and 2.2-bit presets tune in bfloat16 where the CPU multiplies it natively (`tune_dtype="auto"`)
# since 2026-12-05; the rows built on them that were measured before add this.
BEFORE_BF16_TUNING = dict(tune_dtype="float32")

# The 4.25- and 3.25-bit presets refit their tables to each layer's output error since 2026-12-05 (`refit_rounds`),
# the 2.2-bit one since 2026-12-06; the rows built on them that were measured before (in float32 too) add this, so
# each still reproduces its record.
BEFORE_REFIT = dict(refit_rounds=0, refit_damp=0.0, layer_overrides={}, **BEFORE_BF16_TUNING)

# The 2.2-bit preset tunes its layer norms beside the tables (`tune_norms_lr`) since 2026-12-06, when the teacher
# stopped sharing them (before, tuned norms moved the teacher's too); the rows built on it that were measured before
# add this.
BEFORE_2_2B_NORMS = dict(tune_norms_lr=0.0, rotate_residual=False)

# The 2.2-bit preset rotates its residual stream before compression (`rotate_residual`) and leaves its norms as
# fitted since 2026-12-06 (evening); the row of the preset as it was just before (norms tuned) adds this.
BEFORE_2_2B_ROTATION = dict(tune_norms_lr=1e-3, rotate_residual=False)

# Each calibrated preset's tuning steps before 2026-12-05, when the 3.25- and 2.2-bit ones spent the time bfloat16
# saved on more (256 instead of 160, 448 instead of 224); rows built on a preset without their own steps add these.
FORMER_STEPS = {"4.25": {}, "3.25": dict(tune_steps=160), "3.2": {}, "2.2": dict(tune_steps=224, **BEFORE_2_2B_NORMS)}

# The 2.2-bit preset refits its tables in 4 rounds with a ridge (`refit_damp`) and scales its down projections per
# 64 weights (`layer_overrides`) since 2026-12-06 (after a few hours with 2 rounds, no ridge, scales per 128): the
# rows measured with 2 rounds add the first, those measured without the refit (in bfloat16) the second. Both tuned
# 448 steps, the preset's count until it took 576 later that day.
BEFORE_2_2B_RIDGE = dict(refit_rounds=2, refit_damp=0.0, layer_overrides={}, tune_steps=448, **BEFORE_2_2B_NORMS)
BEFORE_2_2B_REFIT = dict(BEFORE_2_2B_RIDGE, refit_rounds=0)

# The 2.2-bit preset's scales step before 2026-12-05, when it became three times the default (6e-3 of each layer's
# mean scale); the rows built on that preset that were measured before (without the refit too) add this.
BEFORE_2_2B_SCALES_STEP = dict(tune_scales_lr=2e-3, **BEFORE_2_2B_REFIT)

# Calibration shared by every calibrated method (swsc_hf and GPTQ): 16 WikiText-2 validation windows of 512 tokens
# (what the published results used; swsc_hf alone defaults to 64).
CALIBRATION = dict(dataset="wikitext2", n_samples=16, seq_len=512)

# swsc_hf's calibrated fit alone: since calibrated compression tunes toward the dense model by default, the "-cal"
# rows switch that off (the "-kd" rows run it as a second stage, the "b-cal" presets as part of compression).
SWSC_CALIBRATION = dict(**CALIBRATION, tune_steps=0)

# Table distillation (swsc_hf.distill.distill_tables): steps over the calibration windows, codebook and scale step
# sizes (the scales' relative to their magnitude: 2e-4 is about the absolute 1e-4 these rows were measured with).
DISTILL = dict(steps=64, lr=3e-3, scales_lr=2e-4)

# Everything but the attention's query and key projections (for the SWSC paper's own ground).
NOT_QK = ["lm_head", "embed_tokens", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "dense-bf16": ("dense", dict(dtype="bfloat16")),
    # Dense fp32 with every nn.Linear on swsc_hf's dense GEMV (`SWSCDenseLinear`, what compressed models run their
    # dense head on) and its attention on swsc_hf's decode attention, as compressed models have both: how fast the
    # dense model decodes on swsc_hf's kernels (speed runs only).
    "dense-gemv": ("dense", dict(dense_gemv=True)),
    **{f"rtn-{b}b-g{g}": ("rtn", dict(bits=b, group_size=g)) for b in (2, 3, 4, 6) for g in (64, 128)},
    **{f"hqq-{b}b-g64": ("hqq", dict(bits=b, group_size=64)) for b in (2, 3, 4)},
    **{f"gptq-{b}b-g64": ("gptq", dict(bits=b, group_size=64, **CALIBRATION)) for b in (2, 3, 4)},
    "quanto-int4": ("quanto", dict(bits=4)),
    "quanto-int8": ("quanto", dict(bits=8)),
    "torchao-int4-g64": ("torchao", dict(bits=4, group_size=64)),
    "torchao-int8": ("torchao", dict(bits=8, group_size=None)),
    # The papers' own recipes (swsc_hf presets).
    "swsc-paper": ("swsc_hf", dict(preset="swsc-paper")),
    "swsc-paper-cal": ("swsc_hf", dict(preset="swsc-paper", **SWSC_CALIBRATION)),
    "weight-clustering-paper": ("swsc_hf", dict(preset="weight-clustering-paper")),
    "basis-sharing-paper": ("swsc_hf", dict(preset="basis-sharing-paper")),
    "basis-sharing-paper-cal": ("swsc_hf", dict(preset="basis-sharing-paper", **SWSC_CALIBRATION)),
    "weight-clustering-paper-cal": ("swsc_hf", dict(preset="weight-clustering-paper", **SWSC_CALIBRATION)),
    # Second settings of the papers' methods: K=64 values per matrix (6 bits); 40% of parameters removed.
    "weight-clustering-k64": ("swsc_hf", dict(preset="weight-clustering-paper", n_clusters=64)),
    "weight-clustering-k64-cal": ("swsc_hf", dict(preset="weight-clustering-paper", n_clusters=64,
                                                  **SWSC_CALIBRATION)),
    "basis-sharing-keep60": ("swsc_hf", dict(preset="basis-sharing-paper", parameter_ratio=0.6)),
    "basis-sharing-keep60-cal": ("swsc_hf", dict(preset="basis-sharing-paper", parameter_ratio=0.6,
                                                 **SWSC_CALIBRATION)),
    # Ours, data-free and calibrated.
    **{f"swsc-{b}bit": ("swsc_hf", dict(preset=f"swsc-{b}bit")) for b in (4, 3, 2)},
    # ... with the output head compressed too (SmolLM2's tied 49152 x 576 head is 21% of the weights; the
    # embedding stays dense)
    **{f"swsc-{b}bit-head": ("swsc_hf", dict(preset=f"swsc-{b}bit", modules_to_not_convert=["embed_tokens"]))
       for b in (4, 3, 2)},
    # ... with every codebook on its 8-bit grid (`int8_codebooks`), which the CPU kernels' integer dot products read
    # exactly and so run by default (AVX2 CPUs: the 4-bit tables)
    "swsc-4bit-int8": ("swsc_hf", dict(preset="swsc-4bit", int8_codebooks=True)),
    "swsc-4bit-head-int8": ("swsc_hf", dict(preset="swsc-4bit", int8_codebooks=True,
                                            modules_to_not_convert=["embed_tokens"])),
    # ... with the tied input embeddings read from the compressed head (`embedding_from_head`) instead of a dense
    # copy: the tied matrix is stored once, compressed, as in a GGUF file
    "swsc-4bit-head-tied": ("swsc_hf", dict(preset="swsc-4bit", modules_to_not_convert=["embed_tokens"],
                                            embedding_from_head=True)),
    "swsc-4bit-head-int8-tied": ("swsc_hf", dict(preset="swsc-4bit", int8_codebooks=True, embedding_from_head=True,
                                                 modules_to_not_convert=["embed_tokens"])),
    # ... the head with its own 6-bit table (`head_bits=6`), the embeddings dense or read from it
    "swsc-4bit-head6": ("swsc_hf", dict(preset="swsc-4bit", head_bits=6)),
    "swsc-4bit-head6-tied": ("swsc_hf", dict(preset="swsc-4bit", head_bits=6, embedding_from_head=True)),
    **{f"swsc-{b}bit-cal": ("swsc_hf", dict(preset=f"swsc-{b}bit", **SWSC_CALIBRATION)) for b in (4, 3, 2)},
    # Ours, then the codebooks and scales distilled toward the dense model on the calibration windows
    # (quality.py also records the model before distillation, under the name without "-kd").
    **{f"swsc-{b}bit-cal-kd": ("swsc_hf", dict(preset=f"swsc-{b}bit", **SWSC_CALIBRATION, distill=DISTILL))
       for b in (3, 2)},
    # Ours with a bits budget spread over layers by measured (Fisher) sensitivity.
    # (data-free, each layer gets the richest layout within the budget: 6.25 buys 6-bit codes, 6 only 5-bit ones)
    "swsc-bits6.25": ("swsc_hf", dict(bits=6.25)),
    "swsc-bits4.25": ("swsc_hf", dict(bits=4.25)),
    # (calibrated, from scalar tables only: what bits= chose from before vector tables joined its ladder)
    **{f"swsc-bits{b}-cal": ("swsc_hf", dict(bits=b, bits_ladder="scalar", **SWSC_CALIBRATION))
       for b in (6.25, 4.25, 4.15, 3.15, 2.4)},
    **{f"swsc-bits{b}-cal-kd": ("swsc_hf", dict(bits=b, bits_ladder="scalar", **SWSC_CALIBRATION, distill=DISTILL))
       for b in (4.25, 4.15)},
    # The calibrated presets: fit, then tuning toward the dense model inside compression (its time included).
    **{f"swsc-{b}b-cal": ("swsc_hf", dict(preset=f"swsc-{b}b-cal", dataset="wikitext2"))
       for b in ("4.25", "3.25", "3.2", "2.2")},
    # swsc-3bit's layout everywhere, calibrated and tuned as the presets are (the 3.2-bit preset before `bits=`
    # chose among vector tables)
    "swsc-3bit-cal-tuned": ("swsc_hf", dict(preset="swsc-3bit", **CALIBRATION, **FIRST_TUNING)),
    # The 3.2-bit preset as it was until 2026-12-04: fitted on 16 windows, tuned 128 steps on fresh windows
    "swsc-3.2b-cal-n16": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", n_samples=16, tune_steps=128,
                                          **FIRST_TUNING)),
    # ... as it was before tuning drew fresh windows: 64 steps cycling the 16 fitting windows
    "swsc-3.2b-cal-t64-cycled": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", n_samples=16,
                                                 tune_steps=64, tune_samples=16, **FIRST_TUNING)),
    # ... with twice its tuning steps (fresh windows), once a tuning step cost less
    "swsc-3.2b-cal-t256": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", n_samples=16,
                                           tune_steps=256, **FIRST_TUNING)),
    # The 3.2-bit preset tuned with the default step sizes since 2026-12-05 (codebooks 1e-3, scales 2e-3 of their
    # magnitude) instead of the former ones (3e-3, 2e-4): measured first under this name, then the preset's recipe
    "swsc-3.2b-cal-new-steps": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", tune_lr=1e-3,
                                                tune_scales_lr=2e-3)),
    # The 4.25- and 3.25-bit presets as they were until 2026-12-05, without refitting the tables to the layers'
    # output error
    **{f"swsc-{b}b-cal-no-refit": ("swsc_hf", dict(preset=f"swsc-{b}b-cal", dataset="wikitext2", **BEFORE_REFIT,
                                                   **FORMER_STEPS[b])) for b in ("4.25", "3.25")},
    # The 3.25-bit preset tuned 128 steps instead of 160, for more room in the 30-minute budget: over the 20% target
    "swsc-3.25b-cal-t128": ("swsc_hf", dict(preset="swsc-3.25b-cal", dataset="wikitext2", tune_steps=128,
                                            **BEFORE_BF16_TUNING)),
    # The 3.25-bit preset (without the refit) tuned 192 steps instead of 160: -0.2% for 93% of the 30-minute budget
    "swsc-3.25b-cal-t192": ("swsc_hf", dict(preset="swsc-3.25b-cal", dataset="wikitext2", tune_steps=192,
                                            **BEFORE_REFIT)),
    # The 4.25-bit preset fitted on twice its calibration windows (128 x 512 tokens): measured no better
    "swsc-4.25b-cal-n128": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=128,
                                            **BEFORE_REFIT)),
    # The 2.2-bit preset with half its tuning steps
    "swsc-2.2b-cal-t128": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", n_samples=16,
                                           tune_steps=128, **FIRST_TUNING, **BEFORE_REFIT,
                                           **BEFORE_2_2B_NORMS)),
    # ... and with its output head compressed too, to a 6-bit scalar table (`head_bits=6`; the embedding stays dense)
    "swsc-2.2b-cal-t128-head6": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", n_samples=16,
                                                 tune_steps=128, head_bits=6, **FIRST_TUNING,
                                                 **BEFORE_REFIT, **BEFORE_2_2B_NORMS)),
    # The 2.2-bit preset as it was until 2026-12-05 (224 steps tuned in float32), and the same steps tuned with
    # bfloat16 matrix products (`tune_dtype`); twice the steps in bfloat16 became the preset
    "swsc-2.2b-cal-t224": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", **BEFORE_BF16_TUNING,
                                           **dict(BEFORE_2_2B_SCALES_STEP, **FORMER_STEPS["2.2"]))),
    "swsc-2.2b-cal-bf16": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", tune_dtype="bfloat16",
                                           **dict(BEFORE_2_2B_SCALES_STEP, tune_steps=224))),
    # The 2.2-bit preset with the default scales step (2e-3 of each layer's mean scale), as it was until 2026-12-05
    "swsc-2.2b-cal-scales2e-3": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2",
                                                 **BEFORE_2_2B_SCALES_STEP)),
    # The 2.2-bit preset as it was for a few hours of 2026-12-06: 2 refit rounds, no ridge, scales per 128 weights
    "swsc-2.2b-cal-refit2": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", **BEFORE_2_2B_RIDGE)),
    # ... with 4 refit rounds (as the 4.25- and 3.25-bit presets)
    "swsc-2.2b-cal-refit4": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2",
                                             **dict(BEFORE_2_2B_RIDGE, refit_rounds=4))),
    # ... and the refit's ridge (`refit_damp`: a tenth of each Hessian's mean diagonal added to it); the preset is
    # this with its down projections scaled per 64 weights
    "swsc-2.2b-cal-refit4-damp0.1": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2",
                                                     **dict(BEFORE_2_2B_RIDGE, refit_rounds=4, refit_damp=0.1))),
    # The 2.2-bit preset as it was for a few hours of 2026-12-06: 448 tuning steps (576 since, in the time the fused
    # distillation loss and the head cast once per tuning run saved); measured with the unfused loss
    "swsc-2.2b-cal-down64-t448": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", tune_steps=448,
                                                  **BEFORE_2_2B_NORMS)),
    # ... and with 576 steps, as it was until its norms were tuned too (with the former nearest-codeword search)
    "swsc-2.2b-cal-t576": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", tune_steps=576,
                                           **BEFORE_2_2B_NORMS)),
    # ... and with its norms tuned too, as it was until it rotated its residual stream (the evening of 2026-12-06)
    "swsc-2.2b-cal-norms": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", **BEFORE_2_2B_ROTATION)),
    # The 2.2-bit preset with its value and output projections scaled per 48 weights too (2.241 bits)
    "swsc-2.2b-cal-vo48": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", tune_steps=576,
                                           **BEFORE_2_2B_NORMS,
                                           layer_overrides={"down_proj": {"scale_group_size": 64},
                                                            "v_proj": {"scale_group_size": 48},
                                                            "o_proj": {"scale_group_size": 48}})),
    # The 2.2-bit preset as it was until 2026-12-06, without refitting its tables to each layer's output error
    "swsc-2.2b-cal-no-refit": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", **BEFORE_2_2B_REFIT)),
    # ... and with twice the codebooks' tuning step (2e-3)
    "swsc-2.2b-cal-lr2e-3": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", tune_lr=2e-3,
                                             **BEFORE_2_2B_REFIT)),
    # The 3.25-bit preset with its former 160 tuning steps, in bfloat16 (256 in the time that saved became the preset)
    "swsc-3.25b-cal-t160": ("swsc_hf", dict(preset="swsc-3.25b-cal", dataset="wikitext2", tune_steps=160)),
    # The 4.25- and 3.25-bit presets as they were until 2026-12-05, tuned in float32
    **{f"swsc-{b}b-cal-float32-tuning": ("swsc_hf", dict(preset=f"swsc-{b}b-cal", dataset="wikitext2",
                                                          **BEFORE_BF16_TUNING, **FORMER_STEPS[b]))
       for b in ("4.25", "3.25")},
    # The 2.2-bit preset as it was until 2026-12-04: fitted on 16 windows, tuned 256 steps
    "swsc-2.2b-cal-n16": ("swsc_hf", dict(preset="swsc-2.2b-cal", dataset="wikitext2", n_samples=16, tune_steps=256,
                                          **FIRST_TUNING, **BEFORE_REFIT, **BEFORE_2_2B_NORMS)),
    # The former (16-window) 4.25-bit preset with its head in a 6-bit table beside the budget, and with the head
    # inside the budget (the `bits=` allocation sizes it with the other linears; the tied embedding stays dense)
    "swsc-4.25b-cal-head6": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                             head_bits=6, **FIRST_TUNING, **BEFORE_REFIT)),
    "swsc-4.25b-cal-headin": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                              modules_to_not_convert=["embed_tokens"], **FIRST_TUNING,
                                              **BEFORE_REFIT)),
    # The 4.25-bit preset served with its head on a 6-bit table that the tied embeddings read (`head_bits=6`,
    # `embedding_from_head=True`): the tied matrix stored once, compressed, beside the budget
    "swsc-4.25b-cal-head6-tied": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", head_bits=6,
                                                  embedding_from_head=True)),
    # The same on an 8-bit table (`head_bits=8`): a quarter of the float32 head's bytes, read by the byte-plane GEMV
    "swsc-4.25b-cal-head8-tied": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", head_bits=8,
                                                  embedding_from_head=True)),
    # `bits=2.2` calibrated and tuned as the presets are (measured worse than the 2.2-bit preset's quadruples)
    "swsc-bits2.2-cal-tuned": ("swsc_hf", dict(bits=2.2, **CALIBRATION, **FIRST_TUNING)),
    # The 4.25-bit preset as it was before vector tables joined the `bits=` ladder (scalar tables only), and the same
    # with twice the calibration windows and four times the tuning steps (each window seen 8 times, not 4)
    "swsc-4.25b-cal-scalar": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                              bits_ladder="scalar", **FIRST_TUNING, **BEFORE_REFIT)),
    "swsc-4.25b-cal-scalar-n32-t256": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2",
                                                       bits_ladder="scalar", n_samples=32, tune_steps=256,
                                                       **FIRST_TUNING, **BEFORE_REFIT)),
    # The former 3.2-bit preset fitted on 4x its calibration windows (64 x 512 tokens; 128 tuning steps); with 96
    # steps instead, it became the preset
    "swsc-3.2b-cal-n64": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", n_samples=64,
                                          tune_steps=128, **FIRST_TUNING)),
    # The 4.25-bit preset as it was until 2026-12-04, fitted on 16 windows (tuning the same: 64 steps cycling 16)
    "swsc-4.25b-cal-n16": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                           **FIRST_TUNING, **BEFORE_REFIT)),
    # The 4.25-bit preset tuned twice as long, cycling 32 of its 64 windows
    "swsc-4.25b-cal-t128-s32": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", tune_steps=128,
                                                tune_samples=32, **FIRST_TUNING, **BEFORE_REFIT)),
    # ... and, with the tuning's current step sizes, three times as long on fresh windows (as the 3.25-bit preset)
    "swsc-4.25b-cal-t192": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", tune_steps=192,
                                            tune_samples=0)),
    # ... and with the 2.2-bit preset's ridge on the refit (`refit_damp`: a tenth of each Hessian's mean diagonal)
    "swsc-4.25b-cal-damp0.1": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", refit_damp=0.1)),
    # The calibrated presets with each decoder layer's tables tuned 32 steps toward the dense layer's outputs right
    # after it is fitted (swsc_hf.layer_tuning), before the end-to-end tuning
    **{f"swsc-{b}b-cal-lt32": ("swsc_hf", dict(preset=f"swsc-{b}b-cal", dataset="wikitext2", layer_tune_steps=32,
                                               **FIRST_TUNING, **BEFORE_REFIT, **FORMER_STEPS[b]))
       for b in ("4.25", "3.2", "2.2")},
    # The 4.25-bit preset calibrated on windows as long as the evaluation's (16 x 2048 tokens: the same tokens as its
    # 64 x 512), tuned 32 steps cycling those 16 windows (twice the preset's tuning tokens in half its steps)
    "swsc-4.25b-cal-len2048": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                               seq_len=2048, tune_steps=32, **FIRST_TUNING, **BEFORE_REFIT)),
    # The 4.25-bit preset calibrated and tuned on Shakespeare (common.shakespeare_calibration_rows, disjoint from the
    # second domain's evaluation windows) instead of WikiText-2: what the calibration domain is worth (report.py pairs
    # each "X-shakespeare" with "X"; these were measured before the preset refitted its tables)
    "swsc-4.25b-cal-no-refit-shakespeare": ("swsc_hf", dict(preset="swsc-4.25b-cal",
                                                            dataset=common.SHAKESPEARE_DATASET, **BEFORE_REFIT)),
    # Both without the tuning, to tell what fitting and what tuning owe to the calibration domain
    "swsc-4.25b-cal-t0": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", tune_steps=0, **BEFORE_REFIT)),
    "swsc-4.25b-cal-t0-shakespeare": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset=common.SHAKESPEARE_DATASET,
                                                      tune_steps=0, **BEFORE_REFIT)),
    # The calibrated presets with the layer norms tuned beside the tables (Adam steps on weights of order one): at
    # 4.25 bits (16 windows cycled) 1e-3, measured worse than the preset; at 3.2 bits (fresh windows) 3e-4
    "swsc-4.25b-cal-norms": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", n_samples=16,
                                             tune_norms_lr=1e-3, **FIRST_TUNING, **BEFORE_REFIT)),
    # ... and the preset with its norms tuned (step 1e-3) since the teacher keeps its own (2026-12-06)
    "swsc-4.25b-cal-tuned-norms": ("swsc_hf", dict(preset="swsc-4.25b-cal", dataset="wikitext2", tune_norms_lr=1e-3)),
    "swsc-3.2b-cal-norms": ("swsc_hf", dict(preset="swsc-3.2b-cal", dataset="wikitext2", n_samples=16,
                                            tune_steps=128, tune_norms_lr=3e-4, **FIRST_TUNING)),
    # The SWSC paper's recipe on the query and key projections only (where its reported gains over RTN likely come
    # from), against per-row RTN on the same projections; every other linear stays dense.
    "swsc-paper-qk": ("swsc_hf", dict(preset="swsc-paper", modules_to_not_convert=NOT_QK)),
    "swsc-paper-qk-cal": ("swsc_hf", dict(preset="swsc-paper", modules_to_not_convert=NOT_QK, **SWSC_CALIBRATION)),
    **{f"rtn-{b}b-qk": ("rtn", dict(bits=b, group_size=None, skip=tuple(NOT_QK))) for b in (2, 3, 4)},
}


# The report's papers table: each paper's method at its settings, (data-free, calibrated) registry names for each.
PAPER_SETTINGS: dict[str, list[tuple[str, str, str]]] = {
    "SWSC": [("paper recipe: channel K-Means to half the channels + rank 32", "swsc-paper", "swsc-paper-cal"),
             ("ours: 16 scalars per matrix, scales per 128 (~4.2 bits)", "swsc-4bit", "swsc-4bit-cal"),
             ("ours: 64 pairs per matrix, scales per 128 (~3.2 bits)", "swsc-3bit", "swsc-3bit-cal")],
    "Weight clustering": [("paper: K=16 per matrix, affine", "weight-clustering-paper", "weight-clustering-paper-cal"),
                          ("K=64 per matrix, affine", "weight-clustering-k64", "weight-clustering-k64-cal")],
    "Basis Sharing": [("paper: 20% removed, q/k/v/up/gate shared by 2 layers", "basis-sharing-paper",
                       "basis-sharing-paper-cal"),
                      ("40% removed, same sharing", "basis-sharing-keep60", "basis-sharing-keep60-cal")],
}


def is_calibrated(name: str) -> bool:
    return "dataset" in METHODS[name][1]


def calibration_windows(tokenizer, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """The calibration windows swsc_hf's calibrated compression uses, for the baselines that need data (GPTQ)."""
    from swsc_hf import SWSCConfig, calibration_batches

    config = SWSCConfig(dataset=CALIBRATION["dataset"], n_samples=n_samples, seq_len=seq_len)
    return calibration_batches(config, tokenizer, torch.device("cpu"))


# Methods that only speed runs time: their outputs are the dense model's, so quality runs leave them out.
SPEED_ONLY = frozenset({"dense-gemv"})


def setting(name: str, n_samples: int | None = None) -> dict[str, Any]:
    """The method's kwargs, with the number of calibration windows replaced by `n_samples` (smoke tests) if given."""
    kwargs = dict(METHODS[name][1])
    if n_samples is not None and "dataset" in kwargs:
        kwargs["n_samples"] = n_samples
    return kwargs


# Fields of a resolved SWSCConfig that are not part of the recipe (filled in by compression, fixed, or a label: the
# preset's fields are resolved into the others). `to_dict` already leaves out the calibration text.
NOT_RECIPE = ("quant_method", "compressed_layers", "format_version", "preset")


def config_kwargs(name: str, n_samples: int | None = None) -> dict[str, Any]:
    """The `SWSCConfig` kwargs of an swsc_hf method: its setting without the distillation stage (run by `distill`)."""
    kwargs = setting(name, n_samples)
    kwargs.pop("distill", None)
    return kwargs


def recipe(name: str, n_samples: int | None = None) -> dict[str, Any] | None:
    """What an swsc_hf method runs: its `SWSCConfig` fields with the presets and defaults resolved (None for other
    families). Recorded beside the registry kwargs, so a record still says what it measured after a preset or a
    default changes, and the report can tell when the registry no longer reproduces it."""
    if METHODS[name][0] != "swsc_hf":
        return None
    import swsc_hf

    resolved = swsc_hf.SWSCConfig(**config_kwargs(name, n_samples)).to_dict()
    return {key: value for key, value in resolved.items() if key not in NOT_RECIPE}


def apply_method(
    name: str, model: nn.Module, tokenizer, serving: bool = False, n_samples: int | None = None
) -> tuple[nn.Module, float, float]:
    """Compress `model` (in place where the method allows) as `name` says (see `setting` for `n_samples`).

    `serving` keeps quanto's packed layers; without it they are swapped for their dequantized weights, which
    computes the same function faster (for perplexity). Returns (model, avg stored bits per compressed weight,
    seconds). Dense counts its float width (32 here).
    """
    import baselines

    family, kwargs = METHODS[name][0], setting(name, n_samples)
    start = time.perf_counter()
    if family == "dense":
        model = model.to(getattr(torch, kwargs.get("dtype", "float32")))
        bits = float(torch.finfo(model.dtype).bits)
        if kwargs.get("dense_gemv"):
            from swsc_hf import SWSCDenseLinear, use_decode_attention

            for module in model.modules():
                if type(module) is nn.Linear:
                    module.__class__ = SWSCDenseLinear
            use_decode_attention(model)
    elif family == "rtn":
        bits = baselines.rtn_quantize_(model, kwargs["bits"], kwargs["group_size"], **(
            {"skip": kwargs["skip"]} if "skip" in kwargs else {}))
    elif family == "hqq":
        bits = baselines.hqq_quantize_(model, kwargs["bits"], kwargs["group_size"])
    elif family == "quanto":
        bits = baselines.quanto_quantize_(model, kwargs["bits"], dequantize=not serving)
    elif family == "torchao":
        bits = baselines.torchao_quantize_(model, kwargs["bits"], kwargs["group_size"])
    elif family == "gptq":
        windows = calibration_windows(tokenizer, kwargs["n_samples"], kwargs["seq_len"])
        bits = baselines.gptq_quantize_(model, tokenizer, kwargs["bits"], kwargs["group_size"], windows)
    elif family == "swsc_hf":
        import swsc_hf

        kwargs = config_kwargs(name, n_samples)
        if kwargs.get("dataset") == common.SHAKESPEARE_DATASET:
            kwargs["dataset"] = common.shakespeare_calibration_rows()
        config = swsc_hf.SWSCConfig(**kwargs, tokenizer=tokenizer if "dataset" in kwargs else None)
        model = swsc_hf.compress_model(model, config)
        bits = swsc_hf.compression_report(model).compressed_bits_per_weight
    else:
        raise ValueError(f"method {name!r} has unknown family {family!r}")
    return model, bits, time.perf_counter() - start


def distill(name: str, model: nn.Module, teacher: nn.Module, tokenizer, n_samples: int | None = None) -> float:
    """Distill the compressed model's tables toward `teacher` on the method's calibration windows; returns seconds."""
    from swsc_hf import distill_tables

    kwargs = setting(name, n_samples)
    start = time.perf_counter()
    distill_tables(model, teacher, calibration_windows(tokenizer, kwargs["n_samples"], kwargs["seq_len"]),
                   **kwargs["distill"])
    return time.perf_counter() - start


def select(patterns: str) -> list[str]:
    """Registry names matching a comma-separated list of names or shell patterns ("rtn-*"), in registry order."""
    from fnmatch import fnmatch

    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [p for p in wanted if not any(fnmatch(name, p) for name in METHODS)]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return [name for name in METHODS if any(fnmatch(name, p) for p in wanted)]
