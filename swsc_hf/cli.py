"""`swsc-hf`: compress, evaluate, report and publish models from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .atomic_save import check_output_folder, save_atomically
from .bundled import as_dense, smollm2_gguf
from .config import SWSCConfig
from .data import join_rows, rows_from_lines
from .distributed import compress_source, is_distributed, launch
from .evaluation import perplexity
from .hub import push_compressed
from .quantizer import compress_model
from .report import compression_report

BUNDLED = "bundled:smollm2"
logger = logging.getLogger("swsc_hf")


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _device_map(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_source(src: str, gguf_file: str | None, *, dtype: torch.dtype, quantization_config=None, device_map=None):
    """Model and tokenizer from a folder, a Hub id, a folder holding a GGUF file, or the bundled SmolLM2.

    GGUF models are dequantized by transformers' own GGUF loader, then compressed after loading (its loader and
    ours are both quantizer hooks, so they cannot run in one `from_pretrained`).
    """
    if src == BUNDLED:
        src, gguf_file = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(src, **({"gguf_file": gguf_file} if gguf_file else {}))
    if quantization_config is not None and quantization_config.is_calibrated and quantization_config.tokenizer is None:
        quantization_config.tokenizer = tokenizer  # calibration inside from_pretrained reads it from the config
    if gguf_file:
        model = as_dense(AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=dtype,
                                                              device_map=device_map))
        if quantization_config is not None:
            compress_model(model, quantization_config)
        return model, tokenizer
    extra = {} if quantization_config is None else {"quantization_config": quantization_config}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map=device_map, **extra)
    return model, tokenizer


def _config_from_args(args):
    fields = {
        "preset": args.preset, "n_clusters": args.n_clusters, "rank": args.rank, "cluster_dim": args.cluster_dim,
        "scale_group_size": args.scale_group_size, "dataset": args.calibration, "n_samples": args.n_samples,
        "seq_len": args.calibration_seq_len, "table_dtype": args.table_dtype, "bits": args.bits,
    }
    if args.segment_length is not None:
        fields["segment_length"] = None if args.segment_length == 0 else args.segment_length
    return SWSCConfig(**{k: v for k, v in fields.items() if v is not None})


def cmd_compress(args) -> int:
    check_output_folder(args.out, args.src, overwrite=args.overwrite)  # before any work: never lose a user's files
    config = _config_from_args(args)
    dtype = getattr(torch, args.dtype)
    if args.num_processes < 1:
        raise ValueError(f"--num-processes {args.num_processes} is invalid: use 1 or more")
    split = args.num_processes > 1 or is_distributed()
    if split and (args.gguf_file or args.src == BUNDLED or args.device_map):
        raise ValueError("multi-process compression reads a safetensors checkpoint (a folder or Hub id) on each "
                         "process's own device; drop --gguf-file/--device-map or use --num-processes 1")
    if args.num_processes > 1 and not is_distributed():
        return launch(args.num_processes, cmd_compress, args)
    start = time.perf_counter()
    if split:
        model, tokenizer = compress_source(args.src, config, dtype=dtype)
        if model is None:  # not rank 0: its layers went to rank 0, which writes the checkpoint
            return 0
    else:
        model, tokenizer = load_source(args.src, args.gguf_file, dtype=dtype, quantization_config=config,
                                       device_map=_device_map(args.device_map))
    seconds = time.perf_counter() - start
    save_atomically(model, tokenizer, args.out)
    report = compression_report(model)
    logger.info("%s", report)
    print(json.dumps({"out": str(args.out), "seconds": round(seconds, 1),
                      "avg_bits": report.compressed_bits_per_weight,
                      "model_bits": report.model_bits_per_weight,
                      "stored_mib": report.model_stored_bytes / 2**20,
                      "dense_mib": report.model_dense_bytes / 2**20}))
    return 0


def cmd_eval(args) -> int:
    model, tokenizer = load_source(args.model, args.gguf_file, dtype=getattr(torch, args.dtype),
                                   device_map=_device_map(args.device_map))
    text = None
    if args.data:
        text = join_rows(rows_from_lines(Path(args.data).read_text(encoding="utf-8")))
    result = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
    report = compression_report(model)
    bits = report.compressed_bits_per_weight if report.layers else torch.finfo(model.dtype).bits
    out = {"perplexity": result.perplexity, "tokens": result.tokens, "windows": result.windows,
           "seq_len": result.seq_len, "avg_bits": bits, "model_bits": report.model_bits_per_weight}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({result.windows} windows of "
              f"{result.seq_len}); {bits:.3f} bits per compressed weight")
    return 0


def cmd_report(args) -> int:
    model, _ = load_source(args.model, None, dtype=getattr(torch, args.dtype))
    report = compression_report(model)
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0


def cmd_push(args) -> int:
    config = _config_from_args(args)
    model, tokenizer = load_source(args.src, args.gguf_file, dtype=getattr(torch, args.dtype),
                                   quantization_config=config)
    metrics = None
    if args.evaluate_tokens:
        result = perplexity(model, tokenizer, seq_len=args.eval_seq_len, max_tokens=args.evaluate_tokens)
        metrics = {"dataset": "wikitext-2-raw-v1 test", "perplexity": result.perplexity, "tokens": result.tokens,
                   "seq_len": result.seq_len}
    tokenizer.push_to_hub(args.repo_id, private=args.private)
    url = push_compressed(model, args.repo_id, metrics=metrics, private=args.private)
    print(url)
    return 0


def _add_compression_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help=f"model folder, Hub id, folder with a GGUF file, or {BUNDLED}")
    parser.add_argument("--gguf-file", help="GGUF file name inside SRC")
    parser.add_argument("--preset", help="named setting (see swsc_hf.PRESETS)")
    parser.add_argument("--bits", type=float, help="target average bits per compressed weight")
    parser.add_argument("--n-clusters", type=_number, help="codewords per codebook (int) or fraction of channels")
    parser.add_argument("--segment-length", type=int, help="values per codeword; 0 = whole channel (SWSC paper)")
    parser.add_argument("--rank", type=int, help="rank of the low-rank error compensation")
    parser.add_argument("--cluster-dim", choices=["output", "input"])
    parser.add_argument("--scale-group-size", type=int, help="values per scale; 0 none, -1 one per channel")
    parser.add_argument("--table-dtype", choices=["float16", "bfloat16", "float32", "auto"])
    parser.add_argument("--calibration", help='calibration text file or "wikitext2" (enables data-aware mode)')
    parser.add_argument("--n-samples", type=int, help="calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, help="calibration sequence length")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swsc-hf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    compress = sub.add_parser("compress", help="compress a model and save an swsc_hf checkpoint")
    _add_compression_args(compress)
    compress.add_argument("out", help="output folder (written atomically): new, empty, or an swsc_hf checkpoint")
    compress.add_argument("--overwrite", action="store_true",
                          help="write into a non-empty OUT that is not an swsc_hf checkpoint (its other files kept)")
    compress.add_argument("--device-map", help='"cpu", "auto", or a JSON dict')
    compress.add_argument("--num-processes", type=int, default=1,
                          help="split the layers among N local processes (data-free compression; also works under "
                               "torchrun / accelerate launch)")
    compress.set_defaults(func=cmd_compress)

    evaluate = sub.add_parser("eval", help="WikiText-2-style perplexity of a (compressed) model")
    evaluate.add_argument("model", help=f"model folder, Hub id, or {BUNDLED}")
    evaluate.add_argument("--gguf-file")
    evaluate.add_argument("--data", help="raw text file (default: WikiText-2 raw test)")
    evaluate.add_argument("--max-tokens", type=int)
    evaluate.add_argument("--seq-len", type=int, default=2048)
    evaluate.add_argument("--device-map")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="stored bytes and bits per weight of a compressed model")
    report.add_argument("model")
    report.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=cmd_report)

    push = sub.add_parser("push", help="compress a model and publish it with a model card on the Hub")
    _add_compression_args(push)
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--evaluate-tokens", type=int, help="measure perplexity on this many test tokens for the card")
    push.add_argument("--eval-seq-len", type=int, default=2048)
    push.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"swsc-hf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
