"""Darknet `.weights` files: read into a `DarknetModel`, write from one.

Layout (AlexeyAB/darknet `src/parser.c`, `load_weights_upto` / `save_weights_upto`), little-endian:
- header: int32 major, minor, revision; then `seen` (images trained on) as a 64-bit integer when
  (major * 10 + minor) >= 2, else as a 32-bit one (AlexeyAB's and OpenCV's rule; pjreddie's
  parser.c also wants major and minor below 1000);
- then, for every `[convolutional]` layer in cfg order, float32: bias (the batch-norm beta when
  `batch_normalize=1`), then with batch norm gamma, rolling mean and rolling variance, then the
  weights [filters, channels/groups, size, size]. No other supported layer holds weights.

Reading checks the size before touching the model: a file that is shorter or longer than the cfg
needs is an error naming the layer that runs out (or what is left over) and both byte counts. Only
where asked (`partial=True`, to start training from it) may a file end at a layer boundary: the
first layers of a model, as `darknet partial` writes them (yolov4.conv.137); the others keep their
initialisation, with a warning that counts them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch

from detector.cfg import DarknetError
from detector.layers import ConvBlock
from engine import atomic_write

if TYPE_CHECKING:
    from detector.model import DarknetModel

_VERSION_BYTES = 12   # major, minor, revision


@dataclass(frozen=True)
class WeightsHeader:
    """The `.weights` header. The default is what current Darknet (0.2.5) writes."""

    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def seen_is_64bit(self) -> bool:
        return (self.major * 10 + self.minor) >= 2

    @property
    def nbytes(self) -> int:
        return _VERSION_BYTES + (8 if self.seen_is_64bit else 4)

    def to_bytes(self) -> bytes:
        seen_dtype = "<u8" if self.seen_is_64bit else "<u4"
        version = np.array([self.major, self.minor, self.revision], dtype="<i4")
        return version.tobytes() + np.array([self.seen], dtype=seen_dtype).tobytes()


@dataclass(frozen=True)
class _LayerSpan:
    index: int
    block: ConvBlock
    start: int   # byte offset in the file
    stop: int

    def describe(self) -> str:
        return f"layer {self.index} ({self.block.cfg_source})"


def _layout(model: DarknetModel, header_bytes: int) -> list[_LayerSpan]:
    spans, offset = [], header_bytes
    for index, module in enumerate(model.layers):
        if isinstance(module, ConvBlock):
            nbytes = 4 * sum(t.numel() for t in module.darknet_tensors())
            spans.append(_LayerSpan(index, module, offset, offset + nbytes))
            offset += nbytes
    return spans


def _read_header(path: Path, file_size: int) -> WeightsHeader:
    with path.open("rb") as f:
        head = f.read(_VERSION_BYTES + 8)
    if len(head) < _VERSION_BYTES + 4:
        raise DarknetError(f"{path}: truncated header: expected at least 16 bytes, "
                           f"found {file_size}")
    header = WeightsHeader(*(int(v) for v in np.frombuffer(head[:_VERSION_BYTES], "<i4")))
    if len(head) < header.nbytes:
        raise DarknetError(f"{path}: truncated header: version {header.major}.{header.minor}."
                           f"{header.revision} needs {header.nbytes} header bytes, found "
                           f"{file_size}")
    seen_dtype = "<u8" if header.seen_is_64bit else "<u4"
    seen = np.frombuffer(head[_VERSION_BYTES:header.nbytes], seen_dtype)[0]
    return WeightsHeader(header.major, header.minor, header.revision, int(seen))


def _check_size(path: Path, model: DarknetModel, spans: list[_LayerSpan], file_size: int,
                header_bytes: int, partial: bool) -> list[_LayerSpan]:
    """The spans the file holds: all of them, or with `partial` those before a layer boundary at
    which the file ends; DarknetError naming the layer and the byte counts otherwise."""
    expected = spans[-1].stop if spans else header_bytes
    cfg = model.cfg.path
    if file_size < expected:
        short = next(span for span in spans if span.stop > file_size)
        if partial and file_size == short.start and short is not spans[0]:      # some layers, not none
            return [span for span in spans if span.stop <= file_size]
        where = f"ends where {short.describe()} starts" if file_size == short.start else \
            f"ends inside {short.describe()}"
        hint = ("a header without weights" if short is spans[0] and file_size == short.start else
                "a partial file, as `darknet partial` writes? detect train starts from one"
                if file_size == short.start else "truncated file, or weights for another cfg?")
        raise DarknetError(
            f"{path}: file {where}: that layer needs bytes "
            f"{short.start}..{short.stop}, the file has {file_size} bytes; {cfg} needs "
            f"{expected} bytes in total ({hint})")
    if file_size > expected:
        last = spans[-1].describe() if spans else "the header"
        raise DarknetError(
            f"{path}: file has {file_size} bytes but {cfg} needs exactly {expected}: "
            f"{file_size - expected} bytes are left after {last} (weights for another cfg?)")
    return spans


def read_weights(path: str | Path, model: DarknetModel, partial: bool = False) -> WeightsHeader:
    """Load a Darknet `.weights` file into `model`, in place.

    Args:
        path: the `.weights` file.
        model: a `DarknetModel` built from the cfg the weights belong to (any device/dtype).
        partial: accept a file of the first layers only (ending at a layer boundary), as `darknet
            partial` writes for training: the other layers are left as they are, with a warning.

    Returns:
        The file's header (version and `seen`).

    Raises:
        FileNotFoundError: no such file.
        DarknetError: the file size does not match the cfg, or a layer's values are not all finite
            (nothing is loaded then).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Darknet weights not found: {path}")
    file_size = path.stat().st_size
    header = _read_header(path, file_size)
    spans = _layout(model, header.nbytes)
    held = _check_size(path, model, spans, file_size, header.nbytes, partial)
    if len(held) < len(spans):
        last = f"up to {held[-1].describe()}" if held else "none"
        warnings.warn(f"{path}: weights for the first {len(held)} of {len(spans)} convolutional layers ({last}), "
                      f"a partial file as `darknet partial` writes: the other {len(spans) - len(held)} keep "
                      f"their initialisation", stacklevel=3)
    with path.open("rb") as f, torch.no_grad():
        f.seek(header.nbytes)
        for span in held:                    # a first pass checks, a layer at a time: nothing is loaded
            start = f.tell()
            _check_finite(path, span, start, [_read_floats(f, tensor.numel())
                                              for tensor in span.block.darknet_tensors()])
        f.seek(header.nbytes)
        for span in held:
            for tensor in span.block.darknet_tensors():
                tensor.copy_(torch.from_numpy(_read_floats(f, tensor.numel())).view_as(tensor))
    return header


