"""Checks of checkpoints from strangers: everything is validated before any tensor data is read, except the
finiteness and code-range checks, which run on the loaded tensors.

* `read_safetensors_header`: a strict parser of the safetensors header (types, bounds, tensors tiling the data
  section exactly, no duplicate names), so a bad header fails with the file and tensor named instead of driving an
  allocation or a read past the end of the file.
* `check_layouts`: the compressed tensors against the layouts recorded in `quantization_config.compressed_layers`.
* `check_tensor_set`: the checkpoint's tensors against the (meta) model they are about to fill: nothing missing
  (transformers would silently re-initialise it), nothing unexpected, every shape and dtype kind right.
* `verify_checksums`: the CRC32 of every tensor recorded at save time (`checksum_metadata`, written into the
  safetensors metadata). A flipped bit in float data is otherwise undetectable. CRC32 catches accidental corruption;
  it is no defence against a deliberate edit (whoever edits the data can rewrite the checksums too).
* `check_checkpoint`: all of the above, each file's header parsed once.
* `validate_codes`, `check_finite`: after loading, every code addresses a codeword and no table holds NaN or Inf.

May import `core`, `modules` and `load_guard` only (and transformers' loader utilities).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from .core.packing import unpack_codes
from .core.spec import LayerSpec
from .load_guard import is_guard
from .modules import SWSCLinear

# Bytes per element of every safetensors dtype swsc_hf accepts.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
CHECKSUM_KEY = "swsc_crc32"
LAYOUT_KEY = "swsc_layout"  # dtype and shape of every tensor, digest of the layouts


# ---- safetensors headers ------------------------------------------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"names tensor {duplicate!r} twice")
    for text in [*keys, *(value for _, value in pairs if isinstance(value, str))]:
        text.encode("utf-8")  # a lone surrogate escape (\\ud800) is no valid UTF-8: safetensors refuses it
    return dict(pairs)


def _json_int(text: str) -> int:
    if text.startswith("-0"):  # -0 parses as 0 here but as a float in safetensors' parser, which refuses it
        raise ValueError(f"the number {text} is not an unsigned integer")
    return int(text)


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
    try:  # strict UTF-8 (json.loads of bytes would also take UTF-16/32), as safetensors' own parser
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_int=_json_int)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path.name} has a corrupted safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a corrupted safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is accepted by safetensors, false or 0 are not
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


ParsedFile = tuple[Path, dict[str, dict], dict[str, str]]  # (file, tensor table, metadata)


def parse_checkpoint(files: Iterable[str | os.PathLike]) -> list[ParsedFile]:
    """Every file's header, parsed (and checked) once."""
    return [(Path(file), *read_safetensors_header(file)) for file in files]


def checkpoint_entries(parsed: list[ParsedFile]) -> dict[str, tuple[Path, dict]]:
    """Every tensor of a (sharded) checkpoint: name -> (file, header entry); a name in two shards is an error."""
    entries: dict[str, tuple[Path, dict]] = {}
    for file, header, _ in parsed:
        for key, info in header.items():
            if key in entries:
                raise ValueError(f"tensor {key} is stored twice, in {entries[key][0].name} and {file.name}")
            entries[key] = (file, info)
    return entries


