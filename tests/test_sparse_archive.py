"""Sparse archive: exact round trip, int8 error bound, size against the entropy bound, bad files."""
from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

from pruning import check_decoded, entropy_bound, load_sparse_archive, save_sparse_archive


def split_archive(data: bytes) -> tuple[dict, bytes]:
    """An archive's JSON header and its payload (the blobs)."""
    header_length = int.from_bytes(data[8:16], "little")
    return json.loads(data[20:20 + header_length]), bytes(data[20 + header_length:])


def join_archive(header, payload: bytes, first_layout: bool = False) -> bytes:
    """An archive of `header` (written as JSON) and `payload`; `first_layout`: YASPARS1, no header CRC."""
    raw = json.dumps(header).encode()
    if first_layout:
        return b"YASPARS1" + len(raw).to_bytes(8, "little") + raw + payload
    return b"YASPARS2" + len(raw).to_bytes(8, "little") + zlib.crc32(raw).to_bytes(4, "little") + raw + payload


def sparse_normal(shape, density: float, generator: torch.Generator, std: float = 0.05) -> torch.Tensor:
    """float32 weights, N(0, std) rounded to float16-representable values, (1 - density) zeroed."""
    weight = (torch.randn(shape, generator=generator) * std).half().float()
    return weight * (torch.rand(shape, generator=generator) < density)


def realistic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Conv-net-like state dict: 80%-sparse weights, dense biases and BN buffers (~0.8M weights)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out_ch, in_ch, k) in enumerate([(32, 16, 3), (64, 32, 3), (128, 64, 3), (256, 128, 3), (256, 256, 1)]):
        state[f"conv{index}.weight"] = sparse_normal((out_ch, in_ch, k, k), 0.2, generator, std=0.1 / (index + 1))
        state[f"bn{index}.running_mean"] = torch.randn(out_ch, generator=generator)
        state[f"bn{index}.num_batches_tracked"] = torch.tensor(1234, dtype=torch.int64)
    state["fc.weight"] = sparse_normal((10, 256), 0.2, generator)
    state["fc.bias"] = torch.randn(10, generator=generator).double()
    return state


@pytest.mark.parametrize("compression", ["lzma", "zlib"])
def test_round_trip_is_exact_for_float16_representable_values(tmp_path, compression):
    state = realistic_state_dict()
    state["flags"] = torch.tensor([True, False, True])
    state["empty.weight"] = torch.zeros(0, 4)
    info = save_sparse_archive(state, tmp_path / "model.yasp", compression=compression)
    loaded = load_sparse_archive(tmp_path / "model.yasp")
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    assert info["bytes"] == (tmp_path / "model.yasp").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.yasp"]          # no temp file left behind


def test_int8_values_are_within_half_a_step_and_zeros_stay_zero(tmp_path):
    state = realistic_state_dict()
    save_sparse_archive(state, tmp_path / "q.yasp", value_format="int8")
    loaded = load_sparse_archive(tmp_path / "q.yasp")
    for name in ("conv0.weight", "conv3.weight", "fc.weight"):
        original, restored = state[name], loaded[name]
        step = float(original.abs().max()) / 127
        assert torch.count_nonzero(restored[original == 0]) == 0
        assert float((original - restored).abs().max()) <= step / 2 + 1e-7
    assert torch.equal(loaded["bn2.running_mean"], state["bn2.running_mean"])


def test_size_is_within_ten_percent_of_the_entropy_bound(tmp_path):
    state = realistic_state_dict()
    for value_format in ("fp16", "int8"):
        info = save_sparse_archive(state, tmp_path / f"{value_format}.yasp", value_format=value_format)
        bound = entropy_bound(state, value_format)["bytes"]
        assert info["entropy_bound_bytes"] == pytest.approx(bound)
        assert 0.98 <= info["sparse_bytes"] / bound <= 1.10, (value_format, info)
        assert info["bytes"] <= 1.10 * bound + info["dense_bytes"] + 4096


def test_entropy_bound_on_a_hand_computed_case():
    state = {"w": torch.tensor([[0.0, 1.0], [-2.0, 0.0]]), "v": torch.tensor([[1.0, 1.0, 1.0, 0.0]])}
    bound = entropy_bound(state)
    # w: mask 4 * H2(1/2) = 4 bits, values {1, -2}: 2 * 1 bit; v: mask 4 * H2(3/4) bits, values all equal: 0.
    h_three_quarters = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert bound["mask_bytes"] == pytest.approx((4 + 4 * h_three_quarters) / 8)
    assert bound["value_bytes"] == pytest.approx(2 / 8)
    assert bound["bytes"] == pytest.approx(bound["mask_bytes"] + bound["value_bytes"])


