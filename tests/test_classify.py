"""classify: LeNet-5 / ResNet-56, MNIST / CIFAR readers, the classify CLI, a tiny end-to-end prune."""
from __future__ import annotations

import copy
import gzip
import json
import re
import math
import shutil

import cv2
import numpy as np
import pytest
import torch

import classify.pipeline
import engine
import pruning
from classify import LENET5_PRUNABLE_WEIGHTS, LeNet5, resnet56
from classify.cli import main as classify_main
from classify.distill import DistillationLoss, frozen_copy
from classify.pipeline import (PruneSettings, TrainSettings, build_model, classification_loss, load_weights, prepare,
                               prune_model)
from classify.resnet56 import RESNET56_MEAN, RESNET56_STD
from data.cifar import CIFAR10_CLASSES, CIFARDataset, decode_rgb32, list_class_images, load_cifar_folder, random_crop_flip
from data.mnist import IMAGES_MAGIC, LABELS_MAGIC, MNISTDataset, load_mnist, read_idx
from yolo_admm.cli import main as yolo_admm_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> None:
    """A learnable stand-in for MNIST: class c is a bright 6x6 square at one of 10 positions, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 60, (count, 28, 28))
        for image, label in zip(images, labels):
            row, col = 2 + 8 * (label // 4), 2 + 6 * (label % 4)
            image[row:row + 6, col:col + 6] = 255
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images, IMAGES_MAGIC)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels, LABELS_MAGIC)


# ------------------------------------------------------------------------------------ models
def test_lenet5_has_430500_prunable_weights_and_classifies_28x28():
    model = LeNet5()
    weights = {n: p.numel() for n, p in model.named_parameters() if n.endswith("weight")}
    assert weights == {"conv1.weight": 500, "conv2.weight": 25_000, "fc1.weight": 400_000, "fc2.weight": 5_000}
    assert sum(weights.values()) == LENET5_PRUNABLE_WEIGHTS == 430_500
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_resnet56_shape_and_parameter_count():
    model = resnet56()
    assert sum(p.numel() for p in model.parameters()) == 853_018
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 55  # 1 stem + 54 in the blocks; + 1 linear = 56 weighted layers
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet56_checkpoint_loads_exactly_and_classifies(shared_data):
    path = shared_data("resnet56", "resnet56-4bfd9763.th")
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = load_weights(resnet56(), path)
    state = model.state_dict()
    assert all(torch.equal(state[key.removeprefix("module.")], value) for key, value in saved.items())
    paths, labels, _ = list_class_images(shared_data("cifar10", "test"))
    chosen = range(0, len(paths), 50)  # 200 images, 20 per class
    images = torch.from_numpy(np.stack([decode_rgb32(paths[i]) for i in chosen])).permute(0, 3, 1, 2)
    labels = torch.tensor([labels[i] for i in chosen])
    dataset = CIFARDataset(images.contiguous(), labels, RESNET56_MEAN, RESNET56_STD)
    with torch.no_grad():
        logits = model.eval()(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    accuracy = float((logits.argmax(1) == labels).float().mean())
    assert accuracy > 0.7  # 83% on the full JPEG test set; a wrong layout or normalisation gives far less


def test_load_weights_names_the_file_and_the_mismatch(tmp_path):
    torch.save(LeNet5().state_dict(), tmp_path / "lenet.pt")
    with pytest.raises(ValueError, match=r"lenet.pt: parameter names differ.*missing"):
        load_weights(resnet56(), tmp_path / "lenet.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(LeNet5(), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: not a readable weights file"):
        load_weights(LeNet5(), tmp_path / "junk.pt")
    header = torch.tensor([0, 2, 0, 0, 0], dtype=torch.int32).numpy().tobytes()   # a Darknet .weights file
    (tmp_path / "model.weights").write_bytes(header + torch.rand(64).numpy().tobytes())
    with pytest.raises(ValueError, match="model.weights: not a readable weights file: expected a state dict") as error:
        load_weights(LeNet5(), tmp_path / "model.weights")
    assert "\n" not in str(error.value) and "weights_only=False" not in str(error.value)   # not torch's paragraph


def test_load_weights_takes_a_checkpoints_average_and_refuses_what_would_mislead(tmp_path):
    """Found by a review: a checkpoint of an --ema run gave its raw weights (not those its run
    evaluated), NaN weights loaded silently, and a shape mismatch printed torch's lines."""
    raw, average = LeNet5().state_dict(), LeNet5().state_dict()
    torch.save({"epoch": 1, "step": 8, "model": raw, "ema": {"module": average, "updates": 8, "decay": 0.9}},
               tmp_path / "epoch_0001.pt")
    loaded = load_weights(LeNet5(), tmp_path / "epoch_0001.pt").state_dict()
    assert all(torch.equal(loaded[name], average[name]) for name in average)
    assert not torch.equal(loaded["fc1.weight"], raw["fc1.weight"])
    broken = {name: value.clone() for name, value in raw.items()}
    broken["fc1.weight"][3, 4] = float("nan")
    torch.save(broken, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt: expected finite weights, found NaN or infinity in fc1.weight$"):
        load_weights(LeNet5(), tmp_path / "nan.pt")
    torch.save(resnet56(num_classes=100).state_dict(), tmp_path / "r100.pt")
    with pytest.raises(ValueError) as error:
        load_weights(resnet56(), tmp_path / "r100.pt")
    assert "\n" not in str(error.value) and str(error.value).startswith(
        f"{tmp_path / 'r100.pt'}: expected the shapes of CifarResNet: size mismatch for linear.weight: [100, 64] in "
        f"the checkpoint, [10, 64] in the model; size mismatch for linear.bias")


# ------------------------------------------------------------------------------------ data
def test_mnist_reader_round_trip_and_bad_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, LABELS_MAGIC)
    got_images, got_labels = load_mnist(tmp_path, "test")
    assert got_images.dtype == torch.uint8 and torch.equal(got_images, torch.from_numpy(images.astype(np.uint8)))
    assert got_labels.tolist() == [3, 1, 4, 1, 5]

    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, IMAGES_MAGIC)  # wrong magic
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz: expected IDX magic number 0x00000801, "
                                         r"found 0x00000803"):
        load_mnist(tmp_path, "test")
    with gzip.open(tmp_path / "short.gz", "wb") as handle:
        handle.write(LABELS_MAGIC.to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match=r"short.gz: header says shape \(10,\).*found 11 bytes"):
        read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, "train")


