"""The run folder: everything distill.py writes under --save_path, and eval.py's reading of it.

    images_{tag}.pt, labels_{tag}.pt    the set (the original's names); tag = an iteration or best;
                                        labels are class ids, or N x C logits with soft labels
    syn_lr_{tag}.pt, lr_{tag}.pt        the learned lr (lr_ is DATM's name for it)
    images_zca_{tag}.pt                 with ZCA: the images de-whitened, for viewing
    ema_images_{tag}.pt, ema_...        FTD's EMA of the images, with the lr and labels beside it
    synthetic_{it}.png                  the image grid (ema_synthetic_{it}.png for the EMA)
    log.jsonl                           one line per iteration, evaluated model and resume
    run.json                            what eval.py needs to evaluate the set, and provenance
    zca.pt                              with ZCA: the transform the set lives in
    checkpoint.pt                       everything --resume needs to continue bit for bit

Every file is written under a temporary name and renamed into place (utils.atomic_path).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from data import ZCA
from utils import TEMP_SUFFIX, UsageError, atomic_path, load_json, load_torch, save_json, save_torch

CHECKPOINT, LOG, RUN_JSON, ZCA_FILE = "checkpoint.pt", "log.jsonl", "run.json", "zca.pt"
GRID_SIDE = 128  # pixels a side an image is enlarged to (nearest) in the grid, so a 28-32 px image shows


def sibling(images_file, kind):
    """images_X.pt -> labels_X.pt (or syn_lr_X.pt, lr_X.pt): the original's and DATM's naming."""
    head, found, tail = images_file.name.rpartition("images")
    return images_file.with_name(head + kind + tail) if found else None


def save_set(folder, prefix, tags, images, labels, syn_lr, zca=None):
    """The files of one set under each tag: images, labels, syn_lr and DATM's lr, and with ZCA the
    de-whitened images; `prefix` is ema_ for the EMA images."""
    tensors = {"images": images, "labels": labels, "syn_lr": syn_lr, "lr": syn_lr}
    if zca is not None:
        tensors["images_zca"] = zca.inverse(images)
    for tag in tags:
        for name, tensor in tensors.items():
            save_torch(tensor.detach().cpu(), Path(folder) / f"{prefix}{name}_{tag}.pt")


def save_grid(images, path, to_pixels, ipc, num_classes):
    """One row per class (one row of all classes at ipc 1), de-whitened or de-normalised, clipped
    to [0, 1] and enlarged (nearest) to about GRID_SIDE pixels a side."""
    scale = max(1, GRID_SIDE // max(images.shape[2:]))
    pixels = F.interpolate(to_pixels(images).clamp(0, 1), scale_factor=scale, mode="nearest")
    with atomic_path(path) as tmp:
        Image.fromarray(image_grid(pixels, ipc if ipc > 1 else num_classes)).save(tmp, format="png")


def image_grid(pixels, per_row, padding=2):
    """[0, 1] images (N x C x H x W) in rows of per_row on white, as a uint8 H x W x 3 array."""
    n, _, h, w = pixels.shape
    rows = -(-n // per_row)
    grid = torch.ones(3, padding + rows * (h + padding), padding + per_row * (w + padding))
    for k, image in enumerate(pixels):
        top, left = padding + (h + padding) * (k // per_row), padding + (w + padding) * (k % per_row)
        grid[:, top:top + h, left:left + w] = image.expand(3, h, w)
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def describe_run(folder, fields, zca=None):
    """run.json (what eval.py needs to evaluate the set, and provenance) and, with ZCA, zca.pt."""
    save_json(fields, Path(folder) / RUN_JSON)
    if zca is not None:
        save_torch(zca.state_dict(), Path(folder) / ZCA_FILE)


def save_checkpoint(folder, state):
    save_torch(state, Path(folder) / CHECKPOINT)


class Log:
    """log.jsonl: one line per iteration and per evaluated model. On resume, lines after the
    checkpoint are dropped so that the log reads as one uninterrupted run; a line torn by a kill
    is dropped too. Only the main process writes."""

    def __init__(self, folder, resume_iteration=None, enabled=True):
        self.path, self.enabled = Path(folder) / LOG, enabled
        if not enabled:
            return
        if resume_iteration is not None and self.path.exists():
            rows = []
            for line in open(self.path):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    print(f"{self.path}: dropped a torn line")
            keep = [row for row in rows if row["it"] < resume_iteration
                    or (row["it"] == resume_iteration and row["type"] == "evaluation")]
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in keep)
        elif self.path.exists():
            os.remove(self.path)

    def write(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def check_save_path(folder, resume):
    """Whether the run in `folder` resumes from a checkpoint; refuse a folder that holds something else."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--save_path {folder}: a file is in the way (not a folder)")
    if (folder / CHECKPOINT).exists():
        if not resume:
            raise UsageError(f"{folder} already holds a run: pass --resume to continue it or choose --save_path")
        return True
    if folder.exists() and not resume:
        found = [p.name for p in folder.iterdir() if p.name != ".lock" and not TEMP_SUFFIX.search(p.name)]
        if found:
            raise UsageError(f"{folder} holds files ({', '.join(sorted(found)[:3])}...) but no checkpoint: pass "
                             f"--resume to start its run again from iteration 0, or choose an empty --save_path")
    return False


