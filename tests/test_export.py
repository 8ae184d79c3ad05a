"""Export of a pruned detector (detector.export), each format checked by an independent runtime.

The model is the demo cfg (detector/cfgs/demo-tiny.cfg, 160x160, 2 heads) with seeded random
weights and batch-norm statistics, pruned to 80% global sparsity by magnitude (the mAP comparison
uses the shipped trained weights instead, so that there is an mAP to compare). Inputs are images
of the generated shapes dataset.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import detector
from data.eval_dataset import InferenceDataset
from data.sources import load_yolo_dataset
from data.synthetic import make_shapes_dataset
from detector import cli_export
from detector.cfgs import cfg_path
from detector.evaluate import coco_metrics, to_coco_results
from detector.export import (COMPACT_CFG_KEY, ONNX_LAYOUT_KEY, ExportCheckError, darknet_rows, dense_fp32_bytes,
                             export_compact, export_darknet, export_model, export_onnx, load_compact,
                             onnxruntime_outputs, opencv_difference, opencv_outputs, read_otherwise_by_opencv)
from detector.layers import ConvBlock
from detector.postprocess import postprocess, select_detections, to_original_image
from detector.predict import make_loader
from pruning.magnitude import magnitude_prune
from pruning.masks import Masks
from pruning.sparse_archive import save_sparse_archive

from helpers import needs_darknet_importer

DEMO_CFG = cfg_path("demo-tiny.cfg")
SPARSITY = 0.8


@torch.no_grad()
def _randomize(model: detector.DarknetModel, seed: int) -> None:
    """Conv weights with variance 1/fan_in, BN affine and running statistics away from identity."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.layers:
        if not isinstance(block, ConvBlock):
            continue
        bound = math.sqrt(3.0 / block.conv.weight[0].numel())
        block.conv.weight.uniform_(-bound, bound, generator=gen)
        if isinstance(block.bn, nn.BatchNorm2d):
            block.bn.weight.uniform_(0.5, 1.5, generator=gen)
            block.bn.bias.uniform_(-0.2, 0.2, generator=gen)
            block.bn.running_mean.uniform_(-0.2, 0.2, generator=gen)
            block.bn.running_var.uniform_(0.5, 2.0, generator=gen)
        else:
            block.conv.bias.uniform_(-0.5, 0.5, generator=gen)


@pytest.fixture(scope="module")
def pruned():
    """(model, masks): the demo model, random weights, 80% of its conv weights pruned (global magnitude)."""
    model = detector.load_darknet(DEMO_CFG)
    _randomize(model, seed=0)
    masks = magnitude_prune(model, SPARSITY, scope="global")
    return model.eval(), masks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated dataset's data.yaml (4 val images at the demo's 160x160)."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", n_train=1, n_val=4, img_size=160, seed=5)