def test_real_mnist_test_split(shared_data):
    images, labels = load_mnist(shared_data("mnist"), "test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_cifar_folder_reader_rgb_order_and_errors(tmp_path):
    colours = {"cat": (255, 0, 0), "ship": (0, 0, 255)}  # RGB
    for name, rgb in colours.items():
        (tmp_path / "test" / name).mkdir(parents=True)
        for index in range(2):
            image = np.zeros((32, 32, 3), np.uint8)
            image[:, :] = rgb[::-1]  # OpenCV writes BGR
            image[0, 0] = (index, index, index)
            cv2.imwrite(str(tmp_path / "test" / name / f"{index:04d}.png"), image)
    images, labels, classes = load_cifar_folder(tmp_path, "test")
    assert classes == ["cat", "ship"] and labels.tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert images[0, :, 5, 5].tolist() == [255, 0, 0] and images[2, :, 5, 5].tolist() == [0, 0, 255]
    assert images[1, :, 0, 0].tolist() == [1, 1, 1]

    cv2.imwrite(str(tmp_path / "test" / "cat" / "0002.png"), np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"0002.png: expected a 32x32 image, found 32x30"):
        load_cifar_folder(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train: CIFAR split directory not found"):
        load_cifar_folder(tmp_path, "train")


def test_cifar_folders_as_imagefolder_reads_them(tmp_path):
    """Found by a review: images in a class's sub-folder were skipped silently, and a hidden file
    (macOS's ._x.jpg) or folder (.ipynb_checkpoints) stopped the load."""
    image = np.zeros((32, 32, 3), np.uint8)
    for relative in ("cat/0.png", "cat/more/1.png", "ship/2.png", "cat/._0.png", ".ipynb_checkpoints/3.png",
                     "ship/.hidden/4.png", "stray.png"):
        (tmp_path / "test" / relative).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "test" / relative), image)
    (tmp_path / "test" / "cat" / "._0.png").write_bytes(b"AppleDouble")
    with pytest.warns(UserWarning, match=r"test: 1 image\(s\) in no class folder, left out \(e.g. stray.png\)"):
        images, labels, classes = load_cifar_folder(tmp_path, "test")
    assert classes == ["cat", "ship"] and labels.tolist() == [0, 0, 1] and len(images) == 3


def test_resnet56_needs_the_ten_cifar10_class_folders(tmp_path):
    """A missing or an extra class folder would shift every label after it: refused, naming both."""
    for split in ("train", "test"):
        for name in [*CIFAR10_CLASSES[:-1], "zebra"]:
            (tmp_path / split / name).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / split / name / "0000.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"train: expected the class folders airplane, .*, truck, "
                                         r"found 10: missing \['truck'\], unexpected \['zebra'\]"):
        prepare("resnet56", tmp_path)


def test_a_missing_split_is_found_before_any_split_is_read(tmp_path, monkeypatch):
    """A missing test split was found only after the train split was decoded (13 s on full CIFAR)."""
    for name in CIFAR10_CLASSES:
        (tmp_path / "cifar" / "train" / name).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "cifar" / "train" / name / "0000.png"), np.zeros((32, 32, 3), np.uint8))
    write_mnist_like(tmp_path / "mnist", n_train=8, n_test=4)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setattr("data.cifar.decode_rgb32", lambda path: pytest.fail(f"decoded {path}"))
    monkeypatch.setattr("data.mnist.read_idx", lambda *args: pytest.fail("read an IDX file"))
    with pytest.raises(FileNotFoundError, match=r"test: CIFAR split directory not found"):
        prepare("resnet56", tmp_path / "cifar")
    with pytest.raises(FileNotFoundError, match=r"MNIST file t10k-images-idx3-ubyte.gz \(or t10k-images-idx3-ubyte\)"):
        prepare("lenet5", tmp_path / "mnist")


def test_cifar_augmentation_crops_with_black_padding_and_flips():
    image = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.float32).view(3, 32, 32)
    torch.manual_seed(0)
    crops = [random_crop_flip(image) for _ in range(200)]
    assert all(crop.shape == (3, 32, 32) for crop in crops)
    assert any(torch.equal(crop, image) for crop in crops)  # offset (4, 4), no flip
    assert any(torch.equal(crop, image.flip(-1)) for crop in crops)
    assert any((crop == 0).any() for crop in crops)  # padding is zero before normalisation
    dataset = CIFARDataset(image.to(torch.uint8)[None], torch.tensor([0]), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(dataset[0][0], (image.to(torch.uint8).float() / 255 - 0.5) / 0.25)


def test_mnist_shift_translates_the_digit_with_black_fill():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 10:18, 12:15] = 200  # a stroke well inside the frame
    plain = MNISTDataset(image, torch.tensor([3]), mean=0.0, std=1.0)
    assert torch.equal(plain[0][0], image.float() / 255) and plain[0][1] == 3
    shifted = MNISTDataset(image, torch.tensor([3]), mean=0.0, std=1.0, max_shift=2)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(300):
        out = shifted[0][0]
        assert out.shape == (1, 28, 28) and out.sum() == pytest.approx(plain[0][0].sum())  # nothing cropped
        row, col = (int(v) for v in out[0].nonzero()[0])  # the stroke's top-left pixel
        offsets.add((row - 10, col - 12))
        assert torch.equal(out, torch.roll(plain[0][0], (row - 10, col - 12), (1, 2)))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # every shift, no more
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        MNISTDataset(image, torch.tensor([3]), max_shift=-1)


def _augmenting_datasets():
    generator = torch.Generator().manual_seed(1)
    cifar = CIFARDataset(torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=generator),
                         torch.arange(24) % 10, RESNET56_MEAN, RESNET56_STD, augment=True)
    mnist = MNISTDataset(torch.randint(0, 256, (24, 28, 28), dtype=torch.uint8, generator=generator),
                         torch.arange(24) % 10, max_shift=2)
    return {"cifar": cifar, "mnist": mnist}


