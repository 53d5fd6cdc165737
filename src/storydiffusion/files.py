"""Writing files so that an interrupted or failed write never leaves a half-written one behind.

Every file the project writes goes through `write_atomically`: the data goes to a hidden temporary name in the
same folder (`partial_path`: `.NAME.partial`), which replaces NAME only once it is whole. Whatever stops the
write (a full disk, an exception, Ctrl-C) removes the temporary file, and an `OSError` comes out as one
`FileWriteError` saying which file, how many bytes it needed (when known) and how many the disk has free.
Only a process killed outright (SIGKILL, os._exit) can leave a `.partial` file; `is_partial` recognises one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from storydiffusion.errors import StoryDiffusionError

PARTIAL_SUFFIX = ".partial"


class FileWriteError(OSError, StoryDiffusionError):
    """A file could not be written (a full disk, no permission...); nothing of it is left behind.

    An `OSError` (with the original `errno`) and a `StoryDiffusionError`, so the command line reports it as
    one line. `needed`: bytes the file needed (None: unknown); `free`: bytes free on its file system (None:
    unknown)."""

    def __init__(self, message: str, path: Path, errno: int | None, needed: int | None, free: int | None) -> None:
        super().__init__(message)
        self.errno = errno
        self.filename = str(path)
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.args[0], self.path, self.errno, self.needed, self.free)


def partial_path(path: Path) -> Path:
    """The temporary name `write_atomically` writes `path` under: hidden, beside it."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def is_partial(path: Path) -> bool:
    """Whether `path` is the temporary file of an atomic write (left only by a process killed mid-write)."""
    return path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX)


def remove_partials(folder: Path) -> list[Path]:
    """Remove the temporary files that killed writes left in `folder` (not below it); returns their paths.

    Call it only on a folder no other process is writing into (a run's own output folder)."""
    removed = [path for path in Path(folder).glob(f".*{PARTIAL_SUFFIX}") if is_partial(path) and path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def format_bytes(count: int) -> str:
    """`count` bytes for people: 512 B, 3.4 MiB, 6.20 GiB."""
    if count < 1024:
        return f"{count} B"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{count / size:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(folder: Path) -> int | None:
    """Bytes free on the file system holding `folder` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_atomically(path: Path, write: Callable[[Path], None], nbytes: int | None = None) -> None:
    """Write `path` through `write(temporary path)` in the same folder, so it is either whole or absent.

    `nbytes`: the size the file will have, when known, for the message of a failed write. A failed write
    leaves no temporary file; an `OSError` becomes a `FileWriteError` naming the file, `nbytes` and the free
    space of its file system."""
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    except FileWriteError:
        raise
    except OSError as error:
        free = free_bytes(path.parent)
        needed = f"it needs {format_bytes(nbytes)}, " if nbytes is not None else ""
        room = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        raise FileWriteError(
            f"cannot write {path}: {error.strerror or error} ({needed}{room} on the file system holding "
            f"{path.parent}); nothing was left behind. Free some space there or write to another folder",
            path,
            error.errno,
            nbytes,
            free,
        ) from error
    finally:
        partial.unlink(missing_ok=True)
