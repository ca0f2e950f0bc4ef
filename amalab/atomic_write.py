"""Write-then-rename: the one way amalab writes a file or a folder that must survive a kill at any moment.

A file is written to a hidden temporary sibling, flushed and fsynced, renamed over its final name with
``os.replace`` (atomic on POSIX), and its directory is fsynced so that the rename itself is durable. A
folder is built the same way: a hidden temporary sibling folder, every file in it and the folder fsynced,
then renamed into place. A reader therefore sees the old content or the new, never a half-written one, even
after ``kill -9`` or a power cut; an interrupted write leaves only a hidden ``.tmp-`` leftover, which
:func:`remove_leftovers` clears.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory (its entries: a rename into it) where the OS allows opening one."""
    path = Path(path)
    if path.is_dir() and os.name != "posix":
        return  # only POSIX can open and fsync a directory; elsewhere the rename is all there is
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically; ``write(f)`` writes the content to the open binary file ``f``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the result gets the mode any new file of the user gets
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data, **dumps_options) -> None:
    """``json.dumps(data, **dumps_options)`` written atomically (serialized first: a bad value writes nothing)."""
    write_text_atomic(path, json.dumps(data, **dumps_options))


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``final`` once the block ends without error.

    Every file written in the block is fsynced, then the folder, then the rename; an existing ``final`` is
    replaced (it is moved aside first and removed after the rename, so ``final`` is never missing for
    long and never half-written). An error in the block removes the temporary folder and leaves ``final``
    as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    temp.chmod(0o777 & ~_umask())  # mkdtemp makes the folder private (0700); the result is an ordinary folder
    try:
        yield temp
        for path in sorted(temp.rglob("*")):
            fsync_path(path)
        fsync_path(temp)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(temp, final)
        fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_leftovers(folder: str | Path) -> None:
    """Remove what interrupted atomic writes left in ``folder`` (assumes no other writer is at work there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(TEMP_PREFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