def _read_floats(handle: BinaryIO, count: int) -> np.ndarray:
    values = np.empty(count, dtype="<f4")
    handle.readinto(values)
    return values


def _check_finite(path: Path, span: _LayerSpan, start: int, read: list[np.ndarray]) -> None:
    """DarknetError naming the file and the layer when the values read for it hold NaN or infinity."""
    bad = sum(int(values.size - np.isfinite(values).sum()) for values in read)
    if bad:
        end = start + 4 * sum(values.size for values in read)
        raise DarknetError(f"{path}: bytes {start}..{end} ({span.describe()}) hold {bad} NaN or infinite "
                           f"value(s); expected finite weights (a damaged file, or one a diverging training wrote)")


def write_weights(path: str | Path, model: DarknetModel,
                  header: WeightsHeader | None = None) -> None:
    """Write `model` as a Darknet `.weights` file, atomically (`engine.atomic_write`).

    Args:
        path: the file to write.
        model: the `DarknetModel` to save.
        header: version and `seen` to write; default `WeightsHeader()` (0.2.5, seen 0). Pass the
            header `read_weights` returned to reproduce a file bit for bit.
    """
    header = header or WeightsHeader()

    def write_body(handle: BinaryIO) -> None:
        handle.write(header.to_bytes())
        for span in _layout(model, header.nbytes):
            for tensor in span.block.darknet_tensors():
                values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                handle.write(values.astype("<f4", copy=False).tobytes())

    atomic_write(path, write_body)
