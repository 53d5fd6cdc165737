"""A bank's tensors in one file: appended entry by entry while the reference phase runs, read back one
entry at a time, and written out as a standard safetensors file (readable by `safetensors.safe_open`).

No memory map: a read copies an entry's bytes with `os.preadv` into a buffer of its own (page-locked when
it is bound for a GPU, so the copy to the device can be issued without blocking the denoising loop). Pages
a memory map has touched count in the process's resident set until they are unmapped; pages read this way
stay in the kernel's page cache, which the kernel gives back whenever something needs the memory.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically

# safetensors' names for the dtypes a bank stores
SAFETENSORS_DTYPES = {
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",  # token positions (DiT banks)
    torch.float32: "F32",
}
_TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_HEADER_ALIGNMENT = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes
_COPY_CHUNK = 8 << 20  # bytes per read/write when the OS cannot copy between files itself


@dataclass(frozen=True)
class Location:
    """Where one tensor lies in the file."""

    offset: int  # bytes from the start of the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes without a copy (bfloat16 has no numpy dtype: go through uint8)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_header(tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The start of a safetensors file whose tensors (name, dtype, shape) follow it in this order: the header's
    length and its JSON, padded with spaces to a multiple of 8 bytes as safetensors writes it."""
    header: dict[str, object] = {"__metadata__": metadata}
    position = 0
    for name, dtype, shape in tensors:
        nbytes = Location(0, dtype, tuple(shape)).nbytes
        offsets = [position, position + nbytes]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": offsets}
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU `tensors` and `metadata` as a safetensors file at `path` (through `files.write_atomically`:
    a failed save leaves nothing behind and says why). Written here rather than by `safetensors.save_file`,
    whose I/O failures are not `OSError`s and which reports none on some devices."""
    path = Path(path)
    items = [(name, tensor.contiguous()) for name, tensor in tensors.items()]
    for name, tensor in items:
        if tensor.dtype not in SAFETENSORS_DTYPES or tensor.device.type != "cpu":
            raise StoryDiffusionError(f"a bank file holds CPU tensors of {list(SAFETENSORS_DTYPES)}; {name} is not one")
    header = safetensors_header([(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in items], metadata)

    def write(target: Path) -> None:
        with open(target, "wb", buffering=0) as out:
            writer = EntryFile(out, {}, 0)
            writer._write_at(0, memoryview(header))
            offset = len(header)
            for _, tensor in items:
                if tensor.numel():
                    writer._write_at(offset, _as_bytes(tensor))
                offset += tensor.numel() * tensor.element_size()

    write_atomically(path, write, nbytes=len(header) + sum(t.numel() * t.element_size() for _, t in items))


class EntryFile:
    """Tensors in one file, appended one after another and read back by name, one at a time.

    `temporary()` makes a file that is unlinked as soon as it is created (POSIX), so it disappears when
    it is closed or the process dies, even mid-run; `save_safetensors` writes a named copy.
    """

    def __init__(self, file: BinaryIO, locations: dict[str, Location], end: int, path: Path | None = None) -> None:
        self.file = file
        self.locations = locations
        self.path = path  # None: a temporary file
        self.directory = tempfile.gettempdir() if path is None else str(path.parent)  # for messages
        self._end = end  # where the next appended tensor goes
        # positional reads and writes need no lock; the fallback (seek + read) does
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EntryFile(path={self.path}, tensors={len(self.locations)}, bytes={self.nbytes:,})"

    @classmethod
    def temporary(cls, directory: str | Path | None = None) -> EntryFile:
        """An empty, already unlinked file in `directory` (None: tempfile's default, $TMPDIR)."""
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        try:
            file = tempfile.TemporaryFile(dir=directory, prefix="storydiffusion-bank-", buffering=0)
        except OSError as error:
            raise StoryDiffusionError(
                f"cannot create a disk bank file in {directory or tempfile.gettempdir()}: {error.strerror or error}; "
                "give BankStorage(directory=...) a writable folder with room for the bank"
            ) from error
        entries = cls(file, {}, 0)
        entries.directory = str(directory or tempfile.gettempdir())
        return entries

    @classmethod
    def open_safetensors(cls, path: str | Path) -> tuple[EntryFile, dict[str, str]]:
        """Index a safetensors file's tensors without reading them; also returns its metadata."""
        path = Path(path)
        file = open(path, "rb", buffering=0)  # the EntryFile owns and closes it
        try:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
            metadata = header.pop("__metadata__", None) or {}
            start = 8 + length
            locations = {}
            for name, info in header.items():
                begin, end = info["data_offsets"]
                location = Location(start + begin, _TORCH_DTYPES[info["dtype"]], tuple(info["shape"]))
                if end - begin != location.nbytes:
                    raise ValueError(f"tensor {name!r} spans {end - begin} bytes, its shape needs {location.nbytes}")
                locations[name] = location
        except Exception as error:  # a damaged header raises struct, JSON, key or value errors
            file.close()
            raise StoryDiffusionError(f"bank file {path} is not a readable safetensors file: {error}") from error
        return cls(file, locations, os.fstat(file.fileno()).st_size, path), metadata

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors indexed (the file itself may hold a header and stale bytes besides)."""
        return sum(location.nbytes for location in self.locations.values())

    def close(self) -> None:
        self.file.close()

    # -- raw positional I/O --------------------------------------------------------------------
    def _write_at(self, offset: int, data: memoryview) -> None:
        fd = self.file.fileno()
        while len(data):
            if hasattr(os, "pwrite"):
                written = os.pwrite(fd, data, offset)
            else:  # no positional writes on this OS
                with self._lock:
                    self.file.seek(offset)
                    written = self.file.write(data)
            data, offset = data[written:], offset + written

    def _read_into(self, offset: int, buffer: memoryview) -> None:
        fd = self.file.fileno()
        while len(buffer):
            if hasattr(os, "preadv"):
                count = os.preadv(fd, [buffer], offset)
            else:  # no positional reads on this OS
                with self._lock:
                    self.file.seek(offset)
                    count = self.file.readinto(buffer)
            if not count:
                raise StoryDiffusionError(f"bank file {self.path or '(temporary)'} ended early: truncated on disk?")
            buffer, offset = buffer[count:], offset + count

    # -- tensors -----------------------------------------------------------------------------------
    def append(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` (any device; copied to the CPU first) after the last one, under `name`."""
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise StoryDiffusionError(f"a bank file cannot hold {tensor.dtype} tensors ({name})")
        location = Location(self._end, tensor.dtype, tuple(tensor.shape))
        if location.nbytes:
            try:
                self._write_at(location.offset, _as_bytes(tensor))
            except OSError as error:  # a full disk, most likely: say where, and what else there is
                where = self.path or f"a temporary file in {self.directory}"
                raise StoryDiffusionError(
                    f"cannot write the disk bank ({where}): {error.strerror or error}; give BankStorage(directory=...) "
                    "a folder with room (an SDXL 1024 px character needs 6.2 GiB) or use bank_storage='memory'"
                ) from error
        self.locations[name] = location
        self._end += location.nbytes

    def read(self, name: str, first_row: int = 0, pin: bool = False) -> torch.Tensor:
        """Tensor `name` from row `first_row` of its first dimension on, in a new CPU buffer (page-locked
        with `pin`, for an asynchronous copy to a GPU)."""
        location = self.locations[name]
        rows = location.shape[0] if location.shape else 1
        row_bytes = location.nbytes // max(rows, 1)
        shape = (rows - first_row, *location.shape[1:]) if location.shape else ()
        nbytes = row_bytes * (rows - first_row)
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        if nbytes:
            self._read_into(location.offset + first_row * row_bytes, memoryview(buffer.numpy()))
        return buffer.view(location.dtype).view(shape)

    def save_safetensors(self, path: str | Path, metadata: dict[str, str]) -> EntryFile:
        """Write every tensor, in file order, and `metadata` as a safetensors file at `path` (through
        `files.write_atomically`: a failed save leaves nothing behind); return a reader on it."""
        path = Path(path)
        ordered = sorted(self.locations.items(), key=lambda item: item[1].offset)
        header = safetensors_header([(name, location.dtype, location.shape) for name, location in ordered], metadata)

        def write(target: Path) -> None:
            with open(target, "wb", buffering=0) as out:
                EntryFile(out, {}, 0)._write_at(0, memoryview(header))
                written = len(header)
                for _, location in ordered:
                    self._copy_to(out, location.offset, location.nbytes, written)
                    written += location.nbytes

        write_atomically(path, write, nbytes=len(header) + sum(location.nbytes for _, location in ordered))
        return EntryFile.open_safetensors(path)[0]

    def _copy_to(self, out: BinaryIO, offset: int, count: int, out_offset: int) -> None:
        """`count` bytes from `offset` here to `out_offset` in `out`, in the kernel where it can."""
        source, target = self.file.fileno(), out.fileno()
        if hasattr(os, "copy_file_range"):
            try:
                while count:
                    copied = os.copy_file_range(source, target, count, offset, out_offset)
                    if not copied:
                        break
                    count, offset, out_offset = count - copied, offset + copied, out_offset + copied
            except OSError:  # e.g. across file systems on old kernels: copy through a buffer below
                pass
        buffer = bytearray(min(count, _COPY_CHUNK))
        writer = EntryFile(out, {}, out_offset)
        while count:
            view = memoryview(buffer)[: min(count, _COPY_CHUNK)]
            self._read_into(offset, view)
            writer._write_at(out_offset, view)
            count, offset, out_offset = count - len(view), offset + len(view), out_offset + len(view)