@pytest.mark.parametrize("name", ["cifar", "mnist"])
def test_augmented_batches_do_not_depend_on_the_loader_workers(name):
    dataset = _augmenting_datasets()[name]
    settings = {workers: TrainSettings(batch_size=5, workers=workers, device="cpu") for workers in (0, 2)}

    def two_epochs(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(3)
        loader = classify.pipeline.make_train_loader(classify.pipeline.MODELS["lenet5"], dataset, settings[workers])
        return [images for _ in range(2) for images, _ in loader]

    in_process, in_workers = two_epochs(0), two_epochs(2)
    assert [batch.shape[0] for batch in in_process] == [5, 5, 5, 5, 4] * 2
    drawn = TrainSettings(batch_size=5, train_samples=10, device="cpu")
    assert classify.pipeline.epoch_images(classify.pipeline.make_train_loader(
        classify.pipeline.MODELS["lenet5"], dataset, drawn)) == 10          # not the 24 of the whole set
    assert all(torch.equal(a, b) for a, b in zip(in_process, in_workers, strict=True))
    assert not torch.equal(in_process[0], in_process[5])   # the epochs draw anew


def test_a_seeded_item_augments_from_its_seed_alone():
    dataset = _augmenting_datasets()["cifar"]
    torch.manual_seed(0)
    first = dataset[(4, 123, None)][0]
    torch.randn(10)                                         # the global stream moves on; the item does not
    assert torch.equal(dataset[(4, 123, None)][0], first)
    assert any(not torch.equal(dataset[(4, seed, None)][0], first) for seed in range(5))
    with pytest.raises(ValueError, match="one image size; multi-scale batches"):
        dataset[(4, 123, 64)]


# ------------------------------------------------------------------------------------ distillation
def test_distillation_loss_blends_labels_and_softened_teacher_outputs():
    torch.manual_seed(0)
    student, images, labels = LeNet5(), torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    teacher = frozen_copy(LeNet5())
    logits, teacher_logits = student(images), teacher(images)
    labels_only, _ = DistillationLoss(teacher, weight=0.0, temperature=4.0)(student, (images, labels))
    torch.testing.assert_close(labels_only, torch.nn.functional.cross_entropy(logits, labels))
    blended, logs = DistillationLoss(teacher, weight=0.25, temperature=2.0)(student, (images, labels))
    p_teacher = torch.softmax(teacher_logits / 2.0, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / 2.0, 1))).sum(1).mean()
    torch.testing.assert_close(blended, 0.75 * labels_only + 0.25 * 4.0 * kl)
    assert 0.0 <= logs["acc"] <= 100.0
    blended.backward()
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert all(p.grad is not None for p in student.parameters())
    # a student that equals its teacher has nothing to learn from it
    same, _ = DistillationLoss(frozen_copy(student), weight=1.0, temperature=4.0)(student, (images, labels))
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    for weight, temperature in ((1.5, 4.0), (0.5, 0.0)):
        with pytest.raises(ValueError, match="distillation"):
            DistillationLoss(teacher, weight, temperature)


def test_distilled_pruning_learns_from_a_frozen_copy_of_the_dense_model(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "mnist", n_train=64, n_test=20)
    model, datasets = prepare("lenet5", tmp_path / "mnist")
    dense = {name: value.clone() for name, value in model.state_dict().items()}
    losses = []
    monkeypatch.setattr(classify.pipeline, "DistillationLoss",
                        lambda *args: losses.append(DistillationLoss(*args)) or losses[-1])
    prune = PruneSettings(sparsity=0.9, method="admm-global", admm_iters=1, retrain_epochs=1, distill=0.7,
                          distill_temperature=3.0)
    result = prune_model("lenet5", model, datasets, prune, TrainSettings(batch_size=32, progress=False))
    assert result["settings"]["prune"]["distill"] == 0.7 and result["sparsity"] == pytest.approx(0.9)
    assert result["mask_violations"] == 0
    (loss,) = losses  # one teacher for both phases
    assert (loss.weight, loss.temperature) == (0.7, 3.0) and not loss.teacher.training
    teacher = loss.teacher.state_dict()
    assert all(torch.equal(teacher[name], value) for name, value in dense.items())  # the dense model, unchanged
    assert not torch.equal(teacher["fc1.weight"], model.fc1.weight)  # not the model being pruned
    with pytest.raises(ValueError, match="distill in \\[0, 1\\]"):
        PruneSettings(sparsity=0.5, distill=2.0)


def test_ema_retraining_ends_with_the_average_of_the_masked_weights(tmp_path, monkeypatch):
    """With `ema`, the ADMM phase trains as without it, and the pruned model is the average of
    retraining's masked weights after every step, recomputed here from a run without it."""
    write_mnist_like(tmp_path / "mnist", n_train=64, n_test=20)
    dense, datasets = prepare("lenet5", tmp_path / "mnist")
    steps = []

    class RecordingMaskCallback(pruning.MaskCallback):
        def on_train_start(self, trainer):
            super().on_train_start(trainer)
            record(trainer)  # what the average starts from

        def after_step(self, trainer):
            super().after_step(trainer)
            record(trainer)

    def record(trainer):
        steps.append({name: value.clone() for name, value in trainer.model.state_dict().items()})

    monkeypatch.setattr(pruning, "MaskCallback", RecordingMaskCallback)
    prune = PruneSettings(sparsity=0.9, admm_iters=2, retrain_epochs=2, ramp_from=0.5)
    results = {}
    for decay in (None, 0.5):
        steps.clear()
        model = copy.deepcopy(dense)
        results[decay] = prune_model("lenet5", model, datasets, prune,
                                     TrainSettings(batch_size=16, progress=False, ema=decay, ema_tau=0))
        trajectory, steps[:] = list(steps), []
        results[decay]["weights"] = model.state_dict()
        results[decay]["trajectory"] = trajectory
    plain, averaged = results[None], results[0.5]
    assert len(plain["trajectory"]) == 1 + 2 * 4                       # 64 images in batches of 16, two epochs
    expected = {name: value.clone() for name, value in plain["trajectory"][0].items()}
    for weights in plain["trajectory"][1:]:
        for name in expected:
            expected[name] = 0.5 * expected[name] + 0.5 * weights[name]
    assert all(torch.allclose(averaged["weights"][name], expected[name], atol=1e-6) for name in expected)
    assert not torch.allclose(averaged["weights"]["fc1.weight"], plain["weights"]["fc1.weight"], atol=1e-4)
    assert averaged["accuracy_after_hard_prune"] == plain["accuracy_after_hard_prune"]
    assert averaged["admm_updates"] == plain["admm_updates"]            # the ADMM phase trained as without it
    assert averaged["mask_violations"] == 0 and averaged["sparsity"] == pytest.approx(0.9)
    assert averaged["settings"]["train"]["ema"] == 0.5
    with pytest.raises(ValueError, match=r"ema \(the average's decay\) must be in \(0, 1\), found 1.0"):
        TrainSettings(ema=1.0)


