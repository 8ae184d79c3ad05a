"""engine: resume equals an uninterrupted run, atomic checkpoints, EMA, non-finite loss, hook order."""
from __future__ import annotations

import csv
import io
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine
from engine import checkpoint as checkpoint_module
from engine import ModelEMA, NonFiniteLossError, Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def tiny_loader(batch_size: int = 8, samples: int = 48) -> DataLoader:
    generator = torch.Generator().manual_seed(123)
    inputs = torch.randn(samples, 6, generator=generator)
    labels = torch.randint(0, 3, (samples,), generator=generator)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=True)


def cross_entropy(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    inputs, labels = batch
    loss = nn.functional.cross_entropy(model(inputs), labels)
    return loss, {"double": 2.0 * float(loss.detach())}


class StepCounter:
    """A stateful callback: counts optimizer steps and sums a running value into its state."""

    def __init__(self) -> None:
        self.steps = 0
        self.total = torch.zeros(())

    def after_step(self, trainer) -> None:
        self.steps += 1
        self.total += trainer.model[0].weight.detach().sum()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "total": self.total.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.total = state["steps"], state["total"].clone()


class CrashInEpoch:
    """Simulates a kill: raises in the middle of epoch `epoch` (0-based)."""

    def __init__(self, epoch: int, after_steps: int = 2) -> None:
        self.epoch, self.after_steps, self.seen = epoch, after_steps, 0

    def after_step(self, trainer) -> None:
        if trainer.epoch == self.epoch:
            self.seen += 1
            if self.seen == self.after_steps:
                raise KeyboardInterrupt("simulated kill")


def make_trainer(tmp_path, callbacks, resume=None, **config) -> Trainer:
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    settings = dict(epochs=5, device="cpu", ema=True, ema_decay=0.9, ema_tau=3.0, checkpoint_dir=tmp_path / "ckpt",
                    resume=resume, progress=False, log_csv=tmp_path / "log.csv")
    settings.update(config)
    return Trainer(model, optimizer, cross_entropy, tiny_loader(), TrainConfig(**settings), callbacks=callbacks,
                   scheduler=scheduler, evaluate=lambda m: {"w": float(m[0].weight.sum())})


def test_a_resume_applies_the_checkpoints_masks_not_the_callbacks_own(tmp_path):
    """Found by a review: `on_train_start` ran before the callback states were loaded, so a
    MaskCallback built with other masks (say, of a model pruned again, unseeded) zeroed kept weights
    and their momentum before the checkpoint's masks replaced its own."""
    import pruning

    def masked_trainer(folder, crash_epoch, resume=None, other_masks=False):
        trainer = make_trainer(folder, [], resume=resume, epochs=4)
        masks = pruning.magnitude_prune(trainer.model, 0.6)
        if other_masks:
            masks = pruning.Masks({name: ~mask for name, mask in masks.items()})
        trainer.callbacks += [pruning.MaskCallback(masks), CrashInEpoch(crash_epoch)]
        return trainer

    reference = masked_trainer(tmp_path / "a", crash_epoch=-1)
    reference.fit()
    with pytest.raises(KeyboardInterrupt):
        masked_trainer(tmp_path / "b", crash_epoch=2).fit()
    resumed = masked_trainer(tmp_path / "b", crash_epoch=-1, resume=tmp_path / "b" / "ckpt", other_masks=True)
    resumed.fit()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in reference.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key


def test_a_resume_into_a_folder_with_later_checkpoints_is_refused(tmp_path):
    """Found by a review: resuming epoch 3 of one run into a folder holding epochs 4 and 5 of another
    wrote epoch_0004.pt, epoch_0005.pt over theirs, or with epochs 8, 9 there deleted its own at once
    (the newest are kept), and a later resume continued the other run."""
    make_trainer(tmp_path / "a", [], epochs=3).fit()
    make_trainer(tmp_path / "c", [], epochs=5).fit()
    before = sorted(p.name for p in (tmp_path / "c" / "ckpt").iterdir())
    resumed = make_trainer(tmp_path / "c", [], resume=tmp_path / "a" / "ckpt" / "epoch_0003.pt", epochs=6)
    with pytest.raises(ValueError, match=r"ckpt: holds checkpoints past the resumed epoch 3 \(newest: "
                                         r"epoch_0005.pt\)"):
        resumed.fit()
    assert sorted(p.name for p in (tmp_path / "c" / "ckpt").iterdir()) == before
    make_trainer(tmp_path / "c", [], resume=tmp_path / "c" / "ckpt", epochs=6).fit()    # its own newest: resumes


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    reference = make_trainer(tmp_path / "a", [StepCounter()])
    reference.fit()

    killed = make_trainer(tmp_path / "b", [StepCounter(), CrashInEpoch(epoch=3)])
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert engine.find_latest_checkpoint(tmp_path / "b" / "ckpt").name == "epoch_0003.pt"

    resumed = make_trainer(tmp_path / "b", [StepCounter(), CrashInEpoch(epoch=-1)], resume=tmp_path / "b" / "ckpt")
    torch.rand(1000)  # move the RNG on: its state, like the weights, must come from the checkpoint
    resumed.fit()

    assert resumed.epoch == reference.epoch == 5 and resumed.step == reference.step == 30
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in reference.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key
    assert resumed.callbacks[0].steps == reference.callbacks[0].steps == 30
    assert torch.equal(resumed.callbacks[0].total, reference.callbacks[0].total)
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
    assert [row["eval/w"] for row in resumed.history] == [row["eval/w"] for row in reference.history]
    with open(tmp_path / "b" / "log.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5]


def test_resume_rejects_different_callbacks(tmp_path):
    make_trainer(tmp_path, [StepCounter()], epochs=1).fit()
    trainer = make_trainer(tmp_path, [], resume=tmp_path / "ckpt", epochs=2)
    with pytest.raises(ValueError, match="callback states"):
        trainer.fit()


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    good = {"epoch": 1, "step": 5, "model": {"w": torch.arange(4.0)}}
    path = engine.save_checkpoint(good, tmp_path)
    assert path.name == "epoch_0001.pt"

    def crash_midway(obj, handle):
        handle.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint({**good, "model": {"w": torch.zeros(4)}}, tmp_path)
    with pytest.raises(OSError):
        engine.save_checkpoint({**good, "epoch": 2}, tmp_path)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt"]
    assert torch.equal(engine.load_checkpoint(path)["model"]["w"], torch.arange(4.0))
    assert engine.load_checkpoint(tmp_path)["epoch"] == 1


class InterruptedStream(io.RawIOBase):
    """A file whose writes stop with Ctrl-C once `limit` bytes are written."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.written = stream, limit, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise KeyboardInterrupt
        return self.stream.write(data)


def test_ctrl_c_in_the_middle_of_a_checkpoint_stays_an_interrupt(tmp_path):
    """torch.save closes the archive it was writing when interrupted, which fails with a
    RuntimeError ("unexpected pos"); the run used to end with that error (exit 1), not as Ctrl-C."""
    path = engine.atomic_torch_save({"w": torch.arange(4.0)}, tmp_path / "last.pt")
    state = {"w": torch.zeros(100_000)}
    with pytest.raises(KeyboardInterrupt) as raised:
        engine.atomic_write(path, lambda stream: torch.save(state, InterruptedStream(stream, 50_000)))
    assert isinstance(raised.value.__context__, RuntimeError)           # torch's error, kept as the context
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]          # no temporary file left
    assert torch.equal(torch.load(path)["w"], torch.arange(4.0))        # the previous file is whole


def test_a_failed_write_while_an_interrupt_is_handled_stays_the_failure(tmp_path):
    """Found by a review: the interrupt the caller was handling (a save in `except KeyboardInterrupt`)
    replaced the write's own error."""
    def disk_full(stream):
        raise OSError(28, "No space left on device")

    raised = None
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        try:
            engine.atomic_write(tmp_path / "state.pt", disk_full)
        except BaseException as error:                                  # a KeyboardInterrupt too
            raised = error
    assert isinstance(raised, OSError) and "No space left on device" in str(raised)
    assert list(tmp_path.iterdir()) == []


def test_find_latest_and_load_errors(tmp_path):
    assert engine.find_latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        engine.save_checkpoint({"epoch": epoch, "step": 0, "model": {}}, tmp_path)
    (tmp_path / ".yolo-admm-write.epoch_0011.pt.abc.tmp").write_bytes(b"junk")
    assert engine.find_latest_checkpoint(tmp_path).name == "epoch_0010.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint file not found"):
        engine.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no checkpoint"):
        engine.load_checkpoint(tmp_path / "empty")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        engine.load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="expected a trainer checkpoint"):
        engine.load_checkpoint(tmp_path / "foreign.pt")


