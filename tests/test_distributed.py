"""Multi-process training: 2 gloo processes on CPU (as torchrun starts them) equal one process
with the same global batch, through ADMM, hard pruning, masked retraining and a resume."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pruning
from engine import NonFiniteLossError, Trainer, TrainConfig, distributed

WORLD = 2
GLOBAL_BATCH = 8
SAMPLES = 64
SPARSITY = 0.75
ADMM_EPOCHS = 2
STEPS_PER_UPDATE = 4
SPAWN_DEADLINE_S = 180.0

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(SAMPLES, 10, generator=generator)
    labels = (inputs[:, :3].sum(dim=1) > 0).long() + (inputs[:, 3] > 0.5).long()  # 3 learnable classes
    return TensorDataset(inputs, labels)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))  # no BatchNorm: exact equivalence


def cross_entropy(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    inputs, labels = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits, labels), {"acc": float((logits.argmax(1) == labels).float().mean())}


def train_config(epochs: int, folder: Path, resume: Path | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs, device="cpu", checkpoint_dir=folder, log_csv=folder / "history.csv",
                       resume=resume, progress=False)


def prune_and_retrain(root: Path) -> dict:
    """ADMM -> hard prune -> one epoch of masked retraining -> a second one resumed from rank 0's
    checkpoint. Each rank writes (if at all) under root/rank<r>; returns the final state."""
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // distributed.world_size(),
                        sampler=distributed.distributed_sampler(dataset, shuffle=True, seed=7))
    own = root / f"rank{distributed.rank()}"
    model = make_model()
    admm = pruning.ADMM(model, pruning.ADMMConfig(sparsity=SPARSITY, rho=0.05))
    admm_callback = pruning.ADMMCallback(admm, STEPS_PER_UPDATE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    admm_trainer = Trainer(model, optimizer, cross_entropy, loader, train_config(ADMM_EPOCHS, own / "admm"),
                           callbacks=[admm_callback])
    admm_trainer.fit()
    masks = admm.hard_prune()
    for epochs, resume in ((1, None), (2, root / "rank0" / "retrain")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        retrainer = Trainer(model, optimizer, cross_entropy, loader, train_config(epochs, own / "retrain", resume),
                            callbacks=[pruning.MaskCallback(masks)])
        retrainer.fit()
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "masks": masks.state_dict(),
            "Z": [z.clone() for z in admm.Z], "U": [u.clone() for u in admm.U], "updates": admm_callback.history,
            "admm_losses": [h["train/loss"] for h in admm_trainer.history],
            "retrain_losses": [h["train/loss"] for h in retrainer.history], "sampler_epoch": loader.sampler.epoch,
            "uses_ddp": admm_trainer.ddp_model is not None,
            "model_is_bare": isinstance(admm_trainer.model, nn.Sequential)}


def nan_on_rank_one(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    loss, logs = cross_entropy(model, batch)
    return (loss * float("nan") if distributed.rank() == 1 else loss), logs


def stops_together_on_a_nan(root: Path) -> bool:
    """A NaN loss on rank 1 only must stop every rank (no rank left waiting in an all-reduce)."""
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_size=4, sampler=distributed.distributed_sampler(dataset, seed=0))
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_on_rank_one, loader,
                      TrainConfig(epochs=1, device="cpu", progress=False))
    try:
        trainer.fit()
    except NonFiniteLossError:
        return True
    return False


def dropout_cross_entropy(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    inputs, labels = batch
    return nn.functional.cross_entropy(model(nn.functional.dropout(inputs, 0.5)), labels), {}


def resumed_with_rank_streams(root: Path) -> dict:
    """Ranks whose random streams differ (seeded by rank), training with dropout: two epochs in one
    go, and one epoch then a second resumed (in streams reseeded alike, as in new processes) from
    rank 0's checkpoint. Returns both runs' weights."""
    dataset = make_dataset()
    weights = {}
    for run, plan in (("straight", (2,)), ("resumed", (1, 2))):
        loader = DataLoader(dataset, batch_size=4, sampler=distributed.distributed_sampler(dataset, seed=3))
        model = make_model()
        torch.manual_seed(1000 + distributed.rank())
        for epochs in plan:
            resume = root / run / "rank0" if epochs > 1 and len(plan) > 1 else None
            if resume is not None:
                torch.manual_seed(5)
            config = TrainConfig(epochs=epochs, device="cpu", checkpoint_dir=root / run / f"rank{distributed.rank()}",
                                 resume=resume, progress=False)
            Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), dropout_cross_entropy, loader, config).fit()
        weights[run] = {key: value.clone() for key, value in model.state_dict().items()}
    return weights


class OverReportedLength:
    """A loader that yields fewer batches than its length says (as an IterableDataset's guess can)."""

    def __init__(self, loader: DataLoader, extra: int):
        self.loader, self.extra = loader, extra

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader) + self.extra