def check_shard_indexes(folder: str | os.PathLike) -> None:
    """Every `*.safetensors.index.json` of a local checkpoint folder: a JSON object whose `weight_map` maps tensor
    names to shard file names in the folder. Checked before transformers reads them (it would fail with a bare
    JSONDecodeError, AttributeError or KeyError naming no file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if not stat.S_ISREG(os.lstat(index).st_mode) or index.stat().st_size > MAX_HEADER_BYTES:
            raise ValueError(f"{index.name} is not a regular file of at most {MAX_HEADER_BYTES} bytes")
        try:
            content = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates,
                                 parse_int=_json_int)
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{index.name} is not a valid sharded-checkpoint index: {err}") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index.name} is not a valid sharded-checkpoint index: it needs a \"weight_map\" object "
                             "mapping tensor names to shard files")
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard \
                    or shard.startswith("."):
                raise ValueError(f"{index.name} maps tensor {key} to {str(shard)[:100]!r}, which is not a "
                                 ".safetensors file name in the checkpoint folder")


# ---- the checkpoint's tensors against the model -------------------------------------------------------------------
def _ignored(patterns: Iterable[str] | None, key: str) -> bool:
    return any(re.search(pattern, key) for pattern in patterns or ())


def check_tensor_set(model: nn.Module, entries: dict[str, tuple[Path, dict]]) -> None:
    """The checkpoint must fill every tensor of the (meta) model, with the right shape and dtype kind, and no other.

    Checkpoint names are mapped to the model's through transformers' own renaming rules (legacy names); tensors
    that a converter merges (e.g. per-expert weights) are only checked for presence.
    """
    expected = model.state_dict()
    transforms = get_model_conversion_mapping(model, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    found: set[str] = set()
    sources: dict[str, str] = {}  # model tensor -> the checkpoint name that fills it (converters' merges aside)
    unexpected = []
    for key, (file, info) in entries.items():
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
            if not (_ignored(ignore, key) or _ignored(ignore, target)):  # checkpoint or model name (renamed)
                unexpected.append(key)
            continue
        found.add(target)
        if pattern is not None:
            continue
        if target in sources:
            raise ValueError(f"checkpoint tensors {sources[target]} and {key} both fill the model's {target} (one "
                             "is an alias of the other, and one would silently win); remove one of them")
        sources[target] = key
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
                torch.int64: "I64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
                torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _st_dtype(tensor: torch.Tensor) -> str:
    return _TORCH_TO_ST.get(tensor.dtype, str(tensor.dtype))


# ---- checksums ----------------------------------------------------------------------------------------------------
def _crc32(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return f"{zlib.crc32(data):08x}"


def layout_digest(compressed_layers: dict[str, dict]) -> str:
    """SHA-256 of the layouts (each normalized through `LayerSpec`), independent of order and of omitted defaults."""
    canonical = {name: LayerSpec.from_dict(layer).to_dict() for name, layer in compressed_layers.items()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checksum_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata recording the CRC32 of every tensor `save_pretrained` will write (offloaded ones aside),
    and what gives the bytes their meaning: each tensor's dtype and shape, and a digest of the layers' layouts (which
    `config.json` repeats)."""
    state = model.state_dict()
    sums = {key: _crc32(t) for key, t in state.items() if t.device.type != "meta"}
    layers = {name: m.spec.to_dict() for name, m in model.named_modules() if isinstance(m, SWSCLinear)}
    layout = {"tensors": {key: [_st_dtype(t), list(t.shape)] for key, t in state.items()},
              "layers": layout_digest(layers)}
    compact = dict(sort_keys=True, separators=(",", ":"))
    return {CHECKSUM_KEY: json.dumps(sums, **compact), LAYOUT_KEY: json.dumps(layout, **compact)}


def verify_recorded_layout(parsed: list[ParsedFile], compressed_layers: dict[str, dict] | None) -> None:
    """Each tensor's dtype and shape, and the layouts of `compressed_layers`, against those recorded at save time
    (files without the record are accepted unchecked). Checksums cover bytes, not what the bytes mean: an edited
    header dtype or a layout edited in config.json would load silently wrong."""
    for file, header, metadata in parsed:
        if LAYOUT_KEY not in metadata:
            continue
        try:
            recorded = json.loads(metadata[LAYOUT_KEY])
            tensors, digest = recorded["tensors"], recorded["layers"]
            assert isinstance(tensors, dict) and isinstance(digest, str)
        except (ValueError, TypeError, KeyError, AssertionError):
            raise ValueError(f"{file.name} has corrupted {LAYOUT_KEY} metadata") from None
        for key, info in header.items():
            if key in tensors and tensors[key] != [info["dtype"], info["shape"]]:
                raise ValueError(f"checkpoint tensor {key} in {file.name} is {info['dtype']} {info['shape']} but "
                                 f"was saved as {tensors[key]}: its header was edited or corrupted")
        if compressed_layers is not None and layout_digest(compressed_layers) != digest:
            raise ValueError(f"quantization_config.compressed_layers in config.json differs from the layouts recorded "
                             f"in {file.name} when it was saved: config.json was edited or belongs to another "
                             "checkpoint")


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
    return verify_parsed_checksums(parse_checkpoint(files), workers)


