"""Atomic adapter directory writes, shared by every writer (GeoLoRA, peft, diffusers formats).

:func:`write_adapter_dir` replaces a whole directory: the files are written and fsynced in the
sibling ``.<name>.geolora-tmp``; then the old directory is renamed to ``.<name>.geolora-old``, the
new one renamed into place and the old one deleted. A crash before the first rename leaves the old
directory untouched; a crash between the renames leaves it in the backup, which
:func:`recover` restores. Not safe for two processes saving to the same path at once.

:func:`write_files_into` adds or replaces files in a directory that holds other things too (a
Trainer checkpoint, a ``save_pretrained`` target): each file is written aside, fsynced and renamed
over its old version, so a reader sees either the old or the new file, never a partial one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "recover", "write_adapter_dir", "write_files_into"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
"""File names of an adapter directory: peft's, shared by the GeoLoRA and the peft format."""


def write_adapter_dir(path: Path, files: dict[str, bytes]) -> Path:
    """Replace the directory ``path`` by one holding exactly ``files``, atomically (module doc)."""
    path = Path(path)
    recover(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} is a file; an adapter is a directory: use another path.")
        others = sorted(p.name for p in path.iterdir() if p.name not in files)
        if others:
            raise FileExistsError(
                f"{path} holds files other than an adapter's ({others[:5]}); saving replaces the "
                "whole directory, so choose an empty directory or an earlier adapter directory."
            )
    tmp = _sibling(path, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        _write(tmp / name, data)
    _swap_in(tmp, path)
    return path


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.geolora-{kind}"


def _write(file: Path, data: bytes) -> None:
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    if path.exists():
        backup = _sibling(path, "old")
        os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable (POSIX)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover(path: Path) -> None:
    """Finish an interrupted swap: restore the backup if ``path`` is gone, else drop it."""
    backup = _sibling(path, "old")
    if not backup.exists():
        return
    if path.exists():
        shutil.rmtree(backup)
    else:
        os.replace(backup, path)


def write_files_into(path: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` into the directory ``path`` (created if needed), each one atomically;
    other files in ``path`` are left alone."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; an adapter is a directory: use another path.")
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = path / f".{name}.geolora-tmp"
        _write(tmp, data)
        os.replace(tmp, path / name)
    _fsync_dir(path)
    return path
