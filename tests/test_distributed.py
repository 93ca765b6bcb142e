"""Multi-process compression (`swsc-hf compress --num-processes 2`, gloo on CPU) writes the checkpoint one process
writes, tensor bytes included; compression is deterministic for a config and seed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from swsc_hf import SWSCConfig
from swsc_hf.cli import main
from swsc_hf.distributed import assign_groups, gather_parts, join_process_group, launch

SETTINGS = {
    "codebooks": ["--n-clusters", "16", "--segment-length", "4", "--rank", "2", "--scale-group-size", "32"],
    "shared-bases": ["--preset", "basis-sharing-paper"],  # groups span two layers: one basis per group
}


@pytest.fixture(scope="module")
def source(tiny_dense_dir, tmp_path_factory) -> str:
    """The tiny Llama with a word-level tokenizer beside it (the CLI saves the tokenizer with the checkpoint)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("source")
    shutil.copytree(tiny_dense_dir, path, dirs_exist_ok=True)
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.fixture
def one_thread(monkeypatch):
    """Equal thread counts everywhere: CPU BLAS results depend on them (spawned ranks inherit OMP_NUM_THREADS)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkpoint(folder: Path) -> dict:
    """Everything a checkpoint holds. The safetensors header is parsed: safetensors writes its metadata from a Rust
    HashMap, so with two keys (format and swsc_crc32) their order in the file differs from process to process."""
    raw = (folder / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return {"header": json.loads(raw[8 : 8 + length]), "data": raw[8 + length :],
            "config": json.loads((folder / "config.json").read_text())}


def test_groups_are_balanced_and_deterministic():
    sizes = [4, 4, 4, 1, 1, 1, 12, 3]
    owners = assign_groups(sizes, 3)
    assert owners == assign_groups(sizes, 3)
    loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == rank) for rank in range(3)]
    assert loads == [12, 9, 9]  # the 12 alone, the rest split evenly


@pytest.mark.slow  # two spawned processes per setting (~20 s each on 2 cores)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_processes_write_the_single_process_checkpoint(source, tmp_path, one_thread, name):
    args = [*SETTINGS[name], "--dtype", "float32"]
    assert main(["compress", source, str(tmp_path / "one"), *args]) == 0
    assert main(["compress", source, str(tmp_path / "two"), *args, "--num-processes", "2"]) == 0

    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert one["config"] == two["config"] and one["header"] == two["header"]  # names, shapes, offsets, checksums
    assert one["data"] == two["data"]  # every tensor byte
    AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # and it loads, validated


def test_same_config_and_seed_write_byte_identical_checkpoints(tiny_dense_dir, tmp_path, one_thread):
    config = dict(n_clusters=12, segment_length=2, rank=3, scale_group_size=16, seed=7)
    for run in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32,
                                                     quantization_config=SWSCConfig(**config))
        model.save_pretrained(tmp_path / run)
    assert checkpoint(tmp_path / "a") == checkpoint(tmp_path / "b")


def _listening_addresses() -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets this process listens on."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    addresses.append(fields[1].split(":")[0])
    return addresses


def exchange_probe(out: str) -> int:
    """One rank of `launch`: join the group as compression does, exchange a share, record what was listening."""
    def refuse(*args, **kwargs):
        raise AssertionError("gather_object (pickles between ranks) was used")

    dist.gather_object = refuse
    join_process_group("gloo")
    try:
        rank = dist.get_rank()
        part = ({f"layer{rank}.codes": torch.arange(3 + rank, dtype=torch.uint8),
                 f"layer{rank}.codebook": torch.full((2, 2), rank + 0.5, dtype=torch.bfloat16)},
                {f"layer{rank}": {"rank": rank}})
        parts = gather_parts(part, dist.new_group(backend="gloo"))
        listening = _listening_addresses()
    finally:
        dist.destroy_process_group()
    summary = None if parts is None else [({k: v.float().tolist() for k, v in t.items()}, s) for t, s in parts]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"listening": listening, "parts": summary}))
    return 0


@pytest.mark.slow  # two spawned processes (~20 s on 2 cores)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")
def test_local_ranks_listen_on_loopback_only_and_exchange_tensors_not_pickles(tmp_path, one_thread):
    assert launch(2, exchange_probe, str(tmp_path)) == 0
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(result["listening"]) <= loopback, result["listening"]
    parts = json.loads((tmp_path / "rank0.json").read_text())["parts"]
    assert parts[1] == [{"layer1.codes": [0.0, 1.0, 2.0, 3.0], "layer1.codebook": [[1.5, 1.5], [1.5, 1.5]]},
                        {"layer1": {"rank": 1}}]
