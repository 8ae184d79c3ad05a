"""The `detect prune` pipeline end to end on a tiny generated dataset: stage records, and a run
killed at several points resumes to the same masks and metrics as an uninterrupted run."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

import pruning
from data.synthetic import SHAPE_CLASSES, make_shapes_dataset
from detector import cli_prune, cli_train, load_darknet, prune_pipeline
from detector.export import export_compact, load_compact
from detector.prune_job import PruneJob, read_job_yaml
from detector.prune_pipeline import run_job
from engine import Trainer

DEMO_CFG = str(Path(prune_pipeline.__file__).parent / "cfgs" / "demo-tiny.cfg")


class SimulatedKill(Exception):
    """Stands in for SIGKILL: raised at a chosen point, nothing after it runs."""


@pytest.fixture(scope="module")
def shapes_yaml(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, n_train=12, n_val=6, img_size=96, seed=3)
    return str(root / "data.yaml")


def tiny_job(data: str, out: Path, **overrides) -> PruneJob:
    settings = dict(cfg=DEMO_CFG, data=data, out=str(out), sparsity=[0.6], img_size=96, batch_size=4,
                    admm_iters=2, epochs_per_iter=1, retrain_epochs=2, rho=1e-2, lr=1e-3, export=[],
                    latency_runs=1, progress=False, augment=True, seed=0)
    settings.update(overrides)
    return PruneJob(**settings)


def final_state(out: Path) -> dict:
    folder = out / "sparsity_0.6"
    state = torch.load(folder / "retrained.pt", weights_only=True)
    results = json.loads((folder / "results.json").read_text())
    return {"masks": state["masks"], "model": state["model"],
            "metrics": [(r["stage"], r["map50"], r["map50_95"], r["nonzero_prunable"]) for r in results["stages"]]}


@pytest.fixture(scope="module")
def uninterrupted(shapes_yaml, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    results = run_job(tiny_job(shapes_yaml, out))
    return {"results": results, "state": final_state(out), "out": out}


def test_stage_records_and_sparsity(uninterrupted, tmp_path):
    results = uninterrupted["results"]
    stages = results["sweep"][0]["stages"]
    assert [r["stage"] for r in stages] == ["dense", "hard_prune", "retrained"]
    assert stages[0]["sparsity"] == 0.0
    for record in stages[1:]:
        assert record["sparsity"] == pytest.approx(0.6, abs=1e-5)  # k = round(0.4 N) exactly
        assert record["compact_bytes"] < stages[0]["compact_bytes"]
        for key in ("map50_95", "map50", "cpu_latency_ms"):
            assert record[key] >= 0.0
    retrained = load_darknet(DEMO_CFG)
    retrained.load_state_dict(uninterrupted["state"]["model"])     # the size is that of the archive an export writes,
    retrained.class_names = list(SHAPE_CLASSES)                      # the training data's class names included
    assert stages[2]["compact_bytes"] == export_compact(retrained, None, tmp_path / "r.yaspars", verify=False)["bytes"]
    masks = uninterrupted["state"]["masks"]
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(0.4 * total)
    for name, weight in uninterrupted["state"]["model"].items():
        if name in masks:
            assert torch.count_nonzero(weight[~masks[name]]) == 0, f"{name}: pruned weight came back"
    out = uninterrupted["out"]
    for path in ("config.yaml", "log.txt", "results.json", "sparsity_0.6/layers.json", "sparsity_0.6/layers.png"):
        assert (out / path).is_file(), path


def _kill_after_checkpoint(monkeypatch, phase: str, epoch: int) -> None:
    original = Trainer.save_checkpoint

    def save_then_die(self):
        path = original(self)
        if Path(self.config.checkpoint_dir).name == phase and self.epoch == epoch:
            raise SimulatedKill(f"killed after {path}")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)


def _kill_in_first_epoch(monkeypatch, phase: str) -> None:
    """A kill after the phase's first optimizer step: no checkpoint of it exists yet."""
    original = Trainer._optimizer_step

    def step_then_die(self):
        original(self)
        if Path(self.config.checkpoint_dir).name == phase and self.step == 1:
            raise SimulatedKill(f"killed in the first {phase} epoch")

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_die)


def _kill_at_hard_prune(monkeypatch) -> None:
    def die(self):
        raise SimulatedKill("killed between ADMM and the hard prune")

    monkeypatch.setattr(pruning.ADMM, "hard_prune", die)


