"""Atomic saving: a checkpoint folder holds the earlier checkpoint or the new one, whole, never a mix.

`install_atomic_save` makes `model.save_pretrained` write into a temporary sibling folder and swap it in, so an
interrupted save leaves the earlier checkpoint in place; `save_atomically` writes a model and its tokenizer so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import inspect
import json
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)
_WEIGHTS_FILE = re.compile(r"(pytorch_)?model([.-][\w.-]*)?\.(safetensors|bin)(\.index\.json)?")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        if not stat.S_ISREG(os.lstat(src).st_mode):
            raise  # never open a FIFO, socket or device to copy it: that can block forever
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link into `new` what `old` holds that the save did not write (a tokenizer saved there earlier, say).

    Weight files are not carried: a stale shard or single-file checkpoint beside a new one could be loaded instead.
    Raises OSError when an entry cannot be carried (the caller then writes in place instead of swapping).
    """
    for entry in old.iterdir():
        if os.path.lexists(new / entry.name) or _WEIGHTS_FILE.fullmatch(entry.name):
            continue
        mode = os.lstat(entry).st_mode
        if stat.S_ISDIR(mode):
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry), new / entry.name)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root` (types from lstat: FIFOs, sockets, devices and symlinks
    are never opened)."""
    for folder, _, names in os.walk(root):
        for name in [*names, "."]:
            path = os.path.join(folder, name)
            if not (stat.S_ISREG(mode := os.lstat(path).st_mode) or stat.S_ISDIR(mode)):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported or refused."""
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


def _move_in(staging: Path, target: Path) -> None:
    """Rename what `staging` holds into `target` one entry at a time (weight files last, then config.json), then
    remove weight files of an earlier save that this one did not write. Both must be on one file system."""
    names = os.listdir(staging)
    for name in sorted(names, key=lambda n: (bool(_WEIGHTS_FILE.fullmatch(n)), n == "config.json", n)):
        source, dest = staging / name, target / name
        if os.path.isdir(source) and not os.path.islink(source) and os.path.isdir(dest) \
                and not os.path.islink(dest):
            _move_in(source, dest)
            os.rmdir(source)
        else:
            os.replace(source, dest)
    for entry in target.iterdir():
        if _WEIGHTS_FILE.fullmatch(entry.name) and entry.name not in names and entry.is_file():
            entry.unlink()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_possible(target: Path) -> str | None:
    """Why `target` cannot be replaced by a renamed sibling folder (None when it can)."""
    if not target.exists():
        return None if os.access(target.parent, os.W_OK | os.X_OK) else f"{target.parent} is not writable"
    if os.path.ismount(target):
        return f"{target} is a mount point"
    if not os.access(target.parent, os.W_OK | os.X_OK):
        return f"its parent folder {target.parent} is not writable"
    special = [e.name for e in target.iterdir() if not (stat.S_ISREG(m := os.lstat(e).st_mode)
                                                       or stat.S_ISDIR(m) or stat.S_ISLNK(m))]
    if special:
        return f"it holds {special[0]!r}, which is not a regular file, folder or link and cannot be carried over"
    return None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, keep_other_files: bool = True) -> Iterator[Path]:
    """Yield an empty folder whose contents replace `target`'s on success; on any error it is removed.

    Normally it is a sibling of `target` swapped in whole, so `target` holds the earlier contents or the new ones.
    With `keep_other_files`, files already in `target` that the save did not write (other than weights) are kept;
    without, `target` is replaced whole. A process killed during the save leaves `target` untouched and a
    `.NAME.tmp-*` folder beside it.

    Where a swap cannot work (`target` is a mount point, its parent is not writable, it holds a FIFO or socket),
    the folder is created inside `target` and, on success, its files are renamed into `target` one by one (a log
    line says so); files the save did not write are then always kept, except weight files of an earlier save.
    """
    target = Path(target).resolve()  # a symlinked folder keeps its link; "." gets a name
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; pick another output path")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    reason = _swap_possible(target)
    if reason is not None and not target.exists():
        raise PermissionError(f"cannot create {target}: {reason}")
    if reason is not None:
        logger.warning("swsc_hf: %s cannot be replaced atomically (%s); writing new files into it under temporary "
                       "names and renaming them one by one", target, reason)
        staging = target / f".swsc-tmp-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            yield staging
            _fsync_tree(staging)
            _move_in(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()  # unlike mkdtemp's 0700, this honours the umask, as a plain save_pretrained does
    try:
        if target.is_dir():
            shutil.copymode(target, tmp)
        yield tmp
        try:
            if keep_other_files and target.is_dir():
                _carry_over(target, tmp)
            _fsync_tree(tmp)
            _swap_in(tmp, target)
        except OSError as err:  # EBUSY, EXDEV, an entry that cannot be linked: what the checks did not foresee
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
            logger.warning("swsc_hf: swapping in %s failed (%s); renaming the new files into it one by one",
                           target, err)
            _move_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    `out` as it was. Files already in `out` that this save does not write are kept (weight files of an earlier
    save aside)."""
    with atomic_directory(out) as tmp:
        type(model).save_pretrained(model, tmp)  # the class's own: this folder is already the temporary one
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _is_swsc_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        if not stat.S_ISREG(os.lstat(config).st_mode) or os.lstat(config).st_size > 64 << 20:
            return False
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == "swsc"


def check_output_folder(out: str | os.PathLike, src: str | os.PathLike | None = None, *,
                        overwrite: bool = False) -> Path:
    """Refuse an output folder whose save would lose a user's files, before any work starts; returns it resolved.

    Refused: `out` equal to or containing `src` (a local source), `out` an existing file (or FIFO, socket...), and
    a non-empty `out` that is not an swsc_hf checkpoint unless `overwrite` (which still keeps every file the save
    does not write).
    """
    out = Path(out).resolve()
    if src is not None and os.path.lexists(src):
        source = Path(src).resolve()
        if source == out or out in source.parents:
            raise ValueError(f"the output folder {out} {'is' if source == out else 'contains'} the source model "
                             f"{source}; pick an output folder outside the source")
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"the output path {out} exists and is not a folder; pick a new or empty folder")
    if out.is_dir() and not overwrite and not _is_swsc_checkpoint(out):
        entries = [e.name for e in out.iterdir() if not e.name.startswith(".swsc-tmp-")]
        if entries:
            raise ValueError(f"the output folder {out} is not empty ({len(entries)} entries, e.g. "
                             f"{sorted(entries)[0]!r}) and is not an swsc_hf checkpoint; pick a new or empty folder, "
                             "or pass --overwrite (files the save does not write are kept)")
    return out