def test_ema_average_ramp_and_buffers():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.5, tau=0.0)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(7.0)
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 2.0))  # 0.5 * 1 + 0.5 * 3
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 7.0))  # buffers copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())

    ramped = ModelEMA(model, decay=0.9, tau=10.0)
    assert ramped.current_decay() == pytest.approx(0.9 * (1 - math.exp(-1 / 10)))
    ramped.updates = 10_000
    assert ramped.current_decay() == pytest.approx(0.9)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_a_checkpoint_without_an_average_starts_one_from_its_weights(tmp_path):
    """Found by a review: resuming with EMA from a checkpoint of a run without it left the average
    at the weights the model was built with, and a finished phase then ended there."""
    make_trainer(tmp_path, [], ema=False, epochs=2).fit()
    resumed = make_trainer(tmp_path, [], resume=tmp_path / "ckpt", epochs=2)
    with pytest.warns(UserWarning, match=r"epoch_0002.pt: the checkpoint holds no weight average \(EMA\); the "
                                         r"average starts from its weights"):
        resumed.fit()
    trained = engine.load_checkpoint(tmp_path / "ckpt")["model"]
    assert all(torch.equal(resumed.ema.module.state_dict()[name], trained[name]) for name in trained)
    assert resumed.ema.updates == resumed.step == 12