def test_classify_train_with_ema_saves_the_average_also_when_resumed_after_the_end(tmp_path):
    write_mnist_like(tmp_path / "mnist", n_train=32, n_test=10)
    train = ["train", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--epochs", "2", "--batch-size", "16",
             "--eval-every", "0", "--no-progress", "--ema", "0.5", "--ema-tau", "0",
             "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert classify_main([*train, "--out", str(tmp_path / "first.pt")]) == 0
    checkpoint = engine.load_checkpoint(tmp_path / "ckpt" / "train")
    first = load_weights(LeNet5(), tmp_path / "first.pt").state_dict()
    assert all(torch.equal(first[name], value) for name, value in checkpoint["ema"]["module"].items())
    assert not torch.equal(first["fc1.weight"], checkpoint["model"]["fc1.weight"])   # the average, not the last step
    assert classify_main([*train, "--resume", "--out", str(tmp_path / "again.pt")]) == 0   # nothing left to train
    again = load_weights(LeNet5(), tmp_path / "again.pt").state_dict()
    assert all(torch.equal(again[name], value) for name, value in first.items())


# ------------------------------------------------------------------------------------ CLI
def test_cli_rejects_bad_arguments(tmp_path, capsys):
    write_mnist_like(tmp_path / "mnist", n_train=10, n_test=10)
    base = ["--data", str(tmp_path / "mnist"), "--weights", str(tmp_path / "w.pt")]
    assert classify_main(["prune", "--model", "lenet5", *base, "--sparsity", "1.0"]) == 2
    assert "--sparsity: must be in [0, 1)" in capsys.readouterr().err
    assert classify_main(["prune", "--model", "lenet5", *base, "--sparsity", "-0.1"]) == 2
    assert "found -0.1" in capsys.readouterr().err
    assert classify_main(["eval", "--model", "vgg16", *base]) == 2
    assert "invalid choice: 'vgg16'" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "eval", "--model", "lenet5", "--data", str(tmp_path / "nowhere"),
                           "--weights", str(tmp_path / "w.pt")]) == 2
    assert "nowhere: data directory not found" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "eval", "--model", "lenet5", *base]) == 2
    assert "w.pt: weights file not found" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "eval", "--model", "lenet5", "--data", str(tmp_path / "mnist")]) == 2
    assert "the following arguments are required: --weights" in capsys.readouterr().err   # as its --help says
    assert yolo_admm_main(["classify", "prune", "--model", "lenet5", "--data", str(tmp_path / "mnist"),
                           "--sparsity", "0.5"]) == 2
    assert "the following arguments are required: --weights" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "train", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--resume"]) == 2
    assert "resume needs a checkpoint_dir (--checkpoint-dir)" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "train", "--model", "lenet5", "--data", str(tmp_path / "mnist"),
                           "--ema", "0"]) == 2
    assert "ema (the average's decay) must be in (0, 1), found 0.0" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    train = ["classify", "train", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--epochs", "50"]
    assert yolo_admm_main([*train, "--out", str(tmp_path / "a_file" / "w.pt")]) == 2      # at once, not after 50 epochs
    assert "--out {0}/a_file/w.pt: its folder {0}/a_file: cannot create".format(tmp_path) in capsys.readouterr().err
    assert yolo_admm_main([*train, "--json-out", str(tmp_path)]) == 2
    assert f"--json-out {tmp_path}: expected a file to write, found a folder" in capsys.readouterr().err
    assert yolo_admm_main(["classify", "prune", "--model", "lenet5", *base, "--sparsity", "0.5",
                           "--out", str(tmp_path / "a_file" / "p.pt")]) == 2
    assert "its folder {0}/a_file: cannot create".format(tmp_path) in capsys.readouterr().err
    assert yolo_admm_main([*train, "--checkpoint-dir", str(tmp_path / "a_file")]) == 2   # at once, too
    assert "--checkpoint-dir {0}/a_file: cannot create this output folder".format(tmp_path) in capsys.readouterr().err


def test_cli_refuses_what_a_review_found_accepted(tmp_path, capsys):
    """Each of these ran (or crashed with a traceback) before a review of the classify CLI."""
    write_mnist_like(tmp_path / "mnist", n_train=10, n_test=10)
    prune = ["classify", "prune", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--weights",
             str(tmp_path / "w.pt"), "--sparsity", "0.5"]
    train = ["classify", "train", "--model", "lenet5", "--data", str(tmp_path / "mnist")]
    cases = [
        ([*prune, "--include", "re:["], "pattern 're:[': expected a regular expression after 're:', found one "
                                        "that does not compile (unterminated character set"),
        ([*prune, "--exclude", ","], "argument --exclude: expected comma-separated patterns, found none in ','"),
        ([*prune, "--distill", "0.5", "--distill-temperature", "inf"], "distill_temperature finite and > 0"),
        ([*prune, "--rho-mult", "0.5"], "rho_mult finite and >= 1; found rho 0.001, rho_mult 0.5"),
        ([*prune, "--rho", "1e39"], "need rho and rho_max in (0, 3.403e+38], rho_max >= rho"),   # was a traceback
        ([*prune, "--ramp-iters", "2"], "ramp_iters (2) is the length of a ramp, and there is none"),
        ([*prune[:-1], "0.9999999"], "sparsity 0.9999999 keeps none of the 430500 prunable weights"),
        ([*train, "--lr", "inf"], "lr must be a finite number > 0, found inf"),
        ([*train, "--out", str(tmp_path / "same"), "--json-out", str(tmp_path / "same")],
         f"--out and --json-out both name {tmp_path}/same"),
        ([*prune, "--out", str(tmp_path / "w.pt")],         # the dense input model was replaced
         f"--out {tmp_path}/w.pt: this run would overwrite its own input {tmp_path}/w.pt (--weights)"),
        ([*train, "--weights", str(tmp_path / "w.pt"), "--json-out", str(tmp_path / "w.pt")],
         f"--json-out {tmp_path}/w.pt: this run would overwrite its own input {tmp_path}/w.pt (--weights)"),
    ]
    for argv, message in cases:
        assert yolo_admm_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "same").exists() and not (tmp_path / "w.pt").exists()


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Found by a review: classify printed only "interrupted", with no word on resuming."""
    import classify.pipeline as pipeline

    write_mnist_like(tmp_path / "mnist", n_train=64, n_test=16)
    train = ["classify", "train", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--epochs", "3",
             "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "w.pt")]
    real_evaluate, calls = pipeline.evaluate_accuracy, []

    def interrupt_at_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate_accuracy", interrupt_at_the_second_epoch)
    assert yolo_admm_main(train) == 130
    assert "interrupted: nothing was kept: without --checkpoint-dir" in capsys.readouterr().err
    calls.clear()
    assert yolo_admm_main([*train, "--checkpoint-dir", str(tmp_path / "ck")]) == 130
    err = capsys.readouterr().err
    assert f"the checkpoints so far are kept in {tmp_path}/ck (newest: train/epoch_0001.pt); run the same " \
           f"command with --resume to continue" in err, err


def test_tiny_end_to_end_train_and_prune(tmp_path, capsys):
    data = tmp_path / "mnist"
    write_mnist_like(data)
    common = ["--model", "lenet5", "--data", str(data), "--batch-size", "32", "--no-progress"]
    assert classify_main(["train", *common, "--epochs", "3", "--out", str(tmp_path / "dense.pt"),
                          "--json-out", str(tmp_path / "dense.json")]) == 0
    assert json.loads((tmp_path / "dense.json").read_text())["accuracy"] > 50.0  # chance is 10%

    out = tmp_path / "admm-0.9.json"             # a dot in the stem: the plots are admm-0.9.*.png, not admm-0.*
    prune = ["prune", *common, "--weights", str(tmp_path / "dense.pt"), "--sparsity", "0.9", "--method", "admm-global",
             "--admm-iters", "2", "--rho", "1e-2", "--rho-mult", "2", "--retrain-epochs", "1",
             "--admm-lr", "shared", "--checkpoint-dir", str(tmp_path / "ckpt")]  # shared: resumes mid-decay
    assert classify_main([*prune, "--json-out", str(out), "--out", str(tmp_path / "pruned.pt")]) == 0
    result = json.loads(out.read_text())
    assert result["kept"] == round(0.1 * LENET5_PRUNABLE_WEIGHTS) and result["sparsity"] == pytest.approx(0.9)
    assert result["dense_accuracy"] == json.loads((tmp_path / "dense.json").read_text())["accuracy"]   # same model
    assert result["run"]["data"] == str(data.resolve()) and len(result["run"]["weights_sha256"]) == 64
    assert (result["run"]["train"]["optimizer"], result["run"]["train"]["batch_size"]) == ("adam", 32)
    assert result["mask_violations"] == 0
    assert [u["iteration"] for u in result["admm_updates"]] == [1, 2] and result["epochs"] == {"admm": 2, "retrain": 1}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["admm-0.9.admm.png", "admm-0.9.layers.png"]
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("*.png"))
    pruned = load_weights(LeNet5(), tmp_path / "pruned.pt")
    nonzero = sum(int(torch.count_nonzero(p)) for n, p in pruned.named_parameters() if n.endswith("weight"))
    assert nonzero <= result["kept"]
    capsys.readouterr()
    assert classify_main(["eval", *common, "--weights", str(tmp_path / "pruned.pt")]) == 0      # says it is pruned
    assert re.search(r"test images; 9\d\.\d\d% of its Conv/Linear weights are zero", capsys.readouterr().out)
    with pytest.warns(UserWarning, match=r"pruned.pt: 9\d\.\d% of its Conv/Linear weights are zero .a pruned model"):
        assert classify_main(["train", *common, "--weights", str(tmp_path / "pruned.pt"), "--epochs", "1",
                              "--out", str(tmp_path / "densified.pt")]) == 0
    assert sorted(p.name for p in (tmp_path / "ckpt" / "retrain").iterdir()) == ["epoch_0001.pt", "history.csv"]
    from_checkpoint = load_weights(LeNet5(), tmp_path / "ckpt" / "retrain" / "epoch_0001.pt")  # weights_only load
    assert all(torch.equal(a, b) for a, b in zip(from_checkpoint.state_dict().values(), pruned.state_dict().values()))

    # killed after the first ADMM iteration: resuming gives the very same pruned model
    (tmp_path / "ckpt" / "admm" / "epoch_0002.pt").unlink()
    shutil.rmtree(tmp_path / "ckpt" / "retrain")
    assert classify_main([*prune, "--resume", "--json-out", str(tmp_path / "resumed.json"),
                          "--out", str(tmp_path / "resumed.pt")]) == 0
    resumed = load_weights(LeNet5(), tmp_path / "resumed.pt")
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), pruned.state_dict().values()))
    resumed_result = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed_result["admm_updates"] == result["admm_updates"]
    seconds = [record["seconds"] for phase in ("admm", "retrain") for record in resumed_result["history"][phase]]
    assert len(seconds) == 3 and seconds[0] == result["history"]["admm"][0]["seconds"]   # epoch 1: before the kill
    assert resumed_result["train_time_s"] == pytest.approx(sum(seconds))               # counted all the same

    # killed after the last ADMM epoch, before the hard prune: the ADMM state comes back, and so does the model
    shutil.rmtree(tmp_path / "ckpt" / "retrain")
    assert classify_main([*prune, "--resume", "--json-out", str(tmp_path / "after-admm.json"),
                          "--out", str(tmp_path / "after-admm.pt")]) == 0
    after_admm = load_weights(LeNet5(), tmp_path / "after-admm.pt")
    assert all(torch.equal(a, b) for a, b in zip(after_admm.state_dict().values(), pruned.state_dict().values()))
    after_admm_result = json.loads((tmp_path / "after-admm.json").read_text())
    assert after_admm_result["admm_updates"] == result["admm_updates"]
    assert after_admm_result["accuracy_after_hard_prune"] == result["accuracy_after_hard_prune"]

    # the folder holds this run: a new run there is refused, and so is a resume with other settings
    with pytest.raises(ValueError, match=r"ckpt: holds the checkpoints of an earlier run \(retrain/epoch_0001.pt\)"):
        classify_main(prune)
    with pytest.raises(ValueError, match=r"other settings \(prune.sparsity: 0.9 -> 0.8\)"):
        classify_main([*prune, "--resume", "--sparsity", "0.8"])
    # the same run, told otherwise: its data by an absolute path, its default LR spelled out
    same = [*prune, "--resume", "--data", str(data.resolve()), "--lr", "1e-3", "--json-out", str(tmp_path / "same.json")]
    assert classify_main(same) == 0
    assert json.loads((tmp_path / "same.json").read_text())["pruned_accuracy"] == result["pruned_accuracy"]


def test_a_checkpoint_folder_without_run_json_resumes_with_a_warning(tmp_path, capsys):
    """Folders written before run.json existed."""
    data = tmp_path / "mnist"
    write_mnist_like(data, n_train=32, n_test=10)
    train = ["train", "--model", "lenet5", "--data", str(data), "--epochs", "1", "--batch-size", "16",
             "--eval-every", "0", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"),
             "--out", str(tmp_path / "lenet5.pt")]                    # not runs/classify/ in the working folder
    assert classify_main(train) == 0
    (tmp_path / "ckpt" / "run.json").unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"has no run.json \(written since 2026-11-26\): resuming its checkpoints"):
        assert classify_main([*train, "--resume", "--epochs", "2"]) == 0
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["train"]["epochs"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt" / "train").glob("*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]


def test_the_seed_fixes_the_initial_weights_of_classify_train(tmp_path, monkeypatch):
    """Found by a review: the model was built before seeding, so equal commands trained apart."""
    data = tmp_path / "mnist"
    write_mnist_like(data, n_train=32, n_test=10)
    before = torch.random.get_rng_state()
    with monkeypatch.context() as patch:                                # nor are CUDA's streams reseeded
        patch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("CUDA streams reseeded"))
        first, second, other = (build_model("lenet5", seed) for seed in (1, 1, 2))
    assert torch.equal(torch.random.get_rng_state(), before)           # the global stream is left alone
    assert torch.equal(first.conv1.weight, second.conv1.weight) and not torch.equal(first.conv1.weight,
                                                                                     other.conv1.weight)
    train = ["train", "--model", "lenet5", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--seed", "1",
             "--eval-every", "0", "--no-progress"]
    for name in ("a.pt", "b.pt"):
        torch.manual_seed(len(name) + ord(name[0]))                     # whatever came before
        assert classify_main([*train, "--out", str(tmp_path / name)]) == 0
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pt", "b.pt"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    train[train.index("--epochs") + 1] = "0"                            # the initial weights themselves
    assert classify_main([*train, "--out", str(tmp_path / "init.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "init.pt", weights_only=True)["conv1.weight"], first.conv1.weight)
    monkeypatch.chdir(tmp_path)                  # found by a review: a second run replaced the default --out silently
    assert classify_main(train) == 0
    with pytest.warns(UserWarning, match=r"no --out: this run's weights replace runs/classify/lenet5-dense.pt, an "
                                         r"earlier run's; give --out to keep both"):
        assert classify_main([*train, "--seed", "2"]) == 0


class RandomlyAugmented(torch.utils.data.Dataset):
    """Every item draws from torch's random stream, as the augmentations do, in a worker process."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int):
        return torch.randn(4) + 0.01 * index, index % 2


