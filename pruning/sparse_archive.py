"""Compact single-file export of a pruned state_dict, and the entropy bound it is measured against.

Layout (little-endian): 8-byte magic ``YASPARS2``, 8-byte header length, the CRC-32 of the header
(4 bytes), a UTF-8 JSON header, then the compressed blobs it points to (``[offset, length]`` from
the end of the header). Archives of the first layout, magic ``YASPARS1`` and no header CRC, still
load.

- A *sparse* tensor (by default every floating tensor with >= 2 dims, i.e. conv/linear
  weights) is stored as its nonzero mask, bit-packed (``np.packbits`` order), plus its nonzero
  values in flat order: float16 split into a low-byte and a high-byte plane, or int8 with one
  symmetric scale per tensor. Each blob is compressed on its own (lzma or zlib).
- Every other tensor (biases, BN statistics, counters) is stored exactly, raw bytes, compressed.
- Each blob's index entry is ``[offset, length, crc32 of the raw bytes]``: raw lzma carries no
  checksum of its own, so a damaged file is caught here (archives without the CRC still load).

Float16 values round-trip exactly when the weights are float16-representable; int8 is lossy
(error <= scale / 2). ``check_decoded`` checks an archive loaded back against its source tensors
and measures that error. ``entropy_bound`` gives the size an ideal order-0 coder of each layer's
mask bits and quantised values would need; ``save_sparse_archive`` reports both.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from pruning.atomic_file import write_bytes_atomically
from pruning.masks import pack_mask, unpack_mask

MAGIC = b"YASPARS2"
FIRST_MAGIC = b"YASPARS1"                # the first layout: no CRC of the header
VALUE_FORMATS = ("fp16", "int8")
_COMPRESSORS = {
    "lzma": (
        lambda data: lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]),
        lambda data: lzma.decompress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]),
    ),
    "zlib": (lambda data: zlib.compress(data, 9), zlib.decompress),
}


def _sparse_names(state_dict: Mapping[str, Tensor], sparse_names: Iterable[str] | None) -> list[str]:
    """Names stored sparse, in state_dict order: the given ones, or floating tensors with >= 2 dims."""
    if sparse_names is None:
        return [name for name, tensor in state_dict.items() if tensor.is_floating_point() and tensor.dim() >= 2]
    wanted = set(sparse_names)
    for name in wanted:
        if name not in state_dict:
            raise ValueError(f"sparse tensor {name!r} is not in the state_dict")
        if not state_dict[name].is_floating_point():
            raise ValueError(f"sparse tensor {name!r} must be floating, found {state_dict[name].dtype}")
    return [name for name in state_dict if name in wanted]


def quantise_nonzeros(values: Tensor, value_format: str, name: str) -> tuple[Tensor, float | None]:
    """Quantise the nonzero values of one tensor.

    Args:
        values: float Tensor[nnz], the nonzeros in flat order.
        value_format: "fp16" or "int8".
        name: tensor name, for errors.
    Returns:
        (symbols, scale): float16 Tensor[nnz] and None, or int8 Tensor[nnz] in [-127, 127] and
        the float scale with values ~= symbols * scale.
    """
    if value_format == "fp16":
        half = values.to(torch.float16)
        if not bool(torch.isfinite(half).all()):
            raise ValueError(
                f"{name}: values are not finite in float16 (max |w| = {values.abs().max():.4g});"
                " expected |w| <= 65504 (the int8 format scales each tensor instead)"
            )
        return half, None
    if value_format == "int8":
        peak = float(values.abs().max()) if values.numel() else 0.0
        if not math.isfinite(peak):
            raise ValueError(f"{name}: expected finite weights for int8, found max |w| = {peak}")
        scale = peak / 127.0 if peak > 0 else 1.0
        return torch.round(values.float() / scale).clamp_(-127, 127).to(torch.int8), scale
    raise ValueError(f"unknown value format {value_format!r}: expected one of {', '.join(VALUE_FORMATS)}")


def _empirical_entropy_bits(symbols: Tensor) -> float:
    """Total bits an order-0 code of ``symbols`` (Tensor[n], any integer-viewable dtype) needs: n * H."""
    if symbols.numel() == 0:
        return 0.0
    if symbols.dtype == torch.float16:
        symbols = symbols.view(torch.int16)
    counts = torch.unique(symbols, return_counts=True)[1].double()
    probabilities = counts / counts.sum()
    return float(-(counts * torch.log2(probabilities)).sum())


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def entropy_bound(
    state_dict: Mapping[str, Tensor], value_format: str = "fp16", sparse_names: Iterable[str] | None = None
) -> dict[str, float]:
    """Order-0 entropy bound of the sparse tensors: per tensor, numel * H2(density) for the mask
    plus nnz * H(quantised nonzero values), each distribution measured on that tensor.

    Returns:
        dict ``mask_bytes``, ``value_bytes``, ``bytes`` (their sum); dense tensors are not counted.
    """
    mask_bits = value_bits = 0.0
    for name in _sparse_names(state_dict, sparse_names):
        tensor = state_dict[name].detach().reshape(-1)
        nonzeros = tensor[tensor != 0]
        mask_bits += tensor.numel() * _binary_entropy(nonzeros.numel() / max(tensor.numel(), 1))
        value_bits += _empirical_entropy_bits(quantise_nonzeros(nonzeros, value_format, name)[0])
    return {"mask_bytes": mask_bits / 8, "value_bytes": value_bits / 8, "bytes": (mask_bits + value_bits) / 8}


def _tensor_bytes(tensor: Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor in its own dtype."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    if len(data) == 0:
        return torch.empty([0] if shape == [-1] else shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _encode_sparse(name: str, tensor: Tensor, value_format: str) -> tuple[dict, dict[str, bytes]]:
    """Header entry fields and raw blobs (mask, value planes) of one sparse tensor."""
    flat = tensor.detach().cpu().reshape(-1)
    mask = flat != 0
    symbols, scale = quantise_nonzeros(flat[mask], value_format, name)
    if not bool((symbols != 0).all()):     # int8: below scale / 2; fp16: below its smallest subnormal
        mask[mask.nonzero().squeeze(1)[symbols == 0]] = False
        symbols = symbols[symbols != 0]
    blobs = {"mask": pack_mask(mask).numpy().tobytes()}
    if value_format == "fp16":
        planes = symbols.view(torch.uint8).view(-1, 2)       # [nnz, 2]: low byte, high byte
        blobs["values_lo"] = planes[:, 0].numpy().tobytes()
        blobs["values_hi"] = planes[:, 1].numpy().tobytes()
    else:
        blobs["values"] = symbols.numpy().tobytes()
    return {"kind": "sparse", "values": value_format, "nnz": int(mask.sum()), "scale": scale}, blobs


def _decode_sparse(entry: dict, blobs: dict[str, bytes], name: str) -> Tensor:
    shape = entry["shape"]
    mask = unpack_mask(_tensor_from_bytes(blobs["mask"], torch.uint8, [-1]), shape).reshape(-1)
    if int(mask.sum()) != entry["nnz"]:
        raise ValueError(f"{name}: mask has {int(mask.sum())} nonzeros, header says {entry['nnz']}")
    if entry["values"] == "fp16":
        lo = _tensor_from_bytes(blobs["values_lo"], torch.uint8, [-1])
        hi = _tensor_from_bytes(blobs["values_hi"], torch.uint8, [-1])
        values = torch.stack([lo, hi], dim=1).reshape(-1).view(torch.float16)
    else:
        values = _tensor_from_bytes(blobs["values"], torch.int8, [-1]).float() * entry["scale"]
    if values.numel() != entry["nnz"]:
        raise ValueError(f"{name}: {values.numel()} stored values, header says {entry['nnz']}")
    dtype = getattr(torch, entry["dtype"])
    flat = torch.zeros(mask.numel(), dtype=dtype)
    flat[mask] = values.to(dtype)
    return flat.view(shape)


def save_sparse_archive(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike,
    value_format: str = "fp16",
    compression: str = "lzma",
    sparse_names: Iterable[str] | None = None,
) -> dict:
    """Write ``state_dict`` compactly to one file, atomically.

    Args:
        state_dict: name -> Tensor (any device); sparse tensors are chosen by ``sparse_names``
            (default: floating tensors with >= 2 dims).
        path: output file.
        value_format: "fp16" or "int8" for the nonzero values of sparse tensors.
        compression: "lzma" or "zlib".
    Returns:
        dict ``path``, ``bytes`` (file size), ``sparse_bytes`` (compressed masks + values),
        ``dense_bytes``, ``entropy_bound_bytes`` (see ``entropy_bound``), ``ratio_to_bound``
        (sparse_bytes / bound; None when the bound is 0), ``nonzero`` (the sparse tensors' stored
        nonzeros: weights the format rounds to 0, with int8 those below scale / 2, with fp16 those
        below 2^-25, are stored as pruned).
    """
    if value_format not in VALUE_FORMATS:
        raise ValueError(f"unknown value format {value_format!r}: expected one of {', '.join(VALUE_FORMATS)}")
    if compression not in _COMPRESSORS:
        raise ValueError(f"unknown compression {compression!r}: expected one of {', '.join(_COMPRESSORS)}")
    compress = _COMPRESSORS[compression][0]
    sparse = set(_sparse_names(state_dict, sparse_names))
    entries, payload, sizes, stored_nonzero = [], bytearray(), {"sparse": 0, "dense": 0}, 0
    for name, tensor in state_dict.items():
        if name in sparse:
            fields, raw_blobs = _encode_sparse(name, tensor, value_format)
            stored_nonzero += fields["nnz"]
        else:
            fields, raw_blobs = {"kind": "dense"}, {"data": _tensor_bytes(tensor)}
        blob_index = {}
        for blob_name, raw in raw_blobs.items():
            packed = compress(raw)
            blob_index[blob_name] = [len(payload), len(packed), zlib.crc32(raw)]
            payload += packed
            sizes[fields["kind"]] += len(packed)
        dtype = str(tensor.dtype).removeprefix("torch.")
        entries.append({"name": name, "dtype": dtype, "shape": list(tensor.shape), **fields, "blobs": blob_index})
    header = json.dumps({"compression": compression, "tensors": entries}).encode("utf-8")
    prefix = MAGIC + len(header).to_bytes(8, "little") + zlib.crc32(header).to_bytes(4, "little")
    write_bytes_atomically(path, prefix + header + bytes(payload))
    bound = entropy_bound(state_dict, value_format, sorted(sparse))["bytes"]
    return {
        "path": str(path),
        "bytes": len(prefix) + len(header) + len(payload),
        "sparse_bytes": sizes["sparse"],
        "dense_bytes": sizes["dense"],
        "entropy_bound_bytes": bound,
        "ratio_to_bound": sizes["sparse"] / bound if bound else None,      # None: nothing to bound
        "nonzero": stored_nonzero,
    }


def check_decoded(
    original: Mapping[str, Tensor],
    decoded: Mapping[str, Tensor],
    value_format: str = "fp16",
    sparse_names: Iterable[str] | None = None,
) -> dict[str, float]:
    """Check an archive's tensors, loaded back (``decoded``), against those it was written from
    (``original``, as given to ``save_sparse_archive`` with the same ``value_format`` and
    ``sparse_names``), and measure what the value format lost.

    Returns:
        dict ``max_abs_error`` (the largest |decoded - original| over the sparse tensors) and
        ``max_rel_error`` (over the sparse tensors, the largest max |error| / max |original|).
    Raises:
        ValueError: naming the tensor: a name, dtype or shape that differs, a dense tensor not
            bit-equal, a weight zero in ``original`` but not in ``decoded``, or an error beyond the
            format's bound (fp16: none beyond rounding to float16; int8: scale / 2).
    """
    if list(original) != list(decoded):
        missing, extra = sorted(set(original) - set(decoded)), sorted(set(decoded) - set(original))
        raise ValueError(f"expected the tensors written, found {len(missing)} missing {missing[:3]} and "
                         f"{len(extra)} others {extra[:3]}")
    sparse = set(_sparse_names(original, sparse_names))
    max_abs = max_rel = 0.0
    for name, tensor in original.items():
        want, got = tensor.detach().cpu(), decoded[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            raise ValueError(f"{name}: expected {want.dtype} {tuple(want.shape)}, found {got.dtype} {tuple(got.shape)}")
        if name not in sparse:
            if not torch.equal(got, want):
                raise ValueError(f"{name}: expected the tensor stored exactly, found other values")
            continue
        if bool(((got != 0) & (want == 0)).any()):
            raise ValueError(f"{name}: expected zeros where the weights are pruned, found nonzeros")
        error = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
        peak = want.abs().max().item() if want.numel() else 0.0
        if not _within_format(want, got, value_format, error, peak):
            raise ValueError(f"{name}: expected an error within {value_format}'s rounding, found {error:.3g} "
                             f"(max |w| {peak:.3g})")
        max_abs, max_rel = max(max_abs, error), max(max_rel, error / peak if peak else 0.0)
    return {"max_abs_error": max_abs, "max_rel_error": max_rel}


def _within_format(want: Tensor, got: Tensor, value_format: str, error: float, peak: float) -> bool:
    """Whether one sparse tensor decoded as its value format promises: fp16, each weight rounded to
    float16; int8, within half a step of the symmetric scale (max |w| / 127), plus the rounding of
    the decoded value to the tensor's own dtype (a float16 model's int8 archive rounds twice)."""
    if value_format == "fp16":
        return torch.equal(got, want.to(torch.float16).to(want.dtype))
    rounding = torch.finfo(torch.float32).eps + torch.finfo(want.dtype).eps     # quantised in float32
    return error <= peak / 127.0 / 2 + peak * rounding


def is_sparse_archive(path: str | os.PathLike) -> bool:
    """Whether the file at `path` starts as a sparse archive does (False where there is no file)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(len(MAGIC)) in (MAGIC, FIRST_MAGIC)
    except OSError:
        return False


