"""Atomic writes: an output appears complete under its final name, or not at all.

    atomic_write(path, text_or_bytes)                 # a small file (JSON, markdown)
    with atomic_file("palette.npy") as tmp:           # a writer that wants a path (np.save, zipfile, tar)
        np.save(tmp, palette)
    with atomic_directory("runs/export") as tmp:      # a directory of files (consolidated, HF exports)
        (tmp / "config.json").write_text(...)
    atomic_symlink("exports/step-100", "runs/ft/best")

Every temporary lies beside its target (same filesystem, so the final ``os.replace`` is atomic)
under a hidden name, and is removed when the block raises: a crash leaves the old output or none,
never a partial one. A process killed outright (SIGKILL, power loss) can leave a hidden temporary
behind, never a truncated file under the final name.

No torch here (nor anything heavy): feature files and the linear probe write through it without it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def _temp_beside(path: Path) -> Path:
    """A fresh hidden name next to ``path`` that ends in ``path``'s suffix: ``np.save`` appends ``.npy``
    to a name without it and matplotlib picks the image format from it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_file(path: PathLike, *, temp: Optional[PathLike] = None, fsync: bool = False,
                mode: Optional[int] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    The block creates the file (the name does not exist yet, so the writer's permissions are
    the usual umask ones; ``mode`` sets them explicitly before the rename). ``temp`` fixes the
    temporary's name instead of a fresh hidden one, for a writer whose restart sweeps up what a
    killed run left (``<shard>.tar.tmp``). ``fsync`` flushes the data to disk before the rename.
    On any error the temporary is removed and ``path`` is left as it was. The directory of
    ``path`` must exist.
    """
    path = Path(path)
    tmp = Path(temp) if temp is not None else _temp_beside(path)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: PathLike, data: Union[str, bytes], *, fsync: bool = False, mode: Optional[int] = None,
                 encoding: Optional[str] = None) -> Path:
    """Write ``data`` (text, or bytes as they are) to ``path`` atomically; returns ``path`` as a Path.

    Text is written as ``open(path, "w", encoding=encoding)`` would write it. ``fsync`` and
    ``mode`` as in :func:`atomic_file`.
    """
    path = Path(path)
    with atomic_file(path, mode=mode) as tmp:
        binary = isinstance(data, (bytes, bytearray, memoryview))
        with open(tmp, "wb" if binary else "w", encoding=None if binary else encoding) as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def atomic_symlink(target: PathLike, link: PathLike) -> Path:
    """Point ``link`` at ``target`` (stored as given: a relative target stays relative), replacing
    any earlier link in one rename, so a reader sees the old target or the new one, never no link."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except BaseException:
        _remove(tmp)
        raise
    return link


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` must not exist or be an empty directory. On any error the temporary directory is
    removed, so a failed write never leaves a partial output.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
