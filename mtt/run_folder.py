"""The run folder: everything distill.py writes under --save_path (README.md lists the files: the original's, DATM's lr_
beside syn_lr_, FTD's ema_), and eval.py's reading of it. Every file is written under a temporary name and renamed into
place (utils.atomic_path); the files of one evaluation, checkpoint.pt included, are committed as one through the
journal .mtt-commit.json (commit).
"""
import difflib
import io
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from mtt.zca import ZCA
from networks import MODELS
from utils import (REPO, TEMP, UsageError, atomic_path, folder_lock, fsync, full_disk_is_one_line, is_ours, load_json,
                   load_torch, save_json, say, schema_problem, temp_path, torch_bytes)

CHECKPOINT, LOG, RUN_JSON, ZCA_FILE, JOURNAL = "checkpoint.pt", "log.jsonl", "run.json", "zca.pt", ".mtt-commit.json"
GRID_SIDE = 128  # pixels a side an image is enlarged to (nearest) in the grid, so a 28-32 px image shows
GRID_ROW = 10  # images per row at ipc 1, as the original's grid: 200 classes wrap into 20 rows
CAPTION = 12  # pixels under each image of the grid for its class's name (Pillow's default font is 10)
CURVES = "curves.png"
COMMIT_WAIT = 5.0  # seconds a reader waits for a save between its renames to land (they take milliseconds)


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


def sibling(images_file, kind):
    """images_X.pt -> labels_X.pt (or syn_lr_X.pt, lr_X.pt): the original's and DATM's naming."""
    head, found, tail = images_file.name.rpartition("images")
    return images_file.with_name(head + kind + tail) if found else None


def set_files(prefix, tags, images, labels, syn_lr, zca=None):
    """{file name: tensor} of one set under each tag (`prefix` ema_: the EMA's), with ZCA the de-whitened images too."""
    tensors = {"images": images, "labels": labels, "syn_lr": syn_lr, "lr": syn_lr,
               **({} if zca is None else {"images_zca": zca.inverse(images)})}
    return {f"{prefix}{name}_{tag}.pt": tensor.detach().cpu() for tag in tags for name, tensor in tensors.items()}