@pytest.fixture(scope="module")
def images(shapes):
    """Float Tensor[4, 3, 160, 160]: the val images as the network sees them."""
    dataset = InferenceDataset.from_source(load_yolo_dataset(shapes, "val"), 160, 160, False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _with_yolo_options(cfg_text: str, options: str) -> str:
    """The cfg with `options` added to every [yolo] section."""
    return cfg_text.replace("[yolo]\n", f"[yolo]\n{options}\n")


# ---- (1) Darknet .weights, read back by us and by OpenCV DNN --------------------------------------

def test_darknet_export_round_trips_and_keeps_the_cfg(pruned, tmp_path):
    model, masks = pruned
    report = export_darknet(model, tmp_path / "pruned.weights", verify=False)
    assert Path(report["cfg"]).read_text() == DEMO_CFG.read_text()
    assert report["bytes"] == 20 + dense_fp32_bytes(model)  # header + every float tensor, dense
    reloaded = detector.load_darknet(report["cfg"], report["weights"])
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert Masks.from_model(reloaded).stats()["kept"] == masks.stats()["kept"]


@needs_darknet_importer
def test_opencv_reads_the_exported_files_and_computes_the_same_outputs(pruned, tmp_path, images):
    model, _ = pruned
    report = export_darknet(model, tmp_path / "pruned.weights", verify=True)
    assert report["opencv_max_rel_diff"] <= 1e-4
    # Every column of every row: OpenCV with its score threshold and NMS switched off.
    cfg_all_rows = tmp_path / "all_rows.cfg"
    cfg_all_rows.write_text(_with_yolo_options(Path(report["cfg"]).read_text(), "thresh=0\nnms_threshold=0"))
    assert opencv_difference(model, cfg_all_rows, report["weights"], images) <= 1e-4
    theirs = opencv_outputs(cfg_all_rows, report["weights"], images)
    with torch.no_grad():
        ours = [darknet_rows(out) for out in model(images)]
    for head, (mine, cv_out) in enumerate(zip(ours, theirs)):
        assert cv_out.shape == tuple(mine.shape), head
        np.testing.assert_allclose(cv_out[..., 4], mine[..., 4].numpy(), atol=1e-4)


@needs_darknet_importer
def test_a_cfg_opencv_cannot_run_is_a_clear_error(tmp_path):
    """A [route] with groups over two layers is Darknet's (each input split, then joined); OpenCV's
    importer fails on it with an assertion deep in its convolution layer."""
    conv = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride={}\npad=1\nactivation=leaky\n\n"
    (tmp_path / "groups.cfg").write_text(
        "[net]\nwidth=64\nheight=64\nchannels=3\n\n" + conv.format(2) + conv.format(1)
        + "[route]\nlayers=-1,-2\ngroups=2\ngroup_id=1\n\n[maxpool]\nsize=2\nstride=2\n\n"
        + "[convolutional]\nsize=1\nstride=1\npad=1\nfilters=27\nactivation=linear\n\n"
        + "[yolo]\nmask=0,1,2\nanchors=10,14, 23,27, 37,58\nclasses=4\nnum=3\n")
    model = detector.load_darknet(tmp_path / "groups.cfg")
    with pytest.raises(ValueError, match=r"model.cfg: OpenCV's Darknet importer cannot run these files, .*"
                                         r"leave 'darknet' out of the export formats"):
        export_darknet(model, tmp_path / "out" / "model.weights", verify=True)


@pytest.mark.parametrize("layer, message", [
    ("[shortcut]\nfrom=-2,-3\nactivation=linear\n", r"h.cfg:31 \[shortcut\]: OpenCV's importer adds only the first"),
    ("[maxpool]\nsize=2\n", r"h.cfg:14 \[maxpool\]: a \[maxpool\] without stride has stride 1 in Darknet"),
    ("[maxpool]\nstride=1\n", r"h.cfg:15 \[maxpool\]: a \[maxpool\] without size has size = stride \(1\)"),
    ("[maxpool]\nsize=2\nstride=1\nstride_x=2\nstride_y=2\n",
     r"h.cfg:17 \[maxpool\]: OpenCV's importer ignores stride_x and takes stride 1")])
def test_a_darknet_export_opencv_would_read_as_another_network_is_refused_before_writing(tmp_path, layer, message):
    """Found by a review: OpenCV's importer reads these legal cfgs otherwise than Darknet; the check
    then blamed a correct model, or failed on mismatched shapes and left the files behind."""
    conv = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n\n"
    (tmp_path / "h.cfg").write_text(
        "[net]\nwidth=64\nheight=64\nchannels=3\n\n" + conv + layer + "\n"
        + "[convolutional]\nsize=1\nstride=32\npad=1\nfilters=27\nactivation=linear\n\n"
        + "[yolo]\nmask=0,1,2\nanchors=10,14, 23,27, 37,58\nclasses=4\nnum=3\n")
    if "shortcut" in layer:                                   # adds layers 1 and 0 to layer 2
        (tmp_path / "h.cfg").write_text((tmp_path / "h.cfg").read_text().replace(conv, conv * 3, 1))
    model = detector.load_darknet(tmp_path / "h.cfg")
    with pytest.raises(ValueError, match=message + r".*leave 'darknet' out of the export formats"):
        export_darknet(model, tmp_path / "out" / "model.weights", verify=True)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # and where OpenCV reads the same network, nothing is refused (found by a later review)
    (tmp_path / "same.cfg").write_text((tmp_path / "h.cfg").read_text().replace(layer, "[maxpool]\nsize=2\nstride=2\n"
                                                                                "stride_x=2\nstride_y=2\n"))
    assert read_otherwise_by_opencv(detector.parse_cfg(tmp_path / "same.cfg")) is None


def test_onnx_layout_grids_follow_the_outputs_when_the_stride_is_inexact(tmp_path):
    """Found by a review: at 52x52 with three stride-2 convs the 7x7 grid's stride is 52 / 7, and
    int(52 // (52 / 7)) gave 6."""
    conv = "[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
    (tmp_path / "w52.cfg").write_text("[net]\nwidth=52\nheight=52\nchannels=3\n\n" + conv * 3
                                      + "[convolutional]\nsize=1\nstride=1\nfilters=18\nactivation=linear\n\n"
                                      + "[yolo]\nmask=0,1\nanchors=10,14, 23,27\nclasses=4\nnum=2\n")
    model = detector.load_darknet(tmp_path / "w52.cfg")
    report = export_onnx(model, tmp_path / "model.onnx", verify=False)
    layout = json.loads({p.key: p.value for p in onnx.load(tmp_path / "model.onnx").metadata_props}[ONNX_LAYOUT_KEY])
    (head,) = layout["heads"]
    assert head["grid"] == [7, 7] and head["rows"] == [0, 2 * 7 * 7] == [0, report["output_shape"][1]]


def test_an_onnx_size_the_model_cannot_decode_leaves_no_file(tmp_path):
    """width=100 with five stride-2 convs decodes with stride 25 only at 100x100; at 800 (a multiple
    of 32 and of 25) the 25x25 grid's true stride is 32: refused before anything is written."""
    conv = "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
    (tmp_path / "w100.cfg").write_text("[net]\nwidth=100\nheight=100\nchannels=3\n\n" + conv * 5
                                       + "[convolutional]\nsize=1\nstride=1\npad=1\nfilters=27\nactivation=linear\n\n"
                                       + "[yolo]\nmask=0,1,2\nanchors=10,14, 23,27, 37,58\nclasses=4\nnum=3\n")
    model = detector.load_darknet(tmp_path / "w100.cfg")
    with pytest.raises(ValueError, match="at input 800x800 layer 6 .*does not tile the input with its stride 25"):
        export_onnx(model, tmp_path / "model.onnx", img_size=800)
    assert not list(tmp_path.glob("*.onnx"))


@needs_darknet_importer
def test_opencv_keeps_the_scores_we_keep(pruned, tmp_path, images):
    """The exported cfg as is: OpenCV zeroes every score (objectness x class) not above 0.2."""
    model = _confident_copy(pruned[0])
    report = export_darknet(model, tmp_path / "confident.weights", verify=False)
    theirs = opencv_outputs(report["cfg"], report["weights"], images)
    with torch.no_grad():
        ours = [darknet_rows(out) for out in model(images)]
    for mine, cv_out in zip(ours, theirs):
        scores = (mine[..., 5:] * mine[..., 4:5]).numpy()
        np.testing.assert_array_equal(cv_out[..., 5:] > 0, scores > 0.2)
        np.testing.assert_allclose(cv_out[..., 5:][scores > 0.2], scores[scores > 0.2], rtol=1e-4)
    assert sum(int((cv_out[..., 5:] > 0).sum()) for cv_out in theirs) >= 100  # the check saw real scores


@needs_darknet_importer
def test_opencv_nms_keeps_the_detections_we_keep(pruned, tmp_path, images):
    """With `nms_threshold=0.4` in each [yolo] section OpenCV also runs per-class NMS per layer:
    it keeps the same (class, score) pairs as our post-processing with those settings, head by head."""
    model = _confident_copy(pruned[0])
    report = export_darknet(model, tmp_path / "confident.weights", verify=False)
    cfg_nms = tmp_path / "nms.cfg"
    cfg_nms.write_text(_with_yolo_options(Path(report["cfg"]).read_text(), "nms_threshold=0.4"))
    theirs = opencv_outputs(cfg_nms, report["weights"], images)
    with torch.no_grad():
        ours = [darknet_rows(out) for out in model(images)]
    compared = 0
    for mine, cv_out in zip(ours, theirs):
        for rows, cv_rows in zip(mine, cv_out):
            expected = select_detections(rows, conf_thresh=0.2, iou_thresh=0.4, max_det=10_000)
            row_index, class_index = np.nonzero(cv_rows[:, 5:])
            cv_scores = cv_rows[row_index, 5 + class_index]
            order = np.lexsort((class_index, -cv_scores))
            assert len(row_index) == len(expected)
            np.testing.assert_allclose(cv_scores[order], expected[:, 4].numpy(), rtol=1e-4)
            np.testing.assert_array_equal(class_index[order], expected[:, 5].numpy().astype(int))
            compared += len(expected)
    assert compared >= 100  # the check saw real detections


def _confident_copy(model: detector.DarknetModel) -> detector.DarknetModel:
    """A copy whose heads predict objectness ~0.9 everywhere, so plenty of boxes pass 0.2."""
    confident = detector.load_darknet(DEMO_CFG)
    confident.load_state_dict(model.state_dict())
    head_convs = [block for block in confident.layers if isinstance(block, ConvBlock)
                  and block.conv.out_channels == 27]
    with torch.no_grad():
        for block in head_convs:
            block.conv.bias.view(3, 9)[:, 4] = 2.5
    return confident.eval()


# ---- (2) ONNX with decoding, run by onnxruntime ---------------------------------------------------

@pytest.fixture(scope="module")
def onnx_export(pruned, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "pruned.onnx"
    return path, export_onnx(pruned[0], path, opset=17, verify=True)


def test_onnx_file_has_opset_17_and_documents_its_layout(pruned, onnx_export):
    model, _ = pruned
    path, report = onnx_export
    proto = onnx.load(str(path))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert report["output_shape"] == [1, 3 * 5 * 5 + 3 * 10 * 10, 9]
    layout = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_LAYOUT_KEY])
    assert [h["rows"] for h in layout["heads"]] == [[0, 75], [75, 375]]
    assert [h["grid"] for h in layout["heads"]] == [[5, 5], [10, 10]]
    assert layout["heads"][0]["anchors"] == model.heads[0].anchors.tolist()
    assert report["onnxruntime_max_abs_diff"] <= 1e-4 and report["onnxruntime_max_rel_diff"] <= 1e-4


