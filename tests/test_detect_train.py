"""Detector training: [net] optimiser and schedule, overfitting a tiny model, exact resume, the CLI
(detector.train, detector.cli_train)."""
from __future__ import annotations

import argparse
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data.sources import load_yolo_dataset
from data.synthetic import make_shapes_dataset
from detector import cli_train, load_darknet
from detector.cli_train import add_arguments, run
from detector.train import DetectTrainConfig, build_optimizer, darknet_lr_factor, fit_detector

from helpers import tiny_yolo_cfg

# The tests train a few steps of a cfg with burn_in=15: the warning of a burn-in longer than the run
# is expected there (test_a_burn_in_longer_than_the_run_is_warned_of checks it).
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:.*burn_in=15 is longer than this run:UserWarning")]

# A 64x64 detector with one stride-16 head for the 4 classes of data.synthetic. iou_normalizer is
# raised from yolov4's 0.07 so that boxes converge within a few dozen steps.
TINY_CFG = tiny_yolo_cfg("""\
batch=8
subdivisions=1
width=64
height=64
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.02
burn_in=15
policy=steps
steps=48
scales=0.1
hue=.1
saturation=1.5
exposure=1.5
""", (16, 32, 32, 64), """\
ignore_thresh=.7
iou_thresh=0.213
iou_normalizer=0.5
iou_loss=ciou
""")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    yaml = make_shapes_dataset(root / "data", n_train=8, n_val=2, img_size=64, seed=0, max_objects=2,
                               size_range=(0.25, 0.5))
    return yaml, load_yolo_dataset(yaml, "train")


def tiny_model(tmp_path, seed: int = 0):
    path = tmp_path / "tiny.cfg"
    path.write_text(TINY_CFG)
    torch.manual_seed(seed)
    model = load_darknet(path)
    # Darknet's BatchNorm running averages move by 1% a step: too slow to follow 60 steps of
    # training. The test speeds them up; training itself is unchanged.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def test_darknet_lr_schedule(tmp_path):
    net = tiny_model(tmp_path).net
    assert darknet_lr_factor(1, net, burn_in=15) == pytest.approx((1 / 15) ** 4)
    assert darknet_lr_factor(10, net, burn_in=15) == pytest.approx((10 / 15) ** 4)
    assert darknet_lr_factor(15, net, burn_in=15) == 1.0
    assert darknet_lr_factor(47, net, burn_in=15) == 1.0
    assert darknet_lr_factor(48, net, burn_in=15) == pytest.approx(0.1)
    policy_line = Path(net.source.path).read_text().splitlines().index("policy=steps") + 1
    with pytest.raises(ValueError, match=rf"\.cfg:{policy_line} \[net\]: policy=sgdr is not supported"):
        darknet_lr_factor(20, replace(net, policy="sgdr"), burn_in=0)


def test_weight_decay_only_on_conv_weights(tmp_path):
    model = tiny_model(tmp_path)
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (name.endswith("conv.weight")), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_tiny_model_overfits_a_few_images(tmp_path, shapes):
    _, source = shapes
    model = tiny_model(tmp_path)
    config = DetectTrainConfig(epochs=60, batch_size=8, augment=False, eval_every=60, device="cpu",
                               progress=False)
    trainer = fit_detector(model, source, source, config)
    first, last = trainer.history[0], trainer.history[-1]
    assert last["train/loss"] < 0.1 * first["train/loss"]
    assert last["eval/map50"] >= 0.8


def test_resumed_training_continues_identically(tmp_path, shapes):
    _, source = shapes
    config = DetectTrainConfig(epochs=2, batch_size=4, mosaic=0.5, eval_every=0, device="cpu",
                               progress=False)
    torch.manual_seed(1)
    straight = fit_detector(tiny_model(tmp_path), source, None, replace(config, out_dir=tmp_path / "a"))
    torch.manual_seed(1)
    fit_detector(tiny_model(tmp_path), source, None, replace(config, epochs=1, out_dir=tmp_path / "b"))
    torch.manual_seed(123)  # whatever the state now: resume restores the checkpoint's
    resumed = fit_detector(tiny_model(tmp_path, seed=5), source, None,
                           replace(config, out_dir=tmp_path / "b", resume=tmp_path / "b"))
    assert resumed.step == straight.step == 2  # 8 images, 4 per batch, 2 batches per step (batch=8)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.history[-1]["train/loss"] == resumed.history[-1]["train/loss"]


