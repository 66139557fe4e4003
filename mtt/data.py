"""Real data: each loader returns uint8 N x C x H x W images, int64 labels and the class names; get_dataset scales
to [0, 1], then normalises by the dataset's mean and std or (--zca) whitens with a ZCA fitted on the training set,
as the original does. Decoded folder datasets (Tiny ImageNet, the ImageNet subsets), ZCA fits and whitened images
are kept in {data_path}/cache/ (mtt/cache.py), the images memory-mapped on later starts.
"""
import gzip
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtt import cache
from mtt.progress import progress
from mtt.zca import ZCA, cached_zca, whitened
from utils import REPO, UsageError, cpu_threads

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MINI_PATH = REPO / "assets" / "fashion_mnist_mini.npz"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RESIZE_RULE = "PIL convert RGB, resize (res, res) BILINEAR"  # how _decode_chunk makes a picture; part of its key


@dataclass
class Data:
    images_train: torch.Tensor  # float32 N x C x H x W, normalised (or ZCA-whitened)
    labels_train: torch.Tensor  # int64
    images_test: torch.Tensor
    labels_test: torch.Tensor
    channel: int
    im_size: tuple
    num_classes: int
    class_names: list
    mean: list
    std: list
    zca: "ZCA | None" = None
    name: str = ""  # what the dataset's cache files are named after
    data_path: "str | None" = None  # whose cache/ holds them; None: nothing is cached

    def fitted_zca(self, device=None):
        """Data.zca, or the ZCA that --zca whitens with, fitted on the training set now (or read from the cache)."""
        if self.zca is not None:
            return self.zca
        pixels = self.to_pixels(self.images_train).mul_(255).round_().to(torch.uint8)  # exactly the decoded images
        return cached_zca(pixels.cpu(), self.data_path, self.name, device)[0]

    def to_pixels(self, images):
        """Images as get_dataset returns them, back to [0, 1] pixels (where ZCA is fitted)."""
        if self.zca is not None:
            return self.zca.inverse(images)
        std, mean = (torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (self.std, self.mean))
        return images * std + mean


def get_dataset(dataset, data_path="data", zca=False, subset="imagenette", res=128, device=None):
    """The dataset's images as float tensors on the CPU; with zca, the ZCA is fitted and applied on `device`."""
    info = DATASETS[dataset]
    name = f"{dataset}-{subset}-{res}px" if dataset == "ImageNet" else dataset
    x_train, y_train, x_test, y_test, class_names = info.load(data_path, subset, res)
    whitener = None
    if zca:
        whitener, zca_file, train_digest = cached_zca(x_train, data_path, name, device)
        x_train = whitened(x_train, whitener, zca_file, f"{name}-train", device, train_digest)
        x_test = whitened(x_test, whitener, zca_file, f"{name}-test", device)
    else:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
        x_train, x_test = (x.float().div_(255).sub_(mean).div_(std) for x in (x_train, x_test))
    return Data(x_train, y_train, x_test, y_test, channel=x_train.shape[1], im_size=tuple(x_train.shape[2:]),
                num_classes=len(class_names), class_names=list(class_names), mean=list(info.mean),
                std=list(info.std), zca=whitener, name=name, data_path=data_path)


def images_per_class(labels, num_classes):
    return list(torch.split(torch.argsort(labels, stable=True), torch.bincount(labels, minlength=num_classes).tolist()))


def smallest_class(labels, num_classes, pool=None):
    """How many images the smallest class has (among `pool`, a mask of the images; default all)."""
    return min(len(idx) if pool is None else int(pool[idx].sum()) for idx in images_per_class(labels, num_classes))


