"""Data-free compression split among processes: every rank compresses its share of the layers, rank 0 writes.

Run it with `swsc-hf compress --num-processes N` (N local processes, spawned here) or under `torchrun` /
`accelerate launch` (several machines; the usual RANK / WORLD_SIZE / MASTER_ADDR environment). Each process builds
the model skeleton on the meta device, reads only the dense weights of its own groups
(`compression.compression_groups`) from the safetensors checkpoint and compresses them one group at a time on its
device (cuda:LOCAL_RANK where CUDA is available, else the CPU). The compressed tensors are gathered on rank 0, which
adds the checkpoint's other tensors and loads the result through the regular, validating swsc_hf loader. Process
groups use gloo on CPU and NCCL on GPU (the gather of compressed tensors always goes through gloo, on CPU).

The checkpoint equals a single-process run's, byte for byte, with the same config and seed, on the same device
type and with the same number of threads per process: CPU BLAS reductions depend on the thread count.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn
from torch.multiprocessing import ProcessExitedException, spawn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .compression import compress_group, compression_groups
from .config import SWSCConfig
from .hub import install_model_card
from .model_ops import SHARED_BASES_ATTR, find_targets, is_conv1d, plan_head, swap_module

logger = logging.getLogger(__name__)
RENDEZVOUS_FILE = "SWSC_HF_RENDEZVOUS_FILE"  # set by `launch`: local ranks meet through this file, not a TCP store


def is_distributed() -> bool:
    """Whether this process was started as one of several (by `launch`, torchrun or accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def assign_groups(sizes: list[int], world_size: int) -> list[int]:
    """The rank of each group: largest first to the least loaded rank (ties to the lower rank), deterministic."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def _resolve(src: str) -> Path:
    if Path(src).is_dir():
        return Path(src)
    return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a dense checkpoint (pickled .bin checkpoints are refused)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{path} has no model.safetensors(.index.json); multi-process compression reads safetensors "
                         "checkpoints only")
    with safe_open(single, "pt") as handle:
        return {key: single for key in handle.keys()}


def _skeleton(path: Path, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


def compress_groups(
    model: nn.Module, files: dict[str, Path], config: SWSCConfig, groups: list[list[str]], *, dtype: torch.dtype,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Compress `groups` of the meta `model`, reading only their dense weights from `files`, one group at a time.

    Returns the compressed layers' tensors (on the CPU, by checkpoint name) and their layouts.
    """
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict] = {}
    for group in groups:
        for name in group:
            module = model.get_submodule(name)
            for param in ("weight", "bias"):
                if getattr(module, param, None) is None:
                    continue
                key = f"{name}.{param}"
                if key not in files:
                    raise ValueError(f"the checkpoint has no tensor {key}; multi-process compression needs the "
                                     "checkpoint's names to match the model's (compress in one process instead)")
                with safe_open(files[key], "pt") as handle:
                    value = handle.get_tensor(key).to(device, dtype)
                setattr(module, param, nn.Parameter(value, requires_grad=False))
        compress_group(model, group, config)
        for name in group:
            layer = model.get_submodule(name)
            tensors.update({f"{name}.{key}": value.cpu().contiguous() for key, value in layer.state_dict().items()})
            specs[name] = layer.spec.to_dict()
            swap_module(model, name, nn.Identity())  # drop this rank's copy of the layer
        holder = getattr(model, SHARED_BASES_ATTR, None)
        if holder is not None:
            for key in list(holder.bases):
                tensors[f"{SHARED_BASES_ATTR}.bases.{key}"] = holder.bases[key].detach().cpu().contiguous()
                del holder.bases[key]
    return tensors, specs


def assemble(path: Path, config: SWSCConfig, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype) -> nn.Module:
    """The compressed model from the gathered tensors and the dense checkpoint's other tensors, loaded (and so
    validated) by the regular swsc_hf loader."""
    files = _weight_files(path)
    replaced = {f"{name}.{param}" for name in config.compressed_layers for param in ("weight", "bias")}
    merged = dict(tensors)
    for file in sorted(set(files.values())):
        with safe_open(file, "pt") as handle:
            merged.update({key: handle.get_tensor(key) for key in handle.keys() if key not in replaced})
    with tempfile.TemporaryDirectory(prefix="swsc-assemble-") as staging:
        model_config = json.loads((path / "config.json").read_text())
        model_config["quantization_config"] = config.to_dict()
        (Path(staging) / "config.json").write_text(json.dumps(model_config, indent=2))
        if (path / "generation_config.json").is_file():
            shutil.copy(path / "generation_config.json", staging)
        save_file(merged, Path(staging) / "model.safetensors", metadata={"format": "pt"})
        del merged
        return AutoModelForCausalLM.from_pretrained(staging, dtype=dtype)