def grid(images, to_pixels, ipc, classes):
    """The set as a uint8 H x W x 3 picture, one row per class (at ipc 1, the classes in rows of GRID_ROW), in [0, 1]
    pixels enlarged to about GRID_SIDE a side, each class named under its first image (`classes`: of each image)."""
    scale, pad = max(1, GRID_SIDE // max(images.shape[2:])), 2
    pixels = F.interpolate(to_pixels(images.detach().cpu()).clamp(0, 1), scale_factor=scale, mode="nearest")
    (n, _, h, w), per_row = pixels.shape, ipc if ipc > 1 else min(GRID_ROW, len(images))
    rows, cell = -(-n // per_row), h + CAPTION + pad
    canvas = torch.ones(3, pad + rows * cell, pad + per_row * (w + pad))
    corners = [(pad + cell * (k // per_row), pad + (w + pad) * (k % per_row)) for k in range(n)]
    for image, (top, left) in zip(pixels, corners):
        canvas[:, top:top + h, left:left + w] = image.expand(3, h, w)
    picture = Image.fromarray(canvas.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for k, (name, (top, left)) in enumerate(zip(classes, corners)):
        caption = name if k == 0 or name != classes[k - 1] else ""
        while font.getlength(caption) > w:  # cut to the image's width
            caption = caption[:-1]
        draw.text((left, top + h), caption, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def file_bytes(name, value):
    """A .pt's bytes (of a contiguous copy, so a loaded tensor views like any other), or a .png's (uint8 H x W x 3)."""
    if name.endswith(".png"):
        buffer = io.BytesIO()
        Image.fromarray(value).save(buffer, format="png")
        return buffer.getvalue()
    return torch_bytes(value.contiguous() if isinstance(value, torch.Tensor) else value)


def commit(folder, files, iteration):
    """Write `files` ({name: value}) as one: each under its temporary name, then the journal listing the renames, then
    the renames, then the journal marked done. A kill before the journal leaves every old file (the partial ones are a
    dead process's temporary files); a kill after it is finished by the next start, or by a reader (read_consistent)."""
    folder, renames = Path(folder), {}
    try:
        for name, value in files.items():
            data, tmp = file_bytes(name, value), temp_path(folder / name)
            renames[name] = tmp.name
            with full_disk_is_one_line(folder / name, len(data)):
                tmp.write_bytes(data)
                fsync(tmp)
        save_json({"generation": journal(folder)["generation"] + 1, "iteration": iteration, "renaming": renames},
                  folder / JOURNAL)
    except BaseException:
        for tmp in renames.values():
            (folder / tmp).unlink(missing_ok=True)
        raise
    finish_commit(folder)


SET_FILE = re.compile(r"(ema_)?((images|labels|syn_lr|lr|images_zca)_(\d+|best)\.pt|synthetic_\d+\.png)"
                      r"|checkpoint\.pt|curves\.png")
JOURNAL_TYPES = {"generation": int, "iteration": (int, type(None)), "renaming": dict}
JOURNAL_FIX = "if the folder came from elsewhere, move the journal away and check the folder's files"


def journal(folder):
    """The folder's commit journal, checked before it is acted on: a run folder may come from elsewhere, so it renames
    only this project's set files, each from its own temporary name in the folder (never a user's file, nor outside)."""
    path = Path(folder) / JOURNAL
    if not path.exists():
        return {"generation": 0, "iteration": None, "renaming": {}}
    state = load_json(path, "a commit journal", fix=JOURNAL_FIX)
    problem = schema_problem(state, JOURNAL_TYPES)
    for name, tmp in [] if problem else state["renaming"].items():
        temp = TEMP.fullmatch(str(tmp))
        if not (SET_FILE.fullmatch(name) and temp and temp[1] == name):
            problem = f"it would rename {str(tmp)[:60]!r} to {name[:60]!r}, which is not one of a run's files"
            break
    if problem:
        raise UsageError(f"{path} is not a journal distill.py writes ({problem}); nothing was renamed: {JOURNAL_FIX}")
    return state


def finish_commit(folder):
    """Rename into place what a commit that was cut short left listed in its journal."""
    folder, state = Path(folder), journal(folder)
    if state["renaming"]:
        for name, tmp in state["renaming"].items():
            if (folder / tmp).exists():
                os.replace(folder / tmp, folder / name)
        fsync(folder)
        save_json({**state, "renaming": {}}, folder / JOURNAL)


def lock(folder):
    """The run folder's lock, taken (by distill.py or a reader) only after a commit that a kill cut short is finished:
    its journal's temporary files are renamed into place before the lock's clean-up of dead processes' takes them."""
    return folder_lock(folder, "distill.py run", finish=finish_commit)


def last_iteration(folder):
    """The iteration of the last committed checkpoint, or None."""
    return journal(folder)["iteration"] if Path(folder).is_dir() else None


def resume_hint(folder):
    """What an interrupted distill.py leaves, in one line."""
    kept = last_iteration(folder)
    return ("no checkpoint was saved yet; nothing to resume" if kept is None else
            f"the checkpoint of iteration {kept} is in {folder}; run the same command with --resume to continue")


def read_consistent(folder, read):
    """read() of files of one commit: again while a commit is in flight or one landed meanwhile. A commit that no live
    process is making (none holds the lock) is finished first, as distill.py's next start would: never half-saved."""
    deadline, blocked = time.monotonic() + COMMIT_WAIT, "its writer is still saving"
    while time.monotonic() < deadline:
        before = journal(folder)
        if before["renaming"]:
            try:
                with lock(folder):  # which finishes the commit
                    pass
            except UsageError as err:  # a live writer holds the lock, or the folder is read-only
                blocked = str(err)
        else:
            value = read()
            if journal(folder) == before:
                return value
        time.sleep(0.05)
    raise UsageError(f"{folder} is in the middle of saving an evaluation that cannot be finished here ({blocked}); "
                     f"evaluate it once the save is done, or from a writable copy")


class Log:
    """log.jsonl, a line per iteration and evaluated model, kept in `rows` for curves.png; only rank 0 writes. With
    `tensorboard`, the same figures (and the image grids) go to {folder}/tensorboard too."""

    def __init__(self, folder, rows=None, enabled=True, tensorboard=False):
        """rows: a resumed run's (read_log's, up to its checkpoint), None to start a new log."""
        self.path, self.enabled, self.rows, self.board = Path(folder) / LOG, enabled, rows or [], None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: checked when the flags are parsed
            self.board = SummaryWriter(str(Path(folder) / "tensorboard"))
        if enabled and rows is None:
            self.path.unlink(missing_ok=True)
        elif enabled:
            with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.board:
            self.board.close()  # its events are written by a thread: flushed here, not at the process's exit

    def write(self, **row):
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board and row["type"] == "iteration":
            self.board.add_scalar("matching loss", row["loss"], row["it"])
            self.board.add_scalar("syn_lr", row["syn_lr"], row["it"])
        elif self.board and row["type"] == "evaluation":
            name = f"{row['set']} {row['model']}"
            self.board.add_scalar(f"test accuracy/{name}", row["test_acc_mean"], row["it"])
            self.board.add_scalar(f"best test accuracy/{name}", row["best_test_acc_mean"], row["it"])

    def image(self, name, array, it):
        if self.board:
            self.board.add_image(name, array, it, dataformats="HWC")
            self.board.flush()


def curves(rows):
    """curves.png of log rows: the matching loss, syn_lr and each evaluated set and model's test accuracy."""
    import matplotlib  # here, not at the top: only the main process of distill.py draws
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    steps = [row for row in rows if row["type"] == "iteration"]
    figure, (loss, lr, accuracy) = plt.subplots(1, 3, figsize=(15, 4), dpi=80)
    # a fixed layout, and few ticks below: a layout engine and tick objects were most of each evaluation's drawing
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.13, top=0.92, wspace=0.15)
    its, losses = [row["it"] for row in steps], np.array([row["loss"] for row in steps])
    window = max(1, len(losses) // 50)
    faint = {"alpha": 0.3, "linewidth": 0.8} if window > 1 else {}  # under the mean, when there is one
    loss.plot(its, losses, color="tab:blue", label="matching loss", **faint)
    if window > 1:  # a mean of 1 would be the curve itself
        loss.plot(its[window - 1:], np.convolve(losses, np.ones(window) / window, "valid"), color="tab:blue",
                  label=f"mean of {window}")
    lr.plot(its, [row["syn_lr"] for row in steps], color="tab:orange")
    evaluations = {}
    for row in rows:
        if row["type"] == "evaluation":
            evaluations.setdefault(f"{row['set']} {row['model']}", []).append(row)
    for (name, found), color in zip(evaluations.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        at = [row["it"] for row in found]
        accuracy.plot(at, [100 * row["test_acc_mean"] for row in found], "o-", color=color, label=f"{name}: final")
        accuracy.plot(at, [100 * row["best_test_acc_mean"] for row in found], "--", color=color, label="best so far")
    for axes, title in ((loss, "matching loss"), (lr, "syn_lr"), (accuracy, "test accuracy %")):
        axes.set_title(title)
        axes.set_xlabel("iteration")
        axes.grid(alpha=0.3)
        axes.locator_params(nbins=5)
    loss.legend(fontsize=8)
    accuracy.legend(fontsize=8)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


LOG_FIX = "mend or move the file away (the run then resumes without its history)"


def read_log(path, resume_iteration):
    """The rows of log.jsonl that a resume from `resume_iteration` keeps (those after its checkpoint go, so that the
    log reads as one uninterrupted run); a last line torn by a kill is dropped, any other bad line is one error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not text, so not a log distill.py writes; {LOG_FIX}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("it"), int) and isinstance(row.get("type"), str):
            rows.append(row)
        elif number == len(lines):
            say(f"{path}: dropped its last line, torn by a kill")
        else:
            raise UsageError(f"{path} line {number} is not a line distill.py writes ({line[:40]!r}); {LOG_FIX}")
    return [row for row in rows if row["it"] < resume_iteration
            or (row["it"] == resume_iteration and row["type"] == "evaluation")]


def check_save_path(folder, resume):
    """Whether the run in `folder` resumes from a checkpoint (or a commit of one that a kill cut short); refuse a folder
    that holds something else, and a new --resume folder named like a run beside it (a mistyped --save_path)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--save_path {folder}: a file is in the way (not a folder)")
    for name in (CHECKPOINT, LOG, RUN_JSON, ZCA_FILE, JOURNAL):
        if (folder / name).exists() and not (folder / name).is_file():
            raise UsageError(f"{folder / name} is not a file; move it away")
    if (folder / CHECKPOINT).exists() or (folder / JOURNAL).exists():
        if not resume:
            raise UsageError(f"{folder} already holds a run: pass --resume to continue it or choose --save_path")
        return True
    parent = folder.parent
    runs = ([p.name for p in parent.iterdir() if (p / CHECKPOINT).is_file()]
            if resume and not folder.exists() and parent.is_dir() else [])
    if near := [parent / name for name in difflib.get_close_matches(folder.name, runs, n=3, cutoff=0.8)]:
        raise UsageError(f"--resume --save_path {folder}: no such folder, but {near[0]} beside it holds a run: give "
                         f"--save_path {near[0]} to continue it, or a name less like it for a new run")
    if folder.exists() and not resume:
        found = [p.name for p in folder.iterdir() if not is_ours(p.name) and p.name != JOURNAL]
        if found:
            raise UsageError(f"{folder} holds files ({', '.join(sorted(found)[:3])}...) but no checkpoint: pass "
                             f"--resume to start its run again from iteration 0, or choose an empty --save_path")
    return False


START_AGAIN = "move it away to start again from iteration 0"
CHECKPOINT_TYPES = {"iteration": int, "tensors": dict, "optimizers": dict, "best": dict, "args": dict,
                    "rng_cpu": torch.Tensor, "ema": (torch.Tensor, type(None)), "rng_cuda": (torch.Tensor, type(None))}
BEST_TYPES = {"score": float, "it": int, "test_acc_mean": float, "test_acc_std": float}  # per set and model


def read_checkpoint(folder):
    """checkpoint.pt, checked to be what distill.py writes; distill.restore checks it fits the run."""
    path = Path(folder) / CHECKPOINT
    state = load_torch(path, "a checkpoint", fix=START_AGAIN)
    if problem := checkpoint_problem(state):
        raise UsageError(f"the checkpoint {path} is not one distill.py writes ({problem}); {START_AGAIN}")
    return state


def checkpoint_problem(state):
    if problem := schema_problem(state, CHECKPOINT_TYPES):
        return problem
    if state["iteration"] < 0 or not all(isinstance(t, torch.Tensor) for t in state["tensors"].values()):
        return "a negative iteration or a learnable tensor that is not a tensor"
    if not state["optimizers"] or any(schema_problem(o, {"state": dict, "param_groups": list})
                                      for o in state["optimizers"].values()):
        return "no optimizer states"
    if any(schema_problem(mark, BEST_TYPES) for mark in state["best"].values()):
        return f"a best mark that is not {{{', '.join(BEST_TYPES)}}}"
    if state["rng_cpu"].dtype != torch.uint8:
        return "a random-number state that is not a byte tensor"
    tensors = {**state["tensors"], "ema": state["ema"]}
    for name, optimizer in state["optimizers"].items():
        tensors.update({f"{name}'s momentum": step.get("momentum_buffer") for step in optimizer["state"].values()
                        if isinstance(step, dict)})
    non_finite = [name for name, t in tensors.items()
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all()]
    return f"non-finite values in {', '.join(non_finite)}" if non_finite else None


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
    if value.is_floating_point() and not value.isfinite().all():
        raise UsageError(f"{path} holds non-finite values (a run that diverged?)")
    return value.detach()


REFIT = "delete it and pass --zca to refit the whitening on the training set"
RUN_JSON_TYPES = {"dataset": str, "subset": str, "res": int, "model": str, "ipc": int, "zca": bool, "texture": bool,
                  "canvas_size": int, "canvas_samples": int}


def read_run_json(path):
    """run.json, checked: the keys eval.py uses have their types, a texture run its canvas sizes."""
    meta = load_json(path, "a distill.py run.json")
    problem = schema_problem(meta, {key: kind for key, kind in RUN_JSON_TYPES.items() if key in meta})
    if problem is None and meta.get("model", "ConvNet") not in MODELS:
        problem = f"an unknown model {meta['model']!r}"
    if problem is None and meta.get("texture") and min(meta.get("canvas_size", 0), meta.get("canvas_samples", 0)) < 1:
        problem = "a texture run without canvas sizes of 1 or more"
    if problem:
        raise UsageError(f"{path} is not a run.json distill.py writes: {problem}")
    return meta


def learned_lr(images_file, lr_path):
    """(lr, where it came from) for a set: --lr_path, else syn_lr_X.pt or DATM's lr_X.pt beside it."""
    if lr_path and not Path(lr_path).exists():
        raise UsageError(f"--lr_path {lr_path} does not exist")
    found = [lr_path] if lr_path else [path for path in (sibling(images_file, "syn_lr"), sibling(images_file, "lr"))
                                       if path and path.exists()]
    if not found:
        return None, "--lr"
    value = load_tensor(found[0])
    if value.numel() != 1 or not value.is_floating_point() or not float(value) > 0:
        raise UsageError(f"{found[0]} should hold one positive learning rate, not {value.dtype} of shape "
                         f"{tuple(value.shape)}")
    return float(value), "--lr_path" if lr_path else found[0].name


def images_in(folder, prefix=""):
    """The names of the sets' images files in a run folder (prefix ema_: the EMA's), not the de-whitened copies."""
    return sorted(p.name for p in Path(folder).glob(f"{prefix}images_*.pt")
                  if not p.name.startswith(f"{prefix}images_zca_"))


def load_saved_set(path, iteration=None, labels_path=None, lr_path=None, ema=False):
    """The set at `path`: a run folder (images_{iteration}.pt, default images_best.pt; ema_images_... with `ema`, or
    where only those are, as in FTD's ema/) or an images file; anything else is refused naming what to give instead."""
    path = images_file = Path(path)
    if not path.exists():
        raise UsageError(f"--syn_path {path} does not exist")
    if path.is_dir():
        prefix = "ema_" if ema or (not images_in(path) and images_in(path, "ema_")) else ""
        images_file = path / f"{prefix}images_{iteration or 'best'}.pt"
        if not images_file.exists():
            # logged_files/CIFAR10 (distill.py's default --save_path's parent) holds runs, not a set
            runs = [] if images_in(path) or images_in(path, "ema_") else sorted(
                sub.name for sub in path.iterdir() if sub.is_dir() and os.access(sub, os.R_OK | os.X_OK)
                and (images_in(sub) or images_in(sub, "ema_") or (sub / RUN_JSON).exists()))
            if runs:
                shown = ", ".join(runs[:3]) + f" and {len(runs) - 3} more" * (len(runs) > 3)
                raise UsageError(f"no {images_file.name} in {path}, a folder of {len(runs)} run folder"
                                 f"{'s' * (len(runs) > 1)} ({shown}): give one as --syn_path, e.g. "
                                 f"--syn_path {path / runs[0]}")
            found = ", ".join(images_in(path, prefix)) or f"no {prefix}images_*.pt"
            raise UsageError(f"no {images_file.name} in {path} (found: {found})")
    elif part := re.fullmatch(r"(ema_)?(labels|syn_lr|lr|synthetic)_(\d+|best)\.(pt|png)", path.name):
        ema_, kind, tag = part[1] or "", part[2], part[3]
        what = ("the image grid drawn for viewing, not the set" if kind == "synthetic" else
                f"the {'labels' if kind == 'labels' else 'learned lr'} of a set, not its images")
        raise UsageError(f"{path} is {what}: give --syn_path {path.with_name(f'{ema_}images_{tag}.pt')}, or "
                         f"--syn_path {path.parent}" + f" --iteration {tag}" * (tag != "best") + " --ema" * bool(ema_))
    elif path.name in (CHECKPOINT, LOG, RUN_JSON, ZCA_FILE, CURVES, JOURNAL):
        what = "distill.py's checkpoint (for --resume)" if path.name == CHECKPOINT else "a file of a run folder"
        raise UsageError(f"{path} is {what}, not a set: give --syn_path {path.parent} (its images_best.pt; "
                         f"--iteration N for images_N.pt)")
    elif iteration is not None or ema:
        raise UsageError(f"{'--iteration' if iteration is not None else '--ema'} picks a file in a run folder, but "
                         f"--syn_path is a file")
    if "images_zca_" in images_file.name:
        raise UsageError(f"{images_file} is the de-whitened copy saved for viewing; evaluate "
                         f"{images_file.name.replace('images_zca_', 'images_')} instead")
    labels_file = Path(labels_path) if labels_path else sibling(images_file, "labels")
    if labels_file is None:
        raise UsageError(f"cannot tell which labels go with {images_file.name}: pass --labels_path")
    if not labels_file.exists():
        raise UsageError(f"labels file {labels_file} does not exist (pass --labels_path)")
    folder = images_file.resolve().parent
    images, labels, (lr, lr_from) = read_consistent(folder, lambda: (
        load_tensor(images_file), load_tensor(labels_file), learned_lr(images_file, lr_path)))
    return SavedSet(name=f"{folder.name}/{images_file.name}", images=images, labels=labels, lr=lr, lr_from=lr_from,
                    meta=read_run_json(folder / RUN_JSON) if (folder / RUN_JSON).exists() else {},
                    zca=ZCA.load(folder / ZCA_FILE, fix=REFIT) if (folder / ZCA_FILE).exists() else None)