def weights_after_an_over_reported_epoch() -> dict:
    """One epoch of 8 batches (global batch 8, each rank its shard) with `accumulate` 3 and a
    length of 10: the last step's 2 batches think more are coming. Its gradients must still be
    averaged over the ranks, so the ranks end with the weights one process gets."""
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // distributed.world_size(),
                        sampler=distributed.distributed_sampler(dataset, seed=5))
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cross_entropy,
                      OverReportedLength(loader, extra=2),
                      TrainConfig(epochs=1, device="cpu", accumulate=3, progress=False))
    trainer.fit()
    return {"steps": trainer.step, "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def admm_from_rank_seeded_weights() -> dict:
    """ADMM built on weights that differ by rank: its Z and support must still be rank 0's."""
    torch.manual_seed(100 + distributed.rank())
    model = nn.Linear(6, 4)
    admm = pruning.ADMM(model, pruning.ADMMConfig(sparsity=0.5))
    return {"weight": model.weight.detach().clone(), "Z": admm.Z[0].clone(), "support": admm.support[0].clone()}


def epoch_resumed_from_a_stale_view(root: Path) -> int:
    """Rank 1 given a folder that lacks rank 0's newest checkpoint (as a network file system's cache
    can lag behind a write): every rank must resume from the checkpoint rank 0 finds."""
    dist.barrier()                                   # rank 0's retraining checkpoints are written
    newest = root / "rank0" / "retrain"
    stale = root / "stale_view"
    if distributed.rank() == 1:
        stale.mkdir()
        (stale / "epoch_0001.pt").write_bytes((newest / "epoch_0001.pt").read_bytes())
    dist.barrier()
    dataset = make_dataset()
    loader = DataLoader(dataset, batch_size=4, sampler=distributed.distributed_sampler(dataset, seed=0))
    model = make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), cross_entropy, loader,
                      TrainConfig(epochs=3, device="cpu", resume=newest if distributed.rank() == 0 else stale,
                                  progress=False))
    trainer._load_resume_state()
    return trainer.epoch


def what_every_rank_says_of_bad_input() -> list[str]:
    """Bad input found by one rank only, in `distributed.checked_on_every_rank`: every rank stops
    with the same error (said once on the command line), naming the rank that found it."""
    said = []
    for failing_rank, error in ((1, ValueError("data.yaml: split 'val' has no images")),
                                (0, FileNotFoundError("weights.weights: not found"))):
        try:
            with distributed.checked_on_every_rank():
                if distributed.rank() == failing_rank:
                    raise error
        except distributed.EveryRankError as stop:
            said.append(str(stop))
    with distributed.checked_on_every_rank():
        pass                                              # nothing found: nothing raised
    return said


