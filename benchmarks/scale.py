"""Scale: time and peak memory of compressing one decoder layer of a 1B or 8B model, and the whole-model projection.

    python benchmarks/scale.py --model 1b --preset swsc-4bit                 # data-free, every matrix of one layer
    python benchmarks/scale.py --model 8b --calibrated --matrices q_proj      # one matrix, GPTQ-style calibration
    python benchmarks/scale.py --model 1b --calibrated --refit-rounds 4       # ... and tables refitted to it
    python benchmarks/scale.py --model 8b --device cuda

The weights are synthetic with a realistic spectrum (a decaying low-rank part on Gaussian noise, 0.02 scale, as in
trained projections), so no model is downloaded; compression time does not depend on the values much. Calibrated
runs use the Gram matrix of 2048 correlated synthetic activations. Each matrix is compressed as compression does
(`compress_weight` with the preset's layout); the projection multiplies one layer by the number of layers (the
whole-model path streams: one layer's working set at a time, plus the compressed model). Peak memory is the rise of
the resident-set high-water mark (CPU) or of `torch.cuda.max_memory_allocated` (GPU) over the dense matrix already
in memory. One JSON line per matrix and one per layer summary go to --out.
"""

from __future__ import annotations

import argparse
import time

import common
import torch
from compression_time import timed

# (hidden, intermediate, kv width, layers): Llama-3.2-1B and Llama-3.1-8B.
SHAPES = {"1b": (2048, 8192, 512, 16), "8b": (4096, 14336, 1024, 32)}
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matrix_shape(model: str, name: str) -> tuple[int, int]:
    hidden, inter, kv, _ = SHAPES[model]
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}[name]


def synthetic_weight(out: int, inp: int, device: str, seed: int = 0) -> torch.Tensor:
    """0.02-scale Gaussian noise plus a rank-64 part with decaying singular values (a trained layer's spectrum)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rank = 64
    decay = (torch.arange(1, rank + 1, device=device, dtype=torch.float32) ** -0.7) * 0.5
    left = torch.randn(out, rank, generator=gen, device=device) / out**0.5
    right = torch.randn(rank, inp, generator=gen, device=device) / inp**0.5
    return torch.randn(out, inp, generator=gen, device=device) * 0.02 + (left * decay) @ right * 4


def synthetic_gram(inp: int, device: str, tokens: int = 2048, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = torch.rand(inp, generator=gen, device=device) * 2 + 0.1
    x = torch.randn(tokens, inp, generator=gen, device=device) * scales
    x = x + torch.randn(tokens, 1, generator=gen, device=device)  # a shared component: correlated inputs
    return x.t() @ x


def measure(call, device: str) -> tuple[float, int]:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    return timed(call)


def main(argv: list[str] | None = None) -> None:
    from swsc_hf import SWSCConfig
    from swsc_hf.core.compress import compress_weight

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--preset", default="swsc-4bit")
    parser.add_argument("--calibrated", action="store_true", help="with a synthetic Gram matrix (GPTQ feedback)")
    parser.add_argument("--refit-rounds", type=int, default=0,
                        help="with --calibrated, refit the tables to the output error (SWSCConfig.refit_rounds)")
    parser.add_argument("--matrices", default=",".join(MATRICES), help="comma-separated subset of one layer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(common.RESULTS / "scale.jsonl"))
    args = parser.parse_args(argv)

    config = SWSCConfig(preset=args.preset, refit_rounds=args.refit_rounds)
    info = common.run_info()
    names = [name.strip() for name in args.matrices.split(",") if name.strip()]
    total_seconds, peak = 0.0, 0
    for name in names:
        out, inp = matrix_shape(args.model, name)
        weight = synthetic_weight(out, inp, args.device)
        gram = synthetic_gram(inp, args.device) if args.calibrated else None
        spec = config.layer_spec(name, out, inp)
        seconds, rise = measure(lambda w=weight, s=spec, g=gram: compress_weight(w, s, hessian=g,
                                                                                 **config.fit_options()), args.device)
        total_seconds += seconds
        peak = max(peak, rise)
        record = dict(kind="matrix", model=args.model, matrix=name, shape=[out, inp], preset=args.preset,
                      calibrated=args.calibrated, refit_rounds=args.refit_rounds, device=args.device,
                      seconds=seconds, peak_rise_bytes=rise, dense_bytes=weight.numel() * 4)
        print(f"{args.model} {name} {out}x{inp}: {seconds:.2f} s, peak +{rise / 2**20:.0f} MiB", flush=True)
        common.append_jsonl(args.out, {**record, **info})
        del weight, gram
    layers = SHAPES[args.model][3]
    summary = dict(kind="layer", model=args.model, matrices=names, preset=args.preset, calibrated=args.calibrated,
                   refit_rounds=args.refit_rounds, device=args.device, layer_seconds=total_seconds,
                   peak_rise_bytes=peak, layers=layers,
                   projected_model_seconds=total_seconds * layers if len(names) == len(MATRICES) else None)
    print(f"{args.model}: {len(names)} matrices of one layer in {total_seconds:.1f} s, peak +{peak / 2**20:.0f} MiB"
          + (f"; whole model ({layers} layers) ~{total_seconds * layers / 60:.1f} min"
             if summary["projected_model_seconds"] else ""))
    common.append_jsonl(args.out, {**summary, **info})


if __name__ == "__main__":
    main()
