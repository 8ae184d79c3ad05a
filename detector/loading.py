"""Loading a detector from the files a user names: a Darknet cfg with its `.weights`, or a compact
archive (`detect export`'s model.yaspars, which carries its cfg); other files given as weights are
refused by what they are. Used by the `detect` commands and by `detector.prune_pipeline`."""
from __future__ import annotations

from pathlib import Path

import detector
from detector.cfg import first_difference, with_input_size
from detector.export import load_compact
from pruning.sparse_archive import is_sparse_archive

NOT_WEIGHTS = {   # file types given as --weights by mistake, by suffix: what they are
    ".onnx": "an ONNX file, which runs in onnxruntime or OpenCV (see the README's ONNX section)",
    ".cfg": "a Darknet cfg (give it as --cfg)",
    ".pt": "a PyTorch checkpoint (detect export --checkpoint turns it into .weights)",
    ".pth": "a PyTorch checkpoint (detect export --checkpoint turns it into .weights)",
}


def load_detector(cfg: str | None, weights: str, partial: bool = False) -> detector.DarknetModel:
    """The model of a Darknet cfg and .weights file, or of a compact archive (`detect export`'s
    model.yaspars), which carries its cfg: `cfg` may then be None, and where given must set up the same
    model and training (`detector.cfg.first_difference`: comments and layout do not count).
    `partial`: accept .weights of the first layers only (`detector.read_weights`).

    Raises:
        FileNotFoundError: no file at `weights`.
        ValueError: .weights without a cfg, or an archive whose cfg is not `cfg`.
    """
    if not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights}: expected a Darknet .weights file or a compact archive, "
                                f"found {'a folder' if Path(weights).is_dir() else 'no file'}")
    other = NOT_WEIGHTS.get(Path(weights).suffix.lower())
    if other is not None:
        raise ValueError(f"--weights {weights}: {other}; expected Darknet .weights (with --cfg) or a compact archive")
    if is_archive(weights):
        model = load_compact(weights)
        difference = None if cfg is None else first_difference(detector.parse_cfg(cfg), model.cfg)
        if difference is not None:
            raise ValueError(f"--weights {weights}: a compact archive carries its own cfg, which differs from "
                             f"--cfg {cfg} (first at {difference}); leave --cfg out to use the archive's")
        return model
    if cfg is None:
        raise ValueError(f"--weights {weights}: Darknet .weights need --cfg (only a compact archive carries its cfg)")
    return detector.load_darknet(cfg, weights, partial)


def load_to_train(cfg: str, weights: str | None, partial: bool = False) -> detector.DarknetModel:
    """The model of the cfg file `cfg` (which a training or pruning run records and writes out) with
    the weights to start from: a Darknet .weights file (with `partial`, also one of the first layers
    only, as `darknet partial` writes yolov4.conv.137), a compact archive of the same model (its cfg
    may differ from `cfg` in the input size only, which an export may set: a pruned model pruned or
    fine-tuned again), or None (the cfg's initialisation). Other files given as weights (ONNX, a
    PyTorch checkpoint) are refused by what they are (`load_detector`)."""
    if weights is None:
        return detector.load_darknet(cfg)
    if not is_archive(weights):
        return load_detector(cfg, weights, partial)
    archive = load_detector(None, weights)
    model = detector.load_darknet(cfg)
    net = model.net
    difference = first_difference(model.cfg, with_input_size(archive.cfg, net.width, net.height))
    if difference is not None:
        raise ValueError(f"--weights {weights}: a compact archive of another model than --cfg {cfg} (first at "
                         f"{difference}); write its own cfg with `detect export --weights {weights} --formats "
                         f"darknet --out DIR` and give DIR/model.cfg as --cfg")
    model.load_state_dict(archive.state_dict())
    return model


def is_archive(weights: str | Path) -> bool:
    """Whether `weights` is read as a compact archive: one by its content, or a file named .yaspars
    (a damaged archive, which loading then says it is)."""
    return is_sparse_archive(weights) or Path(weights).suffix == ".yaspars"
