"""Export a (pruned) Darknet model for edge devices, each format checked against the model itself.

- **Darknet** (`export_darknet`): `.weights` via `detector.write_weights` plus a copy of the cfg
  beside it; checked by loading both in OpenCV's DNN importer (`cv2.dnn.readNetFromDarknet`).
  Pruned weights are stored as dense zeros: the file is as large as the dense model's.
- **ONNX** (`export_onnx`): the eval-mode forward with the YOLO decoding included, one output
  `detections` Float[B, N, 5 + C] = `detector.postprocess.flatten_heads` of the heads: rows are
  head by head in cfg order, within a head anchor-major then row then column (the flatten of
  [B, A, Hk, Wk, 5 + C]); columns cx, cy, w, h in network-input pixels, objectness, then class
  probabilities (not multiplied by objectness). Input `images` Float[B, 3, H, W], RGB in [0, 1],
  H and W fixed at export, B free (the output declares N and 5 + C). The row layout per head
  (anchors, stride, grid, row range) is stored as JSON in the model's metadata under
  `ONNX_LAYOUT_KEY`. Checked with onnxruntime. Initialisers are dense: the file is about the
  dense fp32 size.
- **Compact** (`export_compact`, `load_compact`): `pruning.sparse_archive` (bit-packed masks,
  nonzeros in fp16 or int8 with per-tensor scales, compressed) with the cfg text embedded, so the
  one file rebuilds the model.

Unstructured sparsity buys size, not speed, on dense runtimes (OpenCV, onnxruntime): only the
compact archive is smaller than the dense model.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from detector.cfg import (ConvolutionalSection, DarknetCfg, DarknetError, MaxpoolSection, ShortcutSection,
                          with_input_size)
from detector.model import DarknetModel, load_darknet
from detector.postprocess import flatten_heads
from detector.weights import write_weights
from engine import atomic_write_bytes, held_interrupts, load_error_summary
from engine.staging_folder import remove_abandoned_staging_folders, staged_files, staging_folder
from pruning.atomic_file import check_writable
from pruning.masks import Masks
from pruning.sparse_archive import check_decoded, load_sparse_archive, save_sparse_archive

FORMATS = ("darknet", "onnx", "compact")
FORMAT_SUFFIXES = {"darknet": (".weights", ".cfg", ".names"), "onnx": (".onnx",), "compact": (".yaspars",)}
FLOAT16_MAX = float(torch.finfo(torch.float16).max)    # 65504
ONNX_INPUT, ONNX_OUTPUT = "images", "detections"
ONNX_LAYOUT_KEY = "yolo_admm.layout"
ONNX_NAMES_KEY = "yolo_admm.names"  # metadata: the class names as a JSON list, where the model has them
MIN_OPSET = 17
COMPACT_CFG_KEY = "darknet_cfg"   # the archive entry (uint8 tensor) holding the cfg text, UTF-8
COMPACT_NAMES_KEY = "class_names"  # the archive entry (uint8 tensor) holding the class names as JSON, where known
ONNX_TOLERANCE = 1e-4             # max |onnxruntime - PyTorch| / max(1, |PyTorch|) accepted by export_onnx
OPENCV_TOLERANCE = 1e-3           # max relative |OpenCV - PyTorch| accepted by export_darknet's check
OPENCV_BN_EPS = 1e-6              # OpenCV's batch-norm epsilon (Darknet's is 1e-5)
_VERIFY_SEED = 0


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of every floating tensor of the model's state_dict stored as dense float32 (the payload
    of its Darknet `.weights` file: conv weights, biases, batch-norm parameters and statistics)."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


class ExportCheckError(ValueError):
    """An exported file's outputs differ from the model's beyond the check's tolerance; the file is
    removed, so that it cannot be shipped by mistake."""


def _mismatch(path: Path, runtime: str, difference: float, tolerance: float, model: DarknetModel,
              images: torch.Tensor) -> ExportCheckError:
    """The error for a failed check of `path`, with why where the model explains it: outputs that
    float32 rounding alone moves by more than the tolerance (compared with float64), which a
    BatchNorm channel of zero running variance fed a constant does (its rounding noise is
    multiplied by 1/sqrt(eps); `detector.batchnorm.silence_constant_channels`)."""
    with torch.no_grad():
        single = DecodedDetections(copy.deepcopy(model).float().cpu()).eval()(images.float()).double()
        double = DecodedDetections(copy.deepcopy(model).double().cpu()).eval()(images.double())
    own = float(((single - double).abs() / double.abs().clamp(min=1.0)).max())
    reason = ""
    if not own <= tolerance:
        constant = sum(int((module.running_var == 0).sum()) for module in model.modules()
                       if isinstance(module, nn.BatchNorm2d) and module.running_var is not None)
        channels = "1 BatchNorm channel" if constant == 1 else f"{constant} BatchNorm channels"
        hint = (f" ({channels} with a running variance of 0: "
                f"detector.batchnorm.silence_constant_channels(model) sets their scale to 0, as detect "
                f"prune now does)") if constant else ""
        reason = (f"; the model itself is numerically unstable: its float32 and float64 outputs differ by "
                  f"{own:.3g}{hint}")
    return ExportCheckError(f"{path}: {runtime}'s outputs differ from the model's by {difference:.3g} (relative), "
                            f"expected <= {tolerance}{reason}; the file was removed")


def require_opencv_darknet_importer(cfg: DarknetCfg | None = None) -> None:
    """ValueError unless this OpenCV can read Darknet files (OpenCV 5 has no Darknet importer) and,
    given `cfg`, that cfg (OpenCV refuses some layers and activations Darknet has, e.g. selu):
    so that a Darknet export that could not be checked is refused before anything is written."""
    if not hasattr(getattr(cv2, "dnn", None), "readNetFromDarknet"):
        raise ValueError(f"checking a Darknet export needs OpenCV 4.x's Darknet importer (cv2.dnn.readNetFromDarknet); "
                         f"found OpenCV {cv2.__version__} without it: install opencv-python<5 (as pyproject.toml "
                         f"asks), or leave 'darknet' out of the export formats")
    if cfg is None:
        return
    try:
        cv2.dnn.readNetFromDarknet(np.frombuffer(cfg.text.encode("utf-8"), np.uint8))
    except cv2.error as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), str(error))
        raise ValueError(f"{cfg.path}: OpenCV's Darknet importer cannot read this cfg, so a Darknet export of it "
                         f"cannot be checked against it; leave 'darknet' out of the export formats: "
                         f"{first_line.strip()}") from error
    otherwise = read_otherwise_by_opencv(cfg)
    if otherwise:
        raise ValueError(f"{otherwise}, so a Darknet export of this cfg cannot be checked against it; leave "
                         f"'darknet' out of the export formats")


def read_otherwise_by_opencv(cfg: DarknetCfg) -> str | None:
    """Where OpenCV 4's Darknet importer builds another network than Darknet from `cfg`, said with
    the option's place, or None: a [shortcut] from several layers (OpenCV adds the first only),
    stride_x / stride_y (OpenCV ignores them), and a [maxpool] without `stride` or, with a stride
    other than 2, without `size` (OpenCV's defaults are 2 and 2; Darknet's stride 1 and size = stride)."""
    for section in cfg.layers:
        written = section.source.written
        if isinstance(section, ShortcutSection) and len(section.layers) > 1:
            return f"{section.source.of('from')}: OpenCV's importer adds only the first of a [shortcut]'s layers"
        if isinstance(section, (ConvolutionalSection, MaxpoolSection)):
            plain = written("stride")                               # an integer: the parser read it so
            opencv_stride = int(plain) if plain is not None else (2 if isinstance(section, MaxpoolSection) else 1)
            for key in ("stride_x", "stride_y"):
                if written(key) is not None and section.stride != opencv_stride:
                    return (f"{section.source.of(key)}: OpenCV's importer ignores {key} and takes stride "
                            f"{opencv_stride}")
        if isinstance(section, MaxpoolSection):
            if plain is None:
                return (f"{section.source}: a [maxpool] without stride has stride 1 in Darknet and 2 in OpenCV's "
                        f"importer")
            if written("size") is None and section.stride != 2:
                return (f"{section.source.of('stride')}: a [maxpool] without size has size = stride "
                        f"({section.stride}) in Darknet and 2 in OpenCV's importer")
    return None


def export_darknet(model: DarknetModel, path: str | os.PathLike, verify: bool = True) -> dict:
    """Write `path` (.weights) and the model's cfg beside it (same stem, `.cfg`), atomically.

    Args:
        model: a `DarknetModel` (any device); its cfg is written as it was read (`model.cfg.text`).
        path: the `.weights` file to write.
        verify: load both files in OpenCV DNN and compare its output on one random input with the
            model's (beyond OPENCV_TOLERANCE: removes the files and raises ExportCheckError).

    Returns:
        dict `weights`, `cfg` (paths), `bytes` (the .weights size), `dense_fp32_bytes`, and with
        verify `opencv_max_rel_diff`.
    """
    if verify:
        require_opencv_darknet_importer(model.cfg)
    weights_path = Path(path)
    cfg_path = weights_path.with_suffix(".cfg")
    atomic_write_bytes(cfg_path, model.cfg.text.encode("utf-8"))
    write_weights(weights_path, model, model.weights_header)
    report = {"weights": str(weights_path), "cfg": str(cfg_path), "bytes": weights_path.stat().st_size,
              "dense_fp32_bytes": dense_fp32_bytes(model)}
    if model.class_names is not None:
        names_path = weights_path.with_suffix(".names")
        report["names"] = str(write_class_names(names_path, model.class_names, "the model's class names"))
    if verify:
        image = _verify_input(model.net.channels, model.net.height, model.net.width)
        report["opencv_max_rel_diff"] = opencv_difference(model, cfg_path, weights_path, image)
        if not report["opencv_max_rel_diff"] <= OPENCV_TOLERANCE:
            for written in (weights_path, cfg_path, Path(report.get("names", weights_path))):
                written.unlink(missing_ok=True)
            raise _mismatch(weights_path, "OpenCV", report["opencv_max_rel_diff"], OPENCV_TOLERANCE, model, image)
    return report


def opencv_outputs(cfg_path: str | os.PathLike, weights_path: str | os.PathLike,
                   images: torch.Tensor) -> list[np.ndarray]:
    """Run Darknet files in OpenCV DNN (`cv2.dnn.readNetFromDarknet`, CPU).

    Args:
        images: float Tensor[B, 3, H, W], RGB in [0, 1] (H, W: the cfg's [net] size).

    Returns:
        One float32 ndarray[B, Hk * Wk * A, 5 + C] per `[yolo]` layer, in cfg order, as OpenCV's
        region layer gives them: rows ordered (row, column, anchor); cx, cy, w, h divided by the input
        width/height; objectness; objectness x class probability, set to 0 where it is not above the
        `[yolo]` section's `thresh` (default 0.2) and, only where the section sets `nms_threshold`,
        where OpenCV's per-class NMS within that layer drops it.
    """
    require_opencv_darknet_importer()
    try:
        net = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        names = net.getUnconnectedOutLayersNames()
        per_image = []
        for image in images.detach().cpu().float().numpy():
            net.setInput(np.ascontiguousarray(image[None]))
            per_image.append(net.forward(names))
    except cv2.error as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), str(error))
        raise ValueError(f"{cfg_path}: OpenCV's Darknet importer cannot run these files, so they cannot be "
                         f"checked against it (it does not support every layer option Darknet has, e.g. a "
                         f"[route] with groups over several layers; leave 'darknet' out of the export formats): "
                         f"{first_line.strip()}") from error
    return [np.stack([outputs[head] for outputs in per_image]) for head in range(len(names))]


def darknet_rows(decoded: torch.Tensor) -> torch.Tensor:
    """Tensor[B, A, H, W, K] (our eval output of one head) -> Tensor[B, H * W * A, K] in OpenCV's row
    order (row, column, anchor)."""
    batch, _, _, _, channels = decoded.shape
    return decoded.permute(0, 2, 3, 1, 4).reshape(batch, -1, channels)


def opencv_difference(model: DarknetModel, cfg_path: str | os.PathLike, weights_path: str | os.PathLike,
                      images: torch.Tensor) -> float:
    """Largest relative difference between OpenCV's outputs and the model's on `images`.

    OpenCV's batch norm divides by sqrt(var + 1e-6) where Darknet (and the model) use 1e-5: the
    model's side is computed by a copy with OPENCV_BN_EPS, so the files are checked as written.
    Boxes and objectness are compared everywhere, scores (objectness x class) where OpenCV keeps
    them (see `opencv_outputs`); each difference is divided by max(1, |value|), boxes in pixels.
    """
    reference_model = copy.deepcopy(model)
    for module in reference_model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = OPENCV_BN_EPS
    reference = [darknet_rows(out) for out in _eval_outputs(reference_model, images)]
    theirs = opencv_outputs(cfg_path, weights_path, images)
    if [out.shape for out in theirs] != [tuple(out.shape) for out in reference]:
        return math.inf                                 # another network: no number measures it
    height, width = images.shape[-2:]
    worst = 0.0
    for ours, cv_out in zip(reference, theirs):
        ours = ours.numpy().astype(np.float64)
        cv_out = cv_out.astype(np.float64) * np.array([width, height, width, height] + [1.0] * (ours.shape[-1] - 4))
        scores = ours[..., 5:] * ours[..., 4:5]
        kept = cv_out[..., 5:] > 0
        if not (np.isfinite(ours).all() and np.isfinite(cv_out).all()):
            return math.inf                             # NaN compares false: never let it pass as 0
        diffs = [np.abs(cv_out[..., :5] - ours[..., :5]) / np.maximum(1.0, np.abs(ours[..., :5])),
                 np.abs(cv_out[..., 5:] - scores)[kept]]
        worst = max([worst] + [float(d.max()) for d in diffs if d.size])
    return worst


class DecodedDetections(nn.Module):
    """The model's eval forward with the heads joined: x Float[B, 3, H, W] -> Float[B, N, 5 + C]."""

    def __init__(self, model: DarknetModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_heads(self.model(x))


def onnx_layout(model: DarknetModel, height: int, width: int) -> dict:
    """What the rows and columns of the ONNX output mean (stored in the file's metadata)."""
    heads, start = [], 0
    for head in model.heads:
        grid = [round(height / head.stride), round(width / head.stride)]        # a stride of 52 / 7 is inexact
        stop = start + head.num_anchors * grid[0] * grid[1]
        heads.append({"rows": [start, stop], "anchors": head.anchors.tolist(), "stride": float(head.stride),
                      "grid": grid, "row_order": ["anchor", "row", "column"]})
        start = stop
    columns = ["cx", "cy", "w", "h", "objectness"] + [f"class{i}" for i in range(model.heads[0].num_classes)]
    return {"input": {"name": ONNX_INPUT, "shape": ["batch", model.net.channels, height, width],
                      "format": "RGB float in [0, 1]", "letter_box": bool(model.net.letter_box)},
            "output": {"name": ONNX_OUTPUT, "rows": start, "columns": columns,
                       "boxes": "centre x, centre y, width, height in input pixels",
                       "scores": "objectness and class probabilities; score = objectness x class"},
            "heads": heads}


def export_onnx(model: DarknetModel, path: str | os.PathLike, img_size: int | None = None,
                opset: int = MIN_OPSET, verify: bool = True) -> dict:
    """Write the decoding model to ONNX (see the module doc for the layout), atomically.

    Args:
        model: a `DarknetModel`; a float32 CPU copy in eval mode is exported (the model is untouched).
        path: the `.onnx` file.
        img_size: square input side; default the cfg's [net] height x width.
        opset: ONNX opset, >= MIN_OPSET.
        verify: run the file in onnxruntime on a random batch of 2 and compare with PyTorch, before
            it is written (ExportCheckError where |difference| / max(1, |value|) exceeds
            ONNX_TOLERANCE, and no file at `path`: boxes are in pixels, so large inputs earn a
            proportionally larger absolute slack).

    Returns:
        dict `path`, `bytes`, `opset`, `input_shape`, `output_shape` (batch 1), `dense_fp32_bytes`,
        and with verify `onnxruntime_max_abs_diff` and `onnxruntime_max_rel_diff`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET} (needed for the decoding ops), got {opset}")
    onnx = _import_optional("onnx")
    height, width = (img_size, img_size) if img_size else (model.net.height, model.net.width)
    _check_input_size(model, height, width)
    wrapper = DecodedDetections(copy.deepcopy(model).float().cpu()).eval()
    example = torch.zeros(1, model.net.channels, height, width)
    with torch.no_grad():
        output_shape = list(wrapper(example).shape)    # untraced, so the model's input checks run first
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as staging:    # torch.onnx.export writes a path
        staged = Path(staging) / path.name
        _torch_onnx_export(wrapper, example, staged, opset)
        proto = onnx.load(str(staged))
    _declare_output_size(proto, output_shape[1:])
    props = {ONNX_LAYOUT_KEY: json.dumps(onnx_layout(model, height, width))}
    if model.class_names is not None:
        props[ONNX_NAMES_KEY] = json.dumps(model.class_names)
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    serialized = proto.SerializeToString()
    report = {"path": str(path), "bytes": len(serialized), "opset": opset,
              "input_shape": list(example.shape), "output_shape": output_shape,
              "dense_fp32_bytes": dense_fp32_bytes(model)}
    if verify:
        report.update(_onnx_difference(serialized, wrapper, model, path, height, width))
    atomic_write_bytes(path, serialized)
    return report


def _onnx_difference(serialized: bytes, wrapper: nn.Module, model: DarknetModel, path: Path,
                     height: int, width: int) -> dict:
    """Run the file's bytes in onnxruntime on a random batch of 2 and compare with `wrapper` (the
    model's eval forward): `onnxruntime_max_abs_diff` and `_max_rel_diff`, or ExportCheckError
    (any file already at `path` removed)."""
    images = _verify_input(model.net.channels, height, width, batch=2)
    with torch.no_grad():
        expected = wrapper(images).numpy()
    difference = np.abs(onnxruntime_outputs(serialized, images).astype(np.float64) - expected)
    difference[~np.isfinite(difference)] = math.inf        # a NaN on either side is no match
    relative = float((difference / np.maximum(1.0, np.abs(expected))).max())
    if not relative <= ONNX_TOLERANCE:
        path.unlink(missing_ok=True)                       # an earlier export's file would pass for this one
        raise _mismatch(path, "onnxruntime", relative, ONNX_TOLERANCE, model, images)
    return {"onnxruntime_max_abs_diff": float(difference.max()), "onnxruntime_max_rel_diff": relative}


def _declare_output_size(proto, rows_and_columns: list[int]) -> None:
    """Write the output's row and column counts into the graph. The tracer leaves every output dim
    after the batch symbolic (they are computed from shapes), though H and W are fixed at export;
    runtimes and converters that plan memory from the declared shape (TensorRT, TFLite) need them."""
    (output,) = [value for value in proto.graph.output if value.name == ONNX_OUTPUT]
    for dim, size in zip(output.type.tensor_type.shape.dim[1:], rows_and_columns, strict=True):
        dim.Clear()
        dim.dim_value = int(size)


def onnxruntime_outputs(model: str | os.PathLike | bytes, images: torch.Tensor) -> np.ndarray:
    """Run an exported file (its path, or its bytes) on the CPU: images Float[B, 3, H, W] ->
    ndarray[B, N, 5 + C]."""
    ort = _import_optional("onnxruntime")
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: images.detach().cpu().float().numpy()})[0]


def _torch_onnx_export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """TorchScript-based export (the dynamo exporter needs onnxscript, not a dependency here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(wrapper, (example,), str(path), opset_version=opset, dynamo=False,
                          input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})


def export_compact(model: DarknetModel, masks: Masks | None, path: str | os.PathLike,
                   value_format: str = "fp16", compression: str = "lzma", verify: bool = True) -> dict:
    """Write the model's state_dict and cfg as one compact sparse archive (`pruning.sparse_archive`).

    Args:
        model: a `DarknetModel` (not wrapped), pruned: zero wherever `masks` is False.
        masks: the pruning masks, checked (each names a tensor of the model, fits it, and the
            weights it prunes are zero), or None. Either way every conv weight is stored sparse
            (its nonzeros and where they are), those that masks leave out (`--exclude`) too.
        path: the archive file.
        value_format: "fp16" (exact for fp16-representable weights) or "int8" (per-tensor scale).
        compression: "lzma" or "zlib".
        verify: load the file back and check it against the model (`pruning.check_decoded`:
            every tensor as stored, pruned weights zero, values within the format's rounding;
            raises ExportCheckError otherwise), then run the rebuilt model on one random input.

    Returns:
        The archive's report (`bytes`, `sparse_bytes`, `entropy_bound_bytes`, `ratio_to_bound`, ...,
        see `pruning.save_sparse_archive`) plus `dense_fp32_bytes`, `ratio_to_dense` (bytes / dense),
        `params` and `nonzero` (of the sparse tensors, as stored) and `sparsity`, `rounded_to_zero`
        (nonzero weights the value format stores as 0: int8's below half its step, fp16's below
        2^-25); with verify,
        `max_abs_error` and `max_rel_error` of the stored weights (0 for fp16-representable
        weights) and `output_max_rel_diff`, what that error does to the decoded detections on the
        random input (|difference| / max(1, |value|), as for ONNX; reported, not bounded).
    """
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if masks is not None:
        _check_masks(state, masks)
    for key in (COMPACT_CFG_KEY, COMPACT_NAMES_KEY):
        if key in state:
            raise ValueError(f"the model has a tensor named {key!r}, an entry of the archive's own")
    state[COMPACT_CFG_KEY] = _text_tensor(model.cfg.text)
    if model.class_names is not None:
        state[COMPACT_NAMES_KEY] = _text_tensor(json.dumps(model.class_names))
    names = [name for name, tensor in state.items() if tensor.is_floating_point() and tensor.dim() >= 2]
    report = save_sparse_archive(state, path, value_format, compression, names)
    params = sum(state[name].numel() for name in names)
    nonzero = report["nonzero"]                     # as stored: the format may round the smallest to 0
    rounded_to_zero = sum(int(state[name].count_nonzero()) for name in names) - nonzero
    dense = dense_fp32_bytes(model)
    report.update(dense_fp32_bytes=dense, ratio_to_dense=report["bytes"] / dense, params=params,
                  nonzero=nonzero, sparsity=1.0 - nonzero / params if params else 0.0,
                  rounded_to_zero=rounded_to_zero, value_format=value_format)
    if verify:
        report.update(compact_difference(model, state, Path(path), value_format, names))
    return report


def compact_difference(model: DarknetModel, state: dict[str, torch.Tensor], path: Path, value_format: str,
                       sparse_names: list[str]) -> dict:
    """Load the archive `path` back, check its tensors against `state` (those written: the model's
    CPU state_dict and the cfg entry), and compare the rebuilt model's decoded detections with the
    model's on one random input. Returns `max_abs_error`, `max_rel_error`, `output_max_rel_diff`.

    Raises:
        ExportCheckError: the archive does not decode to the model (names the file and the tensor).
    """
    decoded = load_sparse_archive(path)
    try:
        errors = check_decoded(state, decoded, value_format, sparse_names)
    except ValueError as err:
        path.unlink()                                   # not to be shipped by mistake
        raise ExportCheckError(f"{path}: the archive does not decode to the model, removed: {err}") from None
    rebuilt = _model_from_archive(decoded, path)
    images = _verify_input(model.net.channels, model.net.height, model.net.width)
    with torch.no_grad():
        expected = DecodedDetections(copy.deepcopy(model).float().cpu()).eval()(images)
        found = DecodedDetections(rebuilt)(images)
    difference = (found.double() - expected.double()).abs()
    difference[~torch.isfinite(difference)] = math.inf
    relative = difference / expected.double().abs().clamp(min=1.0)
    return {**errors, "output_max_rel_diff": float(relative.max())}


def _check_masks(state: dict[str, torch.Tensor], masks: Masks) -> None:
    """Check that each mask names a tensor of `state`, fits it, and that it is zero where pruned."""
    for name, mask in masks.items():
        if name not in state:
            raise ValueError(f"mask {name!r} names no tensor of the model's state_dict "
                             f"(masks of another model, or of a wrapped one?)")
        tensor = state[name]
        if tuple(mask.shape) != tuple(tensor.shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}")
        stray = int(((tensor != 0) & ~mask.cpu()).sum())
        if stray:
            raise ValueError(f"{name}: {stray} weights are nonzero where the mask prunes them; "
                             f"apply the masks (masks.apply(model)) before exporting")


def load_compact(path: str | os.PathLike, cfg_path: str | os.PathLike | None = None) -> DarknetModel:
    """Rebuild the model of an `export_compact` archive (CPU, float32, eval mode).

    Args:
        path: the archive.
        cfg_path: where to write the embedded cfg; default a temporary file, removed once parsed
            (the model's `cfg.path` then names a file that is gone; its `cfg.text` stays).
    """
    path = Path(path)
    return _model_from_archive(load_sparse_archive(path), path, cfg_path)


def check_class_names(names: list[str], source: str) -> None:
    """ValueError unless each name can be a line of a Darknet .names file as it is: not empty, no
    line break, no space at either end (a reader strips those)."""
    for index, name in enumerate(names):
        if not name or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"{source}: class {index} is {name!r}; expected a name that is not empty, has no line "
                             f"break and no space at either end (a .names file holds one name per line)")


def write_class_names(path: str | os.PathLike, names: list[str], source: str) -> Path:
    """Write Darknet's .names file (one name per line) atomically, after `check_class_names(names,
    source)`."""
    check_class_names(names, source)
    return atomic_write_bytes(path, "".join(f"{name}\n" for name in names).encode("utf-8"))


def _text_tensor(text: str) -> torch.Tensor:
    """`text` as a uint8 tensor of its UTF-8 bytes (how an archive stores the cfg and the names)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def _model_from_archive(state: dict[str, torch.Tensor], path: Path,
                        cfg_path: str | os.PathLike | None = None) -> DarknetModel:
    """The model of an archive's tensors (`state`, read from `path`): see `load_compact`."""
    state = dict(state)
    cfg_tensor = state.pop(COMPACT_CFG_KEY, None)
    if cfg_tensor is None:
        raise ValueError(f"{path}: a sparse archive without an embedded Darknet cfg "
                         f"(entry {COMPACT_CFG_KEY!r}); expected a file written by export_compact")
    cfg_text = cfg_tensor.numpy().tobytes()
    names_tensor = state.pop(COMPACT_NAMES_KEY, None)
    if cfg_path is not None:
        atomic_write_bytes(cfg_path, cfg_text)
        model = load_darknet(cfg_path)
    else:
        with tempfile.TemporaryDirectory() as staging:
            temporary_cfg = Path(staging) / f"{path.stem}.cfg"
            temporary_cfg.write_bytes(cfg_text)
            try:
                model = load_darknet(temporary_cfg)
            except DarknetError as err:                 # name the archive, not a file about to be removed
                raise DarknetError(str(err).replace(str(temporary_cfg), f"{path} (its embedded cfg)")) from None
    own = model.state_dict()
    unknown = [name for name, tensor in state.items()
               if name not in own and tensor.dtype == torch.uint8 and tensor.dim() == 1]
    if unknown:                                  # text entries as the cfg's and the names': a newer writer's
        warnings.warn(f"{path}: entries {', '.join(unknown)} are unknown to this version and left out "
                      f"(written by a newer yolo-admm?)", stacklevel=3)
        state = {name: tensor for name, tensor in state.items() if name not in unknown}
    try:
        model.load_state_dict({name: tensor.float() if tensor.is_floating_point() else tensor
                               for name, tensor in state.items()})
    except RuntimeError as err:
        raise ValueError(f"{path}: the tensors do not fit the embedded cfg: {load_error_summary(err)}") from None
    if names_tensor is not None:
        model.class_names = _archive_names(names_tensor, path, int(model.heads[0].num_classes))
    return model.eval()


def _archive_names(tensor: torch.Tensor, path: Path, num_classes: int) -> list[str]:
    """The class names an archive stores (a JSON list of `num_classes` strings), checked."""
    try:
        names = json.loads(tensor.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: damaged class names entry ({error})") from None
    if not (isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path}: expected {num_classes} class names (the model's classes), found {names!r:.80}")
    return names


def export_model(model: DarknetModel, out_dir: str | os.PathLike, formats: Iterable[str] = FORMATS,
                 masks: Masks | None = None, value_format: str = "fp16", img_size: int | None = None,
                 stem: str = "model") -> dict:
    """Export to several formats in `out_dir`: `stem`.weights + `stem`.cfg (+ `stem`.names, with
    class names), `stem`.onnx, `stem`.yaspars. With `img_size` other than the cfg's, every format is
    for that size: the ONNX input, and the `[net]` width and height of the cfg written beside the
    .weights and into the archive.

    The files are written and checked in a hidden folder in `out_dir`
    (`.yolo-admm-export.STEM.XXXXXXXX.tmp`, held while in use: the next export there, a prune run
    or a trainer removes it after a kill, `engine.staging_folder`), then moved into place
    together, with interrupts held: a failed check or an interrupt leaves an earlier export there
    as it was, not some files of each model.

    Returns:
        dict `dense_fp32_bytes` and, per format exported, that exporter's report.
    Raises:
        ValueError: what `check_export` refuses, before anything is written.
    """
    formats = list(formats)
    model = check_export(model, formats, value_format, img_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in export_targets(out_dir, formats, stem):
        check_writable(target)                       # a folder in a file's place: now, not after the others
    remove_abandoned_staging_folders(out_dir)        # what killed exports left
    with staging_folder(out_dir, stem) as staged:
        report: dict = {"dense_fp32_bytes": dense_fp32_bytes(model)}
        if "darknet" in formats:
            report["darknet"] = export_darknet(model, staged / f"{stem}.weights")
        if "onnx" in formats:
            report["onnx"] = export_onnx(model, staged / f"{stem}.onnx", img_size)
        if "compact" in formats:
            report["compact"] = export_compact(model, masks, staged / f"{stem}.yaspars", value_format)
        with held_interrupts():                      # the files move in together, or not at all
            for written in staged_files(staged):
                os.replace(written, out_dir / written.name)
    return _moved_paths(report, staged, out_dir)


def export_targets(out_dir: Path, formats: Iterable[str], stem: str = "model") -> list[Path]:
    """The files `export_model` writes into `out_dir` for `formats` (a Darknet export's .names only
    when the model has class names)."""
    return [out_dir / f"{stem}{suffix}" for name in formats for suffix in FORMAT_SUFFIXES[name]]


def check_export(model: DarknetModel, formats: list[str], value_format: str = "fp16",
                 img_size: int | None = None) -> DarknetModel:
    """What `export_model` refuses before writing anything: unknown formats, weights that are not
    finite, an input size the model cannot take, a cfg OpenCV's Darknet importer would read
    otherwise (with "darknet"), and weights beyond float16's range in an fp16 archive. Returns the
    model to export: `model`, or with `img_size` a copy whose cfg has that input size."""
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats: expected some of {', '.join(FORMATS)}, found {formats}")
    state = model.state_dict()
    broken = [name for name, tensor in state.items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ValueError(f"export: expected finite weights, found NaN or infinity in {len(broken)} tensor(s): "
                         f"{', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}")
    if "compact" in formats and value_format == "fp16":
        largest = max(((float(tensor.abs().max()), name) for name, tensor in state.items()
                       if tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel()), default=(0.0, ""))
        if largest[0] > FLOAT16_MAX:
            raise ValueError(f"export: {largest[1]} holds |w| = {largest[0]:.4g}, beyond float16's {FLOAT16_MAX:g}, "
                             f"so the compact archive cannot store it as fp16; expected smaller weights, or the "
                             f"int8 format (detect export --int8), which scales each tensor")
    if "darknet" in formats:
        require_opencv_darknet_importer(model.cfg)
    if img_size is not None and (img_size, img_size) != (model.net.width, model.net.height):
        _check_input_size(model, img_size, img_size)
        model = copy.copy(model)                     # the same layers, the cfg of the export's size
        model.cfg = with_input_size(model.cfg, img_size, img_size)
        model.net = model.cfg.net
    return model


def _moved_paths(report: dict, staged: Path, out_dir: Path) -> dict:
    """`report` with every path it gives in `staged` given in `out_dir` instead."""
    def moved(value):
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        if isinstance(value, str) and Path(value).parent == staged:
            return str(out_dir / Path(value).name)
        return value
    return moved(report)


def _eval_outputs(model: DarknetModel, images: torch.Tensor) -> list[torch.Tensor]:
    """The model's eval-mode outputs on `images` (on the model's device), as float32 CPU tensors."""
    was_training = model.training
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            outputs = model.eval()(images.to(parameter.device, parameter.dtype))
    finally:
        model.train(was_training)
    return [out.float().cpu() for out in outputs]


def _verify_input(channels: int, height: int, width: int, batch: int = 1) -> torch.Tensor:
    """A fixed random batch Float[batch, channels, height, width] in [0, 1]."""
    generator = torch.Generator().manual_seed(_VERIFY_SEED)
    return torch.rand(batch, channels, height, width, generator=generator)


def _check_input_size(model: DarknetModel, height: int, width: int) -> None:
    if not model.accepts_size(height, width):
        raise ValueError(f"{model.cfg.path}: the input size must be {model.size_rule()}, found {height}x{width}")


def _import_optional(name: str):
    """Import onnx / onnxruntime, with a hint where they are missing."""
    try:
        return __import__(name)
    except ImportError as err:
        raise ImportError(f"ONNX export needs the {name!r} package, a dependency of yolo-admm: "
                          f"pip install onnx onnxruntime") from err
