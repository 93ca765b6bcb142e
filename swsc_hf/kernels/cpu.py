"""The compiled CPU kernels (csrc/codebook_cpu.cpp, the compressed matmul; csrc/decode_attention.cpp;
csrc/dense_gemv.cpp, the dense GEMV of decode steps): built on first use with the system compiler and cached.

`torch.utils.cpp_extension.load` compiles the source once per source hash and torch version into
`$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`) and later imports reuse it (about 10 s the first time).
A build killed midway is redone by the next process (`exclusive_build`), not waited on forever.
Without a working compiler `load_cpu_kernels()` returns False after one logged warning (with `SWSC_HF_KERNELS=0`, after
an info line) and layers use the reference path. The instruction set (AVX-512F+BW, AVX2+FMA+F16C or portable C++) is
chosen at run time. Integer dot products run where the CPU and layout have them, by default for codebooks on their
8-bit grid (`SWSCConfig.int8_codebooks`), for every codebook after `set_integer_dot(True)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
# the compiled files first; the rest are included by them and count in the build's digest
SOURCES = tuple(_CSRC / name for name in ("codebook_cpu.cpp", "decode_attention.cpp", "dense_gemv.cpp",
                                           "codebook_simd.inc", "decode_attention_simd.inc", "dense_gemv_simd.inc",
                                           "float_vec.h", "cpu_isa.h"))
COMPILED = SOURCES[:3]
ISA_NAMES = ("portable", "avx2", "avx512")

_lock = threading.Lock()
_state: dict[str, bool] = {}


def load_cpu_kernels() -> bool:
    """Build (first time) and load the CPU kernels; False, with one warning, when they cannot be had."""
    loaded = _state.get("loaded")
    if loaded is not None:
        return loaded
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _build()
        return _state["loaded"]


def _build() -> bool:
    if os.environ.get("SWSC_HF_KERNELS", "1") == "0":
        logger.info("swsc_hf: compiled kernels disabled by SWSC_HF_KERNELS=0; using the reference path")
        return False
    if hasattr(torch.ops, "swsc_hf_cpu") and hasattr(torch.ops.swsc_hf_cpu, "gemv"):
        _register_fakes()
        return True
    logger.info("swsc_hf: building the CPU kernels (first use; about 10 s, then cached)")
    try:
        from torch.utils.cpp_extension import load

        # The name carries a digest of the sources: torch's build cache does not see the included .inc file.
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in SOURCES)).hexdigest()[:12]
        name = f"swsc_hf_cpu_{digest}"
        directory = build_directory(name)
        with exclusive_build(directory):
            load(name=name, sources=[str(path) for path in COMPILED], extra_cflags=["-O3", "-fopenmp"],
                 extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False, verbose=False)
        _register_fakes()
    except Exception as error:  # no compiler, no headers, a failed build: the reference path still works
        logger.warning("swsc_hf: could not build the CPU kernels (%s: %s); compressed layers use the slower "
                       "reference path", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return False
    return True


def build_directory(name: str) -> Path:
    """Where torch builds an extension called `name` by default: `$TORCH_EXTENSIONS_DIR/name`, else a folder per
    Python version and accelerator under `get_default_build_root()`. Passed to `load` explicitly, so that
    `exclusive_build` guards the directory the build really uses."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / name


