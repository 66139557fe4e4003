import gzip
import shutil
import struct

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mtt import data
from mtt.data import IMAGENET_SUBSETS, ZCA, get_dataset
from utils import UsageError


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 4))
    for name in ("a.gz", "b"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(data.read_idx(tmp_path / name), array)


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
    groups = data.images_per_class(labels, 4)
    assert [g.tolist() for g in groups] == [[1, 4], [2], [0, 3, 5], []]


def test_missing_dataset_folders_fail_with_one_clear_line(tmp_path):
    with pytest.raises(UsageError, match="Tiny ImageNet not found: no folder .*tiny-imagenet-200.zip") as err:
        get_dataset("Tiny", data_path=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="ImageNet not found"):
        get_dataset("ImageNet", data_path=str(tmp_path))


def save_png(path, colour, size=(72, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


RED, BLUE = (255, 0, 0), (0, 0, 255)


def tiny_imagenet(root):
    """A two-class Tiny ImageNet as the zip unpacks it: train/{wnid}/images/, val/images/ and its annotations."""
    for wnid, colour in (("n01", RED), ("n02", BLUE)):
        for i in range(3):
            save_png(root / "train" / wnid / "images" / f"{wnid}_{i}.png", colour)
    save_png(root / "val" / "images" / "val_0.png", BLUE)
    save_png(root / "val" / "images" / "val_1.png", RED)
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t1\t1\nval_1.png\tn01\t0\t0\t1\t1\n")
    return root


def test_tiny_imagenet_zip_layout_loads(tmp_path):
    tiny_imagenet(tmp_path / "tiny-imagenet-200")
    data = get_dataset("Tiny", data_path=str(tmp_path))
    assert data.images_train.shape == (6, 3, 64, 64) and data.labels_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.labels_test.tolist() == [1, 0] and data.class_names == ["n01", "n02"]
    red = (1 - 0.485) / 0.229  # a red pixel's first channel after normalisation
    assert data.images_test[1, 0].sub(red).abs().max() < 1e-4


def test_tiny_imagenet_loads_the_originals_image_folder_layout(tmp_path):
    """The original reads val/images/{wnid}/ with ImageFolder. Its preparation leaves the stale
    val_annotations.txt behind: the class folders must win over it."""
    root = tiny_imagenet(tmp_path)
    for file in (root / "val" / "images").iterdir():
        file.unlink()
    save_png(root / "val" / "images" / "n02" / "a.png", BLUE)
    save_png(root / "val" / "images" / "n02" / "b.png", BLUE)
    save_png(root / "val" / "images" / "n01" / "c.png", RED)
    data = get_dataset("Tiny", data_path=str(tmp_path))
    assert data.labels_test.tolist() == [0, 1, 1] and data.class_names == ["n01", "n02"]
    corners = (data.to_pixels(data.images_test) * 255).round()[:, :, 0, 0]
    assert corners.tolist() == [list(RED), list(BLUE), list(BLUE)]


def empty_test_set(root):
    for file in (root / "val" / "images").iterdir():
        file.unlink()


def empty_training_set(root):
    for folder in (root / "train").iterdir():
        shutil.rmtree(folder)


def class_without_training_images(root):
    for file in (root / "train" / "n02" / "images").iterdir():
        file.unlink()


def unknown_test_class(root):
    empty_test_set(root)
    save_png(root / "val" / "images" / "n01" / "a.png", RED)
    save_png(root / "val" / "images" / "n03" / "a.png", RED)


def unannotated_test_image(root):
    save_png(root / "val" / "images" / "val_2.png", RED)


def corrupt_image(root):
    (root / "train" / "n01" / "images" / "n01_1.png").write_bytes(b"not a png")


BROKEN_TINY = {  # what is wrong -> the one-line error it must give
    empty_test_set: r"no test images in .*val/images",
    empty_training_set: r"Couldn't find any class folder in .*train",
    class_without_training_images: r"Found no valid file for the classes n02",
    unknown_test_class: r"1 class folders in .*val/images are not in .*train, e\.g\. n03",
    unannotated_test_image: r"1 images in .*val/images have no training class in .*val_annotations.txt, e\.g\. val_2",
    corrupt_image: r"cannot read image .*n01_1\.png",
}


@pytest.mark.parametrize("breakage", BROKEN_TINY, ids=lambda f: f.__name__)
def test_broken_tiny_imagenet_is_one_clear_line_not_an_empty_tensor(tmp_path, breakage):
    breakage(tiny_imagenet(tmp_path))
    with pytest.raises(UsageError, match=BROKEN_TINY[breakage]) as err:
        get_dataset("Tiny", data_path=str(tmp_path))
    assert "\n" not in str(err.value)


def imagenet_subset(root, subset, picture):
    """A 1000-class ImageNet whose `subset` classes each hold `picture(label)` in train/ and val/."""
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True)
    for split in ("train", "val"):
        for label, index in enumerate(IMAGENET_SUBSETS[subset]):
            (root / split / wnids[index]).mkdir(parents=True, exist_ok=True)
            picture(label).save(root / split / wnids[index] / "a.png")
    return wnids


def test_imagenet_subset_picks_the_configured_classes(tmp_path):
    wnids = imagenet_subset(tmp_path, "imagewoof", lambda label: Image.new("RGB", (72, 80), (label * 20, 0, 0)))
    data = get_dataset("ImageNet", data_path=str(tmp_path), subset="imagewoof", res=16)
    # in the order of the class folders' names, as torchvision's ImageFolder (the original's reader) lists them
    in_folder_order = sorted(range(10), key=lambda label: IMAGENET_SUBSETS["imagewoof"][label])
    assert data.images_train.shape == (10, 3, 16, 16) and data.labels_test.tolist() == in_folder_order
    assert data.class_names[0] == wnids[193]
    red = (data.to_pixels(data.images_test) * 255).round()[:, 0, 0, 0]
    assert red.tolist() == [20.0 * label for label in in_folder_order]


def test_imagenet_images_are_squashed_to_res_not_cropped(tmp_path):
    """A 2:1 picture, red on its left quarter: squashed to 16 x 16 the red keeps the left quarter
    (columns 0-2 pure, 3-4 blended by the bilinear filter); a centre crop would cut it all away.
    Noise pictures match torchvision's Resize((res, res)), the original's transform, exactly."""
    striped = np.zeros((32, 64, 3), np.uint8)
    striped[:, :16], striped[:, 16:] = RED, BLUE
    noise = np.random.default_rng(0).integers(0, 256, (10, 24, 40, 3), dtype=np.uint8)
    pictures = [Image.fromarray(striped)] + [Image.fromarray(n) for n in noise[:9]]
    imagenet_subset(tmp_path, "imagenette", lambda label: pictures[label])
    data = get_dataset("ImageNet", data_path=str(tmp_path), res=16)
    pixels = (data.to_pixels(data.images_test) * 255).round().to(torch.uint8)
    red = pixels[0, 0, 0].tolist()  # along the width; every row is the same
    assert torch.equal(pixels[0], pixels[0, :, :1].expand(3, 16, 16))
    assert red[:3] == [255] * 3 and 0 < red[4] < red[3] < 255 and red[5:] == [0] * 11
    assert torch.equal(pixels[0, 2], 255 - pixels[0, 0])
    resize = torchvision.transforms.Resize((16, 16))
    for label in range(10):
        expected = torch.from_numpy(np.array(resize(pictures[label]))).permute(2, 0, 1)
        assert torch.equal(pixels[label], expected)


def test_zca_inverse_recovers_real_images(mini):
    x = mini.images_train[:2000] * 0.3530 + 0.2861  # back to [0, 1], as ZCA mode sees them
    zca = ZCA.fit(x)
    whitened = zca(x)
    assert (whitened - x).abs().max() > 0.5  # the transform does something
    assert (zca.inverse(whitened) - x).abs().max().item() <= 1e-4


@pytest.mark.parametrize("n", [40, 10])  # 10 images of 18 pixels: a rank-deficient covariance
def test_zca_whitens_to_the_shrunk_identity_with_a_symmetric_invertible_transform(n):
    """With eps, ZCA does not whiten to the identity: each eigen-direction of the covariance keeps
    variance s / (s + eps), and directions the images do not span stay at zero."""
    torch.manual_seed(0)
    x = torch.rand(n, 2, 3, 3)
    zca = ZCA.fit(x, eps=0.1)
    s, u = torch.linalg.eigh(torch.cov(x.flatten(1).double().T))
    s = s.clamp_min(0)
    expected = u @ torch.diag(s / (s + 0.1)) @ u.T
    assert (torch.cov(zca(x).flatten(1).double().T) - expected).abs().max() <= 1e-5
    assert torch.allclose(zca.transform, zca.transform.T, atol=1e-6)
    assert (zca.inverse_transform @ zca.transform - torch.eye(18)).abs().max() <= 1e-5


def test_zca_saves_and_loads(tmp_path):
    x = torch.rand(30, 1, 4, 4)
    zca = ZCA.fit(x)
    torch.save(zca.state_dict(), tmp_path / "zca.pt")
    loaded = ZCA.load(tmp_path / "zca.pt")
    assert torch.equal(loaded(x), zca(x)) and loaded.eps == 0.1


def test_get_dataset_with_zca_whitens_train_and_test_with_one_transform(tmp_path):
    data = get_dataset("FashionMNIST-mini", str(tmp_path), zca=True)
    raw = get_dataset("FashionMNIST-mini")
    unscaled = raw.images_test[:5] * 0.3530 + 0.2861
    assert data.zca is not None
    assert torch.allclose(data.images_test[:5], data.zca(unscaled), atol=1e-4)
    assert abs(data.images_train.mean().item()) < 1e-3


class FakeTorchvision:
    """Stands in for a torchvision dataset class: the arrays torchvision keeps, as it keeps them
    (CIFAR: N x H x W x C with .targets; SVHN: N x C x H x W with .labels; MNIST: a uint8 tensor)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, root, train=None, split=None, download=False):
        size = 6 if train or split == "train" else 4
        pixels = np.arange(size * 3 * 32 * 32, dtype=np.int64).reshape(size, 32, 32, 3) % 251
        dataset = type("Dataset", (), {})()
        if self.name.startswith("CIFAR"):
            dataset.data, dataset.targets = pixels.astype(np.uint8), list(range(size))
        elif self.name == "SVHN":
            dataset.data, dataset.labels = pixels.transpose(0, 3, 1, 2).astype(np.uint8), np.arange(size)
        else:
            dataset.data, dataset.targets = torch.from_numpy(pixels[..., 0][:, :28, :28].astype(np.uint8)), \
                torch.arange(size)
        return dataset


@pytest.mark.parametrize("name,mean,std", [("CIFAR10", 0.4914, 0.2023), ("CIFAR100", 0.4914, 0.2023),
                                           ("SVHN", 0.4377, 0.1980), ("MNIST", 0.1307, 0.3081)])
def test_torchvision_datasets_become_nchw_images_normalised_by_the_originals_constants(monkeypatch, name, mean, std):
    """CIFAR arrives channels last and is permuted; CIFAR-100 takes CIFAR-10's mean and std, as the
    original normalises it (buffers and sets then mean the same in both codebases)."""
    monkeypatch.setattr(torchvision.datasets, name, FakeTorchvision(name))
    found = get_dataset(name, data_path="unused")
    raw = FakeTorchvision(name)(None, train=True)
    expected = torch.as_tensor(np.asarray(raw.data))
    expected = expected.permute(0, 3, 1, 2) if name.startswith("CIFAR") else expected
    expected = expected.unsqueeze(1) if expected.ndim == 3 else expected
    assert found.images_train.shape == expected.shape and len(found.images_test) == 4
    assert torch.allclose(found.images_train[:, 0], (expected[:, 0].float() / 255 - mean) / std, atol=1e-6)
    assert found.labels_train.tolist() == list(range(6)) and found.labels_train.dtype == torch.long


def test_a_dataset_that_cannot_be_downloaded_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://... got URLError")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UsageError, match=r"^CIFAR10 is not in 'x' and could not be downloaded \(Error downloading "
                                         r"cifar-10-python.tar.gz:\); check the network") as raised:
        get_dataset("CIFAR10", data_path="x")
    assert "\n" not in str(raised.value)