def test_onnxruntime_equals_pytorch_on_a_batch(pruned, onnx_export, images):
    model, _ = pruned
    theirs = onnxruntime_outputs(onnx_export[0], images)        # batch 4: the batch axis is free
    with torch.no_grad():
        ours = torch.cat([out.flatten(1, 3) for out in model(images)], dim=1).numpy()
    assert theirs.shape == ours.shape == (4, 375, 9)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_onnx_file_declares_its_output_size_and_only_the_batch_is_free(onnx_export):
    """The tracer left the rows and columns symbolic; converters that plan memory need them."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_export[0])), strict_mode=True)
    declared = {value.name: [dim.dim_value or dim.dim_param for dim in value.type.tensor_type.shape.dim]
                for value in [*proto.graph.input, *proto.graph.output]}
    assert declared == {"images": ["batch", 3, 160, 160], "detections": ["batch", 375, 9]}


def test_onnxruntime_gives_the_same_detections_and_map(tmp_path, shapes):
    """The shipped, trained demo weights pruned to 80% (so that mAP is far from 0) through both
    runtimes. Detections at a deployment threshold are the same boxes (compared by position: outputs
    that differ by 1e-5 may swap near-tied scores), and mAP at the evaluation threshold is the same."""
    model = detector.load_darknet(DEMO_CFG, cfg_path("demo-tiny.weights"))
    magnitude_prune(model, SPARSITY, scope="global")
    model.eval()
    onnx_path = tmp_path / "trained.onnx"
    export_onnx(model, onnx_path, opset=17, verify=True)
    source = load_yolo_dataset(shapes, "val")
    loader = make_loader(InferenceDataset.from_source(source, 160, 160, False), 4, 0, torch.device("cpu"))
    outputs = {"torch": [], "onnx": []}
    for batch, metas in loader:
        with torch.no_grad():
            outputs["torch"].append((model(batch), metas))
        outputs["onnx"].append(([torch.from_numpy(onnxruntime_outputs(onnx_path, batch))], metas))

    def detections(key: str, conf_thresh: float) -> list:
        return [(meta, to_original_image(found, meta.transform))
                for raw, metas in outputs[key]
                for found, meta in zip(postprocess(raw, conf_thresh=conf_thresh, iou_thresh=0.45, max_det=100), metas)]

    def by_position(found: torch.Tensor) -> torch.Tensor:
        return found[torch.argsort(found[:, 0] * 1e4 + found[:, 1])]

    deployed = {key: detections(key, 0.25) for key in outputs}
    for (_, mine), (_, theirs) in zip(deployed["torch"], deployed["onnx"]):
        assert len(mine) == len(theirs) > 0
        torch.testing.assert_close(by_position(theirs), by_position(mine), atol=1e-3, rtol=0)
    maps = {key: coco_metrics(source.to_coco(), to_coco_results(detections(key, 0.005), source.category_ids)).metrics()
            for key in outputs}
    assert maps["torch"]["map50"] > 0.3
    assert maps["onnx"]["map50"] == pytest.approx(maps["torch"]["map50"], abs=1e-9)
    assert maps["onnx"]["map50_95"] == pytest.approx(maps["torch"]["map50_95"], abs=1e-9)


# ---- (3) the compact sparse archive -----------------------------------------------------------

def test_compact_archive_rebuilds_the_model(pruned, tmp_path, images):
    model, masks = pruned
    report = export_compact(model, masks, tmp_path / "pruned.yaspars")
    rebuilt = load_compact(tmp_path / "pruned.yaspars")
    assert [h.anchors.tolist() for h in rebuilt.heads] == [h.anchors.tolist() for h in model.heads]
    assert Masks.from_model(rebuilt).stats() == masks.stats()
    # Conv weights come back as fp16 values, everything else exactly: identical to the model with
    # its weights rounded to fp16, and within fp16 rounding of the model itself.
    rounded = detector.load_darknet(DEMO_CFG)
    rounded.load_state_dict({name: t.half().float() if name in set(masks) else t
                             for name, t in model.state_dict().items()})
    with torch.no_grad():
        for got, want, original in zip(rebuilt(images), rounded.eval()(images), model(images)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, original, atol=2e-2, rtol=2e-3)
    assert report["sparsity"] == pytest.approx(SPARSITY, abs=1e-4)
    assert report["bytes"] < 0.12 * report["dense_fp32_bytes"]
    print(f"\ncompact fp16 @ {SPARSITY:.0%}: {report['bytes']} bytes = {report['ratio_to_dense']:.3f} x dense fp32 "
          f"({report['dense_fp32_bytes']}); masks + values {report['sparse_bytes']} = "
          f"{report['ratio_to_bound']:.3f} x entropy bound {report['entropy_bound_bytes']:.0f}")


def test_a_rebuilt_model_exports_to_darknet_with_the_cfg_it_was_built_from(pruned, tmp_path):
    model, masks = pruned
    export_compact(model, masks, tmp_path / "pruned.yaspars")
    report = export_darknet(load_compact(tmp_path / "pruned.yaspars"), tmp_path / "again.weights", verify=False)
    assert report["bytes"] == 20 + dense_fp32_bytes(model)        # its temporary cfg file is gone: its text is not
    assert Path(report["cfg"]).read_text() == DEMO_CFG.read_text()
    load_compact(tmp_path / "pruned.yaspars", cfg_path=tmp_path / "kept.cfg")
    assert (tmp_path / "kept.cfg").read_text() == DEMO_CFG.read_text()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.parametrize("failure", [ExportCheckError("the archive's check failed"), KeyboardInterrupt()])
def test_an_export_that_fails_or_is_interrupted_leaves_the_earlier_export_whole(pruned, tmp_path, monkeypatch,
                                                                              failure):
    """Found by a review: the formats were written one by one under their final names, so a failed
    or interrupted export left the new model's .weights and ONNX beside the earlier archive."""
    import detector.export as export_module

    model, masks = pruned
    export_model(model, tmp_path, ["darknet", "onnx", "compact"], masks, stem="m")
    before = _snapshot(tmp_path)

    def failing(*_args, **_kwargs):
        raise failure

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layers[0].conv.weight.mul_(2.0)
    monkeypatch.setattr(export_module, "export_compact", failing)   # the last format, after the other two
    with pytest.raises(type(failure)):
        export_model(changed, tmp_path, ["darknet", "onnx", "compact"], masks, stem="m")
    assert _snapshot(tmp_path) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(before)     # no staging folder left


