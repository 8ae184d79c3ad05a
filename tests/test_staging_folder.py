"""What kills leave behind is swept, and only that: the temporary files of atomic writes, and the
staging folders of exports, which a live job holds (`engine.staging_folder`) so that no sweep takes
them from under it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import detector
from detector.cfgs import cfg_path
from detector.export import export_model
from engine import atomic_write_bytes, remove_stale_temp_files
from engine import staging_folder as staging_module
from pruning import atomic_file
from engine.staging_folder import remove_abandoned_staging_folders, staging_folder

REPO = Path(__file__).resolve().parents[1]
HOLD_STAGING = """
import sys
from engine import atomic_write
from engine.staging_folder import staging_folder
with staging_folder(sys.argv[1], "pruned") as folder:
    (folder / "pruned.weights").write_bytes(b"written")
    def being_written(stream):
        stream.write(b"half an ONNX file")
        stream.flush()
        print(folder, flush=True)
        sys.stdin.read()
    atomic_write(folder / "pruned.onnx", being_written)
"""
LIVE_WRITE = """
import sys
from engine import atomic_write
def being_written(stream):
    stream.write(b"half a checkpoint")
    stream.flush()
    print("writing", flush=True)
    sys.stdin.read()
atomic_write(sys.argv[1], being_written)
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
    users = [out / ".backup.20241127.tmp", out / ".yolo-admm-export.my backup.tmp"]   # the user's, named alike
    for folder in users:
        folder.mkdir()
    assert staging.name.startswith(".yolo-admm-export.pruned.") and staging.is_dir()
    staged = sorted(p.name for p in staging.iterdir())
    assert remove_stale_temp_files(out.parent, recursive=True) == []
    assert sorted(p.name for p in staging.iterdir()) == staged and len(staged) == 3   # .held, its writes
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert staging.is_dir()                          # nothing removes it at the kill itself
    model = detector.load_darknet(cfg_path("demo-tiny.cfg"))
    export_model(model, out, ["darknet"], stem="pruned")
    assert sorted(p.name for p in out.iterdir()) == sorted([*(folder.name for folder in users), "pruned.cfg",
                                                            "pruned.weights"])


def test_a_live_write_is_left_and_a_killed_ones_file_removed(tmp_path):
    """Found by a review: a rerun's sweep removed the temporary file of a checkpoint another job
    (a train run in a prune run's folder) was writing, and that job failed. The name the writer
    gives its temporary file is the one the sweep looks for."""
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITE, str(tmp_path / "epoch_0003.pt")], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        (tmp_path / ".notes.20241127.tmp").write_text("the user's")
        assert remove_stale_temp_files(tmp_path) == []
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".yolo-admm-write.epoch_0003.pt.")]
    assert len(left) == 1 and left[0].read_bytes() == b"half a checkpoint"
    assert remove_stale_temp_files(tmp_path) == left
    assert [p.name for p in tmp_path.iterdir()] == [".notes.20241127.tmp"]


def sweep_at_first_hold(monkeypatch, folder: Path, sweep) -> list[Path]:
    """Run `sweep(folder)` once, at the first hold taken (while the holder has not got it yet):
    returns what it removed."""
    real_flock, swept = atomic_file.fcntl.flock, []

    def swept_first(descriptor, operation):
        if not swept:
            swept.append(None)
            swept[:] = sweep(folder)
        real_flock(descriptor, operation)

    monkeypatch.setattr(atomic_file.fcntl, "flock", swept_first)
    return swept


def test_a_folder_swept_between_its_making_and_its_hold_is_made_again(tmp_path, monkeypatch):
    swept = sweep_at_first_hold(monkeypatch, tmp_path, remove_abandoned_staging_folders)
    with staging_folder(tmp_path, "m") as folder:
        assert len(swept) == 1 and folder.is_dir() and folder != swept[0]
        (folder / "m.weights").write_bytes(b"x")
        monkeypatch.undo()
        assert remove_abandoned_staging_folders(tmp_path) == []          # held now
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_file_swept_between_its_making_and_its_hold_is_made_again(tmp_path, monkeypatch):
    swept = sweep_at_first_hold(monkeypatch, tmp_path, remove_stale_temp_files)
    atomic_write_bytes(tmp_path / "epoch_0001.pt", b"whole")
    assert len(swept) == 1 and swept[0].name.startswith(".yolo-admm-write.epoch_0001.pt.")
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("epoch_0001.pt", b"whole")]