def test_resume_takes_a_newly_given_lr_momentum_and_weight_decay(tmp_path, shapes):
    _, source = shapes
    config = DetectTrainConfig(epochs=1, batch_size=4, eval_every=0, device="cpu", progress=False, lr=0.01,
                               out_dir=tmp_path / "run")
    fit_detector(tiny_model(tmp_path), source, None, config)
    resumed = fit_detector(tiny_model(tmp_path), source, None,
                           replace(config, epochs=2, resume=tmp_path / "run", lr=0.002, momentum=0.8,
                                   weight_decay=0.001))
    factor = darknet_lr_factor(resumed.step + 1, resumed.model.net, burn_in=15)  # the cfg's burn_in
    assert resumed.scheduler.base_lrs == [0.002, 0.002]
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([0.002 * factor] * 2)
    assert [g["momentum"] for g in resumed.optimizer.param_groups] == [0.8, 0.8]
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [0.001, 0.0]
    # found by a review: the conv weights' group was told by its decay > 0, so a run begun without decay kept none
    from_no_decay = fit_detector(tiny_model(tmp_path), source, None,
                                 replace(config, epochs=1, weight_decay=0.0, out_dir=tmp_path / "none"))
    assert [g["weight_decay"] for g in from_no_decay.optimizer.param_groups] == [0.0, 0.0]
    resumed = fit_detector(tiny_model(tmp_path), source, None, replace(config, epochs=2, resume=tmp_path / "none",
                                                                       out_dir=tmp_path / "none", weight_decay=5e-4))
    assert [g["weight_decay"] for g in resumed.optimizer.param_groups] == [5e-4, 0.0]


def train_cli_args(tmp_path, data, epochs: int = 1) -> argparse.Namespace:
    """`detect train` options: the tiny cfg (written to tmp_path) on `data`, into tmp_path/run."""
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--cfg", str(cfg), "--data", str(data), "--epochs", str(epochs), "--batch-size", "4",
                              "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run")])


def test_cli_writes_checkpoint_and_weights_that_load_back(tmp_path, shapes, capsys):
    yaml, source = shapes
    args = train_cli_args(tmp_path, yaml)
    cfg, out = args.cfg, args.out
    assert run(args) == 0
    printed = capsys.readouterr().out   # 8 images at 4 a batch, the cfg's batch=8: one step
    assert "train: 8 images, validation: 2 images;" in printed and "done: 1 epoch, 1 step;" in printed
    assert (out / "epoch_0001.pt").is_file() and (out / "history.csv").is_file() and (out / "args.json").is_file()
    assert (out / "tiny.names").read_text().splitlines() == source.class_names   # Darknet's .names, beside
    reloaded = load_darknet(cfg, out / "tiny.weights")
    checkpoint = torch.load(out / "epoch_0001.pt", weights_only=False)
    for name, value in reloaded.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # a PyTorch counter, not in .weights
            assert torch.equal(value, checkpoint["model"][name]), name
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        run(train_cli_args(tmp_path, yaml, epochs=0))