@pytest.mark.parametrize("kill_point", ["first-admm-epoch", "mid-admm", "before-hard-prune", "first-retrain-epoch",
                                        "mid-retrain", "mid-admm-resumed-with-2-workers"])
def test_killed_run_resumes_to_the_same_result(kill_point, shapes_yaml, uninterrupted, tmp_path):
    """Killed before a phase's first checkpoint, the resumed run skips the evaluations before it
    (dense, hard prune), which drew from torch's random stream; the phase still trains alike."""
    with pytest.MonkeyPatch.context() as patch:
        if kill_point.startswith("first-"):
            _kill_in_first_epoch(patch, kill_point.split("-")[1])
        elif kill_point.startswith("mid-admm"):
            _kill_after_checkpoint(patch, "admm", epoch=1)
        elif kill_point == "before-hard-prune":
            _kill_at_hard_prune(patch)
        else:
            _kill_after_checkpoint(patch, "retrain", epoch=1)
        with pytest.raises(SimulatedKill):
            run_job(tiny_job(shapes_yaml, tmp_path))
    assert not (tmp_path / "sparsity_0.6" / "results.json").exists()
    # a fuzz found that another --workers changed the augmentation, drawn in the worker processes
    run_job(tiny_job(shapes_yaml, tmp_path, workers=2 if kill_point.endswith("workers") else 0))
    resumed, expected = final_state(tmp_path), uninterrupted["state"]
    assert resumed["metrics"] == expected["metrics"]
    log = (tmp_path / "log.txt").read_text()
    assert f"starting {tmp_path}: admm-global, 1 process" in log and f"resuming {tmp_path}:" in log   # which run
    for name, mask in expected["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
    for name, weight in expected["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, rtol=0, atol=1e-6, msg=name)


def test_a_stage_state_keeps_the_weights_header_so_a_resumed_run_exports_the_same_file(tmp_path):
    """Found by a review: a resumed run rebuilt its model from the cfg alone, so its exported
    `.weights` had `seen` 0 where the uninterrupted run kept the source file's."""
    from types import SimpleNamespace

    from detector.weights import WeightsHeader

    model = load_darknet(DEMO_CFG)
    model.weights_header = WeightsHeader(major=0, minor=1, revision=0, seen=14231680)   # as a source file had
    masks = pruning.magnitude_prune(model, 0.5)
    prune_pipeline.save_state(tmp_path / "hard_prune.pt", model, masks)
    context = SimpleNamespace(job=SimpleNamespace(cfg=DEMO_CFG), named=lambda built: built)
    loaded, _ = prune_pipeline.load_state(tmp_path / "hard_prune.pt", context)
    assert loaded.weights_header == model.weights_header
    from detector.cli_export import load_export_model                   # and detect export of the stage file
    assert load_export_model(DEMO_CFG, None, str(tmp_path / "hard_prune.pt")).weights_header == model.weights_header


def test_every_sparsity_of_a_sweep_gets_its_own_folder():
    names = [prune_pipeline.sparsity_folder_name(s) for s in (0.6, 0.6004, 0.999, 0.9991, 0.9995, 0.5)]
    assert names[0] == "sparsity_0.6" and names[-1] == "sparsity_0.5"
    assert len(set(names)) == len(names)


def test_a_damaged_stage_file_is_named_with_what_to_do(shapes_yaml, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted["out"], out)
    (out / "sparsity_0.6" / "results.json").unlink()           # so the rerun reaches the stages
    state = out / "sparsity_0.6" / "retrained.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"retrained.pt: damaged stage state .*delete it to run that stage again"):
        run_job(tiny_job(shapes_yaml, out))
    state.write_bytes(b"")
    with pytest.raises(ValueError, match=r"retrained.pt: damaged stage state \(EOFError: empty or cut short\)"):
        run_job(tiny_job(shapes_yaml, out))
    state.write_bytes((out / "sparsity_0.6" / "hard_prune.pt").read_bytes()[:5000])   # torch: OSError (a fuzz)
    stale = [out / "sparsity_0.6" / ".yolo-admm-write.retrained.pt.k3j_x9q2.tmp",
             out / "sparsity_0.6" / "admm" / ".yolo-admm-write.epoch_0002.pt.a1b2c3d4.tmp"]
    for path in stale:                                          # what writes a kill cut short leave
        path.write_bytes(b"partial")
    elsewhere = tmp_path / "elsewhere" / ".yolo-admm-write.big.pt.abcdefgh.tmp"   # found by a review: behind a
    elsewhere.parent.mkdir()                                                      # link, it was removed too
    elsewhere.write_bytes(b"not this run's")
    (out / "sparsity_0.9").symlink_to(elsewhere.parent)
    with pytest.raises(ValueError, match=r"retrained.pt: damaged stage state \(OSError: .*delete it to run that stage"):
        run_job(tiny_job(shapes_yaml, out))
    assert not any(path.exists() for path in stale) and elsewhere.exists()
    (out / "sparsity_0.9").unlink()
    (out / "dense.json").write_text('{"stage": "dense", "map50": ')
    with pytest.raises(ValueError, match=r"dense.json: damaged stage record .*delete it to run that stage again"):
        run_job(tiny_job(shapes_yaml, out))
    (out / "config.yaml").write_text("cfg: [unclosed\n")              # found by a review: a yaml traceback
    with pytest.raises(ValueError, match=r"config.yaml: expected the settings this run recorded, found a file YAML "
                                         r"cannot read \(.*\); restore it, or choose another --out"):
        run_job(tiny_job(shapes_yaml, out))
    (out / "config.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match=r"config.yaml: expected the settings this run recorded, found a YAML list"):
        run_job(tiny_job(shapes_yaml, out))


def test_a_weight_pattern_that_matches_nothing_fails_before_the_dense_stage(shapes_yaml, tmp_path):
    """Found by a fuzz: it failed after dense.json was written, and the folder then refused the fix."""
    for setting in (dict(method="admm-layerwise", layer_sparsity={"nope.weight": 0.5}), dict(include=["nope.*"])):
        with pytest.raises(ValueError, match="'nope"):
            run_job(tiny_job(shapes_yaml, tmp_path, **setting))
        assert not (tmp_path / "dense.json").exists()
    with pytest.raises(ValueError, match=r"min_density keeps \d+ weights at least, more than the \d+ .* sparsity 0.6"):
        run_job(tiny_job(shapes_yaml, tmp_path, min_density=0.5))     # floors above the global budget
    assert not (tmp_path / "dense.json").exists()
    run_job(tiny_job(shapes_yaml, tmp_path, method="admm-layerwise", layer_sparsity={"layers.0.*": 0.3},
                     admm_iters=1, retrain_epochs=0))                    # the corrected run, same folder


def test_include_and_exclude_flags_reach_the_job():
    parser = argparse.ArgumentParser()
    cli_prune.add_arguments(parser)
    job = cli_prune.job_of(parser.parse_args(["--cfg", DEMO_CFG, "--data", "data.yaml",
                                              "--include", "layers.0.*,layers.2.*", "--exclude", "layers.2.*"]))
    assert job.include == ["layers.0.*", "layers.2.*"] and job.exclude == ["layers.2.*"]
    assert list(pruning.prunable_parameters(prune_pipeline.detector.load_darknet(job.cfg), job.include,
                                            job.exclude)) == ["layers.0.conv.weight"]


def test_a_data_yaml_and_coco_json_options_together_are_refused(tmp_path):
    """Found by a review: `--data` won silently over the COCO json options (from --config, say)."""
    (tmp_path / "job.yaml").write_text("data: shapes/data.yaml\n")
    parser = argparse.ArgumentParser()
    cli_prune.add_arguments(parser)
    with pytest.raises(ValueError, match=r"give --data data.yaml or the COCO json options, not both: data is "
                                         r"shapes/data.yaml, train_annotations train.json$"):
        cli_prune.job_of(parser.parse_args(["--cfg", DEMO_CFG, "--config", str(tmp_path / "job.yaml"),
                                            "--train-annotations", "train.json"]))


def test_coco_jsons_whose_categories_differ_are_refused_before_any_work(shapes_yaml, tmp_path):
    """Found by a review: a validation json listing the training json's categories in another id
    order scored the dense model at mAP50 0.09 instead of 0.94, silently. `detect train` too."""
    from data.sources import load_yolo_dataset

    root = Path(shapes_yaml).parent
    for split in ("train", "val"):
        coco = load_yolo_dataset(shapes_yaml, split).to_coco()
        if split == "val":
            for category in coco["categories"]:                      # the same names, sorted the other way
                category["id"] = 10 - category["id"]
            for annotation in coco["annotations"]:
                annotation["category_id"] = 10 - annotation["category_id"]
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
    coco_job = dict(train_images=str(root / "images" / "train"), train_annotations=str(tmp_path / "train.json"),
                    val_images=str(root / "images" / "val"), val_annotations=str(tmp_path / "val.json"))
    message = (rf"{tmp_path}/val.json: class 0 is '{SHAPE_CLASSES[-1]}', but '{SHAPE_CLASSES[0]}' in "
               rf"{tmp_path}/train.json \(the same classes in another order\)")
    with pytest.raises(ValueError, match=message):
        run_job(tiny_job(None, tmp_path / "run", **coco_job))
    assert not (tmp_path / "run" / "dense").exists()
    args = argparse.Namespace(data=None, images=coco_job["train_images"], annotations=coco_job["train_annotations"],
                              val_images=coco_job["val_images"], val_annotations=coco_job["val_annotations"])
    with pytest.raises(ValueError, match=message):
        cli_train.load_sources(args)


def test_resume_with_other_settings_is_refused(shapes_yaml, uninterrupted, tmp_path):
    with pytest.raises(ValueError, match=r"other settings \(admm_iters: 2 -> 3\)"):
        run_job(tiny_job(shapes_yaml, uninterrupted["out"], admm_iters=3))
    # the export formats may change: a run whose export failed goes on with other ones
    import shutil
    shutil.copytree(uninterrupted["out"], tmp_path / "run")
    (tmp_path / "run" / "sparsity_0.6" / "results.json").unlink()
    results = run_job(tiny_job(shapes_yaml, tmp_path / "run", export=["compact"]))
    assert (tmp_path / "run" / "sparsity_0.6" / "export" / "pruned.yaspars").is_file()
    assert results["sweep"][0]["stages"] == uninterrupted["results"]["sweep"][0]["stages"]


def test_bad_settings_name_what_is_wrong(shapes_yaml, tmp_path):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\).*1\.2"):
        tiny_job(shapes_yaml, tmp_path, sparsity=[1.2])
    with pytest.raises(ValueError, match=r"sparsity lists 0\.5 more than once"):
        tiny_job(shapes_yaml, tmp_path, sparsity=[0.5, 0.7, 0.5])
    for empty in ([], ""):                      # `sparsity: []` in the YAML, `--sparsity ""`
        with pytest.raises(ValueError, match="sparsity: expected at least one value in \\[0, 1\\), found none"):
            tiny_job(shapes_yaml, tmp_path, sparsity=empty)
    with pytest.raises(ValueError, match="multiple of 32, found 100"):
        tiny_job(shapes_yaml, tmp_path, img_size=100)
    with pytest.raises(ValueError, match="unknown pruning method 'magic'"):
        tiny_job(shapes_yaml, tmp_path, method="magic")
    with pytest.raises(ValueError, match=r"unknown pruning method \['admm-global'\]"):   # a YAML list
        tiny_job(shapes_yaml, tmp_path, method=["admm-global"])
    with pytest.raises(ValueError, match=r"ramp_from must be below sparsity \(0.6\), got 0.7"):
        tiny_job(shapes_yaml, tmp_path, ramp_from=0.7)
    with pytest.raises(ValueError, match="layer_sparsity is for method admm-layerwise; method 'admm-global' would"):
        tiny_job(shapes_yaml, tmp_path, layer_sparsity={"layers.0.*": 0.5})
    with pytest.raises(ValueError, match=r"layer_sparsity\['layers.0.\*'\] must be in \[0, 1\) .*got 2.0"):
        tiny_job(shapes_yaml, tmp_path, method="admm-layerwise", layer_sparsity={"layers.0.*": 2.0})  # was "sparsity"
    with pytest.raises(ValueError, match="ramp_from is for the ADMM methods"):
        tiny_job(shapes_yaml, tmp_path, ramp_from=0.2, method="magnitude-global")
    for setting, value, message in [("rho", "high", "rho must be a number, found 'high'"),
                                    ("admm_iters", "two", "admm_iters must be an integer, found 'two'"),
                                    ("min_density", 2, r"min_density must be in \[0, 1\] .*found 2"),
                                    ("min_density", {"layers.0.*": 1.5}, r"min_density must be in \[0, 1\]"),
                                    ("batch_size", -2, "batch_size must be >= 1, found -2"),
                                    ("lr", -0.1, r"lr must be > 0.0, found -0.1"),
                                    ("rho_mult", 0.5, r"rho_mult must be >= 1.0, found 0.5"),  # ADMM refused it late
                                    ("rho", 1e39, r"rho must be > 0.0 and <= 3.40282.*e\+38, found 1e\+39"),
                                    ("amp", "no", "amp must be true or false, found 'no'"),
                                    ("multi_scale", "yes", "multi_scale must be true or false, found 'yes'"),
                                    ("export", "onnx,tflite", r"unknown export format\(s\) \['tflite'\]")]:
        with pytest.raises(ValueError, match=message):      # before any work, so no run folder records it
            tiny_job(shapes_yaml, tmp_path, **{setting: value})
    assert tiny_job(shapes_yaml, tmp_path, sparsity="0.5, 0.7", export="onnx,compact").sparsity == [0.5, 0.7]
    assert tiny_job(shapes_yaml, tmp_path, min_density={"layers.0.*": 0.5}).min_density == {"layers.0.*": 0.5}
    assert tiny_job(shapes_yaml, tmp_path, export=None).export == []
    assert tiny_job(shapes_yaml, tmp_path).multi_scale is False
    assert tiny_job(shapes_yaml, tmp_path, multi_scale=True).multi_scale is True
    job_yaml = tmp_path / "bad.yaml"
    job_yaml.write_text(f"cfg: {DEMO_CFG}\ndata: {shapes_yaml}\nrho: high\n")
    with pytest.raises(ValueError, match=r"bad.yaml \(or a flag over it\): rho must be a number, found 'high'"):
        PruneJob.from_sources(job_yaml, {})
    config = tmp_path / "job.yaml"
    config.write_text("sparsity: 0.5\nrhoo: 3\n")
    with pytest.raises(ValueError, match=r"job.yaml: unknown setting\(s\) \['rhoo'\]"):
        read_job_yaml(config)


def test_batchnorm_statistics_are_recomputed_after_hard_pruning(shapes_yaml, tmp_path):
    from data.augment import AugmentConfig
    from data.sources import load_yolo_dataset
    from data.train_dataset import DetectionTrainDataset, collate_detection

    settings = dict(method="magnitude-global", admm_iters=1, retrain_epochs=0)
    run_job(tiny_job(shapes_yaml, tmp_path / "off", bn_images=0, **settings))
    kept_stats = torch.load(tmp_path / "off" / "sparsity_0.6" / "hard_prune.pt", weights_only=True)["model"]
    assert torch.equal(kept_stats["layers.0.bn.running_mean"], torch.zeros(16))  # a fresh model's statistics

    run_job(tiny_job(shapes_yaml, tmp_path / "on", bn_images=12, **settings))   # all 12 images, 3 batches of 4
    state = torch.load(tmp_path / "on" / "sparsity_0.6" / "hard_prune.pt", weights_only=True)["model"]
    dataset = DetectionTrainDataset(load_yolo_dataset(shapes_yaml, "train"), AugmentConfig(96), augment=False)
    images, _ = collate_detection([dataset[i] for i in range(len(dataset))])
    conv_out = torch.nn.functional.conv2d(images, state["layers.0.conv.weight"], stride=2, padding=1)
    torch.testing.assert_close(state["layers.0.bn.running_mean"], conv_out.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)


def test_batchnorm_recalibration_skips_an_unreadable_training_image(tmp_path):
    from data.sources import load_yolo_dataset

    root = tmp_path / "shapes"
    make_shapes_dataset(root, n_train=6, n_val=3, img_size=96, seed=5)
    coco = {}
    for split in ("train", "val"):  # COCO json takes image sizes from the json, so a broken file loads
        coco[split] = tmp_path / f"{split}.json"
        coco[split].write_text(json.dumps(load_yolo_dataset(root / "data.yaml", split).to_coco()))
    broken = sorted((root / "images" / "train").iterdir())[2]
    broken.write_bytes(b"not an image")
    job = tiny_job(None, tmp_path / "run", method="magnitude-global", admm_iters=1, retrain_epochs=0, bn_images=6,
                   train_images=str(root / "images" / "train"), train_annotations=str(coco["train"]),
                   val_images=str(root / "images" / "val"), val_annotations=str(coco["val"]))
    with pytest.warns(UserWarning, match=f"skipping unreadable training image .*{broken.name}"):
        results = run_job(job)  # recalibration runs over all 6 images, the broken one among them
    assert [record["stage"] for record in results["sweep"][0]["stages"]] == ["dense", "hard_prune", "retrained"]


def test_the_run_log_never_writes_through_a_link(tmp_path):
    """Found by a review: log.txt was appended to through a symbolic link, into the file it named."""
    from detector.prune_pipeline import LOG, log_to_file

    (tmp_path / "precious.txt").write_text("precious log\n")
    (tmp_path / "log.txt").symlink_to(tmp_path / "precious.txt")
    handler = log_to_file(tmp_path / "log.txt")
    try:
        LOG.info("a stage line")
    finally:
        LOG.removeHandler(handler)
        handler.close()
    assert (tmp_path / "precious.txt").read_text() == "precious log\n"
    assert not (tmp_path / "log.txt").is_symlink() and "a stage line" in (tmp_path / "log.txt").read_text()


def test_an_lr_policy_training_cannot_follow_is_refused_before_the_dense_stage(shapes_yaml, tmp_path):
    """Found by a review: a cfg's policy=sgdr was refused when the ADMM trainer was built, after
    the dense stage, whose record then locked the run folder against the corrected cfg."""
    cfg = tmp_path / "sgdr.cfg"
    text = Path(DEMO_CFG).read_text()
    cfg.write_text(text.replace("policy=steps", "policy=sgdr"))
    line = text.splitlines().index("policy=steps") + 1
    with pytest.raises(ValueError, match=rf"sgdr.cfg:{line} \[net\]: policy=sgdr is not supported for training"):
        run_job(tiny_job(shapes_yaml, tmp_path / "run", cfg=str(cfg)))
    assert not (tmp_path / "run").exists()


def test_class_names_a_darknet_export_cannot_write_are_refused_before_the_dense_stage(shapes_yaml, tmp_path):
    odd = Path(shapes_yaml).with_name("odd.yaml")
    odd.write_text(Path(shapes_yaml).read_text().replace(f": {SHAPE_CLASSES[2]}\n", ": ''\n"))
    with pytest.raises(ValueError, match=r"odd.yaml: class 2 is ''; expected a name that is not empty"):
        run_job(tiny_job(str(odd), tmp_path / "run", export=["darknet"]))
    assert not (tmp_path / "run" / "dense.json").exists()
    run_job(tiny_job(str(odd), tmp_path / "compact", admm_iters=1, retrain_epochs=1, export=["compact"]))
    assert load_compact(tmp_path / "compact" / "sparsity_0.6" / "export" / "pruned.yaspars").class_names[2] == ""


def test_a_resumed_run_exports_the_class_names_too(shapes_yaml, tmp_path):
    """Found by a review: a run resumed from its stage files rebuilt the model without the training
    data's class names, so its exports carried none."""
    job = tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1, export=["compact"])
    run_job(job)
    folder = tmp_path / "run" / "sparsity_0.6"
    first = load_compact(folder / "export" / "pruned.yaspars")
    (folder / "results.json").unlink()                      # killed after retraining, before the export
    shutil.rmtree(folder / "export")
    run_job(job)
    resumed = load_compact(folder / "export" / "pruned.yaspars")
    assert first.class_names == resumed.class_names == list(SHAPE_CLASSES)
    report = json.loads((folder / "export" / "export.json").read_text())     # the report, as detect export's
    assert report["compact"]["path"].endswith("pruned.yaspars") and report["compact"]["value_format"] == "fp16"


def test_a_finished_run_run_again_from_another_folder_does_not_export_again(shapes_yaml, tmp_path, monkeypatch):
    """Found by a review: the exports' paths were checked as recorded, relative to the folder the run
    was started from, so a rerun elsewhere (or of a moved run folder) exported every format again."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    run_job(tiny_job(shapes_yaml, Path("run"), admm_iters=1, retrain_epochs=1, export=["compact"]))
    archive = tmp_path / "run" / "sparsity_0.6" / "export" / "pruned.yaspars"
    written = archive.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_job(tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1, export=["compact"]))
    assert archive.stat().st_mtime_ns == written


def test_a_finished_run_asked_for_another_format_exports_it(shapes_yaml, tmp_path):
    """Found by a review: the rerun returned the finished results and wrote nothing, silently, while
    its config.yaml claimed the new format."""
    job = tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1, export=["compact"])
    first = run_job(job)["sweep"][0]
    folder = tmp_path / "run" / "sparsity_0.6"
    again = run_job(tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1,
                             export=["compact", "onnx"]))["sweep"][0]
    assert (folder / "export" / "pruned.onnx").is_file()
    assert {"compact", "onnx"} <= set(again["exports"]) and "onnx" not in first["exports"]
    assert "onnx" in json.loads((folder / "results.json").read_text())["exports"]
    assert again["stages"] == first["stages"] and again["wall_time_s"] > first["wall_time_s"]
    third = run_job(tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1, export=["darknet"]))
    recorded = json.loads((folder / "export" / "export.json").read_text())
    assert {"compact", "onnx", "darknet"} <= set(third["sweep"][0]["exports"]) and \
        {"compact", "onnx", "darknet"} <= set(recorded)             # the earlier formats stay on record
    (folder / "export" / "pruned.onnx").unlink()                 # found by a review: a deleted file stayed gone
    run_job(tiny_job(shapes_yaml, tmp_path / "run", admm_iters=1, retrain_epochs=1, export=["onnx"]))
    assert (folder / "export" / "pruned.onnx").is_file()


def test_export_of_a_stage_file_takes_the_cfg_its_run_records(uninterrupted, tmp_path, capsys):
    """Found by a review: `detect export --checkpoint RUN/sparsity_S/retrained.pt` needed --cfg,
    which the run's config.yaml records, with the input size the run pruned at (96 here, the cfg's
    160). A record is the run's only where its `out` is its own folder: a config.yaml copied
    elsewhere, or another tool's, or an unreadable one, is passed over."""
    from yolo_admm.cli import main

    stage_file = uninterrupted["out"] / "sparsity_0.6" / "retrained.pt"
    assert main(["detect", "export", "--checkpoint", str(stage_file), "--out", str(tmp_path / "a"),
                 "--formats", "compact"]) == 0
    printed = capsys.readouterr().out
    assert f"the cfg {DEMO_CFG} at 96x96, as {uninterrupted['out'] / 'config.yaml'} records" in printed
    rebuilt = load_compact(tmp_path / "a" / "model.yaspars")
    assert rebuilt.net.width == 96
    assert rebuilt.class_names == list(SHAPE_CLASSES)       # found by a review: exported without the run's names
    assert "the class names of" in printed
    folder = uninterrupted["out"] / "sparsity_0.6"             # found by a review: "no checkpoint (epoch_NNNN.pt)"
    assert main(["detect", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "c"),
                 "--formats", "compact"]) == 0
    assert f"export: {folder / 'retrained.pt'}, the final model of this prune run's sparsity folder" in \
        capsys.readouterr().out
    assert (tmp_path / "c" / "model.yaspars").read_bytes() == (tmp_path / "a" / "model.yaspars").read_bytes()
    assert main(["detect", "export", "--checkpoint", str(folder / "retrain"), "--out", str(tmp_path / "d"),
                 "--formats", "compact"]) == 0
    assert (f"a checkpoint of the retraining, before the run's final BatchNorm recalibration; the model the run "
            f"measured and exported is {folder / 'retrained.pt'}") in capsys.readouterr().err
    # found by a new-user review: the run's own folder was "no checkpoint", and the ADMM phase's unpruned
    # weights were exported with no word that they are not the pruned model
    assert main(["detect", "export", "--checkpoint", str(uninterrupted["out"]), "--out", str(tmp_path / "e")]) == 2
    assert (f"{uninterrupted['out']}: a detect prune run's folder, with a final model per sparsity: expected "
            f"--checkpoint {uninterrupted['out']}/sparsity_S, one of sparsity_0.6") in capsys.readouterr().err
    assert main(["detect", "export", "--checkpoint", str(folder / "admm"), "--out", str(tmp_path / "f"),
                 "--formats", "compact"]) == 0
    assert (f"a checkpoint of the ADMM phase, before the hard prune: its weights are not pruned; the pruned model "
            f"is {folder / 'retrained.pt'}") in capsys.readouterr().err
    elsewhere = tmp_path / "project" / "downloads" / "ckpt" / "retrained.pt"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(stage_file, elsewhere)
    shutil.copy(uninterrupted["out"] / "config.yaml", tmp_path / "project" / "config.yaml")   # another run's
    (tmp_path / "project" / "downloads" / "args.json").write_text("{not json")
    assert main(["detect", "export", "--checkpoint", str(elsewhere), "--out", str(tmp_path / "b")]) == 2
    assert "needs --cfg" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_jitter_that_can_crop_an_image_away_stops_a_prune_before_any_work(shapes_yaml, tmp_path):
    """Found by a review: the trainer refused it only after the dense evaluation had been written."""
    text = Path(DEMO_CFG).read_text()
    head, _, tail = text.rpartition("jitter=.2")
    cfg = tmp_path / "jitter.cfg"
    cfg.write_text(head + "jitter=.5" + tail)
    with pytest.raises(ValueError, match=r"jitter.cfg:172 \[yolo\]: jitter=0.5 with resize=1 can crop an image away"):
        run_job(tiny_job(shapes_yaml, tmp_path / "run", cfg=str(cfg)))
    assert not (tmp_path / "run").exists()