def verify_parsed_checksums(parsed: list[ParsedFile], workers: int = 4) -> int:
    """`verify_checksums` of already parsed headers."""
    checked = 0
    for file, header, metadata in parsed:
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


# ---- values, read from the files ----------------------------------------------------------------------------------
# (integer view, exponent mask): a float is NaN or Inf when all its exponent bits are set (E4M3: NaN only, S1111111)
_NONFINITE_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
                   "F64": (np.uint64, 0x7FF0000000000000), "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}
_CHUNK_BYTES = 64 << 20


def _finite_bytes(view: memoryview, dtype: str) -> bool:
    kind, mask = _NONFINITE_BITS[dtype]
    step = _CHUNK_BYTES - _CHUNK_BYTES % np.dtype(kind).itemsize
    mask = kind(mask)
    return not any(((np.frombuffer(view[i : i + step], kind) & mask) == mask).any() for i in range(0, len(view), step))


def _check_tensor_values(key: str, info: dict, data: memoryview, file: Path, specs: dict[str, LayerSpec]) -> None:
    if info["dtype"] in _NONFINITE_BITS and not _finite_bytes(data, info["dtype"]):
        raise ValueError(f"checkpoint tensor {key} in {file.name} holds NaN or Inf values: the checkpoint is "
                         "corrupted")
    if key in specs and info["dtype"] == "U8":
        check_code_range(key, torch.tensor(np.frombuffer(data, np.uint8)), specs[key], f" (in {file.name})")