def test_what_an_export_cannot_write_is_refused_before_it_writes_anything(pruned, tmp_path):
    """Found by a review: a folder at the archive's name, or a weight beyond float16's range, was
    found only after the .weights and ONNX files had been written."""
    model, masks = pruned
    (tmp_path / "m.yaspars").mkdir()
    with pytest.raises(ValueError, match=r"m.yaspars: expected a file to write, found a folder"):
        export_model(model, tmp_path, ["darknet", "onnx", "compact"], masks, stem="m")
    assert [path.name for path in tmp_path.iterdir()] == ["m.yaspars"]
    large = copy.deepcopy(model)
    with torch.no_grad():
        large.layers[2].conv.weight[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match=r"export: layers.2.conv.weight holds \|w\| = 1e\+05, beyond float16's "
                                         r"65504, .* or the int8 format \(detect export --int8\)"):
        export_model(large, tmp_path / "big", ["darknet", "compact"], stem="m")
    assert not (tmp_path / "big").exists()
    assert export_model(large, tmp_path / "big", ["compact"], value_format="int8", stem="m")["compact"]["bytes"] > 0


def test_a_killed_exports_staging_folder_is_removed_and_only_that(tmp_path):
    """A prune run (under its folder lock) removes the staging folder a killed export left; a folder
    of the user's named alike is no staging folder (found by a review: it was removed too)."""
    from engine import remove_stale_temp_files

    staging = tmp_path / "export" / ".yolo-admm-export.pruned.k3j_x9q2.tmp"
    staging.mkdir(parents=True)
    (staging / "pruned.weights").write_bytes(b"half written")
    users = tmp_path / "export" / ".backup.20241127.tmp"
    users.mkdir()
    (users / "precious").write_text("the user's")
    assert remove_stale_temp_files(tmp_path, recursive=True) == [staging]
    assert not staging.exists() and (users / "precious").read_text() == "the user's"


def test_an_export_writes_the_cfg_as_it_was_read_not_as_the_file_is_now(tmp_path):
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(DEMO_CFG.read_text())
    model = detector.load_darknet(cfg)
    cfg.write_text(DEMO_CFG.read_text().replace("activation=leaky", "activation=mish", 1))   # edited afterwards
    report = export_darknet(model, tmp_path / "out" / "tiny.weights", verify=False)
    assert Path(report["cfg"]).read_text() == DEMO_CFG.read_text()


@pytest.mark.parametrize("value_format", ["fp16", "int8"])
def test_compact_archive_is_within_10_percent_of_the_entropy_bound(pruned, tmp_path, value_format):
    model, masks = pruned
    report = export_compact(model, masks, tmp_path / f"pruned-{value_format}.yaspars", value_format)
    print(f"\n{value_format}: masks + values {report['sparse_bytes']} bytes, entropy bound "
          f"{report['entropy_bound_bytes']:.0f}, ratio {report['ratio_to_bound']:.3f}; file {report['bytes']}")
    assert report["ratio_to_bound"] <= 1.10


def test_int8_archive_is_smaller_and_close(pruned, tmp_path, images):
    model, masks = pruned
    fp16 = export_compact(model, masks, tmp_path / "a.yaspars", "fp16")
    int8 = export_compact(model, masks, tmp_path / "b.yaspars", "int8")
    assert int8["bytes"] < fp16["bytes"]
    assert fp16["rounded_to_zero"] == int8["rounded_to_zero"] == 0      # the kept weights are the largest
    dense = detector.load_darknet(DEMO_CFG)                   # a dense model's smallest weights round to 0
    _randomize(dense, seed=1)
    dense_int8 = export_compact(dense, None, tmp_path / "dense.yaspars", "int8")
    assert dense_int8["rounded_to_zero"] > 0 and dense_int8["nonzero"] + dense_int8["rounded_to_zero"] == \
        dense_int8["params"]
    assert f"(sparsity {dense_int8['sparsity']:.3f}; int8 rounded {dense_int8['rounded_to_zero']:,} more to 0)" in \
        cli_export.format_report({"dense_fp32_bytes": dense_int8["dense_fp32_bytes"], "compact": dense_int8})
    rebuilt = load_compact(tmp_path / "b.yaspars")
    for name in masks:
        weight, back = model.state_dict()[name], rebuilt.state_dict()[name]
        step = weight.abs().max() / 127
        assert torch.equal(back != 0, weight != 0), name
        assert (back - weight).abs().max() <= step / 2 + 1e-7, name


def test_compact_export_checks_the_file_against_the_model_and_reports_the_error(pruned, tmp_path, monkeypatch):
    model, masks = pruned
    fp16 = export_compact(model, masks, tmp_path / "a.yaspars", "fp16")
    int8 = export_compact(model, masks, tmp_path / "b.yaspars", "int8")
    weights = [model.state_dict()[name] for name in masks]
    rounding = max(float((w.half().float() - w).abs().max()) for w in weights)
    assert fp16["max_abs_error"] == pytest.approx(rounding) and rounding > 0
    assert int8["max_abs_error"] > 10 * fp16["max_abs_error"]
    assert 1 / 508 < int8["max_rel_error"] <= 1 / 254 * (1 + 1e-4)
    assert 0 < fp16["output_max_rel_diff"] < int8["output_max_rel_diff"] < 0.5
    first = next(iter(masks))
    decode = detector.export.load_sparse_archive

    def misdecoded(path):                   # as a decoder that lost the int8 scale of one tensor would
        state = decode(path)
        state[first] = state[first] * 1.5
        return state

    monkeypatch.setattr(detector.export, "load_sparse_archive", misdecoded)
    with pytest.raises(ExportCheckError, match=f"c.yaspars: the archive does not decode to the model, removed: {first}: "
                                           f"expected an error within int8's rounding"):
        export_compact(model, masks, tmp_path / "c.yaspars", "int8")
    assert not (tmp_path / "c.yaspars").exists()
    assert export_compact(model, masks, tmp_path / "d.yaspars", "int8", verify=False)["bytes"] == int8["bytes"]


