"""Speed of the Triton kernels against fp16/bf16 `F.linear` on the linear layers of Llama-3.2-1B and Llama-3.1-8B.

    python benchmarks/gpu_speed.py --out docs/results/gpu_speed.jsonl

Needs a CUDA GPU and triton (it exits with a message otherwise). Every (model, layer shape, layout, tokens) case
times dense `F.linear` with the activations' dtype, the dispatch (`codebook_matmul`, what `SWSCLinear` runs) and
each Triton kernel forced (`gemv`; `gemv_token`, the one-token candidate, at one token; `gemv_bytes`, the GEMV's
byte reader where the word reader would run; `dequant_gemm`) on random codes, tables and scales; --token-launches
adds the one-token kernel at other launch shapes (a sweep, in the same run). Up to --graph-tokens tokens (decode)
the calls are captured in a CUDA graph and replayed, so launch overhead is what a graphed decoder pays; above, they
run eagerly. A timed call sweeps over enough copies of the layer to exceed the L2 cache four times, so the weights
come from HBM as in a real decoder; the time per layer is the sweep's over the copies (median of --repeats sweeps
after a warm-up). Each JSON line also has the bytes one call reads and the achieved GB/s.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import common
import torch
import torch.nn.functional as F

from swsc_hf.core.packing import pack_codes
from swsc_hf.core.spec import LayerSpec
from swsc_hf.kernels import codebook_matmul, reference_codebook_matmul

# (out_features, in_features) of q, k/v, gate/up and down projections
SHAPES = {
    "llama-3.2-1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
    "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}
# the presets' layouts: (n_clusters, segment_length, scale_group_size)
LAYOUTS = {"swsc-4bit": (16, 1, 128), "swsc-3bit": (64, 2, 128), "swsc-2bit": (256, 4, 128)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated, from: " + ", ".join(LAYOUTS))
    parser.add_argument("--tokens", default="1,2,4,8,16,64,256,2048", help="comma-separated token counts")
    parser.add_argument("--graph-tokens", type=int, default=8, help="up to this many tokens, time CUDA graphs")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="activations and dense weights")
    parser.add_argument("--repeats", type=int, default=20, help="timed sweeps per case (median kept)")
    parser.add_argument("--token-launches", default="",
                        help="one-token GEMV launches to sweep at one token, comma-separated "
                             "BLOCK_N x BLOCK_W x warps x programs per SM, e.g. 32x32x4x4,64x32x8x4")
    parser.add_argument("--out", default=str(common.RESULTS / "gpu_speed.jsonl"), help="JSON lines appended here")
    return parser.parse_args(argv)


def random_layer(out_f: int, in_f: int, layout: tuple[int, int, int], dtype: torch.dtype, seed: int):
    """A LayerSpec and its (packed codes, codebook, scales) on the GPU, random."""
    k, seg, group = layout
    spec = LayerSpec(out_f, in_f, n_clusters=k, segment_length=seg, scale_group_size=group)
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, k, (spec.n_codes,), generator=g, device="cuda")
    codebook = torch.randn(1, k, seg, generator=g, device="cuda").to(dtype)
    scales = (torch.rand(spec.channels, spec.scale_groups, generator=g, device="cuda") * 0.02).to(dtype)
    return spec, (pack_codes(codes, spec.code_bits), codebook, scales)


def copies_for(nbytes: int) -> int:
    """Layer copies one timed sweep runs over: four times the L2 cache, at most 64."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(4 * l2 / nbytes)))


def time_sweep(calls: list, graphed: bool, repeats: int) -> float:
    """Median microseconds per call of running every call once, in a CUDA graph or eagerly."""
    def sweep():
        for call in calls:
            call()

    sweep()  # warm-up: compiles the Triton kernels outside any capture
    torch.cuda.synchronize()
    if graphed:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sweep()
        run = graph.replay
    else:
        run = sweep
    run()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000 / len(calls))
    return statistics.median(times)