def worker(local_rank: int, port: int, root: str) -> None:
    """One of the WORLD processes, set up as torchrun sets up its workers (environment variables; the
    rendezvous store is the launcher's, which every rank joins as a client)."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    device = distributed.init_from_env("cpu", timeout_s=60)
    result = prune_and_retrain(Path(root))
    result.update(device=str(device), rank=distributed.rank(), world=distributed.world_size(),
                  nan_stops=stops_together_on_a_nan(Path(root)), seeded=admm_from_rank_seeded_weights(),
                  streams=resumed_with_rank_streams(Path(root) / "streams"),
                  over_reported=weights_after_an_over_reported_epoch(),
                  stale_view_epoch=epoch_resumed_from_a_stale_view(Path(root)),
                  bad_input=what_every_rank_says_of_bad_input())
    torch.save(result, Path(root) / f"result_rank{local_rank}.pt")
    dist.barrier()  # every rank is past its last collective
    # Leave without tearing gloo down. Once (one clean-clone run of many) rank 1 died of SIGABRT,
    # "terminate called without an active exception" (a C++ thread destroyed unjoined, as happens in
    # teardown), which failed the whole module; where in the worker it died was not recorded.
    os._exit(0)


def run_two_processes(root: Path) -> list[dict]:
    # As torchrun's agent does, this process hosts the rendezvous store, on a port the OS picks and that
    # stays bound: a port merely found free could be taken before rank 0 binds it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    context = mp.spawn(worker, args=(store.port, str(root)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {WORLD} training processes did not finish within {SPAWN_DEADLINE_S:.0f} s")
    del store
    return [torch.load(root / f"result_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    """(single-process result, per-rank results of the 2-process run, the 2-process run folder)."""
    ddp_root = tmp_path_factory.mktemp("ddp")
    ranks = run_two_processes(ddp_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = prune_and_retrain(tmp_path_factory.mktemp("single"))
        single["over_reported"] = weights_after_an_over_reported_epoch()
    finally:
        torch.set_num_threads(threads)
    return single, ranks, ddp_root


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    single, ranks, _ = runs
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)
    assert all(r["uses_ddp"] and r["model_is_bare"] for r in ranks) and not single["uses_ddp"]
    assert len(single["updates"]) == ADMM_EPOCHS * SAMPLES // GLOBAL_BATCH // STEPS_PER_UPDATE
    for result in ranks:
        assert result["masks"].keys() == single["masks"].keys()
        for name, mask in single["masks"].items():
            assert torch.equal(result["masks"][name], mask), name
        for name, weight in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], weight, rtol=0, atol=1e-5)
        # the logged loss is the mean over the ranks, i.e. the single-process batch loss
        torch.testing.assert_close(result["admm_losses"], single["admm_losses"], rtol=0, atol=1e-5)
        torch.testing.assert_close(result["retrain_losses"], single["retrain_losses"], rtol=0, atol=1e-5)
        assert result["sampler_epoch"] == ADMM_EPOCHS - 1  # the trainer called set_epoch every epoch
    kept = sum(int(mask.sum()) for mask in single["masks"].values())
    total = sum(mask.numel() for mask in single["masks"].values())
    assert kept == round((1 - SPARSITY) * total)


def test_ranks_hold_identical_weights_and_admm_state(runs):
    _, (first, second), _ = runs
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    for z_first, z_second, u_first, u_second in zip(first["Z"], second["Z"], first["U"], second["U"]):
        assert torch.equal(z_first, z_second) and torch.equal(u_first, u_second)
    assert [u["primal_residual"] for u in first["updates"]] == [u["primal_residual"] for u in second["updates"]]


def test_admm_takes_rank_zero_state_even_from_different_weights(runs):
    _, (first, second), _ = runs
    assert not torch.equal(first["seeded"]["weight"], second["seeded"]["weight"])
    assert torch.equal(first["seeded"]["Z"], second["seeded"]["Z"])
    assert torch.equal(first["seeded"]["support"], second["seeded"]["support"])
    assert torch.equal(second["seeded"]["Z"], first["seeded"]["weight"] * first["seeded"]["support"])


def test_only_rank_zero_writes_and_every_rank_resumes_from_it(runs):
    _, _, root = runs
    assert not (root / "rank1").exists()
    assert sorted(p.name for p in (root / "rank0" / "admm").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt",
                                                                           "history.csv"]
    assert sorted(p.name for p in (root / "rank0" / "retrain").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt",
                                                                              "history.csv"]


def test_every_rank_resumes_from_the_checkpoint_rank_zero_finds(runs):
    """Found by a review: each rank looked for the newest checkpoint itself, so a rank whose view of
    the folder lagged resumed elsewhere, and the ranks' collectives then mixed."""
    _, ranks, _ = runs
    assert [result["stale_view_epoch"] for result in ranks] == [2, 2]