def test_compact_export_refuses_weights_outside_the_masks(pruned, tmp_path):
    model, masks = pruned
    unpruned = detector.load_darknet(DEMO_CFG)
    unpruned.load_state_dict(model.state_dict())
    with torch.no_grad():
        unpruned.layers[0].conv.weight.add_(1.0)
    with pytest.raises(ValueError, match="nonzero where the mask prunes"):
        export_compact(unpruned, masks, tmp_path / "bad.yaspars")
    assert not (tmp_path / "bad.yaspars").exists()


def test_conv_weights_the_masks_leave_out_are_stored_compactly_too(pruned, tmp_path):
    """Found by a review: with `--exclude`, the conv weights outside the masks went into the archive
    as raw fp32, so that a pruned model's archive outgrew the dense model's."""
    model, masks = pruned
    names = list(masks)
    partial = Masks({name: masks[name] for name in names[1:]})       # one conv weight excluded, dense
    unpruned_first = detector.load_darknet(DEMO_CFG)
    unpruned_first.load_state_dict(model.state_dict())
    first = dict(unpruned_first.named_parameters())[names[0]]
    with torch.no_grad():
        first.add_(0.01)
    full = export_compact(unpruned_first, None, tmp_path / "none.yaspars")
    excluded = export_compact(unpruned_first, partial, tmp_path / "partial.yaspars")
    assert excluded["bytes"] == full["bytes"] and excluded["params"] == full["params"]
    assert excluded["nonzero"] == sum(int(m.sum()) for _, m in partial.items()) + first.numel()
    assert excluded["max_abs_error"] < 1e-3 and excluded["value_format"] == "fp16"

    save_sparse_archive(pruned[0].state_dict(), tmp_path / "bare.yaspars")
    with pytest.raises(ValueError, match=COMPACT_CFG_KEY):
        load_compact(tmp_path / "bare.yaspars")


# ---- the CLI ----------------------------------------------------------------------------------

@needs_darknet_importer
def test_cli_exports_every_format_and_writes_the_report(pruned, tmp_path, capsys):
    model, masks = pruned
    export_darknet(model, tmp_path / "in.weights", verify=False)
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--cfg", str(tmp_path / "in.cfg"), "--weights", str(tmp_path / "in.weights"),
                              "--out", str(tmp_path / "out"), "--formats", "darknet,compact", "--int8"])
    assert cli_export.run(args) == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert set(report) == {"dense_fp32_bytes", "darknet", "compact"}
    assert report["compact"]["value_format"] == "int8"
    assert report["compact"]["nonzero"] == masks.stats()["kept"]
    assert (tmp_path / "out" / "model.cfg").is_file() and not (tmp_path / "out" / "model.onnx").exists()
    assert "entropy bound" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--cfg", "c", "--out", "o", "--formats", "darknet,tflite"])


@needs_darknet_importer
def test_an_export_into_a_used_folder_replaces_the_earlier_one(pruned, tmp_path, monkeypatch):
    """Left alone by an earlier session: an ONNX file of an earlier export stayed beside a new
    report that did not list it. The earlier export's files that are this one's inputs stay."""
    model, _ = pruned
    export_darknet(model, tmp_path / "in.weights", verify=False)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)

    def export(cfg: Path, weights: Path, formats: str) -> None:
        assert cli_export.run(parser.parse_args(["--cfg", str(cfg), "--weights", str(weights), "--out", "out",
                                                 "--formats", formats])) == 0
    monkeypatch.chdir(tmp_path)                            # the report names its files relative to here
    export(tmp_path / "in.cfg", tmp_path / "in.weights", "darknet,onnx")
    (out / "notes.txt").write_text("the user's own file")
    export(out / "model.cfg", out / "model.weights", "compact")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.cfg", "model.weights", "model.yaspars",
                                                     "notes.txt"]
    export(tmp_path / "in.cfg", tmp_path / "in.weights", "onnx")      # the last report listed only the archive
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.cfg", "model.onnx", "model.weights",
                                                     "notes.txt"]
    export(tmp_path / "in.cfg", tmp_path / "in.weights", "darknet")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.cfg", "model.weights", "notes.txt"]
    odd = {"darknet": {"weights": "/elsewhere/notes.txt", "cfg": "export.json"}, "onnx": {"path": ""}}
    (out / "export.json").write_text(json.dumps(odd))        # a report this command did not write: only its
    export(tmp_path / "in.cfg", tmp_path / "in.weights", "darknet")   # own file names are ever removed
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.cfg", "model.weights", "notes.txt"]


def test_cli_exports_a_prune_runs_stage_file(pruned, tmp_path):
    """Found by a review: `--checkpoint sparsity_S/retrained.pt` was refused as no trainer checkpoint."""
    from detector.prune_pipeline import save_state

    model, masks = pruned
    save_state(tmp_path / "retrained.pt", model, masks)
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--cfg", str(DEMO_CFG), "--checkpoint", str(tmp_path / "retrained.pt"),
                              "--out", str(tmp_path / "out"), "--formats", "compact"])
    assert cli_export.run(args) == 0
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["compact"]["nonzero"] == masks.stats()["kept"]


def test_cli_exports_a_trainer_checkpoints_ema(pruned, tmp_path):
    from engine import save_checkpoint

    model, masks = pruned
    ema = {name: value.clone() for name, value in model.state_dict().items()}
    ema["layers.0.conv.weight"].zero_()                          # the EMA is what gets exported
    path = save_checkpoint({"epoch": 3, "step": 30, "model": model.state_dict(), "ema": {"module": ema}}, tmp_path)
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--cfg", str(DEMO_CFG), "--checkpoint", str(path), "--out", str(tmp_path / "out"),
                              "--formats", "compact"])
    assert cli_export.run(args) == 0
    zeroed = int(masks["layers.0.conv.weight"].sum())
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["compact"]["nonzero"] == masks.stats()["kept"] - zeroed
    detector.write_weights(tmp_path / "other.weights", model)
    both = parser.parse_args(["--cfg", str(DEMO_CFG), "--weights", str(tmp_path / "other.weights"),
                              "--checkpoint", str(path), "--out", str(tmp_path / "both"), "--formats", "compact"])
    with pytest.raises(ValueError, match=r"other.weights and --checkpoint .*epoch_0003.pt both give the weights to "
                                         r"export .* --weights may only be a compact archive"):
        cli_export.run(both)
    assert not (tmp_path / "both").exists()


