"""`swsc-hf`: compress, evaluate, report and publish models from the command line.

This is the command's entry point and argument parser, kept outside the `swsc_hf` package on purpose: importing
`swsc_hf` imports torch and transformers and registers with them (seconds, hundreds of MB), so the arguments are
parsed here first with the standard library only (`swsc-hf --help` and argument errors never import torch), and
`swsc_hf.cli`, which runs the chosen command, is imported afterwards. Nothing here is public API.
"""

from __future__ import annotations

import argparse
import json
import os

BUNDLED = "bundled:smollm2"
DTYPES = ["auto", "float32", "float16", "bfloat16"]


def default_threads() -> int:
    """Compute threads when --threads is not given: OMP_NUM_THREADS if set, else the CPUs this process may use minus
    the 1-minute load average (at least 1), so a shared, busy machine is not oversubscribed (on a 2-core machine
    under load, torch's default of one thread per core ran ~4x slower than one thread)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cpus, cpus - busy))


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: use 1 or more")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err}); e.g. "
                                         '\'{"down_proj": {"scale_group_size": 64}}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of layer name -> layout fields")
    return value


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype of the model's dense parts; auto (default) keeps the source checkpoint's")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="CPU compute threads per process (default: OMP_NUM_THREADS if set, else the CPUs free "
                             "by the 1-minute load average, at least 1, split among --num-processes)")


def _add_compression_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help=f"model folder, Hub id, folder with a GGUF file, or {BUNDLED}")
    parser.add_argument("--gguf-file", help="GGUF file name inside SRC")
    parser.add_argument("--preset", help="named setting (see swsc_hf.PRESETS)")
    parser.add_argument("--bits", type=float, help="target average bits per compressed weight")
    parser.add_argument("--bits-ladder", choices=["all", "scalar"],
                        help="with --bits and --calibration: layouts to choose from: all (scalar and vector tables, "
                             "best quality; default) or scalar (fastest kernels)")
    parser.add_argument("--n-clusters", type=_number, help="codewords per codebook (int) or fraction of channels")
    parser.add_argument("--segment-length", type=int, help="values per codeword; 0 = whole channel (SWSC paper)")
    parser.add_argument("--rank", type=int, help="rank of the low-rank error compensation")
    parser.add_argument("--cluster-dim", choices=["output", "input"])
    parser.add_argument("--scale-group-size", type=int, help="values per scale; 0 none, -1 one per channel")
    parser.add_argument("--table-dtype", choices=["float16", "bfloat16", "float32", "auto"])
    parser.add_argument("--layer-overrides", type=_json_object,
                        help="layout fields for some layers, as JSON, e.g. "
                             '\'{"down_proj": {"scale_group_size": 64}}\' (keys match dotted parts of layer names; '
                             "see SWSCConfig.layer_overrides)")
    parser.add_argument("--head-bits", type=int,
                        help="also compress the output head (lm_head) with 2**N shared values scaled per 128 weights "
                             "(2-8; default: the head stays dense)")
    parser.add_argument("--embedding-from-head", action="store_true", default=None,
                        help="with a compressed head tied to the input embeddings: read the embeddings from the "
                             "head's tables instead of keeping a dense copy (SWSCConfig.embedding_from_head)")
    parser.add_argument("--calibration", help='calibration text file or "wikitext2" (enables data-aware mode)')
    parser.add_argument("--n-samples", type=int, help="calibration sequences")
    parser.add_argument("--calibration-seq-len", type=int, help="calibration sequence length")
    parser.add_argument("--refit-rounds", type=int,
                        help="with --calibration: rounds refitting each matrix's scales and codebook to its output "
                             "error, codes chosen again between rounds (0 = off; the calibrated presets at 4.25, "
                             "3.25 and 2.2 bits use 4)")
    parser.add_argument("--refit-damp", type=float,
                        help="with --refit-rounds: the refit's ridge, this fraction of each Hessian's mean diagonal "
                             "added to it, so the tables fit the calibration text less closely (default 0; the "
                             "2.2-bit calibrated preset uses 0.1)")
    parser.add_argument("--rotate-residual", action="store_true", default=None,
                        help="rotate the residual stream by a random Hadamard matrix before compressing (Llama-style "
                             "decoders; SWSCConfig.rotate_residual)")
    parser.add_argument("--int8-codebooks", action="store_true", default=None,
                        help="put every codebook on its 8-bit grid after compressing, so the CPU kernels' integer dot "
                             "products run it exactly and by default (SWSCConfig.int8_codebooks)")
    parser.add_argument("--tune-steps", type=int,
                        help="with --calibration: steps of distillation toward the dense model (default 64; 0 = off)")
    parser.add_argument("--layer-tune-steps", type=int,
                        help="with --calibration: steps per decoder layer tuning its tables toward the dense layer's "
                             "outputs, right after it is fitted (0 = off)")
    parser.add_argument("--tune-samples", type=int,
                        help="calibration windows tuning cycles through (default: a fresh window for every step)")
    parser.add_argument("--tune-dtype", choices=["float32", "bfloat16", "auto"],
                        help="precision of tuning's matrix products (default float32; auto = bfloat16 where the "
                             "CPU or GPU multiplies it natively)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for the whole compression; tuning stops early to fit (default: no limit)")
    _add_common_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swsc-hf", description=__doc__.split("\n\n")[0])
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
    compress.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")

    evaluate = sub.add_parser("eval", help="WikiText-2-style perplexity of a (compressed) model")
    evaluate.add_argument("model", help=f"model folder, Hub id, or {BUNDLED}")
    evaluate.add_argument("--gguf-file")
    evaluate.add_argument("--data", help="raw text file (default: WikiText-2 raw test)")
    evaluate.add_argument("--max-tokens", type=int)
    evaluate.add_argument("--seq-len", type=int, default=2048)
    evaluate.add_argument("--device-map")
    _add_common_args(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    report = sub.add_parser("report", help="stored bytes and bits per weight of a (compressed) model")
    report.add_argument("model", help="model folder or Hub id (no tokenizer needed)")
    _add_common_args(report)
    report.add_argument("--json", action="store_true")

    push = sub.add_parser("push", help="compress a model and publish it with a model card on the Hub")
    _add_compression_args(push)
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--evaluate-tokens", type=int, help="measure perplexity on this many test tokens for the card")
    push.add_argument("--eval-seq-len", type=int, default=2048)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments (standard library only), then set the thread count and run the command."""
    args = build_parser().parse_args(argv)
    if args.threads is None:  # --num-processes N splits the default among the N processes
        args.threads = max(1, default_threads() // max(1, getattr(args, "num_processes", 1)))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported: sizes its OpenMP pool
    from swsc_hf.cli import run

    return run(args)