def read_checkpoint(folder):
    path = Path(folder) / CHECKPOINT
    state = load_torch(path, "a checkpoint", fix="move it away to start again from iteration 0")
    if not isinstance(state, dict) or not {"tensors", "optimizers", "args"} <= set(state):
        raise UsageError(f"the checkpoint {path} is not one this distill.py writes; move it away to start again")
    return state


@dataclass
class SavedSet:
    """A distilled set as found on disk, with what distill.py saved beside it."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor  # class ids, or N x C label logits
    lr: float | None  # the learned lr; None: use --lr
    lr_from: str  # where lr came from, for the report
    meta: dict  # run.json; {} for the original's files
    zca: ZCA | None  # zca.pt: the exact transform the set was distilled under


def load_tensor(path):
    value = load_torch(path, "a torch file")
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value.detach()


def load_lr(path):
    value = load_tensor(path)
    if value.numel() != 1 or not value.is_floating_point() or not float(value) > 0:
        raise UsageError(f"{path} should hold one positive learning rate, not {value.dtype} of shape "
                         f"{tuple(value.shape)}")
    return float(value)


def load_zca(path):
    refit = "delete it and pass --zca to refit the whitening on the training set"
    state = load_torch(path, "a ZCA transform", fix=refit)
    try:
        return ZCA.from_state(state)
    except (TypeError, KeyError) as err:
        raise UsageError(f"{path} is not a ZCA transform; {refit}") from err


def learned_lr(images_file, lr_path):
    """(lr, where it came from) for a set: --lr_path, else syn_lr_X.pt or DATM's lr_X.pt beside it."""
    if lr_path:
        if not Path(lr_path).exists():
            raise UsageError(f"--lr_path {lr_path} does not exist")
        return load_lr(lr_path), "--lr_path"
    for kind in ("syn_lr", "lr"):
        found = sibling(images_file, kind)
        if found and found.exists():
            return load_lr(found), found.name
    return None, "--lr"


def load_saved_set(path, iteration=None, labels_path=None, lr_path=None):
    """The set at `path`: a run folder (images_{iteration}.pt, default images_best.pt) or an images file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--syn_path {path} does not exist")
    if path.is_dir():
        images_file = path / f"images_{iteration or 'best'}.pt"
        if not images_file.exists():
            found = sorted(p.name for p in path.glob("images_*.pt") if not p.name.startswith("images_zca_"))
            raise UsageError(f"no {images_file.name} in {path} (found: {', '.join(found) or 'no images_*.pt'})")
    elif iteration is not None:
        raise UsageError("--iteration picks a file in a run folder, but --syn_path is a file")
    else:
        images_file = path
    if images_file.name.startswith("images_zca_"):
        raise UsageError(f"{images_file} is the de-whitened copy saved for viewing; evaluate "
                         f"{images_file.name.replace('images_zca_', 'images_')} instead")
    labels_file = Path(labels_path) if labels_path else sibling(images_file, "labels")
    if labels_file is None:
        raise UsageError(f"cannot tell which labels go with {images_file.name}: pass --labels_path")
    if not labels_file.exists():
        raise UsageError(f"labels file {labels_file} does not exist (pass --labels_path)")
    folder = images_file.resolve().parent
    lr, lr_from = learned_lr(images_file, lr_path)
    return SavedSet(name=f"{folder.name}/{images_file.name}", images=load_tensor(images_file),
                    labels=load_tensor(labels_file), lr=lr, lr_from=lr_from,
                    meta=load_json(folder / RUN_JSON, "a distill.py run.json") if (folder / RUN_JSON).exists() else {},
                    zca=load_zca(folder / ZCA_FILE) if (folder / ZCA_FILE).exists() else None)