def test_resume_with_worker_processes_equals_an_uninterrupted_run(tmp_path):
    from engine import TrainConfig, Trainer

    def train(epochs: int, folder, resume: bool) -> torch.Tensor:
        engine.seed_everything(0)
        model = torch.nn.Linear(4, 2)
        loader = classify.pipeline.make_train_loader(classify.pipeline.MODELS["lenet5"], RandomlyAugmented(),
                                                     TrainSettings(batch_size=8, workers=1, device="cpu"))
        config = TrainConfig(epochs=epochs, device="cpu", checkpoint_dir=folder, resume=folder if resume else None,
                             progress=False)
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss, loader, config).fit()
        return model.weight.detach()

    uninterrupted = train(3, tmp_path / "a", resume=False)
    train(1, tmp_path / "b", resume=False)                  # killed after its first epoch
    assert torch.equal(train(3, tmp_path / "b", resume=True), uninterrupted)


def test_tiny_magnitude_uniform_prunes_every_layer_alike(tmp_path):
    data = tmp_path / "mnist"
    write_mnist_like(data, n_train=64, n_test=20)
    model, datasets = prepare("lenet5", data)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "uniform.json"
    with pytest.warns(UserWarning, match="--rho, --admm-lr: ADMM settings, which magnitude-uniform ignores"):
        assert classify_main(["prune", "--model", "lenet5", "--data", str(data), "--weights", str(tmp_path / "dense.pt"),
                              "--sparsity", "0.8", "--method", "magnitude-uniform", "--admm-iters", "1",
                              "--retrain-epochs", "0", "--distill", "0.5", "--distill-temperature", "2",
                              "--rho", "0.5", "--admm-lr", "shared", "--json-out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert [row["kept"] for row in result["layers"]] == [100, 5000, 80000, 1000]
    assert result["run"]["prune"]["rho"] == 0.5                             # recorded all the same
    assert (result["settings"]["prune"]["distill"], result["settings"]["prune"]["distill_temperature"]) == (0.5, 2.0)
    assert result["epochs"] == {"admm": 0, "retrain": 1} and result["mask_violations"] == 0


def test_tiny_layerwise_admm_prunes_every_layer_alike(tmp_path, monkeypatch):
    """Zhang et al.'s layer-wise ADMM: with no ratio per layer given, each layer at the target. Each
    accuracy of the JSON is the one measured on its stage's model."""
    data = tmp_path / "mnist"
    write_mnist_like(data, n_train=64, n_test=20)
    model, _ = prepare("lenet5", data)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "layerwise.json"
    measured = []                              # the zero fraction of each model measured; it scores its index

    def zero_fraction_scored(model, loader, device=None):
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        measured.append(sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights))
        return float(len(measured) - 1)

    monkeypatch.setattr(classify.pipeline, "evaluate_accuracy", zero_fraction_scored)
    assert classify_main(["prune", "--model", "lenet5", "--data", str(data), "--weights", str(tmp_path / "dense.pt"),
                          "--sparsity", "0.8", "--method", "admm-layerwise", "--admm-iters", "1",
                          "--retrain-epochs", "0", "--json-out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert [row["kept"] for row in result["layers"]] == [100, 5000, 80000, 1000]
    assert result["epochs"] == {"admm": 1, "retrain": 0} and result["mask_violations"] == 0
    stages = [measured[int(result[key])] for key in ("dense_accuracy", "accuracy_after_hard_prune", "pruned_accuracy")]
    assert stages[0] == 0.0 and stages[1] == stages[2] == pytest.approx(0.8)


def test_prune_model_measures_a_wrapped_model_by_its_own_names(tmp_path):
    """Found by a review: the prunable sparsity looked the masks' names up among a DataParallel
    model's `module.` names, and the run failed at its very end."""
    write_mnist_like(tmp_path / "mnist", n_train=64, n_test=20)
    model, datasets = prepare("lenet5", tmp_path / "mnist")
    result = prune_model("lenet5", torch.nn.DataParallel(model), datasets,
                         PruneSettings(sparsity=0.9, method="magnitude-global", retrain_epochs=0),
                         TrainSettings(batch_size=32, progress=False))
    assert result["prunable_sparsity"] == pytest.approx(0.9, abs=1e-5) and result["mask_violations"] == 0


@pytest.mark.parametrize("method", ["admm-global", "magnitude-global"])
def test_classify_prune_takes_weight_patterns_and_a_floor(tmp_path, method):
    out = tmp_path / "floored.json"
    assert classify_main([*lenet5_prune_command(tmp_path)[1:], "--sparsity", "0.95", "--method", method,
                          "--admm-iters", "1", "--retrain-epochs", "0", "--exclude", "fc2.*", "--min-density", "0.045",
                          "--batch-size", "16", "--json-out", str(out)]) == 0
    kept = {row["layer"]: row["kept"] for row in json.loads(out.read_text())["layers"]}
    assert kept["fc2.weight"] == 5000                                 # excluded: all 500 x 10 kept
    assert kept["fc1.weight"] >= 18000        # 4.5% of 400,000 at least (without the floor: about 15,000)
    assert sum(kept.values()) - 5000 == round(0.05 * (LENET5_PRUNABLE_WEIGHTS - 5000))  # the budget over the rest
    result = json.loads(out.read_text())                  # found by a review: only the all-weights sparsity was there
    assert result["prunable_params"] == LENET5_PRUNABLE_WEIGHTS - 5000
    assert result["prunable_kept"] == round(0.05 * (LENET5_PRUNABLE_WEIGHTS - 5000))
    assert result["prunable_sparsity"] == pytest.approx(0.95, abs=1e-5) and result["sparsity"] < 0.945
    assert result["load_time_s"] > 0                      # wall_time_s leaves out reading the data and weights
    with pytest.raises(ValueError, match=r"min_density must be in \[0, 1\]"):
        PruneSettings(sparsity=0.5, min_density=1.5)


def test_weight_patterns_and_floors_are_checked_before_any_work(tmp_path):
    command = lenet5_prune_command(tmp_path) + ["--checkpoint-dir", str(tmp_path / "ckpt")]
    with pytest.raises(ValueError, match=r"include pattern 'fc9.\*' matches no Conv/Linear weight of LeNet5"):
        classify_main(command[1:] + ["--include", "fc9.*"])
    with pytest.raises(ValueError, match=r"exclude pattern 'fc3.\*' matches no Conv/Linear weight of LeNet5"):
        classify_main(command[1:] + ["--exclude", "fc2.*,fc3.*"])
    with pytest.raises(ValueError, match=r"min_density keeps 215250 weights at least, more than the 43050"):
        classify_main(command[1:] + ["--min-density", "0.5"])
    assert not (tmp_path / "ckpt" / "run.json").exists()               # refused before the folder was claimed


def test_a_run_json_from_before_a_new_option_still_resumes(tmp_path):
    from classify.run_record import claim_checkpoint_dir, run_identity

    settings = TrainSettings(checkpoint_dir=tmp_path / "ckpt", resume=True)
    prune = PruneSettings(sparsity=0.9)
    identity = run_identity("prune", "lenet5", tmp_path, None, settings, prune)
    older = json.loads(json.dumps(identity))
    del older["processes"], older["prune"]["min_density"], older["train"]["seed"]   # not recorded then
    (tmp_path / "ckpt" / "admm").mkdir(parents=True)
    (tmp_path / "ckpt" / "admm" / "epoch_0001.pt").write_bytes(b"")
    (tmp_path / "ckpt" / "run.json").write_text(json.dumps(older))
    claim_checkpoint_dir(settings, identity)                            # accepted: the defaults are what ran
    older["prune"]["sparsity"] = 0.8
    (tmp_path / "ckpt" / "run.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"prune.sparsity: 0.8 -> 0.9"):
        claim_checkpoint_dir(settings, identity)


def test_a_resume_from_weights_replaced_at_the_same_path_is_refused(tmp_path):
    """Found by a review: the resumed run took the new file's dense accuracy into its JSON, while
    its checkpoints came from the old file."""
    from classify.run_record import claim_checkpoint_dir, run_identity

    settings = TrainSettings(checkpoint_dir=tmp_path / "ckpt")
    prune = PruneSettings(sparsity=0.9)
    (tmp_path / "dense.pt").write_bytes(b"the dense weights")
    claim_checkpoint_dir(settings, run_identity("prune", "lenet5", tmp_path, tmp_path / "dense.pt", settings, prune))
    (tmp_path / "ckpt" / "admm").mkdir(parents=True)
    (tmp_path / "ckpt" / "admm" / "epoch_0001.pt").write_bytes(b"")
    resume = TrainSettings(checkpoint_dir=tmp_path / "ckpt", resume=True)
    claim_checkpoint_dir(resume, run_identity("prune", "lenet5", tmp_path, tmp_path / "dense.pt", resume, prune))
    (tmp_path / "dense.pt").write_bytes(b"other dense weights")
    with pytest.raises(ValueError, match=r"holds a run with other settings \(weights_sha256: '[0-9a-f]{64}' -> "
                                         r"'[0-9a-f]{64}'\)"):
        claim_checkpoint_dir(resume, run_identity("prune", "lenet5", tmp_path, tmp_path / "dense.pt", resume, prune))
    record = json.loads((tmp_path / "ckpt" / "run.json").read_text())
    del record["weights_sha256"]                                        # a run.json from before the hash
    (tmp_path / "ckpt" / "run.json").write_text(json.dumps(record))
    claim_checkpoint_dir(resume, run_identity("prune", "lenet5", tmp_path, tmp_path / "dense.pt", resume, prune))


def lenet5_prune_command(tmp_path) -> list[str]:
    """`yolo-admm classify prune` of an untrained LeNet-5 (saved as dense.pt) on 64 MNIST-like images."""
    data = tmp_path / "mnist"
    write_mnist_like(data, n_train=64, n_test=20)
    model, _ = prepare("lenet5", data)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    return ["classify", "prune", "--model", "lenet5", "--data", str(data), "--weights", str(tmp_path / "dense.pt"),
            "--sparsity", "0.9", "--no-progress"]


def test_progressive_admm_ramps_the_kept_count_down_to_the_target(tmp_path, capsys):
    common = [*lenet5_prune_command(tmp_path), "--admm-iters", "3", "--retrain-epochs", "0"]
    out = tmp_path / "ramp.json"
    assert yolo_admm_main([*common, "--ramp-from", "0.5", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    kept = [update["kept"] for update in result["admm_updates"]]
    assert kept[0] > kept[1] == kept[2] == result["kept"] == round(0.1 * LENET5_PRUNABLE_WEIGHTS)  # ramp: 2 of 3
    assert result["mask_violations"] == 0 and result["settings"]["prune"]["ramp_from"] == 0.5
    capsys.readouterr()
    assert yolo_admm_main([*common, "--ramp-from", "0.95"]) == 2
    assert "ramp_from must be below sparsity (0.9), got 0.95" in capsys.readouterr().err
    assert yolo_admm_main([*common, "--ramp-from", "0.5", "--ramp-iters", "4"]) == 2
    assert "ramp_iters must be an int in [1, admm_iters=3], got 4" in capsys.readouterr().err
    assert yolo_admm_main([*common, "--ramp-from", "0.5", "--method", "magnitude-global"]) == 2
    assert "ramp_from is for the ADMM methods" in capsys.readouterr().err


def test_admm_learning_rate_schedules(tmp_path, capsys):
    """The LR at the end of each epoch: 2 ADMM epochs, then 2 retraining epochs, base LR 0.002."""
    common = [*lenet5_prune_command(tmp_path), "--admm-iters", "2", "--retrain-epochs", "2", "--lr", "0.002"]
    lrs = {}
    for schedule in ("constant", "cosine", "shared"):
        out = tmp_path / f"{schedule}.json"
        assert yolo_admm_main([*common, "--admm-lr", schedule, "--json-out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["settings"]["prune"]["admm_lr"] == schedule and result["mask_violations"] == 0
        lrs[schedule] = [epoch["lr"] for phase in ("admm", "retrain") for epoch in result["history"][phase]]
    quarter, half, three_quarters = (0.001 * (1 + math.cos(math.pi * t)) for t in (0.25, 0.5, 0.75))
    assert lrs["constant"] == pytest.approx([0.002, 0.002, 0.001, 0.0], abs=1e-12)
    assert lrs["cosine"] == pytest.approx([0.001, 0.0, 0.001, 0.0], abs=1e-12)  # a decay per phase
    assert lrs["shared"] == pytest.approx([quarter, half, three_quarters, 0.0], abs=1e-12)  # one through the cut
    capsys.readouterr()
    assert yolo_admm_main([*common, "--admm-lr", "linear"]) == 2
    assert "invalid choice: 'linear'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown admm_lr 'linear'; expected one of constant, cosine, shared"):
        PruneSettings(sparsity=0.5, admm_lr="linear")


def test_optimizer_choice_and_its_default_learning_rate(tmp_path, capsys):
    spec, model = classify.pipeline.MODELS["lenet5"], LeNet5()
    adam = classify.pipeline.make_optimizer(model, spec, None, None)  # the model's default
    assert type(adam) is torch.optim.Adam and adam.defaults["lr"] == 1e-3
    sgd = classify.pipeline.make_optimizer(model, spec, "sgd", None)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["lr"] == 0.01
    assert (sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.9, True)
    resnet_sgd = classify.pipeline.make_optimizer(resnet56(), classify.pipeline.MODELS["resnet56"], None, 0.05)
    assert type(resnet_sgd) is torch.optim.SGD and resnet_sgd.defaults["lr"] == 0.05

    out = tmp_path / "sgd.json"
    assert yolo_admm_main([*lenet5_prune_command(tmp_path), "--admm-iters", "1", "--retrain-epochs", "0",
                           "--optimizer", "sgd", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["train"]["optimizer"] == "sgd" and result["history"]["admm"][0]["lr"] == 0.01
    capsys.readouterr()
    assert yolo_admm_main([*lenet5_prune_command(tmp_path), "--optimizer", "rmsprop"]) == 2
    assert "invalid choice: 'rmsprop'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="optimizer must be one of adam, sgd, found 'rmsprop'"):
        TrainSettings(optimizer="rmsprop")


def test_the_cli_runs_the_benchmarks_pruning_exactly_whether_or_not_it_evaluates(tmp_path, capsys):
    """benchmarks/lenet5_mnist.py calls prune_model with eval_every=0; the CLI is the same run, with
    --eval-every 0 and with an evaluation after every epoch (whose DataLoader draws from a fork of
    torch's random streams, so training keeps its shuffles)."""
    command = [*lenet5_prune_command(tmp_path), "--admm-iters", "2", "--retrain-epochs", "1", "--batch-size", "16",
               "--train-samples", "32"]
    weights = {}
    for name, extra in (("final_eval_only", ["--eval-every", "0"]), ("eval_each_epoch", [])):
        assert yolo_admm_main([*command, *extra, "--out", str(tmp_path / f"{name}.pt"),
                               "--json-out", str(tmp_path / f"{name}.json")]) == 0
        weights[name] = load_weights(LeNet5(), tmp_path / f"{name}.pt").state_dict()
    histories = {name: json.loads((tmp_path / f"{name}.json").read_text())["history"] for name in weights}
    assert not any("eval/acc" in epoch for phase in histories["final_eval_only"].values() for epoch in phase)
    assert all("eval/acc" in epoch for phase in histories["eval_each_epoch"].values() for epoch in phase)

    model, datasets = prepare("lenet5", tmp_path / "mnist", tmp_path / "dense.pt")
    prune_model("lenet5", model, datasets, PruneSettings(sparsity=0.9, admm_iters=2, retrain_epochs=1),
                TrainSettings(batch_size=16, train_samples=32, eval_every=0, progress=False))
    direct = model.state_dict()
    for name in weights:
        assert all(torch.equal(direct[key], weights[name][key]) for key in direct), name
    capsys.readouterr()
    assert yolo_admm_main([*command, "--eval-every", "-1"]) == 2
    assert "epochs, workers and eval_every must be >= 0, found 0, 0 and -1" in capsys.readouterr().err


def test_classify_prune_runs_under_torchrun_with_two_processes(tmp_path):
    """2 gloo processes on CPU (with distillation: each rank has its own frozen teacher): one result,
    written once, at the exact sparsity."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    write_mnist_like(tmp_path / "mnist", n_train=128, n_test=64)
    dense = tmp_path / "dense.pt"
    assert classify_main(["train", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--epochs", "1",
                          "--batch-size", "32", "--out", str(dense), "--no-progress"]) == 0
    result = tmp_path / "prune.json"
    run = subprocess.run(  # --standalone: torchrun hosts the rendezvous on a free port it binds itself
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "yolo_admm",
         "classify", "prune", "--model", "lenet5", "--data", str(tmp_path / "mnist"), "--weights", str(dense),
         "--sparsity", "0.9", "--admm-iters", "2", "--retrain-epochs", "1", "--batch-size", "32",
         "--distill", "0.5", "--device", "cpu", "--json-out", str(result), "--no-progress",
         "--checkpoint-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("weights removed") == 1  # only rank 0 reports and writes
    record = json.loads(result.read_text())
    assert record["sparsity"] == pytest.approx(0.9, abs=1e-5) and record["settings"]["prune"]["distill"] == 0.5
    assert record["train_images_per_epoch"] == 128                   # both ranks' shares, not one
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["prune"]["sparsity"] == 0.9


def test_a_resume_without_checkpoints_says_it_starts_over(tmp_path, capsys):
    """Found by a fuzz: `--resume` into an empty (or mistyped) folder started a new run in silence."""
    from classify.run_record import claim_checkpoint_dir, run_identity

    settings = TrainSettings(checkpoint_dir=tmp_path / "typo", resume=True)
    with pytest.warns(UserWarning, match=f"--resume, but {tmp_path / 'typo'} holds no checkpoint yet"):
        claim_checkpoint_dir(settings, run_identity("train", "lenet5", tmp_path, None, settings))