@contextlib.contextmanager
def exclusive_build(directory: Path) -> Iterator[None]:
    """Build in `directory` with no other live process building there, clearing what an interrupted build left.

    torch's build takes a lock file (`directory/lock`) and later processes wait for it to go away, forever: after a
    build killed midway (Ctrl-C, a job limit) every process would hang at its first compressed forward. An OS lock
    (`flock`) is held around the build instead; the OS releases it when its holder exits, so once it is ours, a lock
    file still there is an interrupted build's and is removed with a warning. Where `fcntl` is missing (Windows) or the
    file system refuses the lock, only torch's lock file applies.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(directory / "swsc_hf_build.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: torch's lock file only, as before
            yield
            return
        try:
            stale = directory / "lock"
            if stale.exists():
                logger.warning("swsc_hf: removing %s, left by an interrupted build of the CPU kernels", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register_fakes() -> None:
    """Shapes of the C++ ops for torch.compile, which calls the GEMVs straight from compiled decode graphs: (..., n)
    activations give (..., channels) (gemv) or (..., length) (gemv_t) in their dtype, (..., out) (dense_gemv)."""
    if _state.get("fakes"):
        return
    _state["fakes"] = True
    for name, size in (("gemv", 0), ("gemv_t", 1)):
        @torch.library.register_fake(f"swsc_hf_cpu::{name}")
        def _(x, codes, codebook, scales, layout, size=size):
            return x.new_empty(*x.shape[:-1], layout[size])

    @torch.library.register_fake("swsc_hf_cpu::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    @torch.library.register_fake("swsc_hf_cpu::dense_gemv")
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def cpu_isa() -> str:
    """The instruction set the CPU kernels use here ("avx512", "avx2" or "portable")."""
    if not load_cpu_kernels():
        raise RuntimeError("swsc_hf CPU kernels are not available (see the warning logged when they were built)")
    return ISA_NAMES[torch.ops.swsc_hf_cpu.isa()]


def limit_cpu_isa(name: str) -> str:
    """Use at most instruction set `name` ("avx512", "avx2", "portable"); returns the previous limit (for tests)."""
    if name not in ISA_NAMES:
        raise ValueError(f"isa must be one of {ISA_NAMES}, got {name!r}")
    if not load_cpu_kernels():
        raise RuntimeError("swsc_hf CPU kernels are not available")
    return ISA_NAMES[torch.ops.swsc_hf_cpu.set_max_isa(ISA_NAMES.index(name))]


def integer_dot_available() -> bool:
    """Whether set_integer_dot has a kernel here, within limit_cpu_isa's cap: AVX-512 VBMI and VNNI (quadruples) or
    AVX2 kernels (4-bit scalar tables)."""
    return load_cpu_kernels() and bool(torch.ops.swsc_hf_cpu.integer_dot_available())


def set_integer_dot(enabled: bool) -> bool:
    """Opt every codebook in to integer dot products for decode-sized calls (False, the default: only codebooks
    already on their 8-bit grid); returns the previous setting.

    Covers, over output channels, 8-bit codes of 4-dim vectors (the `swsc-2bit` layout: channels of whole 64
    values, scale groups of whole 32) on CPUs with AVX-512 VBMI and VNNI, and 4-bit scalar tables (`swsc-4bit`:
    channels and scale groups of whole 32 values) where the kernels run AVX2 (CPUs without AVX-512); other layouts
    and CPUs keep the float kernels. The activations are rounded to 15-bit (14-bit for the 4-bit tables) integers
    per 32 values, and the codebook to 8-bit integers: exactly for codebooks on that grid (`SWSCConfig.
    int8_codebooks`), which run these kernels without opting in; opted in, other codebooks too, so outputs then
    differ from the float kernels' by the codebook's rounding (docs/results.md measures the perplexity cost). These
    GEMVs run 1.4-2.6x faster per layer (docs/design.md). Process-wide, eager and compiled alike. Without the
    kernels or those instructions it logs a warning and changes nothing.
    """
    if not load_cpu_kernels():
        if enabled:
            logger.warning("swsc_hf: set_integer_dot(True) has no effect: the CPU kernels are not available (see the "
                           "warning logged when they were built)")
        return False
    if enabled and not torch.ops.swsc_hf_cpu.integer_dot_available():
        logger.warning("swsc_hf: set_integer_dot(True) has no effect on this CPU: the integer kernels run where the "
                       "kernels use AVX2 (4-bit tables; CPUs without AVX-512) or AVX-512 with VBMI and VNNI "
                       "(quadruples), and they use %s here; the float kernels keep running", cpu_isa())
    return bool(torch.ops.swsc_hf_cpu.set_integer_dot(bool(enabled)))