def test_the_trained_weights_header_keeps_the_source_version_and_counts_the_schedule(tmp_path, shapes):
    """The `.weights` of `detect train` had Darknet 0.2.5's header with `seen` 0 whatever it started
    from: Darknet continuing from it restarted burn-in. `seen` is the steps x the cfg's batch (8)."""
    from detector import WeightsHeader, read_weights, write_weights

    yaml, _ = shapes
    args = train_cli_args(tmp_path, yaml, epochs=2)
    write_weights(tmp_path / "start.weights", load_darknet(args.cfg), WeightsHeader(0, 1, 0, seen=123456))
    args.weights = str(tmp_path / "start.weights")
    assert run(args) == 0                                   # 8 images at 4 a batch, batch=8: a step per epoch
    header = read_weights(args.out / "tiny.weights", load_darknet(args.cfg))
    assert header == WeightsHeader(0, 1, 0, seen=16)        # 32-bit seen, as the 0.1 file it came from
    assert header.nbytes == 16 and (args.out / "tiny.weights").stat().st_size == \
        (tmp_path / "start.weights").stat().st_size
    from yolo_admm.cli import main                          # found by a review: an export of its checkpoint had 0
    assert main(["detect", "export", "--checkpoint", str(args.out), "--formats", "darknet", "--out",
                 str(tmp_path / "export")]) == 0
    assert read_weights(tmp_path / "export" / "model.weights", load_darknet(args.cfg)).seen == 16


def test_training_starts_from_a_partial_file_or_an_archive_and_refuses_other_files_by_what_they_are(tmp_path, shapes):
    """Found by a review: `detect train --weights` read any file as .weights ("file ends inside layer
    6" for a compact archive), and refused `darknet partial`'s first-layers files, with which Darknet
    trains a model of other classes."""
    from detector import write_weights
    from detector.cfg import with_input_size
    from detector.loading import load_to_train
    from detector.export import export_compact

    yaml, _ = shapes
    args = train_cli_args(tmp_path, yaml)
    start = load_darknet(args.cfg)
    write_weights(tmp_path / "full.weights", start)
    first_conv = start.layers[0].conv
    first_bytes = 20 + 4 * sum(t.numel() for t in start.layers[0].darknet_tensors())
    (tmp_path / "first.weights").write_bytes((tmp_path / "full.weights").read_bytes()[:first_bytes])
    args.weights = str(tmp_path / "first.weights")
    with pytest.warns(UserWarning, match="weights for the first 1 of"):
        assert run(args) == 0
    exported = load_darknet(args.cfg)
    exported.load_state_dict(start.state_dict())
    exported.cfg = with_input_size(exported.cfg, 96, 96)       # exported at another input size: the same model
    export_compact(exported, None, tmp_path / "start.yaspars")
    args = train_cli_args(tmp_path, yaml)
    args.weights, args.out = str(tmp_path / "start.yaspars"), tmp_path / "from_archive"
    assert run(args) == 0 and (args.out / "tiny.weights").is_file()
    from_archive = load_to_train(args.cfg, args.weights)
    assert from_archive.cfg.path == args.cfg and torch.equal(from_archive.layers[0].conv.weight,
                                                             first_conv.weight.half().float())   # fp16 archive
    export_compact(load_darknet(args.cfg), None, tmp_path / "other.yaspars")          # of the tiny cfg
    (tmp_path / "other.cfg").write_text(TINY_CFG.replace("filters=16", "filters=8", 1))
    with pytest.raises(ValueError, match=r"other.yaspars: a compact archive of another model than --cfg .*other.cfg "
                                         r"\(first at .*; write its own cfg with `detect export --weights"):
        load_to_train(str(tmp_path / "other.cfg"), str(tmp_path / "other.yaspars"))
    (tmp_path / "model.pt").write_bytes(b"not weights")
    args = train_cli_args(tmp_path, yaml)
    args.weights, args.out = str(tmp_path / "model.pt"), tmp_path / "from_pt"
    with pytest.raises(ValueError, match=r"model.pt: a PyTorch checkpoint .*; expected Darknet .weights"):
        run(args)


