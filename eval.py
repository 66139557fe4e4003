"""Evaluate a distilled set beside the baselines a paper needs, by the protocol of MTT and DC/DSA:
train num_eval fresh networks per model on the set alone, report mean +- std test accuracy.

    python eval.py --dataset CIFAR10 --syn_path logged_files/CIFAR10/run --baseline random --ipc 10
    python eval.py --dataset CIFAR10 --syn_path images_best.pt --zca     # the original's ZCA outputs
    python eval.py --dataset FashionMNIST-mini --baseline random --ipc 10 --baseline full
    torchrun --standalone --nproc_per_node 4 eval.py --syn_path RUN --eval_mode M --baseline random --ipc 50

--syn_path is a distill.py run folder (images_best.pt, or images_{--iteration}.pt) or an images
.pt file with its labels beside it (images_X.pt -> labels_X.pt, or --labels_path). Labels are
class ids, or N x C label logits (DATM's soft labels: the networks train with the soft
cross-entropy). The learning rate is, in this order, --lr_path, the set's learned syn_lr_X.pt or
DATM's lr_X.pt, else --lr; each row says which. --model defaults to the set's run.json model,
else ConvNet; baselines use the same models, so the rows compare. Under torchrun the networks
(sets x models x num_eval) spread over the processes; the rows equal a one-process run's.
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

import parallel
from utils import (ZCA, EvalSet, UsageError, add_common_args, check_common_args, eval_pool, evaluate_sets,
                   get_dataset, images_per_class, make_deterministic, pick_device, require_positive, run_info,
                   save_json)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(model=None)  # None: the set's run.json model, else ConvNet
    parser.add_argument("--syn_path", help="a distill.py run folder, or an images .pt file")
    parser.add_argument("--iteration", help="in a run folder, evaluate images_{ITERATION}.pt (default: best)")
    parser.add_argument("--labels_path", help="the labels .pt file (default: beside the images, images -> labels)")
    parser.add_argument("--lr_path", help="a .pt file holding the learning rate to train with (a syn_lr_X.pt or "
                                          "DATM's lr_best.pt); default: the one beside the images, else --lr")
    parser.add_argument("--baseline", action="append", default=[], choices=["random", "full"],
                        help="also evaluate real images: 'random' (--ipc per class) or 'full' (the training set); "
                             "may be repeated")
    parser.add_argument("--ipc", type=int, help="real images per class for --baseline random, drawn with --seed")
    parser.add_argument("--epochs_full", type=int, default=50,
                        help="epochs for --baseline full (same SGD, lr decay and DSA as the other rows)")
    parser.add_argument("--eval_mode", default="S",
                        help="models: S = the set's model (BN -> instance norm), C = it and ConvNet, "
                             "M = ConvNet AlexNet VGG11 ResNet18_AP ResNet18, W = widths, D = depths, "
                             "A = activations, P = poolings, N = norms")
    parser.add_argument("--num_eval", type=int, default=5, help="networks trained per set and model")
    parser.add_argument("--epoch_eval_train", type=int, default=1000, help="epochs on a distilled or random set")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate for sets without a learned one")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    return parser.parse_args(argv)


def check_args(args):
    """Every check that needs no data, before anything is loaded or trained."""
    check_common_args(args)
    require_positive(args, "num_eval", "epoch_eval_train", "epochs_full")
    if not args.syn_path and not args.baseline:
        raise UsageError("nothing to evaluate: give --syn_path and/or --baseline random --ipc N / --baseline full")
    if "random" in args.baseline and args.ipc is None:
        raise UsageError("--baseline random needs --ipc (real images per class)")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, not {args.lr}")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give a file name")
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise UsageError(f"--out {out}: the folder {out.parent} does not exist or is not writable")


# ---------------------------------------------------------------------------------------------
# Loading a distilled set


@dataclass
class Synset:
    """A distilled set as found on disk, with what distill.py saved beside it."""
    name: str
    images: torch.Tensor
    labels: torch.Tensor  # class ids, or N x C label logits
    lr: float | None  # the learned lr; None: use --lr
    lr_from: str  # where lr came from, for the report
    meta: dict  # run.json; {} for the original's files
    zca: ZCA | None  # zca.pt: the exact transform the set was distilled under


def load_tensor(path):
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"cannot read {path} as a torch file ({type(err).__name__})") from err
    if not isinstance(value, torch.Tensor):
        raise UsageError(f"{path} holds a {type(value).__name__}, not a tensor")
    return value.detach()


def load_lr(path):
    value = load_tensor(path)
    if value.numel() != 1 or not value.is_floating_point() or not float(value) > 0:
        raise UsageError(f"{path} should hold one positive learning rate, not {value.dtype} of shape "
                         f"{tuple(value.shape)}")
    return float(value)


def load_run_json(path):
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict):
        raise UsageError(f"{path} is not a distill.py run.json (it holds a {type(meta).__name__})")
    return meta


def load_zca(path):
    try:
        return ZCA.load(path)
    except Exception as err:
        raise UsageError(f"cannot read {path} as a ZCA transform ({type(err).__name__}); delete it and pass "
                         f"--zca to refit the whitening on the training set") from err


def sibling(images_file, kind):
    """images_X.pt -> labels_X.pt (or syn_lr_X.pt, lr_X.pt): the original's and DATM's naming."""
    head, found, tail = images_file.name.rpartition("images")
    return images_file.with_name(head + kind + tail) if found else None


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


def load_synset(path, iteration=None, labels_path=None, lr_path=None):
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
    return Synset(name=f"{folder.name}/{images_file.name}", images=load_tensor(images_file),
                  labels=load_tensor(labels_file), lr=lr, lr_from=lr_from,
                  meta=load_run_json(folder / "run.json") if (folder / "run.json").exists() else {},
                  zca=load_zca(folder / "zca.pt") if (folder / "zca.pt").exists() else None)


def check_synset(synset, data, args):
    """Refuse a set that cannot be trained on this dataset's networks, before any training starts."""
    meta, images, labels = synset.meta, synset.images, synset.labels
    for key in ("dataset", "subset", "res") if args.dataset == "ImageNet" else ("dataset",):
        if key in meta and meta[key] != getattr(args, key):
            raise UsageError(f"{synset.name} was distilled with --{key} {meta[key]}, not {getattr(args, key)}")
    if images.ndim != 4 or not images.is_floating_point():
        raise UsageError(f"{synset.name}: expected float images N x C x H x W, got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    tiles = meta["canvas_size"] if meta.get("texture") else 1
    expected = (data.channel, data.im_size[0] * tiles, data.im_size[1] * tiles)
    if tuple(images.shape[1:]) != expected:
        raise UsageError(f"{synset.name}: images of shape {tuple(images.shape[1:])} do not fit {args.dataset}, "
                         f"whose {'canvases' if tiles > 1 else 'images'} are {expected}")
    soft = labels.is_floating_point() and labels.ndim == 2 and labels.shape[1] == data.num_classes
    if not soft and (labels.ndim != 1 or labels.is_floating_point()):
        raise UsageError(f"{synset.name}: expected labels as class ids (N) or label logits (N x "
                         f"{data.num_classes}), got {labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) != len(images):
        raise UsageError(f"{synset.name}: {len(labels)} labels for {len(images)} images")
    if soft and not labels.isfinite().all():
        raise UsageError(f"{synset.name}: the label logits hold non-finite values")
    if not soft and (labels.min() < 0 or labels.max() >= data.num_classes):
        raise UsageError(f"{synset.name}: labels run from {labels.min().item()} to {labels.max().item()}, "
                         f"outside the {data.num_classes} classes of {args.dataset} (0 to {data.num_classes - 1})")
    if not images.isfinite().all():
        raise UsageError(f"{synset.name}: the images hold non-finite values")


def set_whitening(synset, user_zca, refit):
    """The ZCA the set was distilled under, or None. A ZCA set trained against plain test images
    (or a plain one against whitened images) scores chance with no other sign, so refuse it."""
    distilled_with_zca = synset.meta.get("zca", user_zca)  # the original's files say nothing: trust --zca
    if user_zca and not distilled_with_zca:
        raise UsageError(f"--zca given, but {synset.name} was distilled without ZCA (run.json): whitening the "
                         f"test set would silently give chance-level accuracy; drop --zca")
    if not distilled_with_zca:
        return None
    if synset.zca is not None:
        return synset.zca
    if not user_zca:
        raise UsageError(f"{synset.name} was distilled with ZCA but has no zca.pt beside it: on plain test "
                         f"images it would silently give chance-level accuracy; pass --zca to refit the "
                         f"whitening on the training set")
    return refit()


# ---------------------------------------------------------------------------------------------
# The sets to evaluate, each with its test images in the same space as its training images


def in_space(images, data, whitening):
    return images if whitening is None else whitening(data.to_pixels(images))


def random_subset(data, ipc, seed):
    """ipc real training images per class, drawn by their own generator so the draw depends on the seed only."""
    per_class = images_per_class(data.labels_train, data.num_classes)
    smallest = min(len(idx) for idx in per_class)
    if not 1 <= ipc <= smallest:
        raise UsageError(f"--ipc {ipc}: the random baseline needs 1 to {smallest} images per class "
                         f"(the smallest class of the training set has {smallest})")
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([idx[torch.randperm(len(idx), generator=generator)[:ipc]] for idx in per_class])


def build_sets(args, data, synset):
    """Every set the command asks for, checked before the first network trains."""
    refit = cache(lambda: ZCA.fit(data.to_pixels(data.images_train)))
    sets = []
    if synset is not None:
        check_synset(synset, data, args)
        whitening = set_whitening(synset, args.zca, refit)
        texture = (data.im_size, synset.meta["canvas_samples"]) if synset.meta.get("texture") else None
        sets.append(EvalSet(synset.name, synset.images.float(), synset.labels,
                            synset.lr if synset.lr is not None else args.lr, args.epoch_eval_train,
                            synset.meta.get("ipc", len(synset.labels) // data.num_classes),
                            (in_space(data.images_test, data, whitening), data.labels_test), texture,
                            lr_from=synset.lr_from))
    baselines = {
        "random": lambda: (random_subset(data, args.ipc, args.seed), args.epoch_eval_train, args.ipc),
        "full": lambda: (slice(None), args.epochs_full, None),  # a slice indexes without a copy
    }
    whitening = refit() if args.zca and args.baseline else None  # real images: whitened only if asked
    test = (in_space(data.images_test, data, whitening), data.labels_test)
    for name in dict.fromkeys(args.baseline):
        chosen, epochs, ipc = baselines[name]()
        sets.append(EvalSet(name, in_space(data.images_train[chosen], data, whitening), data.labels_train[chosen],
                            args.lr, epochs, ipc, test))
    return sets


# ---------------------------------------------------------------------------------------------
# Evaluation and report


def format_table(rows):
    cells = [("set", "model", "ipc", "lr", "test acc %", "n")]
    cells += [(row["set"], row["model"], "all" if row["ipc"] is None else str(row["ipc"]),
               f"{row['lr']:.4g} ({row['lr_from']})",
               f"{100 * row['test_acc_mean']:.2f} +- {100 * row['test_acc_std']:.2f}", str(row["n"]))
              for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def evaluate_all(args, device, log=print):
    synset = load_synset(args.syn_path, args.iteration, args.labels_path, args.lr_path) if args.syn_path else None
    distilled_with = synset.meta.get("model") if synset else None
    models = eval_pool(args.eval_mode, args.model or distilled_with or "ConvNet")
    data = get_dataset(args.dataset, args.data_path, zca=False, subset=args.subset, res=args.res)
    sets = build_sets(args, data, synset)
    dsa_strategy = args.dsa_strategy if args.dsa else None
    return evaluate_sets([(train_set, model) for train_set in sets for model in models], data, args.num_eval,
                         args.seed, args.batch_train, dsa_strategy, device, log)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        eval_pool(args.eval_mode, "ConvNet")
        device = parallel.setup(pick_device(args.device))
        if args.deterministic:
            make_deterministic()
        rows = evaluate_all(args, device, log=lambda line: print(line, flush=True) if parallel.is_main() else None)
    except UsageError as err:
        sys.exit(f"error{f' (rank {parallel.rank()})' if parallel.rank() else ''}: {err}")
    if parallel.is_main():
        print(format_table(rows))
        if args.out:
            save_json({"dataset": args.dataset, "rows": rows, "processes": parallel.world(), "args": vars(args),
                       **run_info(device)}, args.out)
            print(f"rows written to {args.out}")
    parallel.teardown()
    return rows


if __name__ == "__main__":
    main()