def test_trainer_evaluates_the_ema_copy(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, [], epochs=1, checkpoint_dir=None)
    trainer.evaluate = lambda m: seen.append(m) or {}
    trainer.fit()
    assert seen == [trainer.ema.module] and trainer.ema.updates == trainer.step == 6


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_turning_nan(model, batch):
        calls["n"] += 1
        loss, logs = cross_entropy(model, batch)
        return (loss * float("nan") if calls["n"] > 14 else loss), logs  # 6 batches per epoch: NaN in epoch 3

    trainer = make_trainer(tmp_path, [])
    trainer.loss_fn = loss_turning_nan
    with pytest.raises(NonFiniteLossError, match=r"epoch 3.*epoch_0002\.pt") as info:
        trainer.fit()
    assert info.value.checkpoint.name == "epoch_0002.pt"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    saved = engine.load_checkpoint(info.value.checkpoint)
    assert saved["epoch"] == 2 and saved["step"] == 12
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


class Recorder:
    """Records hook calls and what the gradients look like when `after_backward` runs."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.grad_norms: list[float] = []
        self.grad_norms_before_step: list[float] = []

    def on_train_start(self, trainer) -> None:
        self.calls.append("on_train_start")

    def after_backward(self, trainer) -> None:
        self.calls.append("after_backward")
        self.grad_norms.append(float(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm()))

    def before_step(self, trainer) -> None:
        self.calls.append("before_step")
        self.grad_norms_before_step.append(float(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm()))

    def after_step(self, trainer) -> None:
        self.calls.append("after_step")

    def end_epoch(self, trainer) -> None:
        self.calls.append(f"end_epoch {trainer.epoch}")


def test_hooks_are_called_in_order_once_per_optimizer_step(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [recorder], epochs=2, accumulate=2, clip_grad_norm=1e-6, ema=False,
                           checkpoint_dir=None)
    trainer.fit()
    step = ["after_backward", "before_step", "after_step"]
    assert recorder.calls == ["on_train_start", *step * 3, "end_epoch 0", *step * 3, "end_epoch 1"]
    assert trainer.step == 6
    assert min(recorder.grad_norms) > 1e-6  # after_backward sees the gradients before clipping
    assert max(recorder.grad_norms_before_step) == pytest.approx(1e-6, rel=1e-3)   # before_step after it


def test_the_admm_penalty_is_not_clipped(tmp_path):
    """With clipping on, the step still moves each weight by lr * rho * (W - Z + U) on top of the
    clipped loss gradient: here the loss gradient is zero, so the step is exactly the penalty's."""
    import pruning

    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    admm = pruning.ADMM(model, pruning.ADMMConfig(sparsity=0.5, rho=1.0))
    penalty = model.weight.detach() - admm.Z[0] + admm.U[0]
    assert penalty.norm() > 0.1
    before = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    zero_loss = lambda module, batch: ((module(batch[0]) * 0.0).sum(), {})
    config = TrainConfig(epochs=1, device="cpu", clip_grad_norm=1e-3, progress=False)
    loader = DataLoader(TensorDataset(torch.randn(4, 6)), batch_size=4)
    Trainer(model, optimizer, zero_loss, loader, config, callbacks=[pruning.ADMMCallback(admm, 1000)]).fit()
    torch.testing.assert_close(before - model.weight.detach(), 0.1 * penalty)


