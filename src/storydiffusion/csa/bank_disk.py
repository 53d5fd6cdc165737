"""A disk bank's open file and its read-ahead thread (`BankStorage(mode="disk")`)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from storydiffusion.csa.bank_file import EntryFile


def _read_parts(file: EntryFile, stored: str, first_row: int, pin: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An entry's values and scales from a bank file, from guidance half `first_row` on."""
    scales = f"scales/{stored}"
    values = file.read(f"values/{stored}", first_row, pin)
    return values, file.read(scales, first_row, pin) if scales in file.locations else None


class DiskState:
    """A disk bank's open file and its read-ahead thread: closed with the bank, or when it is collected.

    Holds no reference to the bank, so a bank nobody uses is collected and its temporary file goes."""

    def __init__(self, file: EntryFile, prefetch: int) -> None:
        self.file = file
        self.prefetch = prefetch
        self.pool: ThreadPoolExecutor | None = None
        self.ahead: dict[tuple[str, int, bool], Future] = {}  # (entry, first row, pinned) -> its read

    def read(
        self,
        stored: str,
        first_row: int,
        pin: bool,
        order: list[str],
        position: Mapping[str, int],
        ahead: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entry `stored`, read ahead already or now; then, with `ahead`, the next entries in `order` are
        read ahead."""
        future = self.ahead.pop((stored, first_row, pin), None)
        parts = future.result() if future is not None else _read_parts(self.file, stored, first_row, pin)
        if ahead:
            self._read_ahead(stored, first_row, pin, order, position)
        return parts

    def _read_ahead(
        self, stored: str, first_row: int, pin: bool, order: list[str], position: Mapping[str, int]
    ) -> None:
        ahead = min(self.prefetch, len(order) - 1)
        if ahead <= 0:
            return
        start = position[stored]
        # wrapping round: the next frame starts at the first entry again
        window = [(order[(start + j) % len(order)], first_row, pin) for j in range(1, ahead + 1)]
        for key in [key for key in self.ahead if key not in window]:
            self.ahead.pop(key).cancel()  # reads went another way: drop what no one will ask for
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storydiffusion-bank")
        for key in window:
            if key not in self.ahead:
                self.ahead[key] = self.pool.submit(_read_parts, self.file, *key)

    def held_bytes(self) -> int:
        """Bytes of the entries read ahead (an upper bound: some reads may still be under way)."""
        total = 0
        for stored, first_row, _ in self.ahead:
            for name in (f"values/{stored}", f"scales/{stored}"):
                location = self.file.locations.get(name)
                if location is not None:
                    rows = max(location.shape[0], 1)
                    total += location.nbytes * (rows - first_row) // rows
        return total

    def drain(self) -> None:
        """Cancel or finish every read ahead (before the file changes)."""
        for future in self.ahead.values():
            future.cancel()
        for future in self.ahead.values():
            if not future.cancelled():
                future.exception()  # waits; a failed read ahead is simply not used
        self.ahead.clear()

    def swap(self, file: EntryFile) -> None:
        """Read from `file` from now on (the same tensors, e.g. the saved copy of a temporary file)."""
        self.drain()
        self.file.close()
        self.file = file

    def close(self) -> None:
        self.drain()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        self.file.close()
