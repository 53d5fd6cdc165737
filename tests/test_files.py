"""Atomic writes: a write that fails midway (a full disk) leaves nothing behind and says what failed, with
the free space -- for plain files and for identity banks, the largest files the project writes."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from storydiffusion import BankSettings, IdentityBank, StoryDiffusionError
from storydiffusion.csa.bank import BankStorage
from storydiffusion.files import (
    FileWriteError,
    format_bytes,
    is_partial,
    partial_path,
    remove_partials,
    write_atomically,
)

FREE = 3 * 2**20 + 2**19  # what the stand-in file system reports free: "3.5 MiB"
SETTINGS = BankSettings(
    model="tiny", denoiser_fingerprint="abc", scheduler="EulerDiscreteScheduler", num_steps=4,
    height=64, width=64, guidance_halves=2, id_length=2,
)  # fmt: skip


@pytest.fixture
def small_disk(monkeypatch):
    """A file system that reports FREE bytes free."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * 2**20, 100 * 2**20 - FREE, FREE))


def everything_in(folder):
    return sorted(path.name for path in folder.rglob("*"))  # hidden files too


def test_the_temporary_name_is_hidden_and_recognised(tmp_path):
    partial = partial_path(tmp_path / "panel_000.png")
    assert partial.name == ".panel_000.png.partial" and is_partial(partial)
    assert not is_partial(tmp_path / "panel_000.png") and not is_partial(tmp_path / "notes.partial")


def test_a_write_failing_midway_leaves_nothing_and_names_the_file_and_the_free_space(tmp_path, small_disk):
    target = tmp_path / "out" / "big.bin"
    target.parent.mkdir()

    def fills_the_disk(partial):
        with open(partial, "wb") as file:
            file.write(b"x" * 4096)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FileWriteError) as raised:
        write_atomically(target, fills_the_disk, nbytes=5 * 2**30)
    assert everything_in(tmp_path / "out") == []
    message = str(raised.value)
    assert str(target) in message and "No space left on device" in message
    assert "it needs 5.00 GiB, 3.5 MiB free" in message and "another folder" in message
    assert isinstance(raised.value, StoryDiffusionError) and raised.value.errno == errno.ENOSPC  # CLI: one line
    assert raised.value.needed == 5 * 2**30 and raised.value.free == FREE


def test_any_other_failure_also_leaves_nothing_and_passes_through(tmp_path):
    def interrupted(partial):
        partial.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "a.json", interrupted)
    assert everything_in(tmp_path) == []
    write_atomically(tmp_path / "a.json", lambda partial: partial.write_text("{}"))
    assert everything_in(tmp_path) == ["a.json"]


def filled_bank(storage, tmp_path):
    bank = IdentityBank("Bob", SETTINGS, storage=storage)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        for layer in ("down.attn1", "up.attn1"):
            bank.put(step, layer, torch.randn(2, 64, 32, generator=generator))
    return bank


def fill_disk_after(monkeypatch, room: int) -> list[int]:
    """Writes (`os.pwrite`, `os.copy_file_range`) that fail with ENOSPC once `room` bytes have landed, after a
    short write as a real full disk does; returns the bytes written so far (one number, updated)."""
    written = [0]
    real_pwrite, real_copy = os.pwrite, os.copy_file_range

    def allowed(count):
        take = min(count, room - written[0])
        if count and not take:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += take
        return take

    monkeypatch.setattr(
        os, "pwrite", lambda fd, data, offset: real_pwrite(fd, memoryview(data)[: allowed(len(data))], offset)
    )
    monkeypatch.setattr(
        os, "copy_file_range", lambda src, dst, count, *offsets: real_copy(src, dst, allowed(count), *offsets)
    )
    return written


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_bank_save_failing_midway_leaves_no_partial_file(tmp_path, monkeypatch, small_disk, storage):
    """Both ways a bank is saved (an in-RAM bank written out, a disk bank's file copied out) fail the same way."""
    bank = filled_bank(BankStorage(storage, directory=str(tmp_path / "scratch")), tmp_path)
    out = tmp_path / "banks"
    out.mkdir()
    with monkeypatch.context() as full:
        written = fill_disk_after(full, bank.nbytes // 2)
        with pytest.raises(FileWriteError) as raised:
            bank.save(out / "Bob.safetensors")
    assert written[0] == bank.nbytes // 2, "half the bank landed before the disk was full"
    assert everything_in(out) == []
    message = str(raised.value)
    assert str(out / "Bob.safetensors") in message and "3.5 MiB free" in message
    assert raised.value.needed > bank.nbytes and f"it needs {format_bytes(raised.value.needed)}" in message

    # the disk has room again: the same bank saves, whole
    loaded = IdentityBank.load(bank.save(out / "Bob.safetensors"), expected=SETTINGS)
    assert loaded.digest == bank.digest and sorted(loaded.keys()) == sorted(bank.keys())
    for step, layer in bank.keys():
        cpu = torch.device("cpu")
        assert torch.equal(loaded.get(step, layer, torch.float32, cpu, 2), bank.get(step, layer, torch.float32, cpu, 2))
    assert everything_in(out) == ["Bob.safetensors"]


def test_a_run_removes_what_a_killed_write_left_in_its_folder(tmp_path):
    """SIGKILL skips every clean-up; the next run into the folder removes the temporary files it finds."""
    (tmp_path / "panel_000.png").write_bytes(b"whole")
    partial_path(tmp_path / "panel_001.png").write_bytes(b"half")
    (tmp_path / "notes.partial").write_text("the user's, not ours")
    assert [path.name for path in remove_partials(tmp_path)] == [".panel_001.png.partial"]
    assert everything_in(tmp_path) == ["notes.partial", "panel_000.png"]


def test_sigterm_ends_a_command_without_leaving_a_half_written_file(tmp_path):
    """What `accelerate launch` sends the other processes when one dies: the command line turns it into a clean
    exit, so the write in flight removes its temporary file (by default SIGTERM ends Python with no clean-up)."""
    script = f"""
import os, signal, time
from pathlib import Path
from storydiffusion.app import cli
from storydiffusion.files import write_atomically

cli._stop_cleanly_on_sigterm()

def slow(partial):
    partial.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

write_atomically(Path({str(tmp_path / "page_01.png")!r}), slow)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert everything_in(tmp_path) == []
