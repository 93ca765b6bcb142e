"""Batch-1 generation speed and memory of compressed vs dense SmolLM2-135M (or --model gemma3-270m) on this CPU, and
llama.cpp on the same GGUF weights.

    python benchmarks/speed.py --threads 2 --repeats 3 --out docs/results/speed.jsonl

Every model lives in this one process and is timed in interleaved rounds (every model once per round, after one
untimed warm-up round), so load on the machine hits them alike; the JSON lines keep medians and every run, and the
report divides by dense fp32 from the same run. Prefill: one forward of a --prompt-tokens WikiText-2 prompt that
builds the KV cache. Decode: --new-tokens greedy tokens, one forward each on that cache (tokens/s = new tokens /
decode seconds). Memory: the bytes of the model's parameters and buffers, and the peak resident set of the process
while it prefills and decodes (VmHWM after a reset), which includes everything loaded so far: compare its rise.
llama.cpp (`llama-cpp-python`, installed by benchmarks/setup_env.sh) runs the GGUF file the dense model was loaded from
(SmolLM2's bundled Q4_1, Gemma-3's Q4_K_M) with the same prompt tokens and thread count; it is skipped with a note
where it is not installed.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

import common
import methods
import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from swsc_hf import compile_decoding, set_integer_dot, set_kernels_enabled, wikitext2_test_text
from swsc_hf.kernels import GEMV_MAX_TOKENS

SDPA_DECODING = "swsc_hf_bench_packed_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """compile_decoding's attention with torch's SDPA in place of swsc_hf's decode attention kernel: single-token
    steps on the packed key/value heads (what compile_decoding ran before the kernel; the `+compile-sdpa` rows)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or module.training or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(pack_gqa(query, groups), key, value,
                                                           attn_mask=pack_gqa(attention_mask, groups), scale=scaling)
    return out.reshape(out.shape[0], query.shape[1], 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_DECODING, packed_sdpa_forward)
AttentionMaskInterface.register(SDPA_DECODING, sdpa_mask)

DEFAULT_METHODS = ("dense,dense-bf16,swsc-4bit,swsc-4bit-head,swsc-3bit,swsc-3bit-head,swsc-2bit,swsc-2bit-head,"
                   "swsc-bits4.25,hqq-4b-g64")


class TorchCase:
    """A transformers model: prefill the prompt, then greedy decode on the KV cache."""

    kind = "torch"

    def __init__(self, label: str, family: str, model, bits: float, prompt: torch.Tensor, compiled: bool,
                 cpp_wrapper: bool = False, integer_dot: bool = False, sdpa_attention: bool = False) -> None:
        self.label, self.family, self.model, self.bits, self.prompt = label, family, model, bits, prompt
        self.compiled, self.cpp_wrapper, self.integer_dot = compiled, cpp_wrapper, integer_dot
        # compiled: what swsc_hf.compile_decoding makes generate do (a static KV cache, the prefill eager, each
        # decode step one torch.compile'd graph with static shapes, its attention swsc_hf's decode attention on
        # the key/value heads). Eager cases keep the model's own attention: each run sets its case's, as cases
        # share a model. cpp_wrapper: the inductor option that compile_decoding(cpp_wrapper=True) sets.
        # sdpa_attention: compiled with torch's SDPA on the packed heads instead of the decode attention kernel
        original_attention = model.config._attn_implementation
        if compiled:
            compile_decoding(model)
        self.attention = SDPA_DECODING if sdpa_attention else model.config._attn_implementation
        if compiled:
            model.set_attn_implementation(original_attention)
        options = {"cpp_wrapper": True} if cpp_wrapper else None
        # compile_decoding's dynamic setting (automatic for models with sliding-window layers)
        dynamic = model.generation_config.compile_config.dynamic if compiled else False
        self.decode_step = (torch.compile(self._static_step, fullgraph=True, dynamic=dynamic, options=options)
                            if compiled else None)
        self.cache = None
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.info: dict[str, float] = {"model_bytes": common.tensor_bytes(model)}
        self.generated: list[int] = []

    def _static_step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=position, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def run(self, new_tokens: int) -> tuple[float, float]:
        if self.model.config._attn_implementation != self.attention:
            self.model.set_attn_implementation(self.attention)
        previous = set_integer_dot(self.integer_dot)  # swsc_hf.set_integer_dot: this case's kernels only
        try:
            return self._run_static(new_tokens) if self.compiled else self._run_eager(new_tokens)
        finally:
            set_integer_dot(previous)

    def _run_eager(self, new_tokens: int) -> tuple[float, float]:
        start = time.perf_counter()
        out = self.model(input_ids=self.prompt, use_cache=True)
        prefill = time.perf_counter() - start
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        decode = time.perf_counter() - start
        self.generated = tokens
        return prefill, decode

    def _run_static(self, new_tokens: int) -> tuple[float, float]:
        from transformers import StaticCache

        length = self.prompt.shape[1]
        if self.cache is None:
            self.cache = StaticCache(config=self.model.config, max_cache_len=length + new_tokens)
        self.cache.reset()
        start = time.perf_counter()
        token = self._static_step(self.prompt, torch.arange(length))
        prefill = time.perf_counter() - start
        tokens = [int(token)]
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            token = self.decode_step(token, torch.tensor([length + i]))
            tokens.append(int(token))
        decode = time.perf_counter() - start
        self.generated = tokens
        return prefill, decode


