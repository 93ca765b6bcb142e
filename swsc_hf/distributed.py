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
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.multiprocessing import ProcessExitedException, spawn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .compression import compress_group, compression_groups
from .config import SWSCConfig
from .hub import install_model_card
from .model_ops import SHARED_BASES_ATTR, find_targets, is_conv1d, swap_module

logger = logging.getLogger(__name__)


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
    path = _resolve(src)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group(backend)
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
        config.plan_bits({name: (m.out_features, m.in_features) for name, m in targets})  # as one process does
        groups = compression_groups([name for name, _ in targets], config)
        sizes = [sum(skeleton.get_submodule(name).weight.numel() for name in group) for group in groups]
        owners = assign_groups(sizes, world_size)
        mine = [group for group, owner in zip(groups, owners, strict=True) if owner == rank]
        logger.info("swsc_hf rank %d/%d: compressing %d of %d groups on %s", rank, world_size, len(mine),
                    len(groups), device)
        part = compress_groups(skeleton, _weight_files(path), config, mine, dtype=dtype, device=device)
        parts = [None] * world_size if rank == 0 else None
        cpu_group = dist.new_group(backend="gloo")
        dist.gather_object(part, parts, dst=0, group=cpu_group)
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(rank: int, world_size: int, port: int, func, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(
        world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
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
    try:
        spawn(_child, args=(num_processes, _free_port(), func, args), nprocs=num_processes, join=True)
    except ProcessExitedException as err:
        return err.exit_code or 1
    return 0
