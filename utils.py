"""Data, ZCA whitening, differentiable Siamese augmentation (DSA) and the evaluation protocol."""
import argparse
import fcntl
import gzip
import json
import math
import os
import random
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import parallel
from networks import MODELS, get_network

REPO = Path(__file__).resolve().parent
MINI_PATH = REPO / "assets" / "fashion_mnist_mini.npz"
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


class UsageError(Exception):
    """Bad input (a missing file, an impossible flag): the scripts print it as one line and exit."""


# ---------------------------------------------------------------------------------------------
# Run set-up


def set_seed(seed):
    """Seed python, numpy and torch (every device) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_seed(seed, index):
    """The seed of the index-th run of a command seeded with `seed` (an evaluation network, an
    evaluation iteration): distinct for each index, and the same whatever else the command does."""
    return seed * 1_000_003 + index


def pick_device(device=None):
    """torch.device for --device: cuda when present unless given; a device that is absent or
    unknown is a UsageError, not a traceback from the first tensor moved to it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"unknown --device {device!r}; use cuda, cuda:N or cpu") from err
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU (torch sees none); use --device cpu")
    if picked.type == "cuda" and (picked.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if picked.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: only cuda and cpu are supported")
    return picked


def make_deterministic():
    """--deterministic: torch's deterministic algorithms, cuDNN without autotuning and cuBLAS with
    a fixed workspace, so that a CUDA run repeats bit for bit (CPU runs repeat without it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run_info(device):
    """What a results file should say about where it came from: code version, torch, device."""
    git = lambda *argv: subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = commit and bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"git_commit": commit, "git_dirty": dirty, "torch_version": torch.__version__, "device": str(device),
            "device_name": name}


def true_false(text):
    """The original's --dsa True / --dsa False, as a bool."""
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")
    return text == "True"


def require_positive(args, *flags):
    for flag in flags:
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")


def add_common_args(parser):
    """The flags buffer.py, distill.py and eval.py share, with the original's names and defaults."""
    parser.add_argument("--dataset", default="CIFAR10", choices=list(DATASETS), help="dataset (default CIFAR10)")
    parser.add_argument("--subset", default="imagenette", choices=list(IMAGENET_SUBSETS),
                        help="ImageNet subset (with --dataset ImageNet)")
    parser.add_argument("--model", default="ConvNet", choices=list(MODELS), metavar="MODEL",
                        help=f"network: {', '.join(MODELS)}")
    parser.add_argument("--res", type=int, default=128,
                        help="image side of ImageNet subsets, squashed to res x res (default 128, as the original)")
    parser.add_argument("--data_path", default="data", help="where datasets are found or downloaded")
    parser.add_argument("--zca", action="store_true", help="ZCA-whiten the data (eps 0.1, fitted on the training set)")
    parser.add_argument("--dsa", type=true_false, default=True, metavar="{True,False}",
                        help="differentiable Siamese augmentation on every batch (default True)")
    parser.add_argument("--dsa_strategy", default=DSA_STRATEGY,
                        help=f"DSA groups joined by _, one drawn per batch (from {', '.join(DSA_GROUPS)})")
    parser.add_argument("--batch_train", type=int, default=256, help="batch size for training networks")
    parser.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch: a seed repeats a run")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic CUDA kernels (bit-identical CUDA runs, somewhat slower)")
    return parser


def check_common_args(args):
    """The shared flag checks that need no data: run before any folder or file is created."""
    require_positive(args, "batch_train", "res")
    if args.seed < 0:
        raise UsageError("--seed must be non-negative")
    check_dsa_strategy(args.dsa_strategy)


def buffer_dir(buffer_path, dataset, model, zca, subset="imagenette", res=128):
    """The original's expert directory: {buffer_path}/{dataset}[/{subset}/{res}][_NO_ZCA]/{model}."""
    path = os.path.join(buffer_path, dataset)
    if dataset == "ImageNet":
        path = os.path.join(path, subset, str(res))
    if dataset in ("CIFAR10", "CIFAR100") and not zca:
        path += "_NO_ZCA"
    return os.path.join(path, model)