@torch.no_grad()
def decode_kernel_perplexity(model, windows: torch.Tensor) -> float:
    """Perplexity of each row of `windows` (windows x tokens) fed GEMV_MAX_TOKENS tokens per forward on the KV cache,
    so every compressed linear runs its decode kernel (a prompt in one forward would take the prefill path)."""
    nll, count = 0.0, 0
    for window in windows:
        cache = None
        for start in range(0, window.numel() - 1, GEMV_MAX_TOKENS):
            chunk = window[start: start + GEMV_MAX_TOKENS][None]
            out = model(input_ids=chunk, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            targets = window[start + 1: start + 1 + GEMV_MAX_TOKENS]
            logits = out.logits[0, : targets.numel()].float()
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += targets.numel()
    return math.exp(nll / count)


def integer_perplexities(case: TorchCase, windows: torch.Tensor) -> dict:
    """The decode-kernel perplexity of an integer-dot case's model with the default kernels ("float": integer only
    for codebooks on their 8-bit grid), with integer dot products for every codebook, and on the reference path."""
    out = {"windows": windows.shape[0], "tokens_per_window": windows.shape[1], "tokens_per_forward": GEMV_MAX_TOKENS}
    for name, integer in (("float", False), ("integer", True)):
        previous = set_integer_dot(integer)
        try:
            out[name] = decode_kernel_perplexity(case.model, windows)
        finally:
            set_integer_dot(previous)
    previous = set_kernels_enabled(False)
    try:
        out["reference"] = decode_kernel_perplexity(case.model, windows)
    finally:
        set_kernels_enabled(previous)
    return out


def llama_cpp_failure(gguf_path: str) -> str | None:
    """Why llama.cpp cannot run here, or None: it loads the GGUF file and evaluates a token in a child process first,
    since a build for instructions this CPU lacks dies with SIGILL and would take this whole benchmark with it."""
    probe = ("import sys; from llama_cpp import Llama; "
             "Llama(model_path=sys.argv[1], n_ctx=16, n_threads=1, verbose=False).eval([1])")
    done = subprocess.run([sys.executable, "-c", probe, gguf_path], capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return (f"llama.cpp died with {name} in a probe: its build uses instructions this CPU lacks; rebuild "
                "llama-cpp-python on this machine (benchmarks/setup_env.sh)")
    last_line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
    return f"llama.cpp failed in a probe: {last_line}"


class LlamaCppCase:
    """llama.cpp through llama-cpp-python on a GGUF file: the same prompt token ids, greedy decode."""

    kind = "llama.cpp"
    family = "llama.cpp"
    compiled = False

    def __init__(self, label: str, gguf_path: str, prompt: torch.Tensor, threads: int, new_tokens: int) -> None:
        from llama_cpp import Llama

        self.label, self.bits = label, None
        self.prompt = [int(t) for t in prompt[0]]
        self.llm = Llama(model_path=gguf_path, n_ctx=len(self.prompt) + new_tokens + 8, n_batch=len(self.prompt),
                         n_threads=threads, n_threads_batch=threads, verbose=False)
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.info: dict[str, float] = {"file_bytes": os.path.getsize(gguf_path)}
        self.generated: list[int] = []

    def next_token(self) -> int:
        """Greedy choice from the last position's logits (llama-cpp-python keeps `scores` only with logits_all)."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def run(self, new_tokens: int) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.prompt)
        prefill = time.perf_counter() - start
        token = self.next_token()
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = self.next_token()
            tokens.append(token)
        decode = time.perf_counter() - start
        self.generated = tokens
        return prefill, decode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="names or patterns from methods.METHODS")
    parser.add_argument("--compile", default="", help="methods to also time with compiled decoding (a static KV "
                        "cache and a torch.compile'd decode step, as swsc_hf.compile_decoding; comma-separated)")
    parser.add_argument("--cpp-wrapper", default="", help="methods to also time with compiled decoding whose "
                        "wrapper inductor emits in C++ (compile_decoding(cpp_wrapper=True); comma-separated)")
    parser.add_argument("--compile-sdpa", default="", help="methods to also time with compiled decoding whose "
                        "single-token attention is torch's SDPA on the packed heads, not swsc_hf's decode attention "
                        "kernel (the kernel's A/B; comma-separated)")
    parser.add_argument("--integer-dot", default="", help="methods to also time with integer dot products "
                        "(swsc_hf.set_integer_dot), eager and, for those in --compile, compiled; comma-separated")
    parser.add_argument("--integer-windows", type=int, default=4, help="WikiText-2 test windows of 512 tokens on "
                        "which to compare the decode kernel's perplexity with and without integer dot products, per "
                        "eager --integer-dot case (0: skip)")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                        help="also time llama.cpp on the bundled GGUF file (needs llama-cpp-python)")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--model", choices=common.MODELS, default="smollm2")
    parser.add_argument("--out", help="JSON lines to append to (default docs/results/speed.jsonl for smollm2, "
                        "docs/results/speed-MODEL.jsonl for another model)")
    args = parser.parse_args(argv)
    out = args.out or str(common.RESULTS / ("speed.jsonl" if args.model == "smollm2" else f"speed-{args.model}.jsonl"))
    torch.set_num_threads(args.threads)

    names = methods.select(args.methods)
    names = ["dense"] + [name for name in names if name != "dense"]
    to_compile = set(methods.select(args.compile)) if args.compile else set()
    to_compile_cpp = set(methods.select(args.cpp_wrapper)) if args.cpp_wrapper else set()
    to_integer = set(methods.select(args.integer_dot)) if args.integer_dot else set()
    to_compile_sdpa = set(methods.select(args.compile_sdpa)) if args.compile_sdpa else set()
    info = {**common.run_info(), "model": args.model}
    dense, tokenizer = common.load_dense(args.model)
    prompt = tokenizer(wikitext2_test_text(), return_tensors="pt").input_ids[:, : args.prompt_tokens]
    cases, failed = [], []
    for name in tqdm(names, desc="compressing", unit="method"):
        try:
            model, bits, _ = methods.apply_method(name, copy.deepcopy(dense), tokenizer, serving=True)
        except Exception as err:  # a baseline that does not run here is recorded, not fatal
            failed.append({"method": name, "label": name, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(limit=-3)})
            continue
        model.eval()
        cases.append(TorchCase(name, methods.METHODS[name][0], model, bits, prompt, compiled=False))
        if name in to_compile:
            cases.append(TorchCase(f"{name}+compile", methods.METHODS[name][0], model, bits, prompt, compiled=True))
        if name in to_integer:
            cases.append(TorchCase(f"{name}+int", methods.METHODS[name][0], model, bits, prompt, compiled=False,
                                   integer_dot=True))
            if name in to_compile:
                cases.append(TorchCase(f"{name}+int+compile", methods.METHODS[name][0], model, bits, prompt,
                                       compiled=True, integer_dot=True))
        if name in to_compile_cpp:
            cases.append(TorchCase(f"{name}+compile-cpp", methods.METHODS[name][0], model, bits, prompt,
                                   compiled=True, cpp_wrapper=True))
        if name in to_compile_sdpa:
            cases.append(TorchCase(f"{name}+compile-sdpa", methods.METHODS[name][0], model, bits, prompt,
                                   compiled=True, sdpa_attention=True))
    del dense
    if args.llama_cpp:
        label = "llama.cpp"
        try:
            label, gguf = common.gguf_file(args.model)
            failure = llama_cpp_failure(gguf)
            if failure:
                raise RuntimeError(failure)
            cases.append(LlamaCppCase(label, gguf, prompt, args.threads, args.new_tokens))
        except Exception as err:
            failed.append({"method": label, "label": label, "error": f"{type(err).__name__}: {err}"})
    for case in tqdm(list(cases), desc="warm-up and memory", unit="model"):
        try:
            before, start = common.reset_peak(), time.perf_counter()
            case.run(args.new_tokens)
            case.info["warmup_seconds"] = time.perf_counter() - start  # compiled rows: includes compiling
            case.info["peak_rss_rise_bytes"] = max(0, common.peak_bytes() - before)
        except Exception as err:
            failed.append({"method": case.label, "label": case.label, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(limit=-3)})
            cases.remove(case)
    for _ in tqdm(range(args.repeats), desc="timing rounds", unit="round"):
        for case in cases:
            prefill, decode = case.run(args.new_tokens)
            case.times["prefill"].append(prefill)
            case.times["decode"].append(decode)
    integer_cases = [case for case in cases if getattr(case, "integer_dot", False) and not case.compiled]
    if args.integer_windows and integer_cases:
        text_ids = tokenizer(wikitext2_test_text(), return_tensors="pt").input_ids[0]
        windows = text_ids[: args.integer_windows * 512].reshape(-1, 512)
        for case in tqdm(integer_cases, desc="decode-kernel perplexity", unit="model"):
            case.info["gemv_perplexity"] = integer_perplexities(case, windows)
    for case in cases:
        decode = statistics.median(case.times["decode"])
        record = {"method": case.label.split("+")[0], "label": case.label, "family": case.family,
                  "kind": case.kind, "compiled": case.compiled, "cpp_wrapper": getattr(case, "cpp_wrapper", False),
                  "attention": getattr(case, "attention", None),
                  "integer_dot": getattr(case, "integer_dot", False),
                  "avg_bits": case.bits, "threads": args.threads,
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "prefill_median_s": statistics.median(case.times["prefill"]), "decode_median_s": decode,
                  "decode_tokens_per_s": (args.new_tokens - 1) / decode, "prefill_runs_s": case.times["prefill"],
                  "decode_runs_s": case.times["decode"], "first_tokens": case.generated[:16], **case.info}
        tqdm.write(f"{case.label}: prefill {record['prefill_median_s']:.3f} s, decode "
                   f"{record['decode_tokens_per_s']:.1f} tokens/s")
        common.append_jsonl(out, {**record, **info})
    for record in failed:
        tqdm.write(f"{record['label']}: FAILED {record['error']}")
        common.append_jsonl(out, {**record, **info})


if __name__ == "__main__":
    main()
