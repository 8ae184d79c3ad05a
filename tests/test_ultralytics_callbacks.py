"""UltralyticsADMM inside Ultralytics' own trainer (a YOLOv8n built from its yaml, CPU, generated
shapes): the global budget is met exactly, masks hold through retraining into best.pt and last.pt,
frozen weights are left alone, and a killed run resumes in either phase."""
from __future__ import annotations

import json
import os

import pytest
import torch

from data.synthetic import make_shapes_dataset
from pruning import ADMMConfig, UltralyticsADMM, kept_count
from pruning.ultralytics_callbacks import PERIODIC_STATE_FILE, PLOT_FILE, PREVIOUS_STATE_FILE, REPORT_FILE, STATE_FILE


@pytest.fixture(scope="module")
def yolo_class(tmp_path_factory):
    """``ultralytics.YOLO``, imported offline with its settings in a temporary folder."""
    patch = pytest.MonkeyPatch()
    patch.setenv("YOLO_OFFLINE", "1")
    patch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics_config")))
    ultralytics = pytest.importorskip("ultralytics")
    yield ultralytics.YOLO
    patch.undo()


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", n_train=32, n_val=16, img_size=96)


class Interrupt(Exception):
    """Stands for a kill of the training process."""


def train(yolo_class, data_yaml, project, pruner, epochs, interrupt_after_epoch=None, model="yolov8n.yaml",
          interrupt_event="on_fit_epoch_end", after_pruner=None, **extra):
    """Train ``model`` (a YOLO, or the yaml / checkpoint to build one from) with ``pruner`` registered;
    ``interrupt_after_epoch``: raise Interrupt at ``interrupt_event`` of that epoch (on_fit_epoch_end:
    after last.pt is written; on_train_epoch_end: before it, just after the pruner's own epoch end)."""
    model = model if isinstance(model, yolo_class) else yolo_class(str(model))
    pruner.register(model)
    for event, callback in (after_pruner or {}).items():     # registered after the pruner's, as loggers are
        model.add_callback(event, callback)
    if interrupt_after_epoch is not None:
        def interrupt(trainer):
            if trainer.epoch == interrupt_after_epoch:
                raise Interrupt
        model.add_callback(interrupt_event, interrupt)
    # nbs=8 with batch=8 and no warmup: every batch is an optimizer step at the full learning rate
    settings = dict(imgsz=96, batch=8, nbs=8, warmup_epochs=0, workers=0, device="cpu", amp=False, plots=False,
                    verbose=False, seed=0, project=str(project), name="run", exist_ok=True)
    model.train(data=str(data_yaml), epochs=epochs, **{**settings, **extra})
    return model


def make_pruner(admm_iters=2):
    return UltralyticsADMM(ADMMConfig(sparsity=0.8, rho=1e-2, rho_multiplier=2.0), admm_iters=admm_iters)