def test_a_cfg_of_other_than_3_input_channels_is_refused_where_images_are_read(tmp_path, shapes, capsys):
    """Found by a review: a channels=1 cfg parsed and built, then every command that reads images
    failed on its first batch ("expected input Tensor[B, 1, H, W]"), after making the run folder."""
    from detector import write_weights
    from yolo_admm.cli import main

    yaml, _ = shapes
    args = train_cli_args(tmp_path, yaml)
    Path(args.cfg).write_text(TINY_CFG.replace("channels=3", "channels=1"))
    message = f"{args.cfg}:6 [net]: channels=1; expected channels=3: training, evaluation and prediction read images"
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        run(args)
    assert not args.out.exists()
    write_weights(tmp_path / "gray.weights", load_darknet(args.cfg))
    images, annotated = str(Path(yaml).parent / "images" / "val"), str(tmp_path / "annotated")
    for command in (["detect", "eval", "--data", str(yaml)], ["detect", "predict", images, "--out", annotated]):
        assert main([*command, "--cfg", args.cfg, "--weights", str(tmp_path / "gray.weights")]) == 2
        assert message in capsys.readouterr().err
    assert main(["detect", "export", "--cfg", args.cfg, "--weights", str(tmp_path / "gray.weights"),
                 "--formats", "compact", "--out", str(tmp_path / "export")]) == 0             # exports all the same


def test_class_names_a_names_file_cannot_hold_are_warned_of_before_training(tmp_path, shapes, monkeypatch):
    yaml, source = shapes
    odd = yaml.parent / "odd.yaml"
    odd.write_text(yaml.read_text().replace(f": {source.class_names[1]}\n", f": '{source.class_names[1]} '\n"))
    args = train_cli_args(tmp_path, odd)
    expected = r"odd.yaml: class 1 is '\w+ '; expected a name .* no .names file will be written beside the weights"

    def no_training(*_args):
        raise RuntimeError("training would start here")

    with monkeypatch.context() as patch, pytest.warns(UserWarning, match=expected):
        patch.setattr(cli_train, "fit_detector", no_training)
        with pytest.raises(RuntimeError, match="training would start here"):
            run(args)
    with pytest.warns(UserWarning, match=expected):
        assert run(args) == 0
    assert (args.out / "tiny.weights").is_file() and not (args.out / "tiny.names").exists()


def test_default_batching_keeps_the_cfgs_batch_per_step_over_processes():
    """Found by a torchrun review: demo-tiny (batch 16, subdivisions 1) on 2 processes took 16
    images each per step, 32 in all."""
    from detector.train import default_batching

    assert default_batching(16, 1, 1) == (16, 1)
    assert default_batching(16, 1, 2) == (8, 1)            # was (16, 1): 32 images a step
    assert default_batching(64, 8, 2) == (8, 4)             # yolov4: 8 x 2 processes x 4 = 64
    assert default_batching(64, 8, 1) == (8, 8)
    assert default_batching(64, 8, 2, batch_size=16) == (16, 2)
    assert default_batching(16, 1, 2, accumulate=3) == (8, 3)