def test_export_of_a_coco_json_runs_stage_file_takes_the_jsons_class_names(uninterrupted, shapes_yaml, tmp_path,
                                                                           capsys):
    """A run trained on a COCO json records `train_annotations`, not `data`: `detect export` of its
    checkpoint exported without class names. It takes the json's categories, as `--names` does."""
    import yaml

    from data.sources import load_yolo_dataset
    from yolo_admm.cli import main

    coco = load_yolo_dataset(shapes_yaml, "train").to_coco()
    names = [f"{category['name']}_json" for category in coco["categories"]]
    for category, name in zip(coco["categories"], names):
        category["name"] = name
    (tmp_path / "train.json").write_text(json.dumps(coco))
    run = tmp_path / "coco_run"
    shutil.copytree(uninterrupted["out"], run)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    del settings["data"]
    settings.update(out=str(run), train_annotations=str(tmp_path / "train.json"))
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    stage_file = run / "sparsity_0.6" / "retrained.pt"
    assert main(["detect", "export", "--checkpoint", str(stage_file), "--out", str(tmp_path / "a"),
                 "--formats", "compact"]) == 0
    assert f"the class names of {tmp_path / 'train.json'}, as the run records" in capsys.readouterr().out
    assert load_compact(tmp_path / "a" / "model.yaspars").class_names == names
    assert main(["detect", "export", "--cfg", DEMO_CFG, "--checkpoint", str(stage_file), "--names",
                 str(tmp_path / "train.json"), "--out", str(tmp_path / "b"), "--formats", "compact"]) == 0
    assert load_compact(tmp_path / "b" / "model.yaspars").class_names == names


