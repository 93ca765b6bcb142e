"""The commands of `swsc-hf` (compress, eval, report, push). Arguments are parsed by `swsc_hf_cli`, the entry point
outside this package, so that `--help` never imports torch; this module runs the parsed command (`run`)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swsc_hf_cli import BUNDLED
from swsc_hf_cli import main as parse_and_run

from .atomic_save import check_output_folder, save_atomically
from .bundled import as_dense, smollm2_gguf
from .config import SWSCConfig
from .data import join_rows, rows_from_lines
from .distributed import compress_source, is_distributed, launch
from .evaluation import perplexity
from .hub import push_compressed
from .quantizer import compress_model
from .report import compression_report

logger = logging.getLogger("swsc_hf")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _dtype(text: str) -> torch.dtype | str:
    """`--dtype`: "auto" (the source checkpoint's dtype: `from_pretrained(dtype="auto")`) or a torch dtype."""
    return text if text == "auto" else getattr(torch, text)


def _check_source(src: str) -> None:
    """A source that is not a folder fails here with what is wrong, before transformers calls it a bad Hub id."""
    path = Path(src).expanduser()
    if src == BUNDLED or path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{src} is a file; give the folder that holds the model (and --gguf-file NAME for a "
                                "GGUF file)")
    looks_local = src.startswith((".", "/", "~")) or src.endswith("/") or not HUB_ID.match(src)
    if looks_local or (path.parent != Path(".") and path.parent.is_dir()):  # "out/x" with a folder "out" here
        raise FileNotFoundError(f"no such folder: {src}")


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
    _check_source(src)
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
        "bits_ladder": args.bits_ladder, "head_bits": args.head_bits, "refit_rounds": args.refit_rounds,
        "refit_damp": args.refit_damp, "rotate_residual": args.rotate_residual, "int8_codebooks": args.int8_codebooks,
        "layer_overrides": args.layer_overrides, "embedding_from_head": args.embedding_from_head,
        "tune_steps": args.tune_steps, "layer_tune_steps": args.layer_tune_steps, "tune_samples": args.tune_samples,
        "tune_dtype": args.tune_dtype, "time_budget": args.time_budget,
    }
    if args.segment_length is not None:
        fields["segment_length"] = None if args.segment_length == 0 else args.segment_length
    return SWSCConfig(**{k: v for k, v in fields.items() if v is not None})


def cmd_compress(args) -> int:
    check_output_folder(args.out, args.src, overwrite=args.overwrite)  # before any work: never lose a user's files
    config = _config_from_args(args)
    dtype = _dtype(args.dtype)
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
        if dtype == "auto":
            _check_source(args.src)
            dtype = _source_dtype(args.src)
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
    if args.json:
        print(json.dumps({"out": str(args.out), "seconds": round(seconds, 1),
                          "avg_bits": report.compressed_bits_per_weight,
                          "model_bits": report.model_bits_per_weight,
                          "stored_mib": report.model_stored_bytes / 2**20,
                          "dense_mib": report.model_dense_bytes / 2**20}))
    else:
        print(f"compressed {args.src} in {seconds:.1f} s, saved to {args.out}\n{report.summary()}")
    return 0


def _source_dtype(src: str) -> torch.dtype:
    """The dtype a safetensors source was saved in (float32 when its config does not say)."""
    dtype = getattr(AutoConfig.from_pretrained(src), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def cmd_eval(args) -> int:
    model, tokenizer = load_source(args.model, args.gguf_file, dtype=_dtype(args.dtype),
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
    _check_source(args.model)
    if args.model == BUNDLED:
        model, _ = load_source(args.model, None, dtype=_dtype(args.dtype))
    else:  # no tokenizer: the report never uses one
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_dtype(args.dtype))
    report = compression_report(model)
    print(json.dumps(report.to_dict()) if args.json else report)
    return 0


def cmd_push(args) -> int:
    config = _config_from_args(args)
    model, tokenizer = load_source(args.src, args.gguf_file, dtype=_dtype(args.dtype),
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


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "report": cmd_report, "push": cmd_push}


def run(args) -> int:
    """Run a command parsed by `swsc_hf_cli.build_parser` with `args.threads` compute threads."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"swsc-hf: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`swsc-hf ARGS` in this process (the console script runs `swsc_hf_cli.main`, which parses before importing)."""
    return parse_and_run(argv)


if __name__ == "__main__":
    sys.exit(main())