def test_bad_input_one_rank_finds_stops_every_rank_with_one_message(runs):
    """Found by a torchrun review: every rank printed its own copy of a bad --data or cfg error."""
    _, ranks, _ = runs
    expected = ["data.yaml: split 'val' has no images (on rank 1)", "weights.weights: not found"]
    assert [result["bad_input"] for result in ranks] == [expected, expected]


def test_each_rank_resumes_its_own_random_streams(runs):
    """Rank 0's checkpoint holds every rank's streams: with rank 1 given rank 0's (as before), its
    dropout masks differed after the resume, and so did the weights."""
    _, ranks, ddp_root = runs
    for rank in ranks:
        straight, resumed = rank["streams"]["straight"], rank["streams"]["resumed"]
        assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    saved = torch.load(ddp_root / "streams" / "resumed" / "rank0" / "epoch_0002.pt", weights_only=True)
    first, second = saved["rng_per_rank"]
    assert torch.equal(first["torch"], saved["rng"]["torch"]) and not torch.equal(first["torch"], second["torch"])


def test_a_last_step_the_length_did_not_announce_is_still_averaged_over_the_ranks(runs):
    single, ranks, _ = runs
    first, second = (rank["over_reported"] for rank in ranks)
    assert first["steps"] == second["steps"] == single["over_reported"]["steps"] == 3  # 8 batches: 3 + 3 + 2
    for key, value in single["over_reported"]["weights"].items():
        assert torch.equal(first["weights"][key], second["weights"][key]), key
        torch.testing.assert_close(first["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(runs):
    _, ranks, _ = runs
    assert [r["nan_stops"] for r in ranks] == [True, True]


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    sampler = distributed.distributed_sampler(list(range(10)), shuffle=False, seed=0)
    assert list(sampler) == list(range(10))


@pytest.mark.parametrize("env, message", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..WORLD_SIZE-1"),
])
def test_init_from_env_rejects_bad_torchrun_variables(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.init_from_env("cpu")
    assert not dist.is_initialized()


def test_init_from_env_rejects_one_fixed_gpu_for_several_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        distributed.init_from_env("cuda:1")
    assert not dist.is_initialized()


ORPHAN = """
import subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", '''
import time
from yolo_admm.cli import stop_when_orphaned
stop_when_orphaned("1", interval_s=0.05)
print("watching", flush=True)
time.sleep(60)
'''], stdout=subprocess.PIPE, text=True)
assert rank.stdout.readline() == "watching\\n"
print(rank.pid, flush=True)
sys.stdin.read()
"""


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_rank_whose_torchrun_agent_was_killed_stops(tmp_path):
    """Found by a fuzz: after a SIGKILL to torchrun's agent its ranks waited for it for up to the
    process group's timeout (3 hours), alive and holding the run folder."""
    import signal
    import subprocess
    import sys

    agent = subprocess.Popen([sys.executable, "-c", ORPHAN], cwd=Path(__file__).resolve().parents[1],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rank_pid = int(agent.stdout.readline())
    assert not _ended(rank_pid)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 10
    while not _ended(rank_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(rank_pid)
