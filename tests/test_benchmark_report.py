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