def ema_weights(checkpoint_path):
    """The weights a checkpoint holds: its EMA (during training) or, once Ultralytics stripped it at the
    end, the model it made of that EMA."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    return dict((checkpoint["ema"] or checkpoint["model"]).float().named_parameters())


def assert_zero_outside(masks, named_params):
    for name, mask in masks.items():
        assert torch.count_nonzero(named_params[name].detach()[~mask]) == 0, name


def assert_optimizer_state_zero_outside(masks, optimizer, named_params):
    """Momentum buffers and Adam moments hold nothing at pruned positions."""
    for name, mask in masks.items():
        for value in optimizer.state[named_params[name]].values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert torch.count_nonzero(value[~mask]) == 0, name


def test_global_admm_then_masked_retraining_in_ultralytics_trainer(yolo_class, data_yaml, tmp_path):
    pruner = make_pruner()
    model = yolo_class("yolov8n.yaml")

    def dense_epoch_scored_high(trainer):    # so best.pt stays dense unless the cut restarts the best fitness
        if trainer.epoch == 0:
            trainer.best_fitness = 1.0
    model.add_callback("on_fit_epoch_end", dense_epoch_scored_high)
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=3, model=model)
    trainer = model.trainer
    params = dict(trainer.model.named_parameters())
    prunable = {name: p for name, p in params.items() if name.endswith(".weight") and p.dim() == 4 and p.requires_grad}
    k = kept_count(sum(p.numel() for p in prunable.values()), 0.8)

    # Z-steps after epochs 1 and 2 with rho doubling, then one cut to exactly k weights over all layers
    assert [(h["epoch"], h["rho"], h["kept"]) for h in pruner.history] == [(1, 0.01, k), (2, 0.02, k)]
    assert set(pruner.masks) == set(prunable)
    assert sum(int(mask.sum()) for mask in pruner.masks.state_dict().values()) == k
    kept_fractions = [pruner.masks[name].float().mean().item() for name in prunable]
    assert max(kept_fractions) > 2 * min(kept_fractions)            # one global budget, not one ratio per layer

    # the frozen DFL convolution is not pruned and still holds its fixed 0..15 weights
    assert "model.22.dfl.conv.weight" not in pruner.masks
    assert torch.equal(params["model.22.dfl.conv.weight"].flatten(), torch.arange(16, dtype=torch.float32))

    # the model, its optimizer state and the saved EMA weights (last.pt and best.pt) are zero where pruned
    assert_zero_outside(pruner.masks, params)
    assert_optimizer_state_zero_outside(pruner.masks, trainer.optimizer, params)
    for checkpoint in ("last.pt", "best.pt"):
        assert_zero_outside(pruner.masks, ema_weights(trainer.wdir / checkpoint))

    report = json.loads((trainer.save_dir / REPORT_FILE).read_text())
    assert report["mask"]["kept"] == k and report["mask"]["params"] == sum(p.numel() for p in prunable.values())
    assert 0.9 * k < report["nonzero_in_saved_weights"]["kept"] <= k
    assert len(report["layers"]) == len(prunable) and len(report["admm_history"]) == 2
    assert (trainer.save_dir / PLOT_FILE).stat().st_size > 0


@pytest.mark.parametrize("interrupt_after_epoch, epochs, interrupt_event", [
    (0, 3, "on_fit_epoch_end"), (2, 4, "on_fit_epoch_end"), (1, 3, "on_train_epoch_end"),
], ids=["in-admm", "in-retraining", "at-the-cut-before-last.pt"])
def test_killed_run_resumes_where_it_stopped(yolo_class, data_yaml, tmp_path, interrupt_after_epoch, epochs,
                                             interrupt_event):
    first = make_pruner()
    with pytest.raises(Interrupt):
        train(yolo_class, data_yaml, tmp_path, first, epochs=epochs, interrupt_after_epoch=interrupt_after_epoch,
              interrupt_event=interrupt_event)
    weights = tmp_path / "run" / "weights"
    saved = torch.load(weights / STATE_FILE, map_location="cpu", weights_only=True)
    previous = torch.load(weights / PREVIOUS_STATE_FILE, map_location="cpu", weights_only=True) \
        if interrupt_after_epoch > 0 else None
    assert saved["epoch"] == interrupt_after_epoch

    resumed = make_pruner()
    model = train(yolo_class, data_yaml, tmp_path, resumed, epochs=epochs, model=weights / "last.pt", resume=True)
    if interrupt_event == "on_train_epoch_end":    # killed after the cut, before last.pt: the cut is redone
        assert saved["masks"] is not None and previous["admm"]["iteration"] == 1
        assert resumed.history[0] == previous["history"][0]
        assert [(h["iteration"], h["rho"]) for h in resumed.history] == [(1, 0.01), (2, 0.02)]
    elif saved["masks"] is None:                   # killed during ADMM: the Z-steps go on where they were
        assert saved["admm"]["iteration"] == 1 and resumed.history[0] == saved["history"][0]
        assert [(h["iteration"], h["rho"]) for h in resumed.history] == [(1, 0.01), (2, 0.02)]
    else:                                          # killed during retraining: the same masks, kept
        assert saved["admm"] is None
        assert all(torch.equal(resumed.masks[name], mask) for name, mask in saved["masks"].items())
    assert_zero_outside(resumed.masks, dict(model.trainer.model.named_parameters()))
    assert_zero_outside(resumed.masks, ema_weights(weights / "best.pt"))


def test_resume_without_the_admm_state_names_the_missing_file(yolo_class, data_yaml, tmp_path):
    with pytest.raises(Interrupt):
        train(yolo_class, data_yaml, tmp_path, make_pruner(), epochs=3, interrupt_after_epoch=0)
    weights = tmp_path / "run" / "weights"
    os.remove(weights / STATE_FILE)
    assert not (weights / PREVIOUS_STATE_FILE).exists()      # nothing before epoch 1 to keep
    with pytest.raises(FileNotFoundError, match="state saved after that epoch.*found none of them"):
        train(yolo_class, data_yaml, tmp_path, make_pruner(), epochs=3, model=weights / "last.pt", resume=True)


def test_resume_with_another_schedule_is_refused(yolo_class, data_yaml, tmp_path):
    """Found by a review: a resume with fewer ADMM iterations went on with Z-steps past the new cut
    epoch, never cut, and failed at the end of the run."""
    with pytest.raises(Interrupt):
        train(yolo_class, data_yaml, tmp_path, make_pruner(admm_iters=2), epochs=3, interrupt_after_epoch=0)
    weights = tmp_path / "run" / "weights"
    with pytest.raises(ValueError, match=rf"{STATE_FILE}: saved by a pruner with other settings \(admm_iters: 2 -> 1\)"):
        train(yolo_class, data_yaml, tmp_path, make_pruner(admm_iters=1), epochs=3, model=weights / "last.pt",
              resume=True)


def test_resume_with_other_frozen_layers_names_freeze(yolo_class, data_yaml, tmp_path):
    """Found by a review: Ultralytics lets a resume change freeze=, and the pruned set (frozen layers
    are left out) then differed from the saved state's with a message that did not say why."""
    with pytest.raises(Interrupt):
        train(yolo_class, data_yaml, tmp_path, make_pruner(), epochs=3, interrupt_after_epoch=0)
    weights = tmp_path / "run" / "weights"
    with pytest.raises(ValueError, match=rf"{STATE_FILE}: ADMM state 'Z' layers differ: .*; the frozen layers "
                                         rf"\(freeze=\) are left out of the pruned set, so resume with the freeze="):
        train(yolo_class, data_yaml, tmp_path, make_pruner(), epochs=3, model=weights / "last.pt", resume=True,
              freeze=3)


