"""Checkpoints are written atomically beside their file: a kill during a save leaves the previous one whole, and
nothing is written outside the checkpoint's folder (not in $TMPDIR, whence a move across file systems is a copy)."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from amrlhf.lightning_cli import CheckedCheckpointIO


@pytest.fixture
def other_tmpdir(tmp_path):
    """A $TMPDIR on another file system than the checkpoints where there is one (/dev/shm)."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path / "tmpdir"
    root.mkdir(exist_ok=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_checkpoint_is_written_beside_its_file_synced_and_renamed_over_it(tmp_path, other_tmpdir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(other_tmpdir))  # what $TMPDIR sets
    events = []
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda src, dst, real=real, name=name: (
            events.append((name, Path(src), Path(dst))), real(src, dst))[1])
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))),
                                                 real_fsync(fd))[1])
    last = tmp_path / "checkpoints" / "last.ckpt"
    for step in (1, 2):
        events.clear()
        CheckedCheckpointIO().save_checkpoint({"global_step": step, "w": torch.arange(10)}, last)
        partial = last.with_name(".last.ckpt.partial")
        assert events == [("fsync", partial), ("replace", partial, last), ("fsync", last.parent)], events
        assert torch.load(last)["global_step"] == step
        assert os.listdir(last.parent) == ["last.ckpt"] and os.listdir(other_tmpdir) == []


def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    CheckedCheckpointIO().save_checkpoint({"global_step": 1}, last)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        CheckedCheckpointIO().save_checkpoint({"global_step": 2}, last)
    assert os.listdir(tmp_path) == ["last.ckpt"] and torch.load(last)["global_step"] == 1


KILL_MID_SAVE = r"""
import io, os, sys, threading, time
from pathlib import Path
import torch
from amrlhf.lightning_cli import CheckedCheckpointIO

folder, tmpdir = Path(sys.argv[1]), Path(sys.argv[2])
last = folder / "last.ckpt"
weights = {"w": torch.zeros(4 * 2**20)}  # 16 MB
CheckedCheckpointIO().save_checkpoint({**weights, "global_step": 1}, last)
good = last.stat()
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # the bytes reach their target in pieces, as a large checkpoint's do
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    for i in range(0, len(data), 2**20):
        f.write(data[i:i + 2**20])
        f.flush()
        time.sleep(0.02)

def kill_mid_save():  # a SIGKILL once the save has written part of a file, wherever it writes it
    while True:
        for f in [*folder.iterdir(), *tmpdir.iterdir()]:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if (st.st_ino, st.st_size) != (good.st_ino, good.st_size) and st.st_size > 0:
                os._exit(9)
        time.sleep(0.001)

torch.save = slow_save
threading.Thread(target=kill_mid_save, daemon=True).start()
CheckedCheckpointIO().save_checkpoint({**weights, "global_step": 2}, last)
sys.exit("the save ended before the kill")
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, other_tmpdir):
    """Killed while the second save writes: last.ckpt is still the first one, loadable, nothing is left in $TMPDIR,
    and the temporary file the kill left beside it is removed by the next save (of any checkpoint in the folder)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(folder), str(other_tmpdir)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TMPDIR": str(other_tmpdir)})
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert torch.load(folder / "last.ckpt")["global_step"] == 1
    assert os.listdir(other_tmpdir) == []
    CheckedCheckpointIO().save_checkpoint({"global_step": 3}, folder / "best-step=3.ckpt")
    assert sorted(os.listdir(folder)) == ["best-step=3.ckpt", "last.ckpt"]