def check_values(parsed: list[ParsedFile], compressed_layers: dict[str, dict] | None = None, workers: int = 4) -> None:
    """From the files, before loading: no NaN or Inf in any float tensor, and every code within its codebook.

    Read from the files, so tensors the loader offloads to disk (or keeps as offloaded buffers) are checked as well
    as those it loads; float data is scanned as integers in 64 MiB chunks (no copy, no float conversion).
    """
    specs = {f"{name}.codes": LayerSpec.from_dict(layer) for name, layer in (compressed_layers or {}).items()}
    for file, header, _ in parsed:
        base = file.stat().st_size - max((info["data_offsets"][1] for info in header.values()), default=0)
        with open(file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view, slices = memoryview(mapped), []
            try:
                slices = [(key, info, view[base + info["data_offsets"][0] : base + info["data_offsets"][1]])
                          for key, info in header.items()]
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    jobs = [pool.submit(_check_tensor_values, *item, file, specs) for item in slices]
                    for job in jobs:
                        job.result()
            finally:
                for *_, data in slices:
                    data.release()
                view.release()


# ---- the compressed tensors against their recorded layouts ---------------------------------------------------------
def model_named_entries(model: nn.Module, entries: dict[str, tuple[Path, dict]]) -> dict[str, tuple[Path, dict]]:
    """The checkpoint's entries under the model's module names: `save_pretrained` writes transformers' legacy names
    (e.g. Mixtral's `block_sparse_moe` for `mlp`), which its renaming rules map back on load."""
    renamings = [t for t in get_model_conversion_mapping(model, None, None) if isinstance(t, WeightRenaming)]
    if not renamings:
        return entries
    prefix = getattr(model, "base_model_prefix", None)
    expected = model.state_dict()
    return {(key if key in expected else rename_source_key(key, renamings, [], prefix, expected)[0]): entry
            for key, entry in entries.items()}


def check_layouts(entries: dict[str, tuple[Path, dict]], compressed_layers: dict[str, dict], shared_prefix: str,
                  float_dtypes: tuple[str, ...] = ("F16", "BF16", "F32")) -> None:
    """Check every compressed tensor of the checkpoint against the layouts in its config, before loading.

    Missing, unexpected, mis-shaped or mis-typed compressed tensors fail here with the tensor's name, instead of
    loading as randomly initialised values. Shared bases are expected under `shared_prefix`.<key>.
    """
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    bases: dict[str, tuple[int, int]] = {}
    for name, layer in compressed_layers.items():
        spec = LayerSpec.from_dict(layer)
        for tensor, shape in spec.tensor_shapes().items():
            expected[f"{name}.{tensor}"] = (shape, ("U8",) if tensor == "codes" else float_dtypes)
        if spec.shared_basis is not None:
            if bases.setdefault(spec.shared_basis, spec.shared_basis_shape) != spec.shared_basis_shape:
                raise ValueError(f"quantization_config.compressed_layers[{name!r}] uses shared basis "
                                 f"{spec.shared_basis!r} with shape {list(spec.shared_basis_shape)}, but another "
                                 f"layer uses it with shape {list(bases[spec.shared_basis])}: the layouts disagree")
    for key, shape in bases.items():
        expected[f"{shared_prefix}.{key}"] = (shape, float_dtypes)
    for key, (shape, dtypes) in expected.items():
        if key not in entries:
            raise ValueError(f"the checkpoint lacks tensor {key} that its quantization_config requires")
        info = entries[key][1]
        if tuple(info["shape"]) != shape or info["dtype"] not in dtypes:
            raise ValueError(f"checkpoint tensor {key} is {info['dtype']} {info['shape']}, expected one of {dtypes} "
                             f"{list(shape)} from its quantization_config")
    prefixes = tuple(f"{name}." for name in compressed_layers)
    allowed = {f"{name}.bias" for name in compressed_layers}
    unexpected = [k for k in entries if k.startswith(prefixes) and k not in expected and k not in allowed
                  and not is_guard(k, entries[k][1]["shape"], compressed_layers)]
    if unexpected:
        raise ValueError(f"the checkpoint has tensors its quantization_config does not describe: {unexpected[:5]}")


def check_checkpoint(model: nn.Module, files: Iterable[str | os.PathLike], compressed_layers: dict[str, dict] | None
                     = None, shared_prefix: str = "") -> None:
    """Everything checkable before loading, each header parsed once: the headers, the compressed tensors against
    `compressed_layers` (when given), the tensor set against `model`, and the checksums."""
    files = [Path(f) for f in files]
    for file in files:
        if file.suffix != ".safetensors":
            raise ValueError(f"swsc_hf loads compressed checkpoints from safetensors only, got {file.name}; "
                             "re-save the model with save_pretrained (safe_serialization is the default)")
    parsed = parse_checkpoint(files)
    entries = checkpoint_entries(parsed)
    if compressed_layers is not None:
        check_layouts(model_named_entries(model, entries), compressed_layers, shared_prefix)
    check_tensor_set(model, entries)
    verify_parsed_checksums(parsed)
    verify_recorded_layout(parsed, compressed_layers)
    check_values(parsed, compressed_layers)


# ---- after loading ------------------------------------------------------------------------------------------------
def check_finite(name: str, module: nn.Module) -> None:
    """No NaN or Inf in the float tables of a compressed layer (or the shared bases)."""
    for tensor_name, param in module.named_parameters(recurse=False):
        if param.is_floating_point() and param.device.type != "meta" and not torch.isfinite(param).all():
            raise ValueError(f"tensor {name}.{tensor_name} holds NaN or Inf values: the checkpoint is corrupted "
                             f"(or the compressed tables overflowed {param.dtype})")


def validate_codes(name: str, module: SWSCLinear) -> None:
    """Every code must address an existing codeword (a corrupted checkpoint must not gather out of bounds)."""
    if module.spec.n_clusters and module.codes.device.type != "meta":
        check_code_range(f"{name}.codes", module.codes, module.spec)


def check_code_range(name: str, packed: torch.Tensor, spec: LayerSpec, where: str = "") -> None:
    """Every code of the packed stream `packed` (checkpoint tensor `name`) addresses one of `spec`'s codewords."""
    if not spec.n_clusters or spec.n_clusters == 2**spec.code_bits:
        return  # no codes, or every representable code is valid
    step = 1 << 24
    for start in range(0, spec.n_codes, step):
        count = min(step, spec.n_codes - start)
        top = int(unpack_codes(packed, spec.code_bits, count, start).max())
        if top >= spec.n_clusters:
            raise ValueError(f"checkpoint tensor {name} holds code {top} but the codebook has only "
                             f"{spec.n_clusters} entries{where}: the checkpoint is corrupted")