def token_launch(launch: str | None = None) -> str:
    """The one-token GEMV's launch as "BLOCK_NxBLOCK_WxWARPSxPROGRAMS_PER_SM"; sets it first when given."""
    from swsc_hf.kernels import triton_gpu

    if launch:
        block_n, block_w, warps, programs = (int(v) for v in launch.split("x"))
        triton_gpu.TOKEN_BLOCK_N, triton_gpu.TOKEN_BLOCK_W = block_n, block_w
        triton_gpu.TOKEN_WARPS, triton_gpu.TOKEN_PROGRAMS_PER_SM = warps, programs
    return "x".join(str(v) for v in (triton_gpu.TOKEN_BLOCK_N, triton_gpu.TOKEN_BLOCK_W, triton_gpu.TOKEN_WARPS,
                                      triton_gpu.TOKEN_PROGRAMS_PER_SM))


def bench_shape(args, model: str, out_f: int, in_f: int, name: str, dtype: torch.dtype) -> list[dict]:
    from swsc_hf.kernels import triton_gpu

    spec, tensors = random_layer(out_f, in_f, LAYOUTS[name], dtype, seed=out_f * 7 + in_f)
    compressed_bytes = sum(t.numel() * t.element_size() for t in tensors)
    dense_bytes = out_f * in_f * torch.finfo(dtype).bits // 8
    layers = [tuple(t.clone() for t in tensors) for _ in range(copies_for(compressed_bytes))]
    weights = [torch.randn(out_f, in_f, device="cuda", dtype=dtype) * 0.02 for _ in range(copies_for(dense_bytes))]
    check = torch.randn(1, in_f, device="cuda", dtype=dtype)
    with torch.no_grad():
        expected = reference_codebook_matmul(check.float(), *tensors, spec)
        err = (codebook_matmul(check, *tensors, spec).float() - expected).abs().max() / expected.abs().max()
    records = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
        graphed = tokens <= args.graph_tokens
        methods = {f"dense-{args.dtype}": ([lambda x=x, w=w: F.linear(x, w) for w in weights], dense_bytes, None),
                   "swsc-dispatch": ([lambda x=x, t=t: codebook_matmul(x, *t, spec) for t in layers],
                                     compressed_bytes, None)}
        for kernel in triton_gpu.KERNELS:
            if kernel.startswith("gemv") and tokens > 64 or kernel == "gemv_token" and tokens > 1:
                continue
            calls = [lambda x=x, t=t, k=kernel: triton_gpu.triton_codebook_matmul(x, *t, spec, kernel=k)
                     for t in layers]
            methods[f"swsc-triton-{kernel}"] = (calls, compressed_bytes, None)
            if kernel == "gemv_token":
                for launch in filter(None, args.token_launches.split(",")):
                    methods[f"swsc-triton-gemv_token@{launch}"] = (calls, compressed_bytes, launch)
        default_launch = token_launch()
        for method, (calls, nbytes, launch) in methods.items():
            token_launch(launch)
            with torch.no_grad():
                us = time_sweep(calls, graphed, args.repeats)
            token_launch(default_launch)
            records.append({"model": model, "out_features": out_f, "in_features": in_f, "layout": name,
                            "tokens": tokens, "dtype": args.dtype, "method": method, "us": round(us, 2),
                            "cuda_graph": graphed, "weight_bytes": nbytes, "copies": len(calls),
                            "gb_per_s": round(nbytes / us / 1e3, 1), "dispatch_max_rel_err": float(err),
                            "token_gemv_launch": (launch or default_launch) if "gemv_token" in method else None})
            print(f"{model} {out_f}x{in_f} {name} tokens={tokens} {method}: {us:.1f} us", flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_speed.py needs a CUDA GPU: torch.cuda.is_available() is False here")
    try:
        import triton
    except ImportError:
        raise SystemExit("benchmarks/gpu_speed.py needs triton (pip install triton)") from None
    info = {**common.run_info(), "gpu": torch.cuda.get_device_name(0), "triton": triton.__version__}
    dtype = DTYPES[args.dtype]
    for model in args.models.split(","):
        for out_f, in_f in SHAPES[model]:
            for name in args.layouts.split(","):
                for record in bench_shape(args, model, out_f, in_f, name, dtype):
                    common.append_jsonl(args.out, {**info, **record})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
