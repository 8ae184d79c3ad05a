"""What kills leave behind is swept, and only that: the temporary files of atomic writes, and the
staging folders of exports, which a live job holds (`engine.staging_folder`) so that no sweep takes
them from under it."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import detector
from detector.cfgs import cfg_path
from detector.export import export_model
from engine import remove_stale_temp_files
from engine import staging_folder as staging_module
from engine.staging_folder import remove_abandoned_staging_folders, staging_folder

REPO = Path(__file__).resolve().parents[1]
HOLD_STAGING = """
import sys
from engine.staging_folder import staging_folder
with staging_folder(sys.argv[1], "pruned") as folder:
    (folder / "pruned.weights").write_bytes(b"half written")
    (folder / ".yolo-admm-write.pruned.onnx.a1b2c3d4.tmp").write_bytes(b"being written")
    print(folder, flush=True)
    sys.stdin.read()
"""
KILLED_WRITE = """
import os, signal, sys
from engine import atomic_write
def write_then_die(stream):
    stream.write(b"half a checkpoint")
    stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)
atomic_write(sys.argv[1], write_then_die)
"""


@pytest.fixture
def live_export(tmp_path):
    """(the staging folder, the process): an export in another process, writing into tmp_path/out."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(out)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        yield Path(holder.stdout.readline().strip()), holder
    finally:
        holder.kill()
        holder.wait()


def test_a_live_exports_staging_folder_is_left_and_a_killed_ones_removed_by_the_next_export(live_export):
    """Found by a review: a standalone export killed by SIGKILL left its hidden folder (a whole
    model's files) for good, and a sweep under a run folder's lock could take a live export's."""
    staging, holder = live_export
    out = staging.parent
    users = out / ".backup.20241127.tmp"             # a folder of the user's, named alike
    users.mkdir()
    assert staging.name.startswith(".yolo-admm-export.pruned.") and staging.is_dir()
    assert remove_stale_temp_files(out.parent, recursive=True) == []       # its files are its job's too
    assert sorted(p.name for p in staging.iterdir()) == [".yolo-admm-write.pruned.onnx.a1b2c3d4.tmp",
                                                         "pruned.weights"]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert staging.is_dir()                          # nothing removes it at the kill itself
    model = detector.load_darknet(cfg_path("demo-tiny.cfg"))
    export_model(model, out, ["darknet"], stem="pruned")
    assert sorted(p.name for p in out.iterdir()) == [".backup.20241127.tmp", "pruned.cfg", "pruned.weights"]


def test_a_write_killed_half_way_leaves_a_file_the_sweep_knows(tmp_path):
    """The name the writer gives its temporary file is the one the sweep looks for."""
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "epoch_0003.pt")], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].read_bytes() == b"half a checkpoint"
    (tmp_path / ".notes.20241127.tmp").write_text("the user's")
    assert remove_stale_temp_files(tmp_path) == left
    assert [p.name for p in tmp_path.iterdir()] == [".notes.20241127.tmp"]


def test_a_folder_swept_between_its_making_and_its_lock_is_made_again(tmp_path, monkeypatch):
    """A sweep may take a new staging folder before its job holds it; the job makes another."""
    real_flock, made = staging_module.fcntl.flock, []

    def swept_first(descriptor, operation):
        if not made:
            made.append(sorted(tmp_path.iterdir())[0])
            assert remove_abandoned_staging_folders(tmp_path) == made    # the sweep takes it, unheld
        real_flock(descriptor, operation)

    monkeypatch.setattr(staging_module.fcntl, "flock", swept_first)
    with staging_folder(tmp_path, "m") as folder:
        assert folder.is_dir() and folder != made[0]
        (folder / "m.weights").write_bytes(b"x")
        monkeypatch.undo()
        assert remove_abandoned_staging_folders(tmp_path) == []          # held now
    assert list(tmp_path.iterdir()) == []
