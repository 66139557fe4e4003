import gzip
import struct

import numpy as np
import pytest
import torch

import utils
from utils import ZCA, UsageError, get_dataset


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def mini():
    return get_dataset("FashionMNIST-mini")


def test_read_idx_round_trips(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4))
    for name in ("a.gz", "b"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(utils.read_idx(tmp_path / name), array)


def test_fashion_mnist_loads_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (20, 28, 28)), "t10k": rng.integers(0, 256, (10, 28, 28))}
    labels = {"train": np.arange(20) % 10, "t10k": np.arange(10)}
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    data = get_dataset("FashionMNIST", data_path=str(tmp_path))
    assert data.images_train.shape == (20, 1, 28, 28) and data.images_test.shape == (10, 1, 28, 28)
    assert data.labels_train.tolist() == labels["train"].tolist()
    expected = (torch.as_tensor(images["train"][3], dtype=torch.float32) / 255 - 0.2861) / 0.3530
    assert torch.allclose(data.images_train[3, 0], expected, atol=1e-6)
    assert data.class_names[9] == "Ankle boot" and data.num_classes == 10


def test_embedded_dataset_is_class_balanced_and_normalised(mini):
    assert mini.images_train.shape == (5000, 1, 28, 28) and mini.images_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(mini.labels_train).tolist() == [500] * 10
    assert torch.bincount(mini.labels_test).tolist() == [100] * 10
    assert (mini.channel, mini.im_size, mini.num_classes) == (1, (28, 28), 10)
    assert abs(mini.images_train.mean().item()) < 0.05 and abs(mini.images_train.std().item() - 1) < 0.05


def test_images_per_class_partitions_the_indices():
    labels = torch.tensor([2, 0, 1, 2, 0, 2])
    groups = utils.images_per_class(labels, 4)
    assert [g.tolist() for g in groups] == [[1, 4], [2], [0, 3, 5], []]


def test_missing_dataset_folders_fail_with_one_clear_line(tmp_path):
    with pytest.raises(UsageError, match="Tiny ImageNet not found: no folder .*tiny-imagenet-200.zip") as err:
        get_dataset("Tiny", data_path=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="ImageNet not found"):
        get_dataset("ImageNet", data_path=str(tmp_path))
    with pytest.raises(UsageError, match="unknown dataset 'CIFAR11'"):
        get_dataset("CIFAR11")


def save_png(path, colour, size=(72, 80)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_tiny_imagenet_layout_loads(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
        for i in range(3):
            save_png(root / "train" / wnid / "images" / f"{wnid}_{i}.png", colour)
    save_png(root / "val" / "images" / "val_0.png", (0, 0, 255))
    save_png(root / "val" / "images" / "val_1.png", (255, 0, 0))
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t1\t1\nval_1.png\tn01\t0\t0\t1\t1\n")
    data = get_dataset("Tiny", data_path=str(tmp_path))
    assert data.images_train.shape == (6, 3, 64, 64) and data.labels_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.labels_test.tolist() == [1, 0] and data.class_names == ["n01", "n02"]
    red = (1 - 0.485) / 0.229  # a red pixel's first channel after normalisation
    assert data.images_test[1, 0].sub(red).abs().max() < 1e-4


def test_imagenet_subset_picks_the_configured_classes(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (tmp_path / "train" / wnid).mkdir(parents=True)
    for split in ("train", "val"):
        for label, index in enumerate(utils.IMAGENET_SUBSETS["imagewoof"]):
            save_png(tmp_path / split / wnids[index] / "a.png", (label * 20, 0, 0))
    data = get_dataset("ImageNet", data_path=str(tmp_path), subset="imagewoof", res=16)
    assert data.images_train.shape == (10, 3, 16, 16) and data.labels_test.tolist() == list(range(10))
    assert data.class_names[0] == wnids[193]


def test_buffer_dir_follows_the_original_layout():
    assert utils.buffer_dir("b", "CIFAR10", "ConvNet", zca=False) == "b/CIFAR10_NO_ZCA/ConvNet"
    assert utils.buffer_dir("b", "CIFAR10", "ConvNet", zca=True) == "b/CIFAR10/ConvNet"
    assert utils.buffer_dir("b", "FashionMNIST", "ConvNet", zca=False) == "b/FashionMNIST/ConvNet"
    path = utils.buffer_dir("b", "ImageNet", "ConvNetD5", False, "imagewoof", 128)
    assert path == "b/ImageNet/imagewoof/128/ConvNetD5"


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "file.pt"
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with utils.atomic_path(target) as tmp:
        torch.save(torch.arange(3), tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["file.pt"]


def test_zca_inverse_recovers_real_images(mini):
    x = mini.images_train[:2000] * 0.3530 + 0.2861  # back to [0, 1], as ZCA mode sees them
    zca = ZCA.fit(x)
    whitened = zca(x)
    assert (whitened - x).abs().max() > 0.5  # the transform does something
    assert (zca.inverse(whitened) - x).abs().max().item() <= 1e-4


def test_zca_matrix_equals_the_formula_in_float64():
    x = torch.rand(40, 2, 3, 3)
    zca = ZCA.fit(x, eps=0.1)
    flat = x.flatten(1).double().numpy()
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (len(flat) - 1)
    s, u = np.linalg.eigh(cov)
    s = np.clip(s, 0, None)
    expected = u @ np.diag(1 / np.sqrt(s + 0.1)) @ u.T
    assert np.abs(zca.transform.double().numpy() - expected).max() <= 1e-5
    assert np.abs(zca.inverse_transform.double().numpy() - np.linalg.inv(expected)).max() <= 1e-5
    out = zca(x).flatten(1).double().numpy()
    assert np.abs(out - centred @ expected).max() <= 1e-5


def test_zca_saves_and_loads(tmp_path):
    x = torch.rand(30, 1, 4, 4)
    zca = ZCA.fit(x)
    zca.save(tmp_path / "zca.pt")
    loaded = ZCA.load(tmp_path / "zca.pt")
    assert torch.equal(loaded(x), zca(x)) and loaded.eps == 0.1


def test_get_dataset_with_zca_whitens_train_and_test_with_one_transform():
    data = get_dataset("FashionMNIST-mini", zca=True)
    raw = get_dataset("FashionMNIST-mini")
    unscaled = raw.images_test[:5] * 0.3530 + 0.2861
    assert data.zca is not None
    assert torch.allclose(data.images_test[:5], data.zca(unscaled), atol=1e-4)
    assert abs(data.images_train.mean().item()) < 1e-3