def test_predict_eval_and_export_take_a_compact_archive_without_its_cfg(pruned, shapes, tmp_path, capsys):
    """The edge file runs as it is: predict and eval on the archive equal them on the Darknet files
    exported from it (the same fp16-rounded weights), and export reads it too."""
    from yolo_admm.cli import main

    model, masks = pruned
    archive = tmp_path / "model.yaspars"
    export_compact(model, masks, archive)
    assert main(["detect", "export", "--weights", str(archive), "--out", str(tmp_path / "dk"), "--formats",
                 "darknet"]) == 0
    darknet = ["--cfg", str(tmp_path / "dk" / "model.cfg"), "--weights", str(tmp_path / "dk" / "model.weights")]
    val = str(shapes.parent / "images" / "val")
    detections = {}
    for name, weights in (("archive", ["--weights", str(archive)]), ("darknet", darknet)):
        assert main(["detect", "predict", *weights, val, "--out", str(tmp_path / name), "--conf", "0.01",
                     "--device", "cpu"]) == 0
        detections[name] = json.loads((tmp_path / name / "detections.json").read_text())
        capsys.readouterr()
        assert main(["detect", "eval", *weights, "--data", str(shapes), "--device", "cpu"]) == 0
        detections[name + " eval"] = capsys.readouterr().out.splitlines()[-1]
    found = [entry["detections"] for entry in detections["archive"]]
    assert len(found) == 4 and any(found) and found == [entry["detections"] for entry in detections["darknet"]]
    assert detections["archive eval"] == detections["darknet eval"]
    other = tmp_path / "other.cfg"
    other.write_text(DEMO_CFG.read_text().replace("activation=leaky", "activation=mish", 1))
    for argv in (["detect", "predict", "--cfg", str(other), "--weights", str(archive), val],
                 ["detect", "predict", "--weights", darknet[3], val]):
        assert main(argv) == 2
    err = capsys.readouterr().err
    lines = DEMO_CFG.read_text().splitlines()
    assert (f"a compact archive carries its own cfg, which differs from --cfg {other} "
            f"(first at {other}:{lines.index('activation=leaky') + 1} [convolutional]: activation 'mish' against "
            f"'leaky')") in err
    assert "Darknet .weights need --cfg (only a compact archive carries its cfg)" in err
    (tmp_path / "model.onnx").write_bytes(b"an onnx file")
    assert main(["detect", "predict", "--weights", str(tmp_path / "model.onnx"), val]) == 2
    assert "model.onnx: an ONNX file, which runs in onnxruntime or OpenCV" in capsys.readouterr().err
    before = archive.read_bytes()                 # found by a review: an --int8 export in place replaced the fp16 input
    assert main(["detect", "export", "--weights", str(archive), "--out", str(tmp_path), "--int8"]) == 2
    assert f"this run would overwrite its own input {archive} (--weights)" in capsys.readouterr().err
    assert archive.read_bytes() == before and (tmp_path / "model.onnx").read_bytes() == b"an onnx file"  # nothing