def draw_per_class(labels, num_classes, per_class, seed):
    """per_class random indices of each class's images, drawn by a generator seeded with `seed` (not the global one)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)[:per_class]]
                      for idx in images_per_class(labels, num_classes)])


def _nchw(images):
    images = torch.as_tensor(np.asarray(images))
    return images.unsqueeze(1) if images.ndim == 3 else images


def _load_torchvision(name, data_path, subset, res):
    import torchvision  # here, not at the top: importing it takes a second, which the other datasets need not pay
    cls = getattr(torchvision.datasets, name)
    missing = [p for p in (Path(data_path).absolute(), *Path(data_path).absolute().parents) if not p.exists()]
    splits = [{"split": "train"}, {"split": "test"}] if name == "SVHN" else [{"train": True}, {"train": False}]
    try:
        train, test = (cls(data_path, download=True, **split) for split in splits)
    except Exception as err:
        if missing:  # the folders torchvision made to download into, and what it left there
            shutil.rmtree(missing[-1], ignore_errors=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{name} is not in {data_path!r} and could not be downloaded ({reason}); "
                         f"check the network or put torchvision's {name} files under --data_path") from err
    labels = lambda ds: torch.as_tensor(np.asarray(ds.labels if name == "SVHN" else ds.targets), dtype=torch.long)
    channels_last = name.startswith("CIFAR")  # torchvision keeps CIFAR as N x H x W x C
    images = lambda ds: _nchw(ds.data).permute(0, 3, 1, 2) if channels_last else _nchw(ds.data)
    class_names = getattr(train, "classes", [str(c) for c in range(10)])
    return images(train), labels(train), images(test), labels(test), list(class_names)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def read_idx(path):
    """An IDX file (the MNIST format, gzipped or not) as a numpy array; a truncated or foreign one is one line."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if data[:3] != b"\x00\x00\x08":  # the magic number of unsigned-byte IDX data
            raise ValueError("no IDX header")
        ndim = data[3]
        shape = np.frombuffer(data, ">i4", ndim, 4)
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError) as err:
        raise UsageError(f"{path} is truncated or not an IDX file ({type(err).__name__}); download it again") from None


def idx_files(folder):
    """The four Fashion-MNIST IDX files in `folder` (gzipped or not), or None."""
    for suffix in (".gz", ""):
        paths = [Path(folder) / f"{name}{suffix}" for name in IDX_FILES]
        if all(p.exists() for p in paths):
            return paths


