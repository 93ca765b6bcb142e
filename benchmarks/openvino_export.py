"""The OpenVINO route measured on SmolLM2-135M: swsc-4bit (data-free) exported with `export_openvino` vs the torch
model it came from, and vs an OpenVINO export of the dense model.

    OMP_NUM_THREADS=1 python benchmarks/openvino_export.py --windows 4 --out docs/results/openvino.jsonl

Perplexity: the first --windows non-overlapping 2048-token windows of the WikiText-2 test split, tokenized once as
`swsc_hf.perplexity` does (its window NLLs for the torch models, the same windows through `OpenVINOCausalLM.logits`
for the IR). Decode: batch 1, a --prompt-tokens WikiText-2 prompt (one prefill forward that builds the KV cache), then
--new-tokens greedy tokens, one forward each on that cache (tokens/s = new tokens / decode seconds, median of
--repeats). Sizes: the IR's .bin on disk. Run-time weights: the resident-set rise of compile_model (a plugin that keeps
weights compressed holds about the .bin; one that decompresses holds the dense float32 weights) and the op types of
the compiled (runtime) model. Everything runs on --threads threads, OpenVINO at f32 inference precision (exact; its
bf16 precision is left out: OpenVINO 2026.4.1 dies with SIGFPE compiling this model for bf16 on one thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import psutil
import torch

import swsc_hf
from swsc_hf import OpenVINOCausalLM, SWSCConfig, compress_model, export_openvino, load_smollm2, perplexity

SEQ_LEN = 2048


def rss() -> int:
    return psutil.Process().memory_info().rss


def ov_window_nll(runner: OpenVINOCausalLM, ids: torch.Tensor, windows: int) -> list[float]:
    out = []
    for w in range(windows):
        batch = ids[w * SEQ_LEN : (w + 1) * SEQ_LEN][None]
        logits = runner.logits(batch)
        out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:], reduction="sum")))
        del logits
    return out


def executed_decompression(folder: Path, threads: int) -> dict:
    """Run one decode step with OpenVINO's per-node profiling: how many nodes of the layers' decompression
    subgraphs (named <layer>/codebook_gather, /fq_weights, ...) ran in it, and how many FullyConnected nodes."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(folder / "openvino_model.xml")), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    layout = json.loads((folder / "swsc_openvino.json").read_text())
    past = [np.zeros((1, heads, 16, dim), np.float32) for heads, dim in layout["kv_heads_head_dim"]]
    request.infer([np.array([[5]]), np.ones((1, 17), np.int64), np.array([[16]]), *past])
    ran = [p for p in request.profiling_info if str(p.status).endswith("EXECUTED")]
    marks = ("/codebook", "/fq_weights", "/scale", "/codes")
    return dict(decompression_nodes_run=sum(any(m in p.node_name for m in marks) for p in ran),
                fully_connected_run=sum(p.node_type == "FullyConnected" for p in ran),
                gather_run=sum(p.node_type == "Gather" for p in ran))


def ov_decode(runner: OpenVINOCausalLM, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    prefill, decode, tokens = [], [], None
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        runner.reset()
        logits = runner.step(prompt)
        mid = time.perf_counter()
        generated = []
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None].astype("int64")
            generated.append(int(token[0, 0]))
            logits = runner.step(token)
        end = time.perf_counter()
        prefill.append(mid - start)
        decode.append(end - mid)
        tokens = generated
    prefill, decode = prefill[1:], decode[1:]
    return dict(prefill_median_s=statistics.median(prefill), decode_median_s=statistics.median(decode),
                decode_tokens_per_s=new_tokens / statistics.median(decode), decode_runs_s=decode, tokens=tokens)