def test_bad_input_and_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"big.weight: values are not finite in float16 \(max \|w\| = 1e\+05\)"):
        save_sparse_archive({"big.weight": torch.full((2, 2), 1e5)}, tmp_path / "x.yasp")
    with pytest.raises(ValueError, match="nan.weight: expected finite weights for int8, found max"):
        save_sparse_archive({"nan.weight": torch.tensor([[1.0, float("nan")]])}, tmp_path / "x.yasp", "int8")
    with pytest.raises(ValueError, match="unknown value format 'int4'"):
        save_sparse_archive({"w": torch.ones(2, 2)}, tmp_path / "x.yasp", value_format="int4")
    with pytest.raises(ValueError, match="sparse tensor 'missing' is not in the state_dict"):
        save_sparse_archive({"w": torch.ones(2, 2)}, tmp_path / "x.yasp", sparse_names=["missing"])
    path = tmp_path / "model.yasp"
    save_sparse_archive({"w": torch.randn(64, 64), "b": torch.randn(64)}, path)
    data = path.read_bytes()
    (tmp_path / "bad_magic.yasp").write_bytes(b"NOTMAGIC" + data[8:])
    with pytest.raises(ValueError, match=r"bad_magic.yasp: not a sparse archive: expected magic b'YASPARS2'"):
        load_sparse_archive(tmp_path / "bad_magic.yasp")
    (tmp_path / "truncated.yasp").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.yasp: tensor '\w+' cannot be rebuilt: ValueError: truncated: blob"):
        load_sparse_archive(tmp_path / "truncated.yasp")
    header, payload = split_archive(data)

    def write_with_header(name: str, changed: dict):
        (tmp_path / name).write_bytes(join_archive(changed, payload))
        return tmp_path / name
    with pytest.raises(ValueError, match=r"no_list.yasp: corrupt header: expected a 'tensors' list, found None"):
        load_sparse_archive(write_with_header("no_list.yasp", {"compression": header["compression"]}))
    reshaped = [{**entry, "shape": [5]} if entry["name"] == "b" else entry for entry in header["tensors"]]
    with pytest.raises(ValueError, match=r"reshaped.yasp: tensor 'b' cannot be rebuilt: RuntimeError: shape '\[5\]'"):
        load_sparse_archive(write_with_header("reshaped.yasp", {**header, "tensors": reshaped}))
    with pytest.raises(FileNotFoundError):
        load_sparse_archive(tmp_path / "absent.yasp")
    with pytest.raises(ValueError, match=r"listed.yasp: corrupt header: expected a JSON object, found list"):
        load_sparse_archive(write_with_header("listed.yasp", [header]))


def test_a_flipped_bit_is_caught_by_the_blobs_crc(tmp_path):
    """Found by a review: raw lzma has no checksum, so 196 of 200 bit flips in the dense blobs of
    a real archive loaded silently with changed weights."""
    path = tmp_path / "model.yasp"
    save_sparse_archive({"w": torch.randn(64, 64), "b": torch.randn(64)}, path)
    data = bytearray(path.read_bytes())
    header, payload = split_archive(data)
    header_length = int.from_bytes(data[8:16], "little")
    offset, length, _ = next(entry for entry in header["tensors"] if entry["name"] == "b")["blobs"]["data"]
    flipped = 0
    for bit in range(8 * length):                      # every single-bit flip of the blob: caught, or harmless
        damaged = bytearray(data)
        damaged[20 + header_length + offset + bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "damaged.yasp").write_bytes(damaged)
        try:
            loaded = load_sparse_archive(tmp_path / "damaged.yasp")
        except ValueError as error:
            assert "damaged.yasp: tensor 'b' cannot be rebuilt" in str(error)
            flipped += 1
            continue
        assert torch.equal(loaded["b"], load_sparse_archive(path)["b"]), f"bit {bit}: loaded with other values"
    assert flipped > 0.9 * 8 * length
    old_style = {**header, "tensors": [{**entry, "blobs": {k: v[:2] for k, v in entry["blobs"].items()}}
                                       for entry in header["tensors"]]}
    (tmp_path / "old.yasp").write_bytes(join_archive(old_style, payload, first_layout=True))
    assert torch.equal(load_sparse_archive(tmp_path / "old.yasp")["b"], load_sparse_archive(path)["b"])  # no CRC: loads


def test_a_changed_header_is_caught_by_its_crc(tmp_path):
    """Found by a review: the JSON header had no checksum, so one changed digit of an int8 scale
    loaded silently and moved the detector's boxes by up to 144 px."""
    path = tmp_path / "model.yasp"
    save_sparse_archive({"w": torch.randn(16, 16)}, path, value_format="int8")
    data = path.read_bytes()
    header, payload = split_archive(data)
    scale = json.dumps(header["tensors"][0]["scale"]).encode()
    damaged = data.replace(scale, scale[:-1] + (b"1" if scale[-1:] != b"1" else b"2"), 1)
    assert damaged != data and len(damaged) == len(data)
    (tmp_path / "damaged.yasp").write_bytes(damaged)
    with pytest.raises(ValueError, match=r"damaged.yasp: the header fails its CRC-32 check: the file is damaged"):
        load_sparse_archive(tmp_path / "damaged.yasp")
    (tmp_path / "first.yasp").write_bytes(join_archive(header, payload, first_layout=True))  # YASPARS1 still loads
    assert torch.equal(load_sparse_archive(tmp_path / "first.yasp")["w"], load_sparse_archive(path)["w"])


