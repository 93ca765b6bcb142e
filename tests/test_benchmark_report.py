"""The benchmark report picks its tables from the JSONL records as documented (no plotting, no models)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import report  # noqa: E402


def record(method: str, family: str, windows: int, ppl: float, bits: float = 4.0) -> dict:
    return dict(method=method, family=family, calibrated=False, seq_len=2048, windows=windows,
                tokens=windows * 2047, avg_bits=bits, perplexity=ppl, compress_seconds=1.0)


def test_main_table_is_the_evaluation_with_most_methods_and_longer_ones_are_shown_whole():
    records = [record("dense", "dense", 16, 20.0, 32), record("rtn-4b-g64", "rtn", 16, 28.0, 4.5),
               record("swsc-4bit", "swsc_hf", 16, 29.0, 4.16), record("dense", "dense", 32, 21.0, 32),
               record("swsc-4bit", "swsc_hf", 32, 30.0, 4.16), record("old", "rtn", 4, 99.0, 3.0),
               record("dense", "dense", 4, 24.0, 32)]
    chosen, failures, key = report.quality_records(records)
    assert key == (2048, 16 * 2047) and set(chosen) == {"dense", "rtn-4b-g64", "swsc-4bit"} and not failures
    text = "\n".join(report.other_evaluations_section(records, key))
    longer, shorter = text.split("### Methods measured only on a shorter evaluation")
    assert "Longer evaluation" in longer and "`swsc-4bit`" in longer and "30.000" in longer
    assert "`old`" in shorter and "`swsc-4bit`" not in shorter


def test_papers_table_pairs_data_free_and_calibrated_runs_with_the_nearest_rtn():
    runs = [record("dense", "dense", 16, 20.0, 32), record("rtn-4b-g128", "rtn", 16, 34.0, 4.27),
            record("swsc-4bit", "swsc_hf", 16, 29.0, 4.16)]
    chosen = {r["method"]: r for r in runs}
    lines = "\n".join(report.papers_section(chosen)).splitlines()
    rows = [line for line in lines if line.startswith("| SWSC | ours: 16 scalars")]
    assert rows == ["| SWSC | ours: 16 scalars per matrix, scales per 128 (~4.2 bits) | 4.16 bits: 29 | "
                    "`rtn-4b-g128` 34 | 0.853 | not run | - | - |"]


def gpu_record(run: str, method: str, tokens: int, us: float) -> dict:
    return dict(run=run, model="llama-3.1-8b", out_features=4096, in_features=4096, layout="swsc-4bit",
                tokens=tokens, dtype="fp16", method=method, us=us, gpu="NVIDIA H200", triton="3.6.0",
                versions={"torch": "2.11.0"})


def test_gpu_table_divides_each_kernel_by_the_dense_time_of_its_own_run():
    records = [gpu_record("r1", "dense-fp16", 1, 13.0), gpu_record("r1", "swsc-triton-gemv", 1, 26.0),
               gpu_record("r1", "swsc-triton-gemv_bytes", 1, 65.0), gpu_record("r1", "dense-fp16", 2048, 90.0),
               gpu_record("r2", "dense-fp16", 1, 10.0), gpu_record("r2", "dense-fp16", 2048, 80.0),
               gpu_record("r2", "swsc-triton-dequant_gemm", 2048, 100.0)]
    text = "\n".join(report.gpu_section(records))
    assert "| llama-3.1-8b | 4096x4096 | `swsc-4bit` | 13.0 | 26.0 | 0.50 | 65.0 | 80.0 | 100.0 | 0.80 |" in text
    assert "`swsc-4bit` decode: 0.50x dense" in text and "`swsc-4bit` prefill: 0.80x dense" in text
    assert report.gpu_section([]) == []
    assert "one-token kernel" not in text  # no column for a candidate that was not timed


def test_gpu_table_adds_the_one_token_kernel_and_its_launch_sweep_when_timed():
    records = [gpu_record("r1", "dense-fp16", 1, 13.0), gpu_record("r1", "swsc-triton-gemv", 1, 26.0),
               gpu_record("r1", "swsc-triton-gemv_bytes", 1, 65.0),
               gpu_record("r1", "swsc-triton-gemv_token", 1, 10.0),
               gpu_record("r1", "swsc-triton-gemv_token@64x32x8x4", 1, 6.5)]
    text = "\n".join(report.gpu_section(records))
    assert "| llama-3.1-8b | 4096x4096 | `swsc-4bit` | 13.0 | 26.0 | 0.50 | 65.0 | 10.0 | 1.30 | - | - | - |" in text
    assert "`swsc-4bit` decode, one-token kernel: 1.30x dense" in text
    assert "`swsc-4bit` decode, one-token kernel at launch 64x32x8x4: 2.00x dense" in text


def speed_record(run: str, cpu: str, label: str, tokens_per_s: float, family: str = "swsc_hf") -> dict:
    return dict(run=run, machine={"cpu": cpu}, label=label, family=family, decode_tokens_per_s=tokens_per_s,
                prefill_median_s=1.0, threads=2, prompt_tokens=512, new_tokens=128, repeats=3, avg_bits=4.0,
                model_bytes=2**20)


def test_speed_section_shows_the_latest_run_of_each_cpu_and_what_misses_the_targets():
    records = [speed_record("r1", "Xeon", "dense", 10.0, "dense"), speed_record("r1", "Xeon", "swsc-4bit", 99.0),
               speed_record("r2", "EPYC", "dense", 20.0, "dense"), speed_record("r2", "EPYC", "swsc-4bit", 60.0),
               speed_record("r3", "Xeon", "dense", 10.0, "dense"), speed_record("r3", "Xeon", "swsc-4bit", 15.0)]
    text = "\n".join(report.speed_section(records))
    assert "Run r3, SmolLM2-135M-Instruct on Xeon" in text and "Run r2, SmolLM2-135M-Instruct on EPYC" in text
    assert "r1" not in text and text.index("Run r3") < text.index("Run r2")
    assert "| `swsc-4bit` | 4.00 | 1.000 | 1.00 | 15.0 | 1.50 |" in text  # r3's ratio to r3's dense
    assert "`swsc-4bit` decodes at x1.50 of dense fp32" in text  # below the 2x target, though faster than dense
    assert "x3.00 of dense fp32" not in text  # r2 meets it


def test_speed_section_names_the_model_and_compares_with_its_own_llama_cpp_row():
    gemma = [{**speed_record("g1", "EPYC", "dense", 10.0, "dense"), "model": "gemma3-270m"},
             {**speed_record("g1", "EPYC", "swsc-4bit-head", 30.0), "model": "gemma3-270m"},
             {**speed_record("g1", "EPYC", "llama.cpp-q4_k_m", 60.0, "llama.cpp"), "model": "gemma3-270m",
              "kind": "llama.cpp"}]
    text = "\n".join(report.speed_section(gemma))
    assert "Run g1, Gemma-3-270M" in text and "SmolLM2" not in text
    assert "| `swsc-4bit-head` | 4.00 | 1.000 | 1.00 | 30.0 | 3.00 | - | 0.50 |" in text


def test_calibration_domain_pairs_each_shakespeare_row_with_its_wikitext_recipe_and_leaves_the_second_domain():
    def on(data: str, method: str, ppl: float, dataset: str | None = None) -> dict:
        r = record(method, "dense" if method == "dense" else "swsc_hf", 32, ppl, 4.25)
        return {**r, "data": data, "setting": {"dataset": dataset} if dataset else {}}

    wikitext = [on("wikitext", "dense", 20.0), on("wikitext", "x", 22.0, "wikitext2"),
                on("wikitext", "x-shakespeare", 23.0, "shakespeare")]
    second = [on("shakespeare", "dense", 40.0), on("shakespeare", "x", 44.0, "wikitext2"),
              on("shakespeare", "x-shakespeare", 41.0, "shakespeare")]
    text = "\n".join(report.calibration_domain_section(second, wikitext))
    assert "| `x` | WikiText-2 | 22.000 | 1.100 | 44.000 | 1.100 |" in text
    assert "| `x-shakespeare` | Shakespeare | 23.000 | 1.150 | 41.000 | 1.025 |" in text
    second_table = "\n".join(report.second_domain_section(second, wikitext))
    assert "`x`" in second_table and "x-shakespeare" not in second_table  # calibrated on the text it would score


def test_integer_agreement_follows_each_cpu_run():
    def row(run: str, cpu: str, label: str, tokens: list[int], ppl: float | None = None) -> dict:
        r = {**speed_record(run, cpu, label, 10.0), "first_tokens": tokens}
        if ppl:
            r["gemv_perplexity"] = dict(float=10.0, integer=ppl, windows=4, tokens_per_window=512,
                                        tokens_per_forward=8)
        return r

    records = [speed_record("r1", "Xeon", "dense", 5.0, "dense"), row("r1", "Xeon", "q", [1, 2, 3]),
               row("r1", "Xeon", "q+int", [1, 2, 4], 10.5),
               speed_record("r2", "EPYC", "dense", 5.0, "dense"), row("r2", "EPYC", "q", [1, 2, 3]),
               row("r2", "EPYC", "q+int", [1, 9, 9], 11.0)]
    text = "\n".join(report.speed_section(records, per_run=report.integer_agreement))
    epyc, xeon = text.split("Run r1")
    assert "the first 1 of 3 greedy tokens" in epyc and "+10.00%" in epyc
    assert "the first 2 of 3 greedy tokens" in xeon and "+5.00%" in xeon


def test_integer_agreement_gives_the_reference_path_where_a_run_measured_it():
    r = {**speed_record("r1", "EPYC", "q-int8+int", 10.0), "first_tokens": [1, 2],
         "gemv_perplexity": dict(float=55.6899, integer=55.6899, reference=55.6908, windows=4, tokens_per_window=512,
                                 tokens_per_forward=8)}
    text = " ".join(report.integer_agreement([r], "r1"))
    assert "55.6899 with the default kernels" in text and "55.6908 on the reference path" in text


def test_stale_recipes_names_the_fields_a_preset_change_moved_and_skips_records_without_a_recipe():
    def measured(method: str, recipe: dict | None) -> dict:
        return {**record(method, "swsc_hf", 16, 25.0), "setting": {"preset": method, "n_samples": 64},
                **({"recipe": recipe} if recipe is not None else {})}

    today = {"a": dict(tune_lr=1e-3, tune_steps=64), "b": dict(tune_lr=1e-3, tune_steps=64, refit_rounds=0),
             "c": dict(tune_lr=1e-3), "d": dict(tune_lr=1e-3, refit_rounds=4)}
    seen = []

    def resolve(name: str, n_samples: int | None) -> dict:
        seen.append(n_samples)
        return today[name]

    # b and d were measured before refit_rounds existed: b still runs it at its default, d no longer does
    chosen = {"a": measured("a", dict(tune_lr=3e-3, tune_steps=64)), "b": measured("b", dict(tune_lr=1e-3,
                                                                                              tune_steps=64)),
              "c": measured("c", None), "d": measured("d", dict(tune_lr=1e-3))}
    stale = report.stale_recipes(chosen, resolve, dict(tune_lr=1e-3, refit_rounds=0))
    assert stale == {"a": ["tune_lr"], "d": ["refit_rounds"]} and seen == [64, 64, 64]
    text = "\n".join(report.stale_section(stale))
    assert "`a`: `tune_lr`" in text and "`b`" not in text
    assert report.stale_section({}) == []


def test_every_swsc_registry_row_resolves_to_a_recipe_with_its_tuning_step_sizes():
    import methods

    from swsc_hf.config import DEFAULTS

    recipes = {name: methods.recipe(name) for name in methods.METHODS}
    assert recipes["rtn-4b-g64"] is None and recipes["dense"] is None
    assert recipes["swsc-2.2b-cal"]["tune_lr"] == DEFAULTS["tune_lr"]
    assert recipes["swsc-2.2b-cal"]["n_clusters"] == 256 and "dataset" not in recipes["swsc-2.2b-cal"]
    assert recipes["swsc-4.25b-cal-n16"]["tune_lr"] == methods.FIRST_TUNING["tune_lr"] != DEFAULTS["tune_lr"]
    assert recipes["swsc-4.25b-cal-n16"]["n_samples"] == 16 and methods.recipe("swsc-4.25b-cal", 2)["n_samples"] == 2


def test_tuning_screens_group_settings_by_run_and_preset_newest_first_naming_set_fields():
    def screen(run: str, lr: float, ppl: float, norms: float | None = None) -> dict:
        return dict(run=run, preset="swsc-2.2b-cal", steps=320, lr=lr, scales_lr=6e-3, norms_lr=norms, windows=8,
                    perplexity=ppl, second_domain_windows=4, second_domain_perplexity=2 * ppl, final_kl=0.5,
                    fit_seconds=500.0, tune_seconds=512.0, machine={"cpu": "Xeon"})
    records = [screen("r1", 1e-3, 40.0), screen("r2", 1e-3, 34.83, 1e-3), screen("r2", 2e-3, 34.76, 1e-3)]
    text = "\n".join(report.tuning_screen_section(records))
    assert text.index("Run r2, `swsc-2.2b-cal` fitted in 500 s, 320 tuning steps per setting, on Xeon") < text.index(
        "Run r1")
    assert "| 0.002 | 0.006 | 0.001 | 34.76 | 69.52 | 0.5000 | 512 |" in text
    assert "| 0.001 | 0.006 | - | 40.00 | 80.00 |" in text  # the norms untrained in r1
    rotated = dict(screen("r3", 1e-3, 33.69), fields={"rotate_residual": True})
    assert "Run r3, `swsc-2.2b-cal`, rotate_residual=True fitted in 500 s" in "\n".join(
        report.tuning_screen_section([rotated]))
    assert report.tuning_screen_section([]) == []