class _BatchesWithoutLength(torch.utils.data.IterableDataset):
    """The batches of a TensorDataset, from an iterable that has no length (as a stream would)."""

    def __init__(self, data: TensorDataset, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        return iter(DataLoader(self.data, batch_size=self.batch_size))


@pytest.mark.parametrize("lengthless", [False, True])   # True: the last step cannot be foreseen
@pytest.mark.parametrize("samples", [32, 36])   # 36: the epoch's last step averages one batch of 4, not two
def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, samples, lengthless):
    def run(batch_size: int, accumulate: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        data = TensorDataset(torch.randn(samples, 6), torch.randint(0, 3, (samples,)))
        loader = DataLoader(data, batch_size=batch_size)
        if lengthless and accumulate > 1:
            loader = DataLoader(_BatchesWithoutLength(data, batch_size), batch_size=None)
        config = TrainConfig(epochs=2, device="cpu", accumulate=accumulate, progress=False)
        Trainer(model, optimizer, cross_entropy, loader, config).fit()
        return model.weight.detach()

    assert torch.allclose(run(8, 1), run(4, 2), atol=1e-6)


class _BatchesOfAReportedLength:
    """The batches of a TensorDataset from an iterable whose `len` says `length` (right or wrong)."""

    def __init__(self, data: TensorDataset, batch_size: int, length: int | None):
        self.data, self.batch_size, self.length = data, batch_size, length

    def __iter__(self):
        return iter(DataLoader(self.data, batch_size=self.batch_size))

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("no length")
        return self.length


@pytest.mark.parametrize("reported", [12, 9, 7])      # the loader gives 10 batches
def test_gradient_accumulation_does_not_trust_a_wrong_length(reported):
    """Found by a review: with a length that was too short, the steps near the end mixed divisors
    (a batch weighed 4x its neighbour); every step must still average its own batches."""
    def run(length: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
        config = TrainConfig(epochs=1, device="cpu", accumulate=4, progress=False)
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), cross_entropy,
                _BatchesOfAReportedLength(data, 4, length), config).fit()
        return model.weight.detach()

    torch.testing.assert_close(run(reported), run(None), atol=1e-6, rtol=0)
    torch.testing.assert_close(run(10), run(None), atol=1e-6, rtol=0)