TEMP_SUFFIX = re.compile(r"\.tmp(\d+)$")


def fsync(path):
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary name to write to; it replaces `path` only if the writing finished.
    The file is fsynced before the rename and the folder after it, so that after a power loss
    `path` holds either the old contents or the complete new ones, never an empty file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def remove_stale_temps(folder):
    """Delete the `*.tmpPID` files that processes killed mid-write left in `folder` (a buffer's
    can be hundreds of MB); a live process's temporary file is left alone."""
    removed = []
    for path in Path(folder).glob("*.tmp*"):
        match = TEMP_SUFFIX.search(path.name)
        if match and path.is_file() and not process_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


@contextmanager
def folder_lock(folder, what):
    """Hold an exclusive lock on `folder` (fcntl on folder/.lock) while the block runs, so that
    two processes never write one folder; the lock goes with the process, however it ends."""
    with open(Path(folder) / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder} is in use by another {what} (it holds {folder}/.lock); wait for it to "
                             f"finish or choose another folder") from None
        yield


def make_folder(folder, flag):
    """Create `folder` (and parents) or say in one line why it cannot be written to."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{flag} {folder}: a file is in the way (not a folder)") from None
    except OSError as err:
        raise UsageError(f"{flag} {folder}: cannot create it ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: not writable")
    return Path(folder)


def save_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def eta(elapsed, done, total):
    """'12m05s left' when `done` of `total` units of work took `elapsed` seconds."""
    seconds = elapsed / max(done, 1e-9) * (total - done)
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s left"


# ---------------------------------------------------------------------------------------------
# Datasets: each loader returns uint8 NCHW tensors and int64 labels, then get_dataset normalises.


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

    def to_pixels(self, images):
        """Images as get_dataset returns them, back to [0, 1] pixels (where ZCA is fitted)."""
        if self.zca is not None:
            return self.zca.inverse(images)
        std, mean = (torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (self.std, self.mean))
        return images * std + mean


def _nchw(images):
    images = torch.as_tensor(np.asarray(images))
    return images.unsqueeze(1) if images.ndim == 3 else images


def _load_torchvision(name, data_path, subset, res):
    cls = getattr(torchvision.datasets, name)
    try:
        if name == "SVHN":
            train, test = (cls(data_path, split=s, download=True) for s in ("train", "test"))
        else:
            train, test = (cls(data_path, train=t, download=True) for t in (True, False))
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{name} is not in {data_path!r} and could not be downloaded ({reason}); "
                         f"check the network or put torchvision's {name} files under --data_path") from err
    labels = lambda ds: torch.as_tensor(np.asarray(ds.labels if name == "SVHN" else ds.targets), dtype=torch.long)
    channels_last = name.startswith("CIFAR")
    images = lambda ds: _nchw(ds.data).permute(0, 3, 1, 2) if channels_last else _nchw(ds.data)
    class_names = getattr(train, "classes", [str(c) for c in range(10)])
    return images(train), labels(train), images(test), labels(test), list(class_names)


def read_idx(path):
    """An IDX file (the MNIST format, gzipped or not) as a numpy array."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", ndim, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def find_idx(folders):
    for folder in folders:
        for suffix in (".gz", ""):
            paths = [Path(folder) / f"{name}{suffix}" for name in IDX_FILES]
            if all(p.exists() for p in paths):
                return paths
    return None


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _load_fashion_mnist(data_path, subset, res):
    """The four IDX files from --data_path or Debian's dataset-fashion-mnist; else torchvision's download."""
    paths = find_idx([data_path, Path(data_path) / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST])
    if paths is None:
        return _load_torchvision("FashionMNIST", data_path, subset, res)
    x_train, y_train, x_test, y_test = (torch.as_tensor(read_idx(p).copy()) for p in paths)
    return _nchw(x_train), y_train.long(), _nchw(x_test), y_test.long(), FASHION_CLASSES


