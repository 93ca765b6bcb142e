"""Compression time (and peak memory): SmolLM2-135M per method, and synthetic square matrices per layout.

    python benchmarks/compression_time.py --out docs/results/compression_time.jsonl

Model part: seconds to compress a fresh copy of the dense model with each of --methods (registry names or
patterns; calibrated methods include their calibration pass). Synthetic part: one N x N float32 matrix per size in
--sizes (Gaussian, std 0.02, seeded), compressed by `swsc_hf.core.compress.compress_weight` in each swsc_hf preset's
layout, and the building blocks alone (`core.kmeans.kmeans` of the rows, `core.kmeans.kmeans` of 4-value
segments, `core.lowrank.low_rank`), next to RTN and HQQ on the same matrix. Peak memory is the rise of the
process's resident set during the call (VmHWM after a reset through /proc/self/clear_refs) over its RSS before it.
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from collections.abc import Callable

import common
import methods
import torch
from tqdm.auto import tqdm

DEFAULT_METHODS = ("rtn-4b-g64,rtn-2b-g64,hqq-4b-g64,hqq-2b-g64,gptq-4b-g64,swsc-paper,weight-clustering-paper,"
                   "swsc-4bit,swsc-3bit,swsc-2bit,swsc-4bit-cal,swsc-2bit-cal,basis-sharing-paper-cal")
SWSC_LAYOUTS = ("swsc-4bit", "swsc-3bit", "swsc-2bit", "weight-clustering-paper", "swsc-paper")
PRIMITIVES = ("kmeans-rows-k256", "kmeans-seg4-k1024", "low_rank-r32", "rtn-4b-g64", "hqq-4b-g64")


def synthetic_task(layout: str, matrix: torch.Tensor) -> Callable[[], object]:
    """The call that compresses `matrix` in `layout`: a swsc_hf preset name or one of PRIMITIVES."""
    from swsc_hf import PRESETS, SWSCConfig
    from swsc_hf.core.compress import compress_weight
    from swsc_hf.core.kmeans import kmeans
    from swsc_hf.core.lowrank import low_rank

    n = matrix.shape[0]
    if layout in PRESETS:
        config = SWSCConfig(preset=layout)
        spec = config.layer_spec("synthetic", n, n)
        return lambda: compress_weight(matrix, spec, kmeans_iters=config.kmeans_iters, seed=config.seed,
                                       affine_correction=config.affine_correction)
    if layout == "kmeans-rows-k256":
        return lambda: kmeans(matrix, 256)
    if layout == "kmeans-seg4-k1024":
        return lambda: kmeans(matrix.reshape(-1, 4), 1024)
    if layout == "low_rank-r32":
        return lambda: low_rank(matrix, 32)
    if layout in ("rtn-4b-g64", "hqq-4b-g64"):
        import baselines

        layer = torch.nn.Linear(n, n, bias=False)
        layer.weight.data = matrix.clone()
        wrapper = torch.nn.Sequential(layer)
        apply = baselines.rtn_quantize_ if layout.startswith("rtn") else baselines.hqq_quantize_
        return lambda: apply(wrapper, 4, 64)
    raise ValueError(f"unknown synthetic layout {layout!r}; use a swsc_hf preset or one of {PRIMITIVES}")


def timed(call: Callable[[], object]) -> tuple[float, int]:
    """Seconds and peak resident-memory rise of one call."""
    before = common.reset_peak()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start, max(0, common.peak_bytes() - before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="registry names or patterns ('' for none)")
    parser.add_argument("--sizes", default="4096,8192", help="synthetic matrix sizes ('' for none)")
    parser.add_argument("--layouts", default=",".join(SWSC_LAYOUTS + PRIMITIVES),
                        help="synthetic layouts: swsc_hf presets and/or " + ", ".join(PRIMITIVES))
    parser.add_argument("--out", default=str(common.RESULTS / "compression_time.jsonl"))
    parser.add_argument("--calibration-samples", type=int, help="override the calibration windows (smoke tests)")
    args = parser.parse_args(argv)

    info = common.run_info()
    names = methods.select(args.methods) if args.methods else []
    if names:
        dense, tokenizer = common.load_dense()
        for name in tqdm(names, desc="compressing SmolLM2-135M", unit="method"):
            record = {"kind": "model", "method": name, "family": methods.METHODS[name][0],
                      "setting": methods.setting(name, args.calibration_samples),
                      "calibrated": methods.is_calibrated(name), "shape": None}
            try:
                model = copy.deepcopy(dense)
                before = common.reset_peak()
                model, bits, seconds = methods.apply_method(name, model, tokenizer, n_samples=args.calibration_samples)
                record.update(seconds=seconds, peak_bytes=max(0, common.peak_bytes() - before), avg_bits=bits)
                tqdm.write(f"{name}: {seconds:.1f} s")
            except Exception as err:  # a baseline that does not run here is recorded, not fatal
                record.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=-3))
                tqdm.write(f"{name}: FAILED {record['error']}")
            model = None
            common.append_jsonl(args.out, {**record, **info})
        del dense
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        matrix = torch.randn(n, n, generator=generator) * 0.02
        for layout in tqdm(layouts, desc=f"synthetic {n}x{n}", unit="layout"):
            record = {"kind": "synthetic", "method": layout, "shape": [n, n]}
            try:
                seconds, peak = timed(synthetic_task(layout, matrix))
                record.update(seconds=seconds, peak_bytes=peak)
                tqdm.write(f"{n}x{n} {layout}: {seconds:.1f} s, peak +{peak / 2**20:.0f} MiB")
            except Exception as err:
                record.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=-3))
                tqdm.write(f"{n}x{n} {layout}: FAILED {record['error']}")
            common.append_jsonl(args.out, {**record, **info})


if __name__ == "__main__":
    main()