def compress_source(src: str, config: SWSCConfig, *, dtype: torch.dtype = torch.float32):
    """This rank's part of a multi-process compression; rank 0 gets (model, tokenizer or None), others (None, None).

    Joins (and leaves) the process group described by the environment: RANK, WORLD_SIZE, MASTER_ADDR/PORT.
    """
    if config.is_calibrated:
        raise ValueError("calibrated compression runs layer after layer on the outputs of the compressed earlier "
                         "layers and cannot be split among processes; run it in one process")
    if config.rotate_residual:
        raise ValueError("SWSCConfig.rotate_residual rotates every layer of the whole model before compression and "
                         "cannot be split among processes; run it in one process (without --num-processes)")
    path = _resolve(src)
    joined = join_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
            torch.cuda.set_device(device)
        skeleton = _skeleton(path, dtype)
        found = find_targets(skeleton, config.modules_to_not_convert)
        unsupported = [name for name, _ in found.experts] + [name for name, m in found.linears if is_conv1d(m)]
        if unsupported:
            raise ValueError(f"multi-process compression handles nn.Linear layers only, not {unsupported[:3]} "
                             "(mixture-of-experts or Conv1D); run it in one process")
        targets = found.linears
        plan_head(skeleton, config)
        config.plan_bits({name: (m.out_features, m.in_features) for name, m in targets})  # as one process does
        groups = compression_groups([name for name, _ in targets], config)
        sizes = [sum(skeleton.get_submodule(name).weight.numel() for name in group) for group in groups]
        owners = assign_groups(sizes, world_size)
        mine = [group for group, owner in zip(groups, owners, strict=True) if owner == rank]
        logger.info("swsc_hf rank %d/%d: compressing %d of %d groups on %s", rank, world_size, len(mine),
                    len(groups), device)
        part = compress_groups(skeleton, _weight_files(path), config, mine, dtype=dtype, device=device)
        parts = gather_parts(part, dist.new_group(backend="gloo"))
    finally:
        if joined:
            dist.destroy_process_group()
    if rank != 0:
        return None, None
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict] = {}
    for part_tensors, part_specs in parts:
        tensors.update(part_tensors)
        layouts.update(part_specs)
    order = [name for group in groups for name in group]
    config.compressed_layers = {name: layouts[name] for name in order}
    model = assemble(path, config, tensors, dtype=dtype)
    install_model_card(model, base_model=src)
    tokenizer = None
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def join_process_group(backend: str) -> bool:
    """Join the process group the environment describes unless already in one; True if this call joined it.

    Processes started by `launch` meet through a file (no TCP store listening on any interface); under torchrun or
    accelerate the usual MASTER_ADDR/MASTER_PORT store is used.
    """
    if dist.is_initialized():
        return False
    store_file = os.environ.get(RENDEZVOUS_FILE)
    if store_file:
        world_size = int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=dist.FileStore(store_file, world_size), rank=int(os.environ["RANK"]),
                                world_size=world_size)
    else:
        dist.init_process_group(backend)
    return True


def _pack(part: tuple[dict[str, torch.Tensor], dict[str, dict]]) -> torch.Tensor:
    """A rank's compressed tensors and layouts as safetensors bytes (the layouts as JSON metadata): data, no pickle."""
    tensors, layouts = part
    raw = save_bytes(tensors, metadata={"layouts": json.dumps(layouts)})
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _unpack(blob: torch.Tensor, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    raw = blob.numpy().tobytes()
    try:
        (length,) = struct.unpack("<Q", raw[:8])
        layouts = json.loads(json.loads(raw[8 : 8 + length])["__metadata__"]["layouts"])
        return load_bytes(raw), layouts
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise ValueError(f"rank {rank} sent a corrupted share of the compressed tensors: {err}") from None


def gather_parts(part, group) -> list | None:
    """Gather every rank's (tensors, layouts) on rank 0 as tensors (safetensors bytes) over `group` (gloo), never
    as pickles (`gather_object` would unpickle whatever a peer sends); None on the other ranks."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    blob = _pack(part)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)] if rank == 0 else None
    dist.gather(torch.tensor([blob.numel()], dtype=torch.int64), sizes, dst=0, group=group)
    if rank != 0:
        dist.send(blob, 0, group=group)
        return None
    parts = [part]
    for source in range(1, world_size):
        buffer = torch.empty(int(sizes[source]), dtype=torch.uint8)
        dist.recv(buffer, source, group=group)
        parts.append(_unpack(buffer, source))
    return parts


def _child(rank: int, world_size: int, store_file: str, func, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(
        world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT="0", **{RENDEZVOUS_FILE: store_file})
    if sys.platform.startswith("linux"):  # gloo's and NCCL's own connections over loopback only
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        code = func(args)
    except (ValueError, OSError) as err:
        print(f"swsc-hf: error (rank {rank}): {err}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def launch(num_processes: int, func, args) -> int:
    """Run `func(args)` in `num_processes` local processes joined in one process group; returns an exit status."""
    with tempfile.TemporaryDirectory(prefix="swsc-rendezvous-") as folder:
        try:
            spawn(_child, args=(num_processes, os.path.join(folder, "store"), func, args), nprocs=num_processes,
                  join=True)
        except ProcessExitedException as err:
            return err.exit_code or 1
    return 0