def test_a_step_gradscaler_skips_still_advances_the_schedule_without_a_warning(tmp_path):
    """The first batch's loss is so large that its scaled gradients overflow: GradScaler skips that
    optimizer step (the case AMP meets on CUDA; torch's GradScaler does the same on CPU). The LR
    schedule still follows the batches, and torch's "scheduler before optimizer" warning, which is
    about calls out of order, does not appear."""
    def overflow_first_batch(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        loss, logs = cross_entropy(model, batch)
        return (loss * 1e35 if trainer.step == 0 else loss), logs

    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    trainer = Trainer(model, optimizer, overflow_first_batch, tiny_loader(), scheduler=scheduler,
                      config=TrainConfig(epochs=1, device="cpu", scheduler_interval="step", progress=False))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with warnings.catch_warnings(record=True) as caught:     # the filters in force, every warning recorded
        trainer.fit()
    assert trainer.scaler.get_scale() == 2.0 ** 15  # one step skipped, then none
    assert trainer.step == scheduler.last_epoch == 6
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 7)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_a_warning_repeated_at_every_step_is_shown_once(tmp_path):
    """Python shows a repeated warning once per place (the "default" action); stepping the scheduler
    must not reset that record at every step."""
    def warns(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        warnings.warn("the same warning at every batch", UserWarning)
        return cross_entropy(model, batch)

    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(model, optimizer, warns, tiny_loader(), scheduler=scheduler,
                      config=TrainConfig(epochs=1, device="cpu", scheduler_interval="step", progress=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        trainer.fit()
    assert trainer.step == 6
    assert [str(w.message) for w in caught] == ["the same warning at every batch"]


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(accumulate=0)
    with pytest.raises(ValueError, match="scheduler_interval"):
        TrainConfig(scheduler_interval="batch")
    with pytest.raises(ValueError, match="save_every"):
        TrainConfig(save_every=0)
    with pytest.raises(ValueError, match="'gpu0'"):
        engine.resolve_device("gpu0")


def test_a_new_run_refuses_a_folder_of_earlier_checkpoints_and_resumes_from_it(tmp_path):
    """Found by a review: a new 2-epoch run beside an old run's epoch_0003/0004 deleted its own
    checkpoints (the newest by epoch are kept), and a resume then continued the old run."""
    make_trainer(tmp_path, [], epochs=4, keep_last=2).fit()
    with pytest.raises(ValueError, match=r"ckpt: holds the checkpoints of an earlier run \(newest: epoch_0004.pt\)"):
        make_trainer(tmp_path, [], epochs=2, keep_last=2).fit()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    resumed = make_trainer(tmp_path, [], epochs=5, resume=tmp_path / "ckpt")
    resumed.fit()
    assert resumed.epoch == 5


def test_a_resume_asked_for_fewer_epochs_than_it_has_says_it_trains_nothing(tmp_path):
    """Found by a review: a finished 3-epoch detect train run again with --epochs 1 said only
    "done: 3 epochs"."""
    make_trainer(tmp_path, [], epochs=3).fit()
    again = make_trainer(tmp_path, [], epochs=1, resume=tmp_path / "ckpt")
    with pytest.warns(UserWarning, match=r"epoch_0003.pt: the run is at epoch 3, past the 1 epochs asked for: "
                                         r"nothing is trained"):
        assert len(again.fit()) == 3 and again.epoch == 3


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    from engine.checkpoint import remove_older_checkpoints

    for epoch in (1, 2, 3, 10):
        (tmp_path / f"epoch_{epoch:04d}.pt").write_bytes(b"x")
    (tmp_path / "history.csv").write_text("keep me")
    (tmp_path / ".yolo-admm-write.epoch_0004.pt.x7_kq2mz.tmp").write_bytes(b"cut short")   # a save a kill cut
    (tmp_path / ".notes.20241127.tmp").write_text("the user's")    # found by a review: it was removed too
    removed = remove_older_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [".yolo-admm-write.epoch_0004.pt.x7_kq2mz.tmp", "epoch_0001.pt",
                                               "epoch_0002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.20241127.tmp", "epoch_0003.pt", "epoch_0010.pt",
                                                          "history.csv"]


def test_an_unreadable_newest_checkpoint_says_which_to_resume_from(tmp_path):
    from engine import load_checkpoint

    torch.save({"epoch": 2, "step": 4, "model": {}}, tmp_path / "epoch_0002.pt")
    (tmp_path / "epoch_0003.pt").write_bytes(b"cut short")
    with pytest.raises(ValueError, match=r"epoch_0003.pt: not a readable checkpoint.*delete it to resume from "
                                         r"epoch_0002.pt"):
        load_checkpoint(tmp_path)
    (tmp_path / "epoch_0004.pt").write_bytes(b"x")            # a newer one is no way back from epoch 3
    (tmp_path / "epoch_0001.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"delete it to resume from epoch_0002.pt$"):
        load_checkpoint(tmp_path / "epoch_0003.pt")
    # found by a review: torch's several sentences of advice were cut mid-sentence at 200 characters
    whole = (tmp_path / "epoch_0002.pt").read_bytes()
    (tmp_path / "epoch_0003.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "epoch_0003.pt")
    message = str(error.value)
    assert "epoch_0003.pt: not a readable checkpoint, damaged or cut short? (RuntimeError: " in message
    assert message.endswith(".); delete it to resume from epoch_0002.pt") and "likelihood" not in message


def test_a_weights_only_refusal_is_told_by_what_it_refused(tmp_path):
    """torch's weights-only refusal opens with two sentences of advice; its first sentence alone
    ("Weights only load failed.") did not say why. The detail is the sentence naming the cause."""
    import pickle

    import numpy as np

    torch.save({"rho": np.float64(0.5)}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(tmp_path / "state.pt", weights_only=True)
    detail = engine.unreadable_detail(error.value)
    assert detail.startswith("UnpicklingError: Unsupported global: GLOBAL numpy") and detail.endswith(
        "was not an allowed global by default."), detail
    assert engine.unreadable_detail(EOFError("Ran out of input")) == "EOFError: Ran out of input"


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    import json
    import os

    from engine import atomic_write_bytes, atomic_write_json

    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"map50": 0.5})
    assert json.loads(target.read_text()) == {"map50": 0.5}
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]  # no temporary file left


def test_atomic_writes_refuse_what_is_not_a_file_and_leave_a_links_target_alone(tmp_path):
    """Found by reviews: `--json-out /dev/null` replaced the device with a JSON file; and writing
    through a link in an export folder overwrote the user's weights it pointed at."""
    from engine import atomic_write_bytes, output_file

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "best.weights").write_bytes(b"the user's weights")
    (tmp_path / "model.weights").symlink_to(tmp_path / "keep" / "best.weights")
    atomic_write_bytes(tmp_path / "model.weights", b"exported")
    assert not (tmp_path / "model.weights").is_symlink() and (tmp_path / "model.weights").read_bytes() == b"exported"
    assert (tmp_path / "keep" / "best.weights").read_bytes() == b"the user's weights"
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "stdout").symlink_to(tmp_path / "pipe")          # as /dev/stdout links to a pipe or a terminal
    for write in (lambda path: atomic_write_bytes(path, b"x"), lambda path: output_file(path, "--json-out")):
        for name in ("pipe", "stdout"):
            with pytest.raises(ValueError, match=f"{name}: expected a file to write, found a pipe"):
                write(tmp_path / name)
        with pytest.raises(ValueError, match="expected a file to write, found a folder"):
            write(tmp_path / "keep")
    assert (tmp_path / "pipe").exists() and not (tmp_path / "pipe").is_file() and (tmp_path / "stdout").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "model.weights", "pipe", "stdout"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_is_refused_before_any_work():
    """Found by a review: `--json-out /proc/res.json` passed the write-permission check, and the
    result, after all the training, could not be written."""
    from engine import output_file

    with pytest.raises(ValueError, match=r"--json-out /proc/res.json: its folder /proc: expected a folder that "
                                         r"takes new files, found one that does not"):
        output_file("/proc/res.json", "--json-out")


def test_changed_settings_lists_what_a_resume_would_change():
    before = {"lr": 0.01, "epochs": 5, "prune": {"sparsity": 0.9, "method": "admm-global"}, "gone": 1}
    now = {"lr": 0.02, "epochs": 6, "prune": {"sparsity": 0.8, "method": "admm-global"}, "new": True}
    assert engine.changed_settings(before, now, ignore={"epochs"}) == [
        ("lr", 0.01, 0.02), ("new", None, True), ("prune.sparsity", 0.9, 0.8)]
    assert engine.changed_settings(now, now) == []


def test_describe_changes_says_which_settings_were_not_given():
    changes = [("multi_scale", False, None), ("lr", 0.01, 0.02), ("new_flag", None, "x")]
    assert engine.describe_changes(changes) == ("multi_scale: False -> not given; lr: 0.01 -> 0.02; "
                                                "new_flag: not given -> 'x'")
    assert engine.describe_changes(changes[:1], as_flags=True) == "--multi-scale False -> not given"


def test_a_callback_state_that_does_not_fit_names_the_checkpoint(tmp_path):
    def refuse(state: dict) -> None:
        raise ValueError("ADMM state has sparsity=0.9, this run has 0.8")

    make_trainer(tmp_path, [StepCounter()], epochs=1).fit()
    other_run = StepCounter()
    other_run.load_state_dict = refuse
    with pytest.raises(ValueError, match=r"ckpt/epoch_0001.pt: ADMM state has sparsity=0.9"):
        make_trainer(tmp_path, [other_run], epochs=2, resume=tmp_path / "ckpt").fit()
