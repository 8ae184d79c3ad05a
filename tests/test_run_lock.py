"""One job per run folder (`engine.run_folder_lock`): a second job on a folder that another process
holds stops before it writes anything, naming the holder; the lock goes with its holder, however
the holder ends (SIGKILL included)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.run_lock import LOCK_FILE, run_folder_lock
from yolo_admm.cli import main

DEMO_CFG = Path(__file__).resolve().parents[1] / "detector" / "cfgs" / "demo-tiny.cfg"  # detect prune reads its cfg first

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from engine.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1], "--out"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_folder(tmp_path: Path):
    """A run folder that another process holds; yields (folder, that process)."""
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield folder, holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_job_is_refused_and_told_who_holds_the_folder(held_folder):
    folder, holder = held_folder
    with pytest.raises(ValueError) as refused:
        with run_folder_lock(folder, "--out"):
            pytest.fail("the block ran although another process holds the folder")
    message = str(refused.value)
    assert message.startswith(f"--out {folder}: expected a run folder no other job is using, found it in use by "
                              f"pid {holder.pid} on ")
    assert "choose another --out" in message


def test_the_lock_goes_with_a_killed_holder(held_folder):
    folder, holder = held_folder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with run_folder_lock(folder, "--out"):
        assert (folder / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


ORPHANED = """
import os, sys, time
from engine.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1], "--out"):
    if os.fork() == 0:                     # a data-loader worker: it shares the lock, and outlives its parent
        time.sleep(1.5)
        os._exit(0)
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_workers_of_a_killed_holder_are_waited_for(tmp_path):
    """Found by a review: after SIGKILL the holder's forked workers kept the lock for a moment, so
    an immediate resume was refused, naming a process that had ended."""
    holder = subprocess.Popen([sys.executable, "-c", ORPHANED, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with run_folder_lock(tmp_path, "--out"):                  # the worker still holds it for about 1.5 s
        waited = time.monotonic() - started
    assert 0.5 < waited < 10


def test_the_lock_is_held_only_inside_the_block(tmp_path: Path):
    with run_folder_lock(tmp_path, "--out"):
        with pytest.raises(ValueError, match="this process already holds this run folder"):
            with run_folder_lock(tmp_path, "--out"):
                pass
    with run_folder_lock(tmp_path, "--out"):
        pass


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    """Found by a review: the lock file was opened through a link and truncated its target."""
    (tmp_path / "precious.txt").write_text("precious data")
    (tmp_path / LOCK_FILE).symlink_to(tmp_path / "precious.txt")
    with pytest.raises(ValueError, match="expected the run folder's lock file, found a symbolic link"):
        with run_folder_lock(tmp_path, "--out"):
            pass
    assert (tmp_path / "precious.txt").read_text() == "precious data"


def test_a_refusal_every_rank_raises_is_printed_by_rank_0_only(held_folder, capsys, monkeypatch):
    """Found by a fuzz: a second torchrun on a held folder printed the refusal once per rank."""
    folder, _ = held_folder
    argv = ["detect", "train", "--cfg", str(DEMO_CFG), "--data", "none.yaml", "--out", str(folder)]  # cfg read first
    from yolo_admm import cli

    for rank, printed in (("1", False), ("0", True)):          # as torchrun's rank 1 and rank 0 (no group here)
        monkeypatch.setattr(cli, "is_rank0", lambda rank=rank: rank == "0")
        assert main(argv) == 2
        assert ("expected a run folder no other job is using" in capsys.readouterr().err) is printed, rank


def test_no_folder_holds_nothing():
    with run_folder_lock(None, "--checkpoint-dir"):
        pass


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("command", [
    ["detect", "train", "--cfg", "{demo_cfg}", "--data", "{root}/none.yaml", "--out", "{run}"],   # checked first
    ["detect", "prune", "--cfg", "{demo_cfg}", "--data", "{demo_cfg}", "--out", "{run}"],   # there; read after the lock
    ["classify", "train", "--model", "lenet5", "--data", "{root}/none", "--checkpoint-dir", "{run}",
     "--out", "{root}/lenet5.pt"],
    ["classify", "prune", "--model", "lenet5", "--data", "{root}/none", "--weights", "{root}/none.pt", "--sparsity", "0.9",
     "--checkpoint-dir", "{run}"],
], ids=["detect-train", "detect-prune", "classify-train", "classify-prune"])
def test_every_command_that_writes_a_run_folder_refuses_one_in_use(command, held_folder, capsys):
    folder, holder = held_folder
    (folder / "epoch_0001.pt").write_bytes(b"a checkpoint of the running job")
    before = snapshot(folder)
    argv = [word.format(root=folder.parent, run=folder, demo_cfg=DEMO_CFG) for word in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{folder}: expected a run folder no other job is using, found it in use by pid {holder.pid}" in err
    assert "Traceback" not in err
    assert snapshot(folder) == before