def test_a_batch_size_that_cannot_make_the_cfgs_batch_per_step_is_warned_of(shapes, tmp_path):
    """Found by a torchrun review: --batch-size 16 on 2 processes made every step see 32 images of a
    cfg written for 16, and its schedule in steps then spanned twice the images, without a word."""
    from detector.train import _warn_of_another_step_batch, build_detector_trainer

    _, source = shapes
    config = DetectTrainConfig(epochs=2, batch_size=3, eval_every=0, device="cpu", progress=False, burn_in=0)
    with pytest.warns(UserWarning, match=r"tiny.cfg:\d+ \[net\]: an optimizer step sees 9 images \(3 per pass x "
                                         r"3 passes x 1 process\), not the cfg's batch=8, so its schedule in steps "
                                         r"\(burn_in, steps, max_batches\) spans 1.12x the images; a --batch-size "
                                         r"that divides 8 keeps the cfg's batch"):
        build_detector_trainer(tiny_model(tmp_path), source, None, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector_trainer(tiny_model(tmp_path), source, None, replace(config, batch_size=2))   # 2 x 4 passes
        build_detector_trainer(tiny_model(tmp_path), source, None, replace(config, accumulate=1))  # as asked
    net = tiny_model(tmp_path).net
    with pytest.warns(UserWarning, match=r"sees 16 images \(8 per pass x 1 pass x 2 processes\), not the cfg's "
                                         r"batch=8, .* spans 2x the images; a --batch-size that divides 4 keeps"):
        _warn_of_another_step_batch(net, 8, 1, 2)
    with pytest.warns(UserWarning, match=r"sees 9 images \(1 per pass x 3 passes x 3 processes\), .*; 3 processes "
                                         r"cannot share it evenly: a number of processes that divides it can"):
        _warn_of_another_step_batch(net, 1, 3, 3)                      # found by a review: "divides 2.66667"


def test_a_burn_in_longer_than_the_run_is_warned_of(shapes, tmp_path):
    """Found by a review: fine-tuning yolo-fastest (burn_in=4000) on a small set learned nothing,
    silently: the learning rate stayed near 1e-17."""
    import warnings

    from detector.train import build_detector_trainer

    _, source = shapes
    config = DetectTrainConfig(epochs=2, batch_size=4, eval_every=0, device="cpu", progress=False, workers=0)
    with pytest.warns(UserWarning, match=r"tiny.cfg:10 \[net\]: burn_in=15 is longer than this run's 2 optimizer "
                                         r"steps, so the learning rate never exceeds 6.3e-06; set --burn-in"):
        build_detector_trainer(tiny_model(tmp_path), source, None, config)
    with pytest.warns(UserWarning, match=r"^the given burn_in: burn_in=30 is longer"):   # a review: blamed the cfg
        build_detector_trainer(tiny_model(tmp_path), source, None, replace(config, burn_in=30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector_trainer(tiny_model(tmp_path), source, None, replace(config, burn_in=2))


def demo_cfg_with_last_yolo(tmp_path, options: str, replacing: str = "jitter=.2") -> Path:
    """The demo cfg with its last [yolo]'s line `replacing` replaced by `options` (its [yolo] header
    is line 167, jitter line 172, random line 175)."""
    text = (Path(cli_train.__file__).parent / "cfgs" / "demo-tiny.cfg").read_text()
    head, _, tail = text.rpartition(replacing)
    path = tmp_path / "last.cfg"
    path.write_text(head + options + tail)
    return path


def test_jitter_resize_and_random_come_from_the_last_yolo_layer(tmp_path):
    """Found by a review: `[yolo] jitter`, `resize` and `random` were parsed and then unused.
    Darknet reads them from its last layer; a crop that can take an image away is refused, and
    only when augmenting."""
    from detector.train import darknet_augmentation

    cfg = load_darknet(demo_cfg_with_last_yolo(tmp_path, "jitter=.3\nresize=1.5")).cfg     # yolov4-tiny's
    augment = darknet_augmentation(cfg, 320)
    assert (augment.size, augment.jitter, augment.resize) == (320, 0.3, 1.5)
    assert darknet_augmentation(cfg, 320, mosaic=1.0).mosaic == 1.0
    for options, line, message in (("jitter=.5", 172, "jitter=0.5 with resize=1 can crop an image away"),
                                   ("jitter=.35\nresize=1.5", 172, "jitter=0.35 with resize=1.5 can crop"),
                                   ("jitter=.2\nresize=0", 173, r"resize=0: expected a zoom factor > 0"),
                                   ("resize=2.5", 167, "jitter=0.2 with resize=2.5 can crop")):   # jitter unwritten
        cfg = load_darknet(demo_cfg_with_last_yolo(tmp_path, options)).cfg
        with pytest.raises(ValueError, match=rf"last.cfg:{line} \[yolo\]: " + message):
            darknet_augmentation(cfg, 320)
        assert darknet_augmentation(cfg, 320, augment=False).size == 320       # unused without augmentation


@pytest.mark.parametrize("random, multi_scale, coefficient", [
    (0.0, None, None), (1.0, None, 1.4), (1.0, False, None), (0.0, True, 1.4), (1.2, None, 1.2),
    (0.8, None, 1.25), (0.5, None, 2.0), (-1.0, False, None)])
def test_multi_scale_follows_the_cfgs_random_unless_told(random, multi_scale, coefficient):
    from detector.train import multi_scale_coefficient

    assert multi_scale_coefficient(random, multi_scale) == coefficient


@pytest.mark.parametrize("random", [-1, 0.05, 3])
def test_a_random_that_multi_scale_cannot_use_is_refused_naming_its_line(tmp_path, random):
    from detector.train import multi_scale_sides

    cfg = load_darknet(demo_cfg_with_last_yolo(tmp_path, f"random={random}", replacing="random=0")).cfg
    with pytest.raises(ValueError, match=rf"last.cfg:175 \[yolo\]: random={random}: expected 0 \(one input size\)"):
        multi_scale_sides(cfg, 320, None)
    assert multi_scale_sides(cfg, 320, False) is None


def test_a_cfg_with_random_draws_batches_of_several_sides(shapes, tmp_path):
    from detector.train import build_detector_trainer

    _, source = shapes
    path = tmp_path / "random.cfg"
    path.write_text(TINY_CFG.replace("[yolo]\n", "[yolo]\nrandom=1\n", 1).replace("width=64", "width=128")
                    .replace("height=64", "height=128"))
    config = DetectTrainConfig(epochs=1, batch_size=4, eval_every=0, device="cpu", progress=False, workers=0, burn_in=0)
    trainer = build_detector_trainer(load_darknet(path), source, None, config)
    assert trainer.train_loader.batch_sampler.sides == [96, 128, 160]                # 128 / 1.4 .. 128 * 1.4
    fixed = build_detector_trainer(load_darknet(path), source, None, replace(config, multi_scale=False))
    assert fixed.train_loader.batch_sampler.sides is None


def test_a_non_square_cfg_trains_and_prunes_only_at_a_side_given(shapes, tmp_path, capsys):
    """Found by a review: a cfg of width=320 height=256 trained, evaluated and exported at 320x320
    without a word, where eval, predict and export take 320x256."""
    from yolo_admm.cli import main

    data, _ = shapes
    text = (Path(cli_train.__file__).parent / "cfgs" / "demo-tiny.cfg").read_text()
    path = tmp_path / "wide.cfg"
    path.write_text(text.replace("height=160", "height=128", 1))
    height_line = path.read_text().splitlines().index("height=128") + 1
    expected = (f"wide.cfg:{height_line} [net]: expected a square [net] (training uses square inputs), found "
                f"width=160 height=128; choose the side with --img-size")
    for command in (["detect", "train", "--cfg", str(path), "--data", str(data), "--out", str(tmp_path / "t")],
                    ["detect", "prune", "--cfg", str(path), "--data", str(data), "--out", str(tmp_path / "p")]):
        assert main(command) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "p" / "dense.json").exists()


def test_a_jitter_that_can_crop_an_image_away_stops_training_before_any_work(shapes, tmp_path, capsys):
    from yolo_admm.cli import main

    data, _ = shapes
    path = demo_cfg_with_last_yolo(tmp_path, "jitter=.5")
    out = tmp_path / "run"
    assert main(["detect", "train", "--cfg", str(path), "--data", str(data), "--out", str(out), "--epochs", "1"]) == 2
    assert "last.cfg:172 [yolo]: jitter=0.5 with resize=1 can crop an image away" in capsys.readouterr().err
    assert not out.exists()                                    # refused before the run folder is made


def test_a_cfg_left_at_its_testing_batch_of_1_is_warned_of(shapes, tmp_path):
    """Found by a review: yolov3-tiny.cfg's active lines are its '# Testing' batch=1, so training took
    one image per step without a word."""
    from detector.train import build_detector_trainer

    _, source = shapes
    path = tmp_path / "testing.cfg"
    path.write_text(TINY_CFG.replace("batch=8\n", "batch=1\n", 1))
    config = DetectTrainConfig(epochs=1, eval_every=0, device="cpu", progress=False, workers=0, burn_in=0)
    with pytest.warns(UserWarning, match=r"testing.cfg:\d+ \[net\]: \[net\] batch=1, the testing setting"):
        build_detector_trainer(load_darknet(path), source, None, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector_trainer(load_darknet(path), source, None, replace(config, batch_size=4, accumulate=1))


def test_per_layer_training_options_darknet_would_apply_are_warned_of(shapes, tmp_path):
    """Found by a review: a cfg's stopbackward=1 (Darknet freezes the layers before it) or per-layer
    learning_rate were parsed and then dropped silently; every layer trained at the full rate."""
    import warnings

    from detector.train import build_detector_trainer

    _, source = shapes
    config = DetectTrainConfig(epochs=2, batch_size=4, eval_every=0, device="cpu", progress=False, workers=0,
                               burn_in=0)
    path = tmp_path / "frozen.cfg"
    path.write_text(TINY_CFG.replace("[convolutional]\n", "[convolutional]\nstopbackward=1\nlearning_rate=0.1\n", 1))
    header = path.read_text().splitlines().index("[convolutional]") + 1          # each option's own line is named
    with pytest.warns(UserWarning, match=rf"2 per-layer training option\(s\) of the cfg are not applied: every layer "
                                         rf"trains, at the \[net\] learning rate \(.*frozen.cfg:{header + 1} "
                                         rf"\[convolutional\]: stopbackward=1; .*frozen.cfg:{header + 2} "
                                         rf"\[convolutional\]: learning_rate=0.1\)"):
        build_detector_trainer(load_darknet(path), source, None, config)
    path.write_text(TINY_CFG.replace("[convolutional]\n", "[convolutional]\nstopbackward=0\nlearning_rate=1\n", 1)
                    .replace("[yolo]\n", "[yolo]\nlearning_rate=0.1\n", 1))     # a [yolo] has no weights to scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector_trainer(load_darknet(path), source, None, config)     # the values that change nothing


def test_net_training_options_darknet_would_apply_are_warned_of(shapes, tmp_path):
    """Found by a review: [net] adam=1 and the blur, noise, mixup and cutmix augmentations were
    parsed and dropped silently."""
    import warnings

    from detector.train import build_detector_trainer

    _, source = shapes
    config = DetectTrainConfig(epochs=2, batch_size=4, eval_every=0, device="cpu", progress=False, workers=0,
                               burn_in=0)
    path = tmp_path / "adam.cfg"
    path.write_text(TINY_CFG.replace("[net]\n", "[net]\nadam=1\nB1=0.9\nmixup=1\nblur=0\n", 1))
    with pytest.warns(UserWarning, match=r"2 \[net\] training option\(s\) of the cfg are not applied: this trainer "
                                         r"uses SGD .*\(.*adam.cfg:2 \[net\]: adam=1; .*adam.cfg:4 \[net\]: mixup=1\)"):
        build_detector_trainer(load_darknet(path), source, None, config)
    path.write_text(TINY_CFG.replace("[net]\n", "[net]\nadam=0\ncutmix=0\n", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_detector_trainer(load_darknet(path), source, None, config)     # the values that change nothing


def test_a_validation_folder_named_0_is_validated_on(tmp_path, shapes):
    """Found by a review: `val: 0` (a folder named 0) read as no validation split."""
    yaml, _ = shapes
    root = Path(yaml).parent
    shutil.copytree(root / "images" / "val", root.parent / "numbered" / "0")
    (root.parent / "numbered" / "data.yaml").write_text(f"path: .\ntrain: {root / 'images' / 'train'}\nval: 0\n"
                                                       f"names: {list(load_yolo_dataset(yaml, 'train').class_names)}\n")
    args = argparse.Namespace(data=str(root.parent / "numbered" / "data.yaml"), images=None, annotations=None,
                              val_images=None, val_annotations=None)
    with pytest.warns(UserWarning, match="none of its 2 images has a label file"):      # labels stay in labels/val
        train, val = cli_train.load_sources(args)
    assert val is not None and len(val.records) == 2