def test_ultralytics_clips_the_kept_gradients_alone(yolo_class, data_yaml, tmp_path, monkeypatch):
    """Found by a review: the pruned gradients were zeroed in the optimizer's pre-step hook, after
    Ultralytics' clip to a total norm of 10 had counted them, which shrank the kept weights' steps."""
    pruner, trainers, pruned_grads_at_clip = make_pruner(), [], []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        if pruner.masks is not None:
            named = dict(trainers[0].model.named_parameters())
            pruned_grads_at_clip.append(sum(int(torch.count_nonzero(named[name].grad[~mask]))
                                            for name, mask in pruner.masks.items()))
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    train(yolo_class, data_yaml, tmp_path, pruner, epochs=3, after_pruner={"on_train_start": trainers.append})
    assert len(pruned_grads_at_clip) == 4 and pruned_grads_at_clip == [0] * 4    # the retraining epoch's steps
    assert "optimizer_step" not in vars(trainers[0])                               # unwrapped at the end


def test_a_run_resumes_from_a_periodic_checkpoint(yolo_class, data_yaml, tmp_path):
    """save_period=1 keeps epoch0.pt, epoch1.pt, ...; the state after epoch 0 is gone from the two
    rolling files by the end, so resuming from epoch0.pt needs its own periodic state file."""
    first = make_pruner()
    train(yolo_class, data_yaml, tmp_path, first, epochs=3, save_period=1)
    weights = tmp_path / "run" / "weights"
    assert {path.name for path in weights.glob("admm_state.epoch*.pt")} == {PERIODIC_STATE_FILE.format(e) for e in range(3)}
    assert torch.load(weights / PREVIOUS_STATE_FILE, weights_only=True)["epoch"] == 1

    resumed = make_pruner()
    model = train(yolo_class, data_yaml, tmp_path, resumed, epochs=3, model=weights / "epoch0.pt", resume=True)
    assert resumed.history[0] == first.history[0]                 # restored, not redone
    assert [(h["iteration"], h["rho"]) for h in resumed.history] == [(1, 0.01), (2, 0.02)]
    assert_zero_outside(resumed.masks, dict(model.trainer.model.named_parameters()))


