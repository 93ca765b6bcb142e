"""Defences for checkpoints from strangers and for interrupted saves.

Loading (all before any tensor data is read, except the finiteness check):

* `read_safetensors_header`: a strict parser of the safetensors header (types, bounds, tensors tiling the data
  section exactly, no duplicate names), so a bad header fails with the file and tensor named instead of driving an
  allocation or a read past the end of the file.
* `check_tensor_set`: the checkpoint's tensors against the (meta) model they are about to fill: nothing missing
  (transformers would silently re-initialise it), nothing unexpected, every shape and dtype kind right.
* `verify_checksums`: the CRC32 of every tensor recorded at save time (`checksum_metadata`, written into the
  safetensors metadata). A flipped bit in float data is otherwise undetectable. CRC32 catches accidental corruption;
  it is no defence against a deliberate edit (whoever edits the data can rewrite the checksums too).
* `check_finite`: after loading, no NaN or Inf in a compressed layer's tables.

Saving: `install_atomic_save` makes `model.save_pretrained` write into a temporary sibling folder and swap it in,
so an interrupted save leaves the earlier checkpoint in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import json
import math
import mmap
import os
import re
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

# Bytes per element of every safetensors dtype swsc_hf accepts.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
CHECKSUM_KEY = "swsc_crc32"


# ---- safetensors headers ------------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"names tensor {duplicate!r} twice")
    return dict(pairs)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table and metadata of a safetensors file, checked against the file without reading tensor data.

    Every entry must have a known dtype, a shape of non-negative ints and offsets matching its byte size; together
    the tensors must tile the data section exactly (no gap, overlap or trailing bytes), as the format requires.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name} is truncated: no safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path.name} declares a {length}-byte header but the file has {size} bytes")
        text = handle.read(length)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path.name} has a corrupted safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a corrupted safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path.name} has corrupted safetensors metadata: it must map strings to strings")
    data_size = size - 8 - length
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path.name}: tensor {key} has an invalid header entry {str(info)[:200]}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"{path.name}: tensor {key} has unsupported dtype {str(dtype)[:50]!r}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise ValueError(f"{path.name}: tensor {key} has an invalid shape {str(shape)[:200]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
            raise ValueError(f"{path.name}: tensor {key} has invalid data offsets {str(offsets)[:200]}")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes or offsets[1] > data_size:
            raise ValueError(f"{path.name}: tensor {key} ({dtype} {shape}) has offsets {offsets} that do not match "
                             f"its size or lie past the end of the file ({data_size} data bytes)")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise ValueError(f"{path.name}: tensor {key} starts at data byte {start}, expected {end}: tensors "
                             "overlap or leave a gap")
        end = stop
    if end != data_size:
        raise ValueError(f"{path.name}: its tensors end at data byte {end} but the file has {data_size} data bytes")
    return header, metadata


def read_checkpoint_headers(files: Iterable[str | os.PathLike]) -> dict[str, tuple[Path, dict]]:
    """Every tensor of a (sharded) checkpoint: name -> (file, header entry); a name in two shards is an error."""
    entries: dict[str, tuple[Path, dict]] = {}
    for file in files:
        header, _ = read_safetensors_header(file)
        for key, info in header.items():
            if key in entries:
                raise ValueError(f"tensor {key} is stored twice, in {entries[key][0].name} and {Path(file).name}")
            entries[key] = (Path(file), info)
    return entries


# ---- the checkpoint's tensors against the model -------------------------------------------------------------------
def _ignored(patterns: Iterable[str] | None, key: str) -> bool:
    return any(re.search(pattern, key) for pattern in patterns or ())


def check_tensor_set(model: nn.Module, entries: dict[str, tuple[Path, dict]]) -> None:
    """The checkpoint must fill every tensor of the (meta) model, with the right shape and dtype kind, and no other.

    Checkpoint names are mapped to the model's through transformers' own renaming rules (legacy names); tensors
    that a converter merges (e.g. per-expert weights) are only checked for presence.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    expected = model.state_dict()
    transforms = get_model_conversion_mapping(model, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    found: set[str] = set()
    unexpected = []
    for key, (file, info) in entries.items():
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            if not _ignored(getattr(model, "_keys_to_ignore_on_load_unexpected", None), key):
                unexpected.append(key)
            continue
        found.add(target)
        if pattern is not None:
            continue
        param = expected[target]
        kind_ok = info["dtype"] in FLOAT_DTYPES if param.is_floating_point() else info["dtype"] == _st_dtype(param)
        if list(param.shape) != info["shape"] or not kind_ok:
            wanted = "a float dtype" if param.is_floating_point() else _st_dtype(param)
            raise ValueError(f"checkpoint tensor {key} in {file.name} is {info['dtype']} {info['shape']}, but the "
                             f"model needs {wanted} {list(param.shape)}")
    if unexpected:
        raise ValueError(f"the checkpoint has tensors the model does not have: {sorted(unexpected)[:5]}; it was "
                         "saved from another architecture or is corrupted")
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_pairs = {**tied, **{source: target for target, source in tied.items()}}
    missing = [
        key for key in expected
        if key not in found and tied_pairs.get(key) not in found
        and not _ignored(getattr(model, "_keys_to_ignore_on_load_missing", None), key)
    ]
    if missing:
        raise ValueError(f"the checkpoint lacks tensors the model needs: {missing[:5]}; transformers would fill them "
                         "with random values")


_TORCH_TO_ST = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
                torch.int64: "I64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def _st_dtype(tensor: torch.Tensor) -> str:
    return _TORCH_TO_ST.get(tensor.dtype, str(tensor.dtype))


# ---- checksums ----------------------------------------------------------------------------------------------------
def _crc32(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return f"{zlib.crc32(data):08x}"


def checksum_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata recording the CRC32 of every tensor `save_pretrained` will write (offloaded ones aside)."""
    sums = {key: _crc32(t) for key, t in model.state_dict().items() if t.device.type != "meta"}
    return {CHECKSUM_KEY: json.dumps(sums, sort_keys=True, separators=(",", ":"))}


def _file_crcs(file: Path, spans: dict[str, tuple[int, int]], workers: int) -> dict[str, str]:
    """CRC32 of byte ranges of `file`, computed in threads (zlib releases the GIL on large buffers)."""
    with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                sums = pool.map(lambda span: f"{zlib.crc32(view[span[0] : span[1]]):08x}", spans.values())
                return dict(zip(spans, sums, strict=True))
        finally:
            view.release()


def verify_checksums(files: Iterable[str | os.PathLike], workers: int = 4) -> int:
    """Check each tensor against the CRC32 recorded in its file's metadata; returns how many were checked.

    Files saved without checksums (other tools, older swsc_hf) are accepted unchecked.
    """
    checked = 0
    for file in files:
        file = Path(file)
        header, metadata = read_safetensors_header(file)
        if CHECKSUM_KEY not in metadata:
            continue
        try:
            recorded = json.loads(metadata[CHECKSUM_KEY])
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            raise ValueError(f"{file.name} has corrupted {CHECKSUM_KEY} metadata")
        base = file.stat().st_size - max((info["data_offsets"][1] for info in header.values()), default=0)
        spans = {key: (base + info["data_offsets"][0], base + info["data_offsets"][1])
                 for key, info in header.items() if key in recorded}
        for key, actual in _file_crcs(file, spans, workers).items():
            if actual != recorded[key]:
                raise ValueError(f"checkpoint tensor {key} in {file.name} has CRC32 {actual} but {recorded[key]} "
                                 "was recorded when it was saved: the file is corrupted")
        checked += len(spans)
    return checked


def check_checkpoint(model: nn.Module, files: Iterable[str | os.PathLike]) -> None:
    """Everything checkable before loading: headers, the tensor set against `model`, and the checksums."""
    files = [Path(f) for f in files]
    check_tensor_set(model, read_checkpoint_headers(files))
    verify_checksums(files)


# ---- after loading ------------------------------------------------------------------------------------------------
def check_finite(name: str, module: nn.Module) -> None:
    """No NaN or Inf in the float tables of a compressed layer (or the shared bases)."""
    for tensor_name, param in module.named_parameters(recurse=False):
        if param.is_floating_point() and param.device.type != "meta" and not torch.isfinite(param).all():
            raise ValueError(f"tensor {name}.{tensor_name} holds NaN or Inf values: the checkpoint is corrupted "
                             f"(or the compressed tables overflowed {param.dtype})")


# ---- atomic save --------------------------------------------------------------------------------------------------
_WEIGHTS_FILE = re.compile(r"(pytorch_)?model([.-][\w.-]*)?\.(safetensors|bin)(\.index\.json)?")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link into `new` what `old` holds that the save did not write (a tokenizer saved there earlier, say).

    Weight files are not carried: a stale shard or single-file checkpoint beside a new one could be loaded instead.
    """
    for entry in old.iterdir():
        if (new / entry.name).exists() or _WEIGHTS_FILE.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in [*names, "."]:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp: Path, target: Path) -> None:
    """Make `tmp` be `target`; an existing `target` is replaced in one step where the OS allows it."""
    if not target.exists():
        tmp.rename(target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the previous checkpoint
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, keep_other_files: bool = True) -> Iterator[Path]:
    """Yield an empty sibling folder of `target`; on success it replaces `target`, on any error it is removed.

    With `keep_other_files`, files already in `target` that the save did not write (other than weights) are kept;
    without, `target` is replaced whole. A process killed during the save leaves `target` untouched and a
    `.NAME.tmp-*` folder beside it.
    """
    target = Path(target).resolve()  # a symlinked folder keeps its link; "." gets a name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # unlike mkdtemp's 0700, this honours the umask, as a plain save_pretrained does
    try:
        if target.is_dir():
            shutil.copymode(target, tmp)
        yield tmp
        if keep_other_files and target.is_dir():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_pretrained(model: nn.Module, *args, **kwargs):
    """`save_pretrained` through `atomic_directory`: the folder holds the earlier checkpoint or the new one, whole.

    Non-main processes, distributed (DCP) checkpoints and a path that is a file go straight to transformers.
    """
    save = type(model).save_pretrained
    bound = inspect.signature(save).bind(model, *args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    target = Path(arguments["save_directory"])
    if (arguments["distributed_checkpoint"] or target.is_file()
            or not model.should_save_on_this_rank(arguments["is_main_process"])):
        return save(*bound.args, **bound.kwargs)
    if arguments["push_to_hub"]:  # transformers names the repo after the folder it is given
        arguments["kwargs"].setdefault("repo_id", target.name)
    with atomic_directory(target) as tmp:
        arguments["save_directory"] = tmp
        return save(*bound.args, **bound.kwargs)


def install_atomic_save(model: nn.Module) -> None:
    """Route `model.save_pretrained` (this instance only, if it has one) through `atomic_save_pretrained`."""
    if not hasattr(type(model), "save_pretrained"):
        return
    # A partial of a module-level function (not a bound method) keeps the model picklable and deep-copyable.
    model.save_pretrained = functools.partial(atomic_save_pretrained, model)