def _read_header(path: Path, data: bytes) -> tuple[dict, int]:
    magic = data[: len(MAGIC)]
    if magic not in (MAGIC, FIRST_MAGIC):
        raise ValueError(f"{path}: not a sparse archive: expected magic {MAGIC!r}, found {magic!r}")
    header_length = int.from_bytes(data[len(MAGIC): len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8 + (4 if magic == MAGIC else 0)
    if start + header_length > len(data):
        raise ValueError(f"{path}: truncated: header of {header_length} bytes, file has {len(data)}")
    stored_crc = data[start - 4: start] if magic == MAGIC else None
    if stored_crc is not None and zlib.crc32(data[start: start + header_length]).to_bytes(4, "little") != stored_crc:
        raise ValueError(f"{path}: the header fails its CRC-32 check: the file is damaged")
    try:
        header = json.loads(data[start: start + header_length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: corrupt header: {error}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt header: expected a JSON object, found {type(header).__name__}")
    if header.get("compression") not in _COMPRESSORS:
        raise ValueError(f"{path}: unknown compression {header.get('compression')!r}")
    return header, start + header_length


def load_sparse_archive(path: str | os.PathLike) -> dict[str, Tensor]:
    """Rebuild the full state_dict (CPU tensors, original dtypes and shapes) from ``save_sparse_archive``."""
    path = Path(path)
    data = path.read_bytes()
    header, payload_start = _read_header(path, data)
    decompress = _COMPRESSORS[header["compression"]][1]
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: corrupt header: expected a 'tensors' list, found {entries!r:.80}")
    state_dict = {}
    for index, entry in enumerate(entries):
        name = entry.get("name", f"#{index}") if isinstance(entry, dict) else f"#{index}"
        try:
            state_dict[name] = _decode_entry(entry, data, payload_start, decompress)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError,
                lzma.LZMAError, zlib.error) as error:
            if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
                raise                                   # not the archive's fault
            raise ValueError(f"{path}: tensor {name!r} cannot be rebuilt: {type(error).__name__}: {error}") from error
    end = payload_start + max((offset + length for entry in entries for offset, length, *_ in entry["blobs"].values()),
                              default=0)
    if end != len(data):
        raise ValueError(f"{path}: {len(data) - end} bytes after the archive's last tensor; expected the file to "
                         f"end there (something appended to it?)")
    return state_dict


def _decode_entry(entry: dict, data: bytes, payload_start: int, decompress) -> Tensor:
    """One tensor of the archive from its header entry and the file's bytes."""
    blobs = {}
    for blob_name, (offset, length, *crc) in entry["blobs"].items():
        begin = payload_start + offset
        if begin + length > len(data):
            raise ValueError(f"truncated: blob {blob_name!r} ends past the file")
        blobs[blob_name] = decompress(data[begin: begin + length])
        if crc and zlib.crc32(blobs[blob_name]) != crc[0]:
            raise ValueError(f"blob {blob_name!r} fails its CRC-32 check: the file is damaged")
    if entry["kind"] == "sparse":
        return _decode_sparse(entry, blobs, entry["name"])
    return _tensor_from_bytes(blobs["data"], getattr(torch, entry["dtype"]), entry["shape"])