def _load_fashion_mnist(data_path, subset, res):
    """The four IDX files from --data_path or Debian's dataset-fashion-mnist; else torchvision's download."""
    folders = [data_path, Path(data_path) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    paths = next(filter(None, map(idx_files, folders)), None)
    if paths is None:
        return _load_torchvision("FashionMNIST", data_path, subset, res)
    x_train, y_train, x_test, y_test = (torch.as_tensor(read_idx(p).copy()) for p in paths)
    for images, labels, path in ((x_train, y_train, paths[1]), (x_test, y_test, paths[3])):
        if labels.ndim != 1 or len(labels) != len(images) or labels.max() >= len(FASHION_CLASSES):
            raise UsageError(f"{path} holds {len(labels)} labels up to {labels.max()} for {len(images)} images of "
                             f"{len(FASHION_CLASSES)} classes (0 to {len(FASHION_CLASSES) - 1}); download it again")
    return _nchw(x_train), y_train.long(), _nchw(x_test), y_test.long(), FASHION_CLASSES


def _load_fashion_mnist_mini(data_path, subset, res):
    """The class-balanced Fashion-MNIST subset shipped in assets/ (made by assets/make_fashion_mnist_mini.py)."""
    with np.load(MINI_PATH) as f:
        arrays = [torch.as_tensor(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    return _nchw(arrays[0]), arrays[1].long(), _nchw(arrays[2]), arrays[3].long(), FASHION_CLASSES


def _decode_chunk(files, res):
    """The files decoded, or the UsageError of one that cannot be: returned, not raised, because a
    pool stopped while it still hands out work can hang (seen here: Pool.terminate waiting forever
    for its task thread, in about one test run in twenty)."""
    # PIL, as before the cache: torchvision's decoder gives PIL's pixels on JPEG, but its resize is
    # not PIL's bilinear (1 level off on many pixels), and cached pixels must equal uncached ones.
    pictures = []
    for path in files:
        try:
            with Image.open(path) as im:
                pictures.append(np.asarray(im.convert("RGB").resize((res, res), Image.BILINEAR)).transpose(2, 0, 1))
        except OSError as err:
            return UsageError(f"cannot read image {path}: {err}")
    return np.stack(pictures)


def _decode_all(files, res, desc):
    """uint8 N x 3 x res x res: the files decoded by a pool of worker processes, in order."""
    out = np.empty((len(files), 3, res, res), np.uint8)
    workers = min(cpu_threads(), max(1, len(files) // 64))
    size = max(1, min(256, len(files) // (4 * workers)))  # chunks small enough to share out evenly
    starts = range(0, len(files), size)
    errors = []
    with multiprocessing.Pool(workers) as pool, progress(total=len(files), desc=desc, unit="img") as bar:
        for start, rows in zip(starts, pool.imap(partial(_decode_chunk, res=res), [files[i:i + size] for i in starts])):
            if isinstance(rows, UsageError):
                errors.append(rows)
                continue
            out[start:start + len(rows)] = rows
            bar.update(len(rows))
        pool.close()
        pool.join()  # every chunk handed out and done: the pool's exit has nothing left to stop
    if errors:
        raise errors[0]
    return out


def _read_images(files, res, data_path, name):
    """Image files as one uint8 N x 3 x res x res tensor, each squashed to res x res (PIL bilinear) as the original's
    Resize((res, res)) does: the whole picture stays, uncropped. Cached as {name}-{res}px-{key}.npy, keyed by each
    file's name (relative: a moved data folder keeps its cache), size and time of change, res and the resize rule."""
    desc = f"decoding {name}"
    folder = cache.folder(data_path)
    if folder is None:
        return torch.from_numpy(_decode_all(files, res, desc))
    signatures = (f"{os.path.relpath(path, data_path)}|{stat.st_size}|{stat.st_mtime_ns}"
                  for path, stat in zip(files, map(os.stat, files)))
    path = cache.file_for(folder, f"{name}-{res}px", ".npy", RESIZE_RULE, res, *signatures)
    return cache.cached_array(path, (len(files), 3, res, res), np.uint8, lambda: _decode_all(files, res, desc),
                              f"{desc}: {len(files)} images")


def _class_folders(root, what):
    from torchvision.datasets.folder import find_classes
    try:
        return find_classes(root)[0]
    except FileNotFoundError as err:
        raise UsageError(f"{what}: {err}") from None


def _load_folders(root, classes, res, what, data_path, name):
    """ImageFolder root/{class}/**/image: the images of `classes` (folder names), labelled by position, cached as
    `name`; a class without images is an error (torchvision's make_dataset)."""
    from torchvision.datasets.folder import make_dataset
    try:
        found = make_dataset(str(root), {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise UsageError(f"{what}, {root}: {err}") from None
    return _read_images([path for path, _ in found], res, data_path, name), torch.tensor([label for _, label in found])


def _require_dirs(what, how, *paths):
    for path in paths:
        if not Path(path).is_dir():
            raise UsageError(f"{what} not found: no folder {str(path)!r}; {how}")


def _load_tiny_annotated(images, classes, data_path):
    """The zip's test set: images/*.JPEG labelled by the wnid column of ../val_annotations.txt."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise UsageError(f"Tiny ImageNet: no test images in {images} (neither {{wnid}}/ folders nor image files)")
    annotations = images.parent / "val_annotations.txt"
    if not annotations.is_file():
        raise UsageError(f"Tiny ImageNet: {annotations} is missing; it labels the images in {images}")
    wnid = {row[0]: row[1] for row in map(str.split, annotations.read_text().splitlines()) if len(row) >= 2}
    index = {name: i for i, name in enumerate(classes)}
    unlabelled = [f.name for f in files if wnid.get(f.name) not in index]
    if unlabelled:
        raise UsageError(f"Tiny ImageNet: {len(unlabelled)} images in {images} have no training class in "
                         f"{annotations}, e.g. {unlabelled[0]}")
    return _read_images(files, 64, data_path, "Tiny-test"), torch.tensor([index[wnid[f.name]] for f in files])


def _load_tiny(data_path, subset, res):
    """Tiny ImageNet (64x64): train/{wnid}/**/*.JPEG, and either the original's ImageFolder test set
    val/images/{wnid}/*.JPEG or the zip's val/images/*.JPEG labelled by val/val_annotations.txt."""
    root = Path(data_path) / "tiny-imagenet-200"
    root = root if root.is_dir() else Path(data_path)
    how = "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into --data_path"
    train, test = root / "train", root / "val" / "images"
    _require_dirs("Tiny ImageNet", how, train, test)
    classes = _class_folders(train, "Tiny ImageNet")
    x_train, y_train = _load_folders(train, classes, 64, "Tiny ImageNet", data_path, "Tiny-train")
    if not any(p.is_dir() for p in test.iterdir()):
        return x_train, y_train, *_load_tiny_annotated(test, classes, data_path), classes
    unknown = sorted(set(_class_folders(test, "Tiny ImageNet")) - set(classes))
    if unknown:
        raise UsageError(f"Tiny ImageNet: {len(unknown)} class folders in {test} are not in {train}, e.g. {unknown[0]}")
    return x_train, y_train, *_load_folders(test, classes, 64, "Tiny ImageNet", data_path, "Tiny-test"), classes


IMAGENET_SUBSETS = {  # indices into the 1000 sorted ImageNet class folders (the original's Config)
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}


def _load_imagenet_subset(data_path, subset, res):
    """Ten ImageNet classes from data_path/train/{wnid} and data_path/val/{wnid}, at res x res."""
    how = "put ImageNet in ImageFolder layout (train/{wnid}/*.JPEG, val/{wnid}/*.JPEG) under --data_path"
    train, test = Path(data_path) / "train", Path(data_path) / "val"
    _require_dirs("ImageNet", how, train, test)
    wnids = _class_folders(train, "ImageNet")
    if len(wnids) != 1000:
        raise UsageError(f"ImageNet: expected 1000 class folders in {train}, found {len(wnids)}")
    classes = [wnids[i] for i in IMAGENET_SUBSETS[subset]]
    train_set, test_set = (_load_folders(folder, classes, res, "ImageNet", data_path, f"{subset}-{split}")
                           for folder, split in ((train, "train"), (test, "test")))
    return *train_set, *test_set, classes


@dataclass(frozen=True)
class DatasetInfo:
    load: callable  # (data_path, subset, res) -> uint8 x_train, y_train, x_test, y_test, class names
    mean: tuple
    std: tuple
    side: int  # image side; None: --res (ImageNet subsets)
    num_classes: int

    def shape(self, res):
        """(channel, (h, w), classes) of the images get_dataset returns, known without loading them."""
        return len(self.mean), (self.side or res,) * 2, self.num_classes


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DATASETS = {
    "MNIST": DatasetInfo(partial(_load_torchvision, "MNIST"), (0.1307,), (0.3081,), 28, 10),
    "FashionMNIST": DatasetInfo(_load_fashion_mnist, (0.2861,), (0.3530,), 28, 10),
    "FashionMNIST-mini": DatasetInfo(_load_fashion_mnist_mini, (0.2861,), (0.3530,), 28, 10),
    "SVHN": DatasetInfo(partial(_load_torchvision, "SVHN"), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 32, 10),
    "CIFAR10": DatasetInfo(partial(_load_torchvision, "CIFAR10"), CIFAR_MEAN, CIFAR_STD, 32, 10),
    # CIFAR-10's constants, as the original normalises CIFAR-100: buffers and sets move between the codebases
    "CIFAR100": DatasetInfo(partial(_load_torchvision, "CIFAR100"), CIFAR_MEAN, CIFAR_STD, 32, 100),
    "Tiny": DatasetInfo(_load_tiny, IMAGENET_MEAN, IMAGENET_STD, 64, 200),
    "ImageNet": DatasetInfo(_load_imagenet_subset, IMAGENET_MEAN, IMAGENET_STD, None, 10),
}
