"""save_pretrained of an swsc_hf model is atomic: an interrupted save (an exception, or the process killed midway)
leaves the earlier checkpoint loading exactly as before; a successful one replaces it whole."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from hub_server import USER, LocalHub, point_clients_at
from huggingface_hub import HfApi
from huggingface_hub.utils import close_session
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import swsc_hf.atomic_save as atomic_save
from swsc_hf import SWSCConfig, atomic_directory


@pytest.fixture(scope="module")
def model(tiny_dense_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32,
                                                quantization_config=SWSCConfig(n_clusters=0, rank=4))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(torch.arange(12)[None] % 128).logits


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def earlier(model, tmp_path):
    """A saved checkpoint (plus a file saved beside it by someone else), its bytes and logits; then the model is
    changed so that a new save would differ."""
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    (folder / "notes.txt").write_text("kept")
    before = snapshot(folder), logits(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lowrank_a.mul_(2)
    yield folder, *before
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lowrank_a.div_(2)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def test_failed_save_leaves_earlier_checkpoint(model, earlier, monkeypatch):
    folder, files, old_logits = earlier

    def half_then_fail(tensors, filename, metadata=None):
        save_file(dict(list(tensors.items())[: len(tensors) // 2]), filename, metadata=metadata)
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(folder)

    assert snapshot(folder) == files and not leftovers(folder)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), old_logits)


def test_killed_save_leaves_earlier_checkpoint(earlier):
    folder, files, old_logits = earlier
    script = textwrap.dedent(f"""
        import os, torch, transformers.modeling_utils
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        import swsc_hf

        def half_then_die(tensors, filename, metadata=None):
            save_file(dict(list(tensors.items())[: len(tensors) // 2]), filename, metadata=metadata)
            os._exit(9)  # like SIGKILL: no exception handler, no cleanup

        model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
        transformers.modeling_utils.safe_save_file = half_then_die
        model.save_pretrained({str(folder)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 9, result.stderr[-2000:]
    assert snapshot(folder) == files
    assert len(leftovers(folder)) == 1  # the half-written temporary folder, beside the checkpoint, never in it
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), old_logits)


def test_successful_save_replaces_checkpoint_whole(model, earlier):
    folder, files, old_logits = earlier
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older save")
    mode = folder.stat().st_mode

    model.save_pretrained(folder)

    assert (folder / "notes.txt").read_text() == "kept"
    assert not (folder / "model-00001-of-00002.safetensors").exists() and not leftovers(folder)
    assert folder.stat().st_mode == mode
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(reloaded), logits(model)) and not torch.equal(logits(reloaded), old_logits)
    assert os.access(folder / "config.json", os.R_OK)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")  # huggingface_hub's
def test_save_with_push_to_hub_names_the_repo_after_the_folder(model, tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "hub-store").start()
    point_clients_at(monkeypatch, hub.url, tmp_path / "hf-home")
    try:
        model.save_pretrained(tmp_path / "tiny-swsc", push_to_hub=True)

        assert "model.safetensors" in HfApi().list_repo_files(f"{USER}/tiny-swsc")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{USER}/tiny-swsc")
        assert torch.equal(logits(reloaded), logits(model))
        assert not leftovers(tmp_path / "tiny-swsc")
    finally:
        close_session()
        hub.stop()


# ---- folders an atomic swap cannot replace: a safe in-place write instead, never a hang -----------------------------
@pytest.fixture
def no_hang():
    """Fail (instead of hanging the test run) if the body blocks for 60 s, e.g. by opening a FIFO."""
    def alarm(signum, frame):
        raise TimeoutError("the save blocked")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write_checkpoint(folder: Path, text: str) -> None:
    (folder / "model.safetensors").write_text(text)
    (folder / "config.json").write_text("{}")


def test_special_files_in_the_folder_never_hang_and_are_kept(tmp_path, no_hang):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock"))
        with atomic_directory(folder) as tmp:
            write_checkpoint(tmp, "new")
    assert (folder / "model.safetensors").read_text() == "new"
    assert stat.S_ISFIFO(os.lstat(folder / "pipe").st_mode) and stat.S_ISSOCK(os.lstat(folder / "sock").st_mode)
    assert os.path.islink(folder / "dangling") and not leftovers(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".swsc-tmp-")]


def test_dangling_symlink_in_the_folder_is_carried_by_the_swap(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    with atomic_directory(folder) as tmp:
        write_checkpoint(tmp, "new")
    assert os.readlink(folder / "dangling") == str(tmp_path / "nowhere") and not leftovers(folder)


def test_mount_point_or_read_only_parent_is_written_in_place(model, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "volume"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    (folder / "model-00001-of-00002.safetensors").write_text("stale shard")
    real_ismount, real_access = os.path.ismount, os.access
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == folder or real_ismount(p))
    with caplog.at_level("WARNING", logger="swsc_hf.atomic_save"):
        model.save_pretrained(folder)
    assert "mount point" in caplog.text and not leftovers(folder)
    assert (folder / "notes.txt").read_text() == "kept" and not (folder / "model-00001-of-00002.safetensors").exists()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), logits(model))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(os.path, "ismount", real_ismount)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path and real_access(p, mode, **kw))
    caplog.clear()
    with caplog.at_level("WARNING", logger="swsc_hf.atomic_save"), atomic_directory(folder) as tmp:
        write_checkpoint(tmp, "new")
    assert "not writable" in caplog.text and (folder / "model.safetensors").read_text() == "new"


def test_a_swap_refused_by_the_os_falls_back_to_renames(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")

    def busy(tmp, target):
        raise OSError(errno.EBUSY, "Device or resource busy", str(target))

    monkeypatch.setattr(atomic_save, "_swap_in", busy)
    with caplog.at_level("WARNING", logger="swsc_hf.atomic_save"), atomic_directory(folder) as tmp:
        write_checkpoint(tmp, "new")
    assert "busy" in caplog.text and (folder / "model.safetensors").read_text() == "new"
    assert (folder / "notes.txt").read_text() == "kept" and not leftovers(folder)


def test_a_file_is_never_replaced_by_a_folder(tmp_path):
    file = tmp_path / "out"
    file.write_text("mine")
    with pytest.raises(ValueError, match="is not a folder"), atomic_directory(file):
        pass
    assert file.read_text() == "mine" and not leftovers(file)