@pytest.mark.parametrize("value_format, small", [("int8", 0.001), ("fp16", 1e-9)])
def test_the_weights_a_format_rounds_to_zero_are_stored_as_pruned(tmp_path, value_format, small):
    """Found by a review: such weights kept their mask bit, so the archive counted them as kept
    (int8 below half its step; fp16, a later review, below its smallest subnormal)."""
    weight = torch.tensor([[1.0, small, 0.0, -0.5]])
    info = save_sparse_archive({"w": weight}, tmp_path / "q.yasp", value_format=value_format)
    assert info["nonzero"] == 2
    assert torch.equal(load_sparse_archive(tmp_path / "q.yasp")["w"] != 0, torch.tensor([[True, False, False, True]]))


def test_running_out_of_memory_while_loading_is_not_called_a_broken_archive(tmp_path, monkeypatch):
    import pruning.sparse_archive as sparse_archive

    path = tmp_path / "model.yasp"
    save_sparse_archive({"w": torch.randn(8, 8)}, path)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(sparse_archive, "_decode_entry", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        load_sparse_archive(path)


@pytest.mark.parametrize("value_format", ["fp16", "int8"])
def test_check_decoded_measures_the_format_and_passes_a_true_archive(tmp_path, value_format):
    state = realistic_state_dict()
    state["conv1.weight"] = state["conv1.weight"].double() * 1.001       # not float16-representable
    save_sparse_archive(state, tmp_path / "m.yasp", value_format=value_format)
    errors = check_decoded(state, load_sparse_archive(tmp_path / "m.yasp"), value_format)
    if value_format == "fp16":          # only conv1 is not float16-representable
        weight = state["conv1.weight"]
        rounding = float((weight.half().double() - weight).abs().max())
        assert errors["max_abs_error"] == pytest.approx(rounding) and rounding > 0
        assert errors["max_rel_error"] == pytest.approx(rounding / float(weight.abs().max()))
    else:                               # half a step of max |w| / 127 at most, and a quarter reached
        steps = [float(t.abs().max()) / 127 for name, t in state.items() if name.endswith(".weight")]
        assert max(steps) / 4 < errors["max_abs_error"] <= max(steps) / 2 * (1 + 1e-4)
        assert 1 / 508 < errors["max_rel_error"] <= 1 / 254 * (1 + 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_decoded_passes_int8_archives_of_any_float_dtype(tmp_path, dtype):
    """Found by reviews: a float16 model's int8 archive was refused (its decoded values round
    again), then, with a bound of float64's rounding, some float64 ones (quantised in float32)."""
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        state = {"conv.weight": (torch.randn(64, 32, 3, 3, generator=generator) * 1.3).to(dtype)}
        save_sparse_archive(state, tmp_path / "m.yasp", value_format="int8")
        errors = check_decoded(state, load_sparse_archive(tmp_path / "m.yasp"), "int8")
        assert errors["max_rel_error"] <= 1 / 254 + 2 * torch.finfo(dtype).eps, seed


def damage(tensors: dict[str, torch.Tensor], name: str, change) -> dict[str, torch.Tensor]:
    changed = {key: value.clone() for key, value in tensors.items()}
    change(changed[name])
    return changed


@pytest.mark.parametrize("name, change, expected", [
    ("bn1.running_mean", lambda t: t.__setitem__(0, t[0] + 1e-6), "bn1.running_mean: expected the tensor stored exactly"),
    ("conv2.weight", lambda t: t.view(-1).__setitem__((t.view(-1) == 0).nonzero()[0], 0.5),
     "conv2.weight: expected zeros where the weights are pruned"),
    ("conv0.weight", lambda t: t.view(-1).__setitem__(t.view(-1).nonzero()[0], 0.3),
     "conv0.weight: expected an error within int8's rounding"),
    ("fc.bias", lambda t: t.__imul__(1), None),
], ids=["dense-tensor-changed", "pruned-weight-revived", "value-beyond-half-a-step", "unchanged"])
def test_check_decoded_names_the_tensor_that_does_not_decode_as_written(tmp_path, name, change, expected):
    state = realistic_state_dict()
    save_sparse_archive(state, tmp_path / "m.yasp", value_format="int8")
    decoded = damage(load_sparse_archive(tmp_path / "m.yasp"), name, change)
    if expected is None:
        check_decoded(state, decoded, "int8")
        return
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        check_decoded(state, decoded, "int8")


def test_check_decoded_wants_every_tensor_with_its_dtype_and_shape(tmp_path):
    state = realistic_state_dict()
    save_sparse_archive(state, tmp_path / "m.yasp")
    decoded = load_sparse_archive(tmp_path / "m.yasp")
    with pytest.raises(ValueError, match=r"1 missing \['fc.bias'\] and 0 others"):
        check_decoded(state, {k: v for k, v in decoded.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match=r"fc.bias: expected torch.float64 \(10,\), found torch.float32 \(10,\)"):
        check_decoded(state, {**decoded, "fc.bias": decoded["fc.bias"].float()})
    with pytest.raises(ValueError, match="fc.weight: expected an error within fp16's rounding"):
        check_decoded(state, {**decoded, "fc.weight": decoded["fc.weight"] * 1.01})