def test_a_temporary_file_is_held_until_it_is_in_place(tmp_path, monkeypatch):
    real_replace, swept = os.replace, []

    def swept_first(source, target):
        swept.extend(remove_stale_temp_files(tmp_path))
        real_replace(source, target)

    monkeypatch.setattr(atomic_file.os, "replace", swept_first)
    atomic_write_bytes(tmp_path / "epoch_0001.pt", b"whole")
    assert swept == [] and [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("epoch_0001.pt", b"whole")]


def test_a_folder_removed_by_another_job_during_a_recursive_sweep_is_passed_over(tmp_path, monkeypatch):
    """Found by a review: the sweep walked with rglob, which raised when a folder it had listed
    (a live export's scratch folder, another sweep's catch) vanished before it got there, and
    stopped a prune run at its start."""
    from engine import checkpoint

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".yolo-admm-write.a.pt.abcdefgh.tmp").write_bytes(b"cut short")
    real, removed_meanwhile = checkpoint.remove_unheld, []

    def another_job_removes_the_other_folder(path, *args, **kwargs):
        if not removed_meanwhile:
            removed_meanwhile.append(tmp_path / ("two" if path.parent.name == "one" else "one"))
            shutil.rmtree(removed_meanwhile[0])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "remove_unheld", another_job_removes_the_other_folder)
    swept = remove_stale_temp_files(tmp_path, recursive=True)
    assert len(swept) == 1 and swept[0].parent not in removed_meanwhile
    assert list(tmp_path.iterdir()) == [swept[0].parent]


def test_a_leftover_that_cannot_be_removed_stays_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """A killed write's file in a folder not ours to write (an earlier run's, made read-only) made
    the sweep raise PermissionError, and so stopped a prune run at its start."""
    name = ".yolo-admm-write.epoch_0002.pt.abcdefgh.tmp"
    for folder in ("read_only", "writable"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"cut short")
    real_unlink = Path.unlink

    def unlink(path, missing_ok=False):          # as for a user other than root (the tests may run as root)
        if path.parent.name == "read_only":
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert remove_stale_temp_files(tmp_path, recursive=True) == [tmp_path / "writable" / name]
    assert (tmp_path / "read_only" / name).read_bytes() == b"cut short"


def test_where_nothing_can_be_held_writes_work_and_nothing_is_swept(tmp_path, monkeypatch, recwarn):
    """As on Windows: no fcntl, no O_NOFOLLOW, no fchmod (a review found all three failing)."""
    from engine import run_lock, run_folder_lock

    monkeypatch.setattr(atomic_file, "fcntl", None)
    for module in (atomic_file, run_lock):
        monkeypatch.setattr(module, "CAN_HOLD", False)
    monkeypatch.setattr(staging_module, "NO_FOLLOW", 0)
    monkeypatch.delattr(os, "O_NOFOLLOW")
    monkeypatch.delattr(os, "fchmod")
    with run_folder_lock(tmp_path, "--out"):
        atomic_write_bytes(tmp_path / "epoch_0001.pt", b"whole")
        with staging_folder(tmp_path, "m") as folder:
            (folder / "m.weights").write_bytes(b"x")
            assert remove_abandoned_staging_folders(tmp_path) == []
        (tmp_path / ".yolo-admm-write.epoch_0002.pt.abcdefgh.tmp").write_bytes(b"cut short")
        assert remove_stale_temp_files(tmp_path, recursive=True) == []
    assert (tmp_path / "epoch_0001.pt").read_bytes() == b"whole"
    assert "nothing stops a second job" in str(recwarn.pop(UserWarning).message)