def test_no_state_is_written_when_ultralytics_saves_no_checkpoints(yolo_class, data_yaml, tmp_path):
    pruner = make_pruner(admm_iters=1)
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=2, save=False)
    assert not list(model.trainer.wdir.glob("admm_state*.pt"))
    assert json.loads((model.trainer.save_dir / REPORT_FILE).read_text())["mask"]["kept"] == kept_count(
        sum(mask.numel() for mask in pruner.masks.state_dict().values()), 0.8)


def test_masks_hold_with_gradient_accumulation_and_warmup(yolo_class, data_yaml, tmp_path):
    """batch 4 of a nominal 8: two backward passes per step, and a warmup that ramps lr and accumulation."""
    pruner = make_pruner()
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=4, batch=4, warmup_epochs=1)
    assert model.trainer.accumulate == 2
    assert_zero_outside(pruner.masks, dict(model.trainer.model.named_parameters()))
    assert_zero_outside(pruner.masks, ema_weights(model.trainer.wdir / "last.pt"))
    assert sum(int(mask.sum()) for mask in pruner.masks.state_dict().values()) == pruner.history[-1]["kept"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masks_hold_on_cuda_with_amp(yolo_class, data_yaml, tmp_path, monkeypatch):
    """Ultralytics' AMP path on the GPU: float16 autocast and a GradScaler that unscales the gradients
    before clipping them, so the penalty is added to unscaled gradients."""
    import ultralytics.engine.trainer
    # Ultralytics checks AMP against a reference model it downloads; offline there is none to fetch
    monkeypatch.setattr(ultralytics.engine.trainer, "check_amp", lambda model: True)
    pruner = make_pruner()
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=3, device=0, amp=True)
    trainer = model.trainer
    assert trainer.device.type == "cuda" and trainer.amp and trainer.scaler.is_enabled()
    params = dict(trainer.model.named_parameters())
    prunable_count = sum(params[name].numel() for name in pruner.masks)
    assert sum(int(mask.sum()) for mask in pruner.masks.state_dict().values()) == kept_count(prunable_count, 0.8)
    assert_zero_outside(pruner.masks, params)
    assert_optimizer_state_zero_outside(pruner.masks, trainer.optimizer, params)
    for checkpoint in ("last.pt", "best.pt"):
        assert_zero_outside({name: mask.cpu() for name, mask in pruner.masks.items()},
                            ema_weights(trainer.wdir / checkpoint))


def add_callback_at_epoch(model, event, epoch, action, times=1):
    """Run ``action(trainer)`` at ``event`` of ``epoch`` (0-based), the first ``times`` times it comes."""
    done = []

    def callback(trainer):
        if trainer.epoch == epoch and len(done) < times:
            done.append(True)
            action(trainer)
    model.add_callback(event, callback)


def slow_ema(trainer):
    """An EMA that has seen 20,000 updates moves 1e-4 per step, as in a long run: a copy the masks miss
    keeps its weights visibly (a young EMA follows the model so fast that it hides such a miss)."""
    trainer.ema.updates = 20000


@pytest.mark.parametrize("admm_iters, nan_times", [(2, 1), (3, 1), (1, 1), (2, 2)],
                         ids=["at-the-cut", "mid-admm", "after-the-cut", "twice-at-the-cut"])