def _load_fashion_mnist_mini(data_path, subset, res):
    """The class-balanced Fashion-MNIST subset shipped in assets/ (made by assets/make_fashion_mnist_mini.py)."""
    with np.load(MINI_PATH) as f:
        arrays = [torch.as_tensor(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
    return _nchw(arrays[0]), arrays[1].long(), _nchw(arrays[2]), arrays[3].long(), FASHION_CLASSES


def _read_images(files, res):
    """Decode image files into one uint8 N x 3 x res x res tensor. Each is squashed to res x res
    (PIL bilinear), as the original's Resize((res, res)) does: the whole picture stays, uncropped."""
    out = np.empty((len(files), res, res, 3), np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                out[i] = np.asarray(im.convert("RGB").resize((res, res), Image.BILINEAR))
        except OSError as err:
            raise UsageError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2)


IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp"}


def _image_files(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root):
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def _load_folders(root, classes, res, what):
    """ImageFolder layout root/{class}/**/image: images of `classes` (folder names), labelled by
    position. A class without images is an error, as in torchvision's ImageFolder."""
    if not classes:
        raise UsageError(f"{what}: no class folders in {root}")
    found = [_image_files(Path(root) / name) for name in classes]
    empty = [name for name, files in zip(classes, found) if not files]
    if empty:
        raise UsageError(f"{what}: no images in {Path(root) / empty[0]} ({len(empty)} of {len(classes)} classes "
                         f"have none)")
    labels = [label for label, files in enumerate(found) for _ in files]
    return _read_images([f for files in found for f in files], res), torch.tensor(labels, dtype=torch.long)


def _require_dir(path, what, how):
    if not Path(path).is_dir():
        raise UsageError(f"{what} not found: no folder {str(path)!r}; {how}")


def _load_tiny_annotated(images, classes):
    """The zip's test set: images/*.JPEG labelled by the wnid column of ../val_annotations.txt."""
    files = _image_files(images)
    if not files:
        raise UsageError(f"Tiny ImageNet: no test images in {images} (neither {{wnid}}/ folders nor image files)")
    annotations = images.parent / "val_annotations.txt"
    if not annotations.is_file():
        raise UsageError(f"Tiny ImageNet: {annotations} is missing; it labels the images in {images}")
    rows = (line.split() for line in annotations.read_text().splitlines())
    wnid = {row[0]: row[1] for row in rows if len(row) >= 2}
    index = {name: i for i, name in enumerate(classes)}
    unlabelled = [f.name for f in files if wnid.get(f.name) not in index]
    if unlabelled:
        raise UsageError(f"Tiny ImageNet: {len(unlabelled)} images in {images} have no training class in "
                         f"{annotations}, e.g. {unlabelled[0]}")
    return _read_images(files, 64), torch.tensor([index[wnid[f.name]] for f in files], dtype=torch.long)


def _load_tiny(data_path, subset, res):
    """Tiny ImageNet (64x64): train/{wnid}/**/*.JPEG, and either the original's ImageFolder test set
    val/images/{wnid}/*.JPEG or the zip's val/images/*.JPEG labelled by val/val_annotations.txt."""
    root = Path(data_path) / "tiny-imagenet-200"
    root = root if root.is_dir() else Path(data_path)
    how = "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into --data_path"
    train, test = root / "train", root / "val" / "images"
    _require_dir(train, "Tiny ImageNet", how)
    _require_dir(test, "Tiny ImageNet", how)
    classes = _class_folders(train)
    x_train, y_train = _load_folders(train, classes, 64, "Tiny ImageNet")
    test_classes = _class_folders(test)
    if not test_classes:
        return x_train, y_train, *_load_tiny_annotated(test, classes), classes
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise UsageError(f"Tiny ImageNet: {len(unknown)} class folders in {test} are not in {train}, e.g. {unknown[0]}")
    return x_train, y_train, *_load_folders(test, classes, 64, "Tiny ImageNet"), classes


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
    _require_dir(Path(data_path) / "train", "ImageNet", how)
    _require_dir(Path(data_path) / "val", "ImageNet", how)
    wnids = _class_folders(Path(data_path) / "train")
    if len(wnids) != 1000:
        raise UsageError(f"ImageNet: expected 1000 class folders in {data_path}/train, found {len(wnids)}")
    classes = [wnids[i] for i in IMAGENET_SUBSETS[subset]]
    x_train, y_train = _load_folders(Path(data_path) / "train", classes, res, "ImageNet")
    x_test, y_test = _load_folders(Path(data_path) / "val", classes, res, "ImageNet")
    return x_train, y_train, x_test, y_test, classes


@dataclass(frozen=True)
class DatasetInfo:
    load: callable  # (data_path, subset, res) -> uint8 x_train, y_train, x_test, y_test, class names
    mean: tuple
    std: tuple
    side: int  # image side; None: --res (ImageNet subsets)
    num_classes: int

    def shape(self, res):
        """(channel, (h, w), classes) of the images get_dataset returns, known without loading them."""
        side = self.side or res
        return len(self.mean), (side, side), self.num_classes


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASETS = {
    "MNIST": DatasetInfo(partial(_load_torchvision, "MNIST"), (0.1307,), (0.3081,), 28, 10),
    "FashionMNIST": DatasetInfo(_load_fashion_mnist, (0.2861,), (0.3530,), 28, 10),
    "FashionMNIST-mini": DatasetInfo(_load_fashion_mnist_mini, (0.2861,), (0.3530,), 28, 10),
    "SVHN": DatasetInfo(partial(_load_torchvision, "SVHN"), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        32, 10),
    "CIFAR10": DatasetInfo(partial(_load_torchvision, "CIFAR10"), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           32, 10),
    # CIFAR-10's constants, as the original normalises CIFAR-100: buffers and sets move between the codebases
    "CIFAR100": DatasetInfo(partial(_load_torchvision, "CIFAR100"), (0.4914, 0.4822, 0.4465),
                            (0.2023, 0.1994, 0.2010), 32, 100),
    "Tiny": DatasetInfo(_load_tiny, IMAGENET_MEAN, IMAGENET_STD, 64, 200),
    "ImageNet": DatasetInfo(_load_imagenet_subset, IMAGENET_MEAN, IMAGENET_STD, None, 10),
}


def get_dataset(dataset, data_path="data", zca=False, subset="imagenette", res=128):
    """Training and test images as float tensors: normalised by the dataset's mean and std, or,
    with zca, scaled to [0, 1] and whitened by a ZCA fitted on the training set (Data.zca)."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    x_train, y_train, x_test, y_test, class_names = info.load(data_path, subset, res)
    x_train, x_test = x_train.float().div_(255), x_test.float().div_(255)
    whitener = None
    if zca:
        whitener = ZCA.fit(x_train)
        x_train, x_test = whitener(x_train), whitener(x_test)
    else:
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        x_train, x_test = x_train.sub_(mean).div_(std), x_test.sub_(mean).div_(std)
    return Data(x_train, y_train, x_test, y_test, channel=x_train.shape[1], im_size=tuple(x_train.shape[2:]),
                num_classes=len(class_names), class_names=list(class_names), mean=list(info.mean),
                std=list(info.std), zca=whitener)


def images_per_class(labels, num_classes):
    """Indices of each class's images, as a list of tensors."""
    order = torch.argsort(labels, stable=True)
    return list(torch.split(order, torch.bincount(labels, minlength=num_classes).tolist()))


# ---------------------------------------------------------------------------------------------
# ZCA whitening (the reference uses kornia's ZCAWhitening(eps=0.1, compute_inv=True)).


class ZCA:
    """x -> (x - mean) T with T = U diag(1 / sqrt(S + eps)) U^T, where U S U^T is the covariance."""

    def __init__(self, mean, transform, inverse_transform, eps):
        self.mean, self.transform, self.inverse_transform, self.eps = mean, transform, inverse_transform, eps

    @classmethod
    def fit(cls, images, eps=0.1, chunk=4096):
        """Fit on N x C x H x W images; the covariance is accumulated in float64 in chunks of rows."""
        x = images.flatten(1)
        mean = sum(rows.double().sum(0) for rows in torch.split(x, chunk)) / len(x)
        cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for rows in torch.split(x, chunk):
            centred = rows.double() - mean
            cov += centred.T @ centred
        cov /= len(x) - 1
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0)  # a rank-deficient covariance has tiny negative eigenvalues from rounding
        transform = (u * (s + eps).rsqrt()) @ u.T
        inverse = (u * (s + eps).sqrt()) @ u.T
        return cls(mean.float(), transform.float(), inverse.float(), eps)

    def __call__(self, images):
        return ((images.flatten(1) - self.mean) @ self.transform).view_as(images)

    def inverse(self, images):
        return (images.flatten(1) @ self.inverse_transform + self.mean).view_as(images)

    def state_dict(self):
        return {"mean": self.mean, "transform": self.transform, "inverse_transform": self.inverse_transform,
                "eps": self.eps}

    def save(self, path):
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    @classmethod
    def load(cls, path, device="cpu"):
        state = torch.load(path, map_location=device, weights_only=True)
        return cls(state["mean"], state["transform"], state["inverse_transform"], state["eps"])

    def to(self, device):
        return ZCA(self.mean.to(device), self.transform.to(device), self.inverse_transform.to(device), self.eps)


# ---------------------------------------------------------------------------------------------
# Differentiable Siamese augmentation. draw_augmentation picks random parameters (a list of
# (op, tensor) pairs); apply_augmentation applies them, differentiably in the pixels. Keeping
# the two apart lets the low-memory backward of distill.py replay a step's exact augmentation.

DSA_PARAMS = dict(flip=0.5, scale=1.2, rotate=15.0, crop=0.125, cutout=0.5, brightness=1.0, saturation=2.0,
                  contrast=0.5)
DSA_GROUPS = {"color": ("brightness", "saturation", "contrast"), "crop": ("crop",), "cutout": ("cutout",),
              "flip": ("flip",), "scale": ("scale",), "rotate": ("rotate",)}


def _affine(x, theta):
    grid = F.affine_grid(theta.expand(len(x), 2, 3), x.shape, align_corners=True)
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return bilinear_sample(x, grid)
    return F.grid_sample(x, grid, align_corners=True)


def bilinear_sample(x, grid):
    """F.grid_sample(x, grid, align_corners=True) (bilinear, zero padding) built from gathers: its
    backward is deterministic on CUDA under --deterministic, where grid_sample's has no such kernel."""
    n, c, h, w = x.shape
    ix, iy = (grid[..., 0] + 1) * (w - 1) / 2, (grid[..., 1] + 1) * (h - 1) / 2
    flat, out = x.reshape(n, c, h * w), 0
    for cx in (ix.floor(), ix.floor() + 1):
        for cy in (iy.floor(), iy.floor() + 1):
            weight = (1 - (ix - cx).abs()) * (1 - (iy - cy).abs()) * ((cx >= 0) & (cx < w) & (cy >= 0) & (cy < h))
            index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long().view(n, 1, -1).expand(n, c, -1)
            out = out + flat.gather(2, index).view(n, c, *ix.shape[1:]) * weight[:, None]
    return out


def _draw_scale(n, x):
    r = DSA_PARAMS["scale"]
    sx, sy = (torch.rand(n, device=x.device, dtype=x.dtype) * (r - 1 / r) + 1 / r for _ in range(2))
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)