@needs_darknet_importer
def test_class_names_travel_with_every_export(pruned, shapes, tmp_path, capsys):
    """Found by a review: no deployed file named the classes, so predict on an archive printed indices."""
    from data.synthetic import SHAPE_CLASSES as NAMES
    from yolo_admm.cli import main

    SHAPE_CLASSES = list(NAMES)
    export_darknet(pruned[0], tmp_path / "in.weights", verify=False)
    assert main(["detect", "export", "--cfg", str(tmp_path / "in.cfg"), "--weights", str(tmp_path / "in.weights"),
                 "--names", str(shapes), "--out", str(tmp_path / "out")]) == 0       # names from a data.yaml
    out = tmp_path / "out"
    assert (out / "model.names").read_text().splitlines() == SHAPE_CLASSES
    metadata = {prop.key: prop.value for prop in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(metadata["yolo_admm.names"]) == SHAPE_CLASSES
    assert load_compact(out / "model.yaspars").class_names == SHAPE_CLASSES
    assert main(["detect", "predict", "--weights", str(out / "model.yaspars"), str(shapes.parent / "images" / "val"),
                 "--out", str(tmp_path / "pred"), "--conf", "0.01"]) == 0
    named = {d["class_name"] for entry in json.loads((tmp_path / "pred" / "detections.json").read_text())
             for d in entry["detections"]}
    assert named and named <= set(SHAPE_CLASSES)
    assert main(["detect", "export", "--weights", str(out / "model.yaspars"), "--out", str(tmp_path / "again"),
                 "--formats", "darknet"]) == 0                                       # carried over from the archive
    assert (tmp_path / "again" / "model.names").read_text().splitlines() == SHAPE_CLASSES
    assert main(["detect", "export", "--weights", str(out / "model.yaspars"), "--names", str(tmp_path / "in.cfg"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "expected 4 class names (the model's classes)" in capsys.readouterr().err
    (tmp_path / "odd.yaml").write_text(json.dumps({"names": ["circle", "square\nbig", "triangle", "cross"]}))
    assert main(["detect", "export", "--weights", str(out / "model.yaspars"), "--names", str(tmp_path / "odd.yaml"),
                 "--out", str(tmp_path / "odd")]) == 2                            # would be two lines of .names
    assert "odd.yaml: class 1 is 'square\\nbig'; expected a name that is not empty, has no line break" in \
        capsys.readouterr().err


def test_an_archive_with_a_newer_text_entry_loads_with_a_warning(pruned, tmp_path):
    """Found by a review: the version before class names could not read an archive that had them
    ("Unexpected key"). An unknown text entry (uint8, 1-D, as the cfg and names are) is left out
    with a warning; an unknown weight is still an error."""
    state = dict(pruned[0].state_dict())
    state[COMPACT_CFG_KEY] = torch.frombuffer(bytearray(DEMO_CFG.read_bytes()), dtype=torch.uint8)
    state["license"] = torch.frombuffer(bytearray(b"CC-BY-4.0"), dtype=torch.uint8)
    save_sparse_archive(state, tmp_path / "newer.yaspars")
    with pytest.warns(UserWarning, match=r"newer.yaspars: entries license are unknown to this version"):
        model = load_compact(tmp_path / "newer.yaspars")
    assert torch.equal(model.layers[0].conv.weight, pruned[0].layers[0].conv.weight.half().float())
    del state["license"]
    state["extra.weight"] = torch.ones(3, 3)
    save_sparse_archive(state, tmp_path / "other.yaspars")
    with pytest.raises(ValueError, match=r"(?s)do not fit the embedded cfg: .*extra.weight"):
        load_compact(tmp_path / "other.yaspars")


def test_a_missing_or_damaged_archive_and_a_bad_embedded_cfg_are_named(pruned, tmp_path):
    """Found by a review: a mistyped archive path was told to add --cfg, and an embedded cfg that
    no longer parses was reported under a temporary file's name."""
    from detector.loading import load_detector

    with pytest.raises(FileNotFoundError, match=r"--weights .*missing.yaspars: expected a Darknet .weights file "
                                                r"or a compact archive, found no file"):
        load_detector(None, str(tmp_path / "missing.yaspars"))
    (tmp_path / "junk.yaspars").write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match=r"junk.yaspars: not a sparse archive: expected magic"):
        load_detector(None, str(tmp_path / "junk.yaspars"))
    state = dict(pruned[0].state_dict())
    cfg_text = DEMO_CFG.read_text().replace("activation=leaky", "activation=leaky # was relu", 1)
    state[COMPACT_CFG_KEY] = torch.frombuffer(bytearray(cfg_text.encode()), dtype=torch.uint8)
    save_sparse_archive(state, tmp_path / "old.yaspars")
    with pytest.raises(detector.DarknetError, match=r"old.yaspars \(its embedded cfg\):\d+ \[convolutional\]"):
        load_detector(None, str(tmp_path / "old.yaspars"))
    good = tmp_path / "good.yaspars"
    export_compact(pruned[0], pruned[1], good, verify=False)
    (tmp_path / "appended.yaspars").write_bytes(good.read_bytes() + b"garbage")    # found by a review: ignored
    with pytest.raises(ValueError, match=r"appended.yaspars: 7 bytes after the archive's last tensor; expected the "
                                         r"file to end there"):
        load_detector(None, str(tmp_path / "appended.yaspars"))
    state = dict(pruned[0].state_dict())
    five_classes = DEMO_CFG.read_text().replace("classes=4", "classes=5").replace("filters=27", "filters=30")
    state[COMPACT_CFG_KEY] = torch.frombuffer(bytearray(five_classes.encode()), dtype=torch.uint8)
    save_sparse_archive(state, tmp_path / "other.yaspars")
    with pytest.raises(ValueError) as refused:           # found by a review: torch's message, a line per tensor
        load_detector(None, str(tmp_path / "other.yaspars"))
    assert "\n" not in str(refused.value) and "the tensors do not fit the embedded cfg: size mismatch for" in \
        str(refused.value) and "(and 2 more)" in str(refused.value)


def test_cli_needs_weights_or_a_checkpoint(tmp_path):
    parser = argparse.ArgumentParser()
    cli_export.add_arguments(parser)
    args = parser.parse_args(["--cfg", str(DEMO_CFG), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--weights"):
        cli_export.run(args)


# ---- real weights -------------------------------------------------------------------------------

@needs_darknet_importer
def test_pruned_yolo_fastest_exports_to_every_format(shared_data, tmp_path):
    """A real pretrained detector (grouped convs, route groups, dropout, 320x320), pruned to 50%."""
    cfg = shared_data("darknet", "yolo-fastest-1.1.cfg")
    model = detector.load_darknet(cfg, shared_data("darknet", "yolo-fastest-1.1.weights"))
    masks = magnitude_prune(model, 0.5)
    report = export_darknet(model, tmp_path / "fastest.weights", verify=True)
    assert report["opencv_max_rel_diff"] <= 1e-4
    onnx_report = export_onnx(model, tmp_path / "fastest.onnx", verify=True)
    assert onnx_report["output_shape"] == [1, 3 * (10 * 10 + 20 * 20), 85]
    assert onnx_report["onnxruntime_max_rel_diff"] <= 1e-4   # boxes reach 320 px: relative to max(1, |v|)
    compact = export_compact(model, masks, tmp_path / "fastest.yaspars")
    print(f"\nyolo-fastest-1.1 @ 50%: weights {report['bytes']}, compact {compact['bytes']} "
          f"({compact['ratio_to_dense']:.3f} x dense), masks + values {compact['ratio_to_bound']:.3f} x entropy bound")
    assert compact["bytes"] < 0.5 * report["bytes"]


@needs_darknet_importer
def test_non_finite_weights_are_refused_and_never_pass_a_check(pruned, tmp_path):
    """Found by a review: NaN compares false, so a NaN output passed OpenCV's check as a
    difference of 0."""

    model, _ = pruned
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers[0].conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"export: expected finite weights, found NaN or infinity in 1 tensor\(s\): "
                                         r"layers.0.conv.weight"):
        export_model(broken, tmp_path / "refused", ["compact"])
    (tmp_path / "nan.names").write_text("the user's own\n")
    broken.class_names = None
    with pytest.raises(ExportCheckError, match="OpenCV's outputs differ from the model's by inf"):
        export_darknet(broken, tmp_path / "nan.weights")
    assert [path.name for path in tmp_path.glob("nan.*")] == ["nan.names"]   # what it wrote is removed, only that
    broken.class_names = [f"c{i}" for i in range(int(broken.heads[0].num_classes))]
    with pytest.raises(ExportCheckError):
        export_darknet(broken, tmp_path / "nan.weights")
    assert not list(tmp_path.glob("nan.*"))


def test_an_onnx_file_that_fails_its_check_is_not_left_in_place(pruned, tmp_path, monkeypatch):
    """Found by a review: the unverified file stayed (and the CLI printed a traceback); a file of an
    earlier export at the same path would pass for this one, so it goes too."""
    import detector.export as export_module

    path = tmp_path / "model.onnx"
    export_onnx(pruned[0], path)
    real = export_module.onnxruntime_outputs
    monkeypatch.setattr(export_module, "onnxruntime_outputs", lambda model, images: real(model, images) + 0.01)
    with pytest.raises(ExportCheckError, match=r"model.onnx: onnxruntime's outputs differ from the model's by "
                                               r"0.01 \(relative\), expected <= 0.0001; the file was removed"):
        export_onnx(pruned[0], path)
    assert not path.exists()


def test_a_failed_check_names_the_models_own_instability_where_that_explains_it(pruned, images):
    """The diagnosis of `_mismatch`: the model's float32 and float64 outputs compared at the check's
    tolerance, and the BatchNorm channels of zero running variance counted. A tolerance below
    float32's rounding stands in for an unstable model; the physics is the next test's."""

    from detector.export import _mismatch

    model = copy.deepcopy(pruned[0])
    with torch.no_grad():
        model.layers[0].bn.running_var[:2] = 0
    stable = _mismatch(Path("m.onnx"), "onnxruntime", 0.5, 1e-2, model, images[:1])
    assert str(stable) == ("m.onnx: onnxruntime's outputs differ from the model's by 0.5 (relative), expected <= "
                           "0.01; the file was removed")
    unstable = str(_mismatch(Path("m.onnx"), "onnxruntime", 0.5, 1e-12, model, images[:1]))
    assert "; the model itself is numerically unstable: its float32 and float64 outputs differ by " in unstable
    assert ("(2 BatchNorm channels with a running variance of 0: detector.batchnorm."
            "silence_constant_channels(model) sets their scale to 0") in unstable
    assert "BatchNorm" not in str(_mismatch(Path("m.onnx"), "OpenCV", 0.5, 1e-12, pruned[0], images[:1]))


def test_constant_batchnorm_channels_are_silenced_and_stop_amplifying_rounding():
    """Found by a review: after magnitude-uniform pruning a 1x1 conv read only emptied channels, so
    its output was a constant and its BN's (x - mean) / sqrt(var + eps) amplified rounding noise by
    316 per layer; exports then failed their checks. The chain here: an emptied channel outputs its
    BN bias, two 1x1 convs read only it, each normalised by statistics measured on data."""

    from torch.optim.swa_utils import update_bn

    from detector.batchnorm import silence_constant_channels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.BatchNorm2d(2), nn.LeakyReLU(0.1),
                          nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2), nn.LeakyReLU(0.1),
                          nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight[1] = 0                                  # emptied: its BN outputs the bias, 26.9
        model[1].bias[1] = 26.9
        model[3].weight[0] = torch.tensor([0.0, 0.37]).view(2, 1, 1)   # channel 0 reads only the constant
        model[6].weight[0] = torch.tensor([0.61, 0.0]).view(2, 1, 1)   # and so does this one
    update_bn([torch.rand(4, 3, 12, 12) for _ in range(3)], model)
    model.eval()
    images = torch.rand(2, 3, 12, 12)

    def float32_against_float64() -> float:
        with torch.no_grad():
            double = copy.deepcopy(model).double()
            return float((model(images).double() - double(images.double())).abs().max())

    assert float32_against_float64() > 1e-2                     # rounding noise times 316, twice
    assert silence_constant_channels(model) == 3                # the emptied one and the two reading it
    assert [int((bn.weight == 0).sum()) for bn in (model[1], model[4], model[7])] == [1, 1, 1]
    assert model[4].weight[1] != 0 and model[7].weight[1] != 0  # the channels that see the images keep theirs
    assert float32_against_float64() < 1e-4
    signal = nn.BatchNorm2d(1).eval()       # a tiny spread on a large mean, above eps: a signal, kept
    signal.running_mean.fill_(1e4)
    signal.running_var.fill_(8e-5)
    assert silence_constant_channels(signal) == 0 and signal.weight.item() == 1.0
    with torch.no_grad():
        assert torch.equal(model(images)[:, 0], model[7].bias[0].expand(2, 10, 10))


@needs_darknet_importer
def test_an_export_at_another_size_writes_that_size_into_every_format(pruned, tmp_path):
    """Found by a review: a prune run at --img-size 160 wrote its ONNX at 160 but a cfg and an
    archive of the cfg's 320, where its detections were worse than the run had measured."""
    model, masks = pruned
    assert (model.net.width, model.net.height) == (160, 160)
    report = export_model(model, tmp_path, ["darknet", "onnx", "compact"], masks=masks, img_size=96)
    assert report["onnx"]["input_shape"] == [1, 3, 96, 96]
    written = detector.load_darknet(tmp_path / "model.cfg", tmp_path / "model.weights")
    archived = load_compact(tmp_path / "model.yaspars")
    assert [(m.net.width, m.net.height) for m in (written, archived)] == [(96, 96), (96, 96)]
    assert report["darknet"]["opencv_max_rel_diff"] <= 1e-3                 # OpenCV ran the files at 96
    assert (model.net.width, model.cfg.net.height) == (160, 160)            # the model itself is as it was


def test_first_difference_ignores_how_a_cfg_is_written(tmp_path):
    from detector.cfg import first_difference, parse_cfg

    text = DEMO_CFG.read_text()
    original = parse_cfg(DEMO_CFG)
    first_conv = text.index("[convolutional]")
    assert text.index("batch_normalize=1", first_conv) < text.index("activation=leaky", first_conv)
    written_otherwise = {        # comments, blank lines, spacing, a section's option order
        "comments.cfg": "# a comment\n\n" + text.replace("[convolutional]", "# a conv\n[convolutional]\n", 1),
        "spacing.cfg": text.replace("activation=leaky", "activation = leaky  "),
        "order.cfg": text[:first_conv] + text[first_conv:].replace("batch_normalize=1\n", "", 1).replace(
            "activation=leaky\n", "activation=leaky\nbatch_normalize=1\n", 1),
    }
    for name, variant in written_otherwise.items():
        (tmp_path / name).write_text(variant)
        assert parse_cfg(tmp_path / name).text != text
        assert first_difference(parse_cfg(tmp_path / name), original) is None, name

    lines = text.splitlines()
    (tmp_path / "mish.cfg").write_text(text.replace("activation=leaky", "activation=mish", 1))
    assert first_difference(parse_cfg(tmp_path / "mish.cfg"), original) == \
        f"{tmp_path / 'mish.cfg'}:{lines.index('activation=leaky') + 1} [convolutional]: activation 'mish' " \
        f"against 'leaky'"
    (tmp_path / "net.cfg").write_text(text.replace("momentum=0.9\n", "momentum=0.95\n", 1))
    assert first_difference(parse_cfg(tmp_path / "net.cfg"), original) == \
        f"{tmp_path / 'net.cfg'}:{lines.index('momentum=0.9') + 1} [net]: momentum 0.95 against 0.9"

    (tmp_path / "longer.cfg").write_text(text + "\n[dropout]\nprobability=0.1\n")
    assert first_difference(parse_cfg(tmp_path / "longer.cfg"), original) == \
        f"{tmp_path / 'longer.cfg'}:{len(lines) + 2} [dropout]"
    assert first_difference(original, parse_cfg(tmp_path / "longer.cfg")) == \
        f"{original.path}: its end, after {len(original.layers)} layers against {len(original.layers) + 1}"


def test_the_readme_onnx_snippet_finds_what_predict_finds(shapes, tmp_path, monkeypatch):
    """The README's "Running the ONNX file" block, run as it is on an EXIF-rotated photo."""
    from PIL import Image

    from yolo_admm.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Running the ONNX file", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    weights = DEMO_CFG.with_suffix(".weights")
    assert main(["detect", "export", "--cfg", str(DEMO_CFG), "--weights", str(weights), "--out", str(tmp_path),
                 "--formats", "onnx"]) == 0
    photo = Image.open(sorted((shapes.parent / "images" / "val").iterdir())[0]).resize((200, 120))
    exif = Image.Exif()
    exif[0x0112] = 6                                          # shown turned 90 degrees clockwise
    photo.save(tmp_path / "photo.jpg", exif=exif)
    monkeypatch.chdir(tmp_path)
    found = {}
    exec(compile(block, "README.md", "exec"), found)
    assert main(["detect", "predict", "--cfg", str(DEMO_CFG), "--weights", str(weights), "photo.jpg",
                 "--out", "predicted", "--no-progress"]) == 0
    predicted = json.loads((tmp_path / "predicted" / "detections.json").read_text())[0]
    assert (predicted["width"], predicted["height"]) == (120, 200) and predicted["detections"]
    assert [d["class_id"] for d in predicted["detections"]] == found["classes"].tolist()
    torch.testing.assert_close(found["boxes"], torch.tensor([d["box_xyxy"] for d in predicted["detections"]]),
                               atol=0.01, rtol=0)
    torch.testing.assert_close(found["scores"], torch.tensor([d["score"] for d in predicted["detections"]]),
                               atol=1e-4, rtol=0)