def test_nan_recovery_repeats_the_epoch_without_repeating_its_admm_step(yolo_class, data_yaml, tmp_path,
                                                                       admm_iters, nan_times):
    """Ultralytics reloads last.pt (and builds a new EMA) and repeats an epoch whose loss is NaN, up to
    three times; the Z/U-step or the cut taken at that epoch's end must be undone with it."""
    pruner = make_pruner(admm_iters)
    model = yolo_class("yolov8n.yaml")
    model.add_callback("on_train_start", slow_ema)
    add_callback_at_epoch(model, "on_train_epoch_end", 1, lambda trainer: setattr(trainer, "loss", torch.tensor(float("nan"))),
                          times=nan_times)
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=admm_iters + 1, model=model)
    assert [(h["epoch"], h["iteration"]) for h in pruner.history] == [(i, i) for i in range(1, admm_iters + 1)]
    assert [h["rho"] for h in pruner.history] == [0.01 * 2 ** i for i in range(admm_iters)]
    assert_zero_outside(pruner.masks, dict(model.trainer.model.named_parameters()))
    for checkpoint in ("last.pt", "best.pt"):
        assert_zero_outside(pruner.masks, ema_weights(model.trainer.wdir / checkpoint))


def test_early_stopping_waits_for_the_cut(yolo_class, data_yaml, tmp_path):
    pruner = make_pruner(admm_iters=3)
    model = yolo_class("yolov8n.yaml")

    def dense_epoch_scored_high(trainer):        # with patience 1, epoch 2 would stop the run before the cut
        trainer.stopper.best_fitness, trainer.stopper.best_epoch = 1.0, 1
    add_callback_at_epoch(model, "on_fit_epoch_end", 0, dense_epoch_scored_high)
    model = train(yolo_class, data_yaml, tmp_path, pruner, epochs=4, model=model, patience=1)
    assert len(pruner.history) == 3 and pruner.masks is not None


def test_a_run_that_stops_before_the_cut_says_so(yolo_class, data_yaml, tmp_path):
    model = yolo_class("yolov8n.yaml")
    add_callback_at_epoch(model, "on_fit_epoch_end", 0, lambda trainer: setattr(trainer, "stop", True))
    ended = []
    with pytest.raises(RuntimeError, match=r"ended after 1 epoch, before the cut at the end of epoch 2 .*epochs >= 2 "
                                           r"\(and no time= limit, or one long enough for them: time= sets epochs\)"):
        train(yolo_class, data_yaml, tmp_path, make_pruner(), epochs=3, model=model,
              after_pruner={"on_train_end": lambda trainer: ended.append(trainer.epoch)})
    assert ended == [0]                     # a callback registered after the pruner still ran


def test_too_few_epochs_for_the_admm_phase_is_a_clear_error(yolo_class, data_yaml, tmp_path):
    with pytest.raises(ValueError, match=r"needs epochs >= 4 .*got epochs=3"):
        train(yolo_class, data_yaml, tmp_path, make_pruner(admm_iters=4), epochs=3)


def test_a_distillation_run_is_refused():
    """Found by a review: Ultralytics' distillation wraps the student with training-only projector
    convolutions, which took part of the global budget; the saved student missed the target."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(args=SimpleNamespace(distill_model="teacher.pt", resume=False), epochs=10)
    with pytest.raises(ValueError, match=r"does not prune a distillation run \(distill_model='teacher.pt'\): .*"
                                         r"projector convolutions"):
        make_pruner().on_train_start(trainer)


@pytest.mark.parametrize("kwargs, message", [
    ({"admm_iters": 0}, "admm_iters must be an int >= 1"),
    ({"admm_iters": 2, "epochs_per_iter": 1.5}, "epochs_per_iter must be an int >= 1"),
])
def test_bad_schedule_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UltralyticsADMM(ADMMConfig(sparsity=0.5), **kwargs)


def test_a_state_saved_with_one_pattern_as_a_string_resumes_as_its_list(tmp_path):
    """Found by a review: ADMMConfig now lists a pattern given as a string; a state saved before it
    recorded the string, and its resume was refused as another run's."""
    from pathlib import Path

    pruner = UltralyticsADMM(ADMMConfig(sparsity=0.5, exclude="model.22.*"), admm_iters=1)
    saved = pruner._settings()
    assert saved["config"]["exclude"] == ["model.22.*"]
    saved["config"]["exclude"] = "model.22.*"                  # as the state of an earlier version holds it
    pruner._check_settings(saved, Path(STATE_FILE))
    saved["config"]["exclude"] = "model.21.*"
    with pytest.raises(ValueError, match=r"other settings \(config.exclude: \['model.21.\*'\] -> \['model.22.\*'\]\)"):
        pruner._check_settings(saved, Path(STATE_FILE))
