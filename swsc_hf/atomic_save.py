"""Atomic saving: a checkpoint folder holds the earlier checkpoint or the new one, whole, never a mix.

`install_atomic_save` makes `model.save_pretrained` write into a temporary sibling folder and swap it in, so an
interrupted save leaves the earlier checkpoint in place; `save_atomically` writes a model and its tokenizer so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch import nn

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


def save_atomically(model, tokenizer, out: str | os.PathLike) -> None:
    """Write model and tokenizer to a temporary folder beside `out`, then swap it in whole: a failed save leaves
    `out` as it was."""
    with atomic_directory(out, keep_other_files=False) as tmp:
        type(model).save_pretrained(model, tmp)  # the class's own: this folder is already the temporary one
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
