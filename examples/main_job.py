"""The main job: compress the bundled SmolLM2-135M, evaluate before and after, save, reload, generate.

    python examples/main_job.py --out out/smollm2-swsc [--preset swsc-4.25b-cal] [--windows 4] [--data-free]
                                [--tune-steps 64] [--per-layer]

The default is the best measured recipe at 4.25 bits per weight (`swsc-4.25b-cal`: calibrated, then tuned toward the
dense model); --data-free compresses with the data-free `swsc-4bit` instead (seconds, lower quality).

It prints a short summary (bits per weight, sizes, perplexities); --per-layer adds the table of every compressed
layer (210 lines for SmolLM2-135M).

Perplexity is WikiText-2 raw test (the usual "\\n\\n" join), non-overlapping windows of --seq-len tokens over the
first --windows windows. Calibration text is the WikiText-2 validation split, never the test split.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

import swsc_hf
from swsc_hf import load_smollm2, perplexity, save_atomically


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/smollm2-swsc")
    parser.add_argument("--preset", help="default: swsc-4.25b-cal, or swsc-4bit with --data-free")
    parser.add_argument("--data-free", action="store_true", help="skip calibration (and tuning)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tune-steps", type=int,
                        help="steps of tuning toward the dense model after calibrated compression (default: the "
                             "config's, 64; 0 = off)")
    parser.add_argument("--per-layer", action="store_true", help="print every compressed layer's bits and error")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    max_tokens = args.windows * args.seq_len

    model, tokenizer = load_smollm2()
    dense = perplexity(model, tokenizer, seq_len=args.seq_len, max_tokens=max_tokens)
    print(f"dense perplexity: {dense.perplexity:.3f} over {dense.tokens} tokens")

    preset = args.preset or ("swsc-4bit" if args.data_free else "swsc-4.25b-cal")
    calibration = {} if args.data_free else dict(dataset="wikitext2", tokenizer=tokenizer)
    tuning = {} if args.tune_steps is None else dict(tune_steps=args.tune_steps)
    config = swsc_hf.SWSCConfig(preset=preset, **calibration, **tuning)
    start = time.perf_counter()
    swsc_hf.compress_model(model, config)
    seconds = time.perf_counter() - start
    report = swsc_hf.compression_report(model)
    print(report if args.per_layer else report.summary())
    compressed = perplexity(model, tokenizer, seq_len=args.seq_len, max_tokens=max_tokens)
    print(f"compressed perplexity: {compressed.perplexity:.3f} at {report.compressed_bits_per_weight:.3f} bits/weight "
          f"(compressed in {seconds:.0f} s)")

    save_atomically(model, tokenizer, args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    probe = tokenizer("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        identical = torch.equal(model(probe).logits, reloaded(probe).logits)
    print(f"reloaded from {args.out}: logits identical = {identical}")
    generated = reloaded.generate(probe, max_new_tokens=30, do_sample=False)
    print("generation:", tokenizer.decode(generated[0], skip_special_tokens=True))
    print(json.dumps({
        "preset": preset, "calibrated": config.is_calibrated, "tune_steps": config.tune_steps if config.tunes else 0,
        "dense_perplexity": dense.perplexity,
        "perplexity": compressed.perplexity, "tokens": compressed.tokens,
        "avg_bits": report.compressed_bits_per_weight,
        "compress_seconds": seconds, "reload_identical": identical,
    }))
    if not identical:
        raise SystemExit("reloaded model differs from the compressed one")


if __name__ == "__main__":
    main()