@torch.no_grad()
def torch_decode(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    decode, tokens = [], None
    for _ in range(repeats + 1):
        out = model(prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(token))
        decode.append(time.perf_counter() - start)
        tokens = generated
    decode = decode[1:]
    # new_tokens - 1 decode forwards (the first token comes from the prefill), as OpenVINO's loop runs new_tokens
    return dict(decode_median_s=statistics.median(decode),
                decode_tokens_per_s=(new_tokens - 1) / statistics.median(decode), tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="swsc-4bit")
    parser.add_argument("--out", default=str(common.RESULTS / "openvino.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import openvino

    info = common.run_info()
    info["versions"]["openvino"] = openvino.__version__
    dense, tokenizer = load_smollm2()
    dense.eval()
    compressed = copy.deepcopy(dense)
    compress_model(compressed, SWSCConfig(preset=args.preset))
    text = swsc_hf.wikitext2_test_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    prompt = ids[: args.prompt_tokens][None]
    max_tokens = args.windows * SEQ_LEN

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in (("dense", dense), (args.preset, compressed)):
            folder = Path(tmp) / label
            start = time.perf_counter()
            export_openvino(model, folder, tokenizer)
            export_s = time.perf_counter() - start
            torch_ppl = perplexity(model, tokenizer, text, seq_len=SEQ_LEN, max_tokens=max_tokens, progress=False)
            torch_speed = torch_decode(model, prompt, args.new_tokens, args.repeats)
            base = rss()
            start = time.perf_counter()
            runner = OpenVINOCausalLM(folder, threads=args.threads, precision="f32")
            compile_s, compile_rss = time.perf_counter() - start, rss() - base
            runtime_ops: dict[str, int] = {}
            for op in runner.compiled.get_runtime_model().get_ordered_ops():
                kind = op.get_rt_info()["layerType"].astype(str)
                runtime_ops[kind] = runtime_ops.get(kind, 0) + 1
            nll = ov_window_nll(runner, ids, args.windows)
            tokens = args.windows * (SEQ_LEN - 1)
            ov_speed = ov_decode(runner, prompt, args.new_tokens, args.repeats)
            del runner
            profile = executed_decompression(folder, args.threads)
            record = dict(
                model="SmolLM2-135M-Instruct", method=label, windows=args.windows, seq_len=SEQ_LEN,
                torch_ppl=torch_ppl.perplexity, openvino_ppl=math.exp(sum(nll) / tokens),
                torch_window_nll=torch_ppl.window_nll, openvino_window_nll=nll,
                max_window_nll_diff=max(abs(a - b) for a, b in zip(nll, torch_ppl.window_nll, strict=True)),
                ir_bin_bytes=os.path.getsize(folder / "openvino_model.bin"),
                ir_xml_bytes=os.path.getsize(folder / "openvino_model.xml"),
                export_s=export_s, compile_s=compile_s, compile_rss_bytes=compile_rss, runtime_ops=runtime_ops,
                decode_step_profile=profile,
                runner="OpenVINOCausalLM, KV cache as OpenVINO state",
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
                openvino_f32=ov_speed, torch=torch_speed,
                greedy_tokens_equal_torch=ov_speed["tokens"] == torch_speed["tokens"], **info)
            record["openvino_f32"].pop("tokens")
            record["torch"].pop("tokens")
            common.append_jsonl(args.out, record)
            records.append(record)
            print(f"{label}: ppl torch {record['torch_ppl']:.4f} openvino {record['openvino_ppl']:.4f} "
                  f"(max window NLL diff {record['max_window_nll_diff']:.4g}); "
                  f".bin {record['ir_bin_bytes'] / 2**20:.1f} MiB; compile RSS +{compile_rss / 2**20:.0f} MiB; "
                  f"decode tok/s OV f32 "
                  f"{ov_speed['decode_tokens_per_s']:.1f}, torch "
                  f"{torch_speed['decode_tokens_per_s']:.1f}; greedy equal {record['greedy_tokens_equal_torch']}; "
                  f"decode step ran {profile}", flush=True)


if __name__ == "__main__":
    main()