def test_batchnorm_recalibration_passes_dropout_layers_through_whatever_the_random_stream(shapes_yaml, tmp_path):
    """Found by a review: update_bn ran yolo-fastest's [dropout] layers in training mode, with masks
    from torch's global stream, which a data loader's workers and a resume move: the statistics, and
    so every stage after them, changed with --workers and after a killed magnitude run resumed."""
    from helpers import tiny_yolo_cfg

    text = tiny_yolo_cfg("width=96\nheight=96\nchannels=3\nbatch=4\n", (8, 16, 16, 16, 16))
    first_pool = text.index("[maxpool]\nsize=2\nstride=2\n") + len("[maxpool]\nsize=2\nstride=2\n")
    cfg = tmp_path / "dropout.cfg"
    cfg.write_text(text[:first_pool] + "\n[dropout]\nprobability=0.5\n" + text[first_pool:])
    ctx = prune_pipeline.make_context(tiny_job(shapes_yaml, tmp_path / "run", cfg=str(cfg), bn_images=8))
    statistics = []
    for seed in (1, 2):
        model = ctx.load_model()
        torch.manual_seed(seed)                                      # another state of the global stream
        ctx.recalibrate_batchnorm(model)
        statistics.append({name: value.clone() for name, value in model.state_dict().items() if "running" in name})
        assert [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)] == [0.5]
    assert statistics[0].keys() and all(torch.equal(statistics[0][k], statistics[1][k]) for k in statistics[0])


def test_a_run_stopped_while_it_measures_a_stage_leaves_no_scratch_archive(shapes_yaml, tmp_path, monkeypatch):
    """Found by a review: the size probe of each stage's archive was written into the run folder and
    removed after it, so a kill in between left a hidden 0.7 MB file that only a resume removed."""
    real = prune_pipeline.export_compact

    def written_then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_pipeline, "export_compact", written_then_stopped)
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_job(shapes_yaml, tmp_path / "run"))
    left = sorted(path.name for path in (tmp_path / "run").rglob("*") if path.is_file())
    assert left and not [name for name in left if name.endswith((".yaspars", ".yolo-admm", ".tmp"))], left
