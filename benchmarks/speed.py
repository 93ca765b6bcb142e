"""Speed and memory of compressed vs dense SmolLM2-135M on this CPU: prefill and one-token decode.

    python benchmarks/speed.py --repeats 7 --out docs/results/speed.jsonl

All models live in one process and are timed in interleaved rounds (every model once per round, after --warmup
untimed rounds), so load on a shared machine hits them alike; the JSON lines hold medians and every run, and the
report divides by dense from the same run. Prefill: one forward of a --prompt-tokens WikiText-2 prompt that builds
the KV cache. Decode: one forward of 1 token on that cache, cropped back to the prompt before every run.
Memory: the bytes of each model's parameters and buffers, and the forward's transient memory, measured as the rise
of the process's resident set (VmHWM after a reset through /proc/self/clear_refs, freed heap returned with
malloc_trim first) over its RSS before the forward. --compile adds `torch.compile`d copies of those models.
quanto-int4 is not in the default list: its CPU int4 forward is 30-100x slower than dense here (minutes a round).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback

import common
import methods
import torch
from tqdm.auto import tqdm

from swsc_hf.data import wikitext2_test_text

DEFAULT_METHODS = "dense,swsc-4bit,swsc-3bit,swsc-2bit,swsc-paper,weight-clustering-paper,hqq-4b-g64"
DEFAULT_COMPILE = "dense,swsc-4bit,swsc-2bit"


class Case:
    """One model under test: its forwards, the prompt's KV cache and the timings collected so far."""

    def __init__(self, label: str, method: str, model, bits: float, prompt: torch.Tensor, compiled: bool) -> None:
        self.label, self.method, self.model, self.prompt, self.compiled = label, method, model, prompt, compiled
        self.bits = bits
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}
        self.memory: dict[str, int] = {}
        self.cache = None

    @torch.no_grad()  # not inference_mode: quanto's layers fail under it
    def prefill(self):
        return self.forward(input_ids=self.prompt, use_cache=True)

    @torch.no_grad()
    def decode(self):
        extra = self.cache.get_seq_length() - self.prompt.shape[1]
        if extra:
            self.cache.crop(-extra)
        return self.forward(input_ids=self.prompt[:, -1:], past_key_values=self.cache, use_cache=True)

    def run(self, phase: str, timed: bool) -> None:
        start = time.perf_counter()
        out = self.prefill() if phase == "prefill" else self.decode()
        if timed:
            self.times[phase].append(time.perf_counter() - start)
        if phase == "prefill":
            self.cache = out.past_key_values

    def measure_memory(self) -> None:
        """Transient resident memory of one prefill and one decode, and the model's own tensor bytes."""
        self.memory["model_bytes"] = common.tensor_bytes(self.model)
        for phase in ("prefill", "decode"):
            before = common.reset_peak()
            self.run(phase, timed=False)
            self.memory[f"{phase}_transient_bytes"] = max(0, common.peak_bytes() - before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="names or patterns from methods.METHODS")
    parser.add_argument("--compile", default=DEFAULT_COMPILE,
                        help="methods to also time under torch.compile (comma-separated, '' for none)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians need >= 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(common.RESULTS / "speed.jsonl"))
    args = parser.parse_args(argv)

    names = methods.select(args.methods)
    names = ["dense"] + [name for name in names if name != "dense"]
    to_compile = set(methods.select(args.compile)) if args.compile else set()
    info = common.run_info()
    dense, tokenizer = common.load_dense()
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
        cases.append(Case(name, name, model, bits, prompt, compiled=False))
        if name in to_compile:
            cases.append(Case(f"{name}+compile", name, model, bits, prompt, compiled=True))
    del dense
    for case in tqdm(list(cases), desc="warm-up (and compile), memory", unit="model"):
        try:  # warm-up; also triggers torch.compile, which may fail
            start = time.perf_counter()
            for _ in range(args.warmup):
                case.run("prefill", timed=False)
                case.run("decode", timed=False)
            case.memory["warmup_seconds"] = time.perf_counter() - start
            case.measure_memory()
        except Exception as err:
            failed.append({"method": case.method, "label": case.label, "compiled": case.compiled,
                           "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=-3)})
            cases.remove(case)
    for _ in tqdm(range(args.repeats), desc="timing rounds", unit="round"):
        for case in cases:
            case.run("prefill", timed=True)
            case.run("decode", timed=True)
    for case in cases:
        record = {"method": case.method, "label": case.label, "family": methods.METHODS[case.method][0],
                  "compiled": case.compiled, "avg_bits": case.bits, "prompt_tokens": args.prompt_tokens,
                  "repeats": args.repeats,
                  "prefill_median_s": statistics.median(case.times["prefill"]),
                  "decode_median_s": statistics.median(case.times["decode"]),
                  "prefill_runs_s": case.times["prefill"], "decode_runs_s": case.times["decode"], **case.memory}
        tqdm.write(f"{case.label}: prefill {record['prefill_median_s'] * 1e3:.1f} ms, decode "
                   f"{record['decode_median_s'] * 1e3:.1f} ms, model {case.memory['model_bytes'] / 2**20:.1f} MiB")
        common.append_jsonl(args.out, {**record, **info})
    for record in failed:
        tqdm.write(f"{record['label']}: FAILED {record['error']}")
        common.append_jsonl(args.out, {**record, **info})


if __name__ == "__main__":
    main()