def _draw_rotate(n, x):
    angle = (torch.rand(n, device=x.device, dtype=x.dtype) - 0.5) * 2 * DSA_PARAMS["rotate"] / 180 * math.pi
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def _draw_shift(n, x, ratio):
    """Integer (row, column) offsets in [-s, s], s = ratio of the side, one row per image."""
    limits = [int(side * ratio + 0.5) for side in x.shape[2:]]
    return torch.stack([torch.randint(-s, s + 1, (n,), device=x.device) for s in limits], 1)


def _cutout_size(shape):
    return [int(side * DSA_PARAMS["cutout"] + 0.5) for side in shape]


def _draw_cutout(n, x):
    """Centres of the cut-out squares, as the original draws them."""
    size = _cutout_size(x.shape[2:])
    return torch.stack([torch.randint(0, side + 1 - s % 2, (n,), device=x.device)
                        for side, s in zip(x.shape[2:], size)], 1)


def _uniform(n, x):
    return torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)


def _crop(x, shift):
    """Translate by whole pixels, filling with zeros (index a 1-pixel zero pad, clamped)."""
    h, w = x.shape[2:]
    rows = (torch.arange(h, device=x.device) + shift[:, :1] + 1).clamp(0, h + 1)  # n x h
    cols = (torch.arange(w, device=x.device) + shift[:, 1:] + 1).clamp(0, w + 1)  # n x w
    batch = torch.arange(len(x), device=x.device).view(-1, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded[batch, :, rows.expand(len(x), h)[:, :, None], cols.expand(len(x), w)[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x, centre):
    h, w = x.shape[2:]
    size = _cutout_size((h, w))
    start = centre - torch.tensor([s // 2 for s in size], device=x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + size[0])  # n x h
    in_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + size[1])  # n x w
    return x * (~(in_rows[:, :, None] & in_cols[:, None, :])).to(x.dtype)[:, None]


def _saturation(x, u):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (u * DSA_PARAMS["saturation"]) + mean


def _contrast(x, u):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u + DSA_PARAMS["contrast"]) + mean


DSA_OPS = {  # op -> (draw(n, x), apply(x, params))
    "flip": (_uniform, lambda x, u: torch.where(u < DSA_PARAMS["flip"], x.flip(3), x)),
    "scale": (_draw_scale, _affine),
    "rotate": (_draw_rotate, _affine),
    "crop": (partial(_draw_shift, ratio=DSA_PARAMS["crop"]), _crop),
    "cutout": (_draw_cutout, _cutout),
    "brightness": (_uniform, lambda x, u: x + (u - 0.5) * DSA_PARAMS["brightness"]),
    "saturation": (_uniform, _saturation),
    "contrast": (_uniform, _contrast),
}


def check_dsa_strategy(strategy):
    """The groups of a --dsa_strategy string ([] for none), or a UsageError naming the unknown ones."""
    if strategy in ("", "none", "None"):
        return []
    groups = strategy.split("_")
    unknown = set(groups) - set(DSA_GROUPS)
    if unknown:
        raise UsageError(f"unknown DSA op(s) {', '.join(sorted(unknown))} in --dsa_strategy; "
                         f"choose from {', '.join(DSA_GROUPS)}")
    return groups


def draw_augmentation(x, strategy=DSA_STRATEGY, mode="S"):
    """Random DSA parameters for the batch x, one draw per image. Mode S applies one group of
    the strategy, drawn at random; mode M applies them all."""
    groups = check_dsa_strategy(strategy)
    if groups and mode == "S":
        groups = [groups[torch.randint(len(groups), ()).item()]]
    return [(op, DSA_OPS[op][0](len(x), x)) for group in groups for op in DSA_GROUPS[group]]


def apply_augmentation(x, draw):
    for op, params in draw:
        x = DSA_OPS[op][1](x, params)
    return x


def augment(x, strategy=DSA_STRATEGY, mode="S"):
    return apply_augmentation(x, draw_augmentation(x, strategy, mode))


def draw_texture_crops(canvases, samples):
    """Random toroidal offsets for `samples` crops of each canvas: (samples * n) x 2."""
    n, (h, w) = len(canvases), canvases.shape[2:]
    return torch.stack([torch.randint(h, (samples * n,)), torch.randint(w, (samples * n,))], 1).to(canvases.device)


def texture_crops(canvases, offsets, res):
    """Crops of the canvases rolled by `offsets` (the canvases repeated once per sample)."""
    h, w = canvases.shape[2:]
    source = canvases.repeat(len(offsets) // len(canvases), 1, 1, 1)
    rows = (torch.arange(res[0], device=offsets.device) - offsets[:, :1]) % h
    cols = (torch.arange(res[1], device=offsets.device) - offsets[:, 1:]) % w
    batch = torch.arange(len(source), device=offsets.device).view(-1, 1, 1)
    return source[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Evaluation protocol (as in DC, DSA and MTT): train a fresh network on a (synthetic) set, test it.

EVAL_POOLS = {
    "M": ["ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"],
    "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
}


def eval_pool(eval_mode, model):
    """The models to evaluate a set with: S = the distillation model (batch norm swapped for
    instance norm, as the original does), C = that model and ConvNet, else a named pool."""
    if eval_mode == "S":
        return [model.split("BN")[0]]
    if eval_mode == "C":
        return list(dict.fromkeys([model, "ConvNet"]))
    if eval_mode not in EVAL_POOLS:
        raise UsageError(f"unknown --eval_mode {eval_mode!r}; choose from S, C, {', '.join(EVAL_POOLS)}")
    return EVAL_POOLS[eval_mode]


@torch.no_grad()
def accuracy(net, images, labels, batch=500):
    net.eval()
    correct = sum((net(x).argmax(1) == y).sum().item() for x, y in zip(images.split(batch), labels.split(batch)))
    return correct / len(labels)


def cross_entropy(logits, targets):
    """Class ids: the usual cross-entropy. N x C label logits (DATM's soft labels): the
    cross-entropy against softmax(targets) at temperature 1, summed over classes, averaged over
    the batch, as DATM trains its students and evaluation networks."""
    if targets.is_floating_point():
        return -(F.log_softmax(logits, 1) * F.softmax(targets, 1)).sum() / len(logits)
    return F.cross_entropy(logits, targets)


def class_ids(labels):
    """Hard labels of class ids or of soft-label logits (their argmax)."""
    return labels.argmax(1) if labels.is_floating_point() else labels


def sgd_step(net, x, y, optimizer):
    """train_epoch's update: one gradient step of `optimizer` on the batch; returns the outputs."""
    out = net(x)
    loss = cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out


def train_epoch(net, images, labels, optimizer, batch_size, dsa_strategy=None, texture=None, step=sgd_step):
    """One shuffled pass over (images, labels) with DSA on every batch (one draw per image) and
    `step` on each (buffer.py's GSAM takes sgd_step's place); labels are class ids or label logits;
    texture = (res, samples) trains on random crops of canvases. Returns the training accuracy as
    a 0-dim tensor: reading it waits for the GPU, which a 1000-epoch evaluation should not do per step."""
    net.train()
    correct, seen = torch.zeros((), device=images.device), 0
    for idx in torch.randperm(len(images), device=images.device).split(batch_size):
        x, y = images[idx], labels[idx]
        if texture is not None:
            (res, samples) = texture
            x = texture_crops(x, draw_texture_crops(x, samples), res)
            y = y.repeat(samples, *[1] * (y.ndim - 1))
        if dsa_strategy:
            x = augment(x, dsa_strategy)
        out = step(net, x, y, optimizer)
        correct += (out.argmax(1) == class_ids(y)).sum()
        seen += len(y)
    return correct / seen


def evaluate_synset(net, images, labels, test_images, test_labels, lr, epochs=1000, batch_train=256,
                    dsa_strategy=DSA_STRATEGY, texture=None, log=None):
    """Train `net` (fresh) on images/labels with SGD (momentum 0.9, weight decay 5e-4), lr decayed
    x0.1 after epoch epochs//2 + 1, DSA on every batch unless dsa_strategy is None; return the
    final (train accuracy, test accuracy). Like the original, it runs epochs + 1 passes and
    restarts the optimiser (momentum included) at the decay."""
    device = next(net.parameters()).device
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4)
    start, passes = time.time(), epochs + 1
    for ep in range(passes):
        train_acc = train_epoch(net, images, labels, optimizer, batch_train, dsa_strategy, texture)
        if ep == epochs // 2 + 1:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4)
        if log and (ep + 1) % max(1, passes // 10) == 0:
            log(f"  epoch {ep + 1}/{passes} train acc {train_acc:.3f} ({eta(time.time() - start, ep + 1, passes)})")
    return train_acc.item(), accuracy(net, test_images.to(device), test_labels.to(device))


@dataclass
class EvalSet:
    """A training set to evaluate (distilled, random real or full), with the real images it is
    tested on, in the same space (ZCA or not) as its own images."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor  # class ids, or N x C label logits (trained with the soft cross-entropy)
    lr: float
    epochs: int
    ipc: int | None  # None: the whole training set
    test: tuple  # (images, labels)
    texture: tuple | None = None  # (crop size, crops per canvas) for texture canvases
    validation: tuple | None = None  # (images, labels) of held-out real training images
    lr_from: str = "--lr"  # where lr came from, for the report


def evaluate_sets(pairs, data, num_eval, seed, batch_train=256, dsa_strategy=DSA_STRATEGY, device="cpu",
                  log=print):
    """Train num_eval fresh networks for each (EvalSet, model) pair and test each; one row of the
    table per pair. Network r of a pair is seeded by (seed, r) alone, so a row repeats whatever
    else the command evaluates, and under torchrun the networks spread over the ranks (network k
    of the list on rank k mod ranks) with the same results as one process."""
    jobs = [(pair, run) for pair in range(len(pairs)) for run in range(num_eval)]
    results = {}
    for pair, run in jobs[parallel.rank()::parallel.world()]:
        train_set, model = pairs[pair]
        set_seed(run_seed(seed, run))
        net = get_network(model, data.channel, data.num_classes, data.im_size).to(device)
        tag = f"[{train_set.name} {model} run {run + 1}/{num_eval}]"
        log(f"{tag} training on {len(train_set.images)} images for {train_set.epochs} epochs, lr {train_set.lr:.4g}")
        _, test_acc = evaluate_synset(net, train_set.images, train_set.labels, *train_set.test, train_set.lr,
                                      train_set.epochs, batch_train, dsa_strategy, train_set.texture,
                                      log=lambda line: log(tag + line))
        val_acc = accuracy(net, *(t.to(device) for t in train_set.validation)) if train_set.validation else None
        validation = "" if val_acc is None else f", validation {100 * val_acc:.2f}%"
        log(f"{tag} test acc {100 * test_acc:.2f}%{validation}")
        results[pair, run] = (test_acc, val_acc)
    for found in parallel.gather_objects(results):
        results.update(found)
    rows = []
    for pair, (train_set, model) in enumerate(pairs):
        test_accs, val_accs = zip(*(results[pair, run] for run in range(num_eval)))
        row = {"set": train_set.name, "model": model, "ipc": train_set.ipc, "images": len(train_set.images),
               "lr": train_set.lr, "lr_from": train_set.lr_from, "epochs": train_set.epochs,
               "test_acc_mean": float(np.mean(test_accs)), "test_acc_std": float(np.std(test_accs)),
               "test_accs": list(test_accs), "n": num_eval}
        if train_set.validation:
            row.update(val_acc_mean=float(np.mean(val_accs)), val_acc_std=float(np.std(val_accs)),
                       val_accs=list(val_accs))
        rows.append(row)
    return rows
