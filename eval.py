"""Evaluate a distilled set beside the baselines a paper needs, by the protocol of MTT and DC/DSA: train num_eval
fresh networks per model on the set alone, report mean +- std test accuracy.

    python eval.py --dataset CIFAR10 --syn_path logged_files/CIFAR10/run --baseline random --ipc 10
    python eval.py --dataset CIFAR10 --syn_path images_best.pt --zca     # the original's ZCA outputs
    python eval.py --dataset FashionMNIST-mini --baseline random --ipc 10 --baseline full
    torchrun --standalone --nproc_per_node 4 eval.py --syn_path RUN --eval_mode M --baseline random --ipc 50

--syn_path is a distill.py run folder (images_best.pt, or images_{--iteration}.pt; FTD's EMA images ema_images_...
with --ema, or in a folder that holds only those, as FTD's ema/ does) or an images .pt file with its labels beside it
(images_X.pt -> labels_X.pt, or --labels_path). Labels are class ids, or N x C label logits (DATM's soft labels: the
networks train with the soft cross-entropy). The learning rate is, in this order, --lr_path, the set's learned
syn_lr_X.pt or DATM's lr_X.pt, else --lr; each row says which. --model defaults to the set's run.json model, else
ConvNet; baselines use the same models, so the rows compare. Under torchrun the networks (sets x models x num_eval)
spread over the processes; the rows equal a one-process run's.
"""
import argparse
from dataclasses import replace
from functools import cache
from pathlib import Path

import mtt  # noqa: F401  before torch loads: Ctrl-C or SIGTERM while the script starts is one line

import numpy as np

from mtt import parallel
from mtt.data import draw_per_class, get_dataset, smallest_class
from mtt.evaluation import EvalSet, eval_pool, evaluate_sets
from mtt.evaluation import add_flags as add_eval_flags
from mtt.flags import (Parser, add_common_args, check_model, checked, folder_path, non_negative_int, parse,
                       positive_float, positive_int, switch)
from mtt.parallel import run_and_exit, run_script
from mtt.run_folder import load_saved_set, run_info
from mtt.training import predict
from mtt.trajectories import Experts, experts_of
from networks import get_network
from utils import UsageError, is_main, make_folder, save_json

unit = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_common_args(parser, from_set=True)
    flag = parser.add_argument
    flag("--syn_path", type=folder_path, help="a distill.py run folder, or an images .pt file")
    flag("--iteration", type=non_negative_int, help="in a run folder, evaluate images_{ITERATION}.pt (default: best)")
    switch(parser, "--ema", "in a run folder, evaluate FTD's EMA images ema_images_*.pt (default: only when the "
                            "folder holds no other images)")
    flag("--labels_path", help="the labels .pt file (default: beside the images, images -> labels)")
    flag("--lr_path", help="a .pt file holding the learning rate to train with (a syn_lr_X.pt or DATM's lr_best.pt) "
                           "(default: the one beside the images, else --lr)")
    flag("--baseline", action="append", default=[], choices=["random", "full"],
         help="also evaluate real images: 'random' (--ipc per class) or 'full' (the training set); may be repeated")
    flag("--ipc", type=positive_int, help="real images per class for --baseline random, drawn with --seed "
                                          "(default: the set's run.json's ipc, so the row matches the set)")
    flag("--epochs_full", type=positive_int, default=50,
         help="epochs for --baseline full (same SGD, lr decay and DSA as the other rows)")
    add_eval_flags(parser, "networks trained per set and model")
    flag("--lr", type=positive_float, default=0.01, help="learning rate for sets without a learned one")
    flag("--out", type=folder_path, help="also write the rows to this JSON file")
    scores = parser.add_argument_group("DD-Ranking's scores (Li et al., 2025)").add_argument
    switch(parser, "--scores", "also the label- and augmentation-robust scores HLR, IOR, LRS, ARS of the set, "
                               "training the rows they need (README: Fair scores)")
    scores("--lrs_lambda", type=unit, default=0.5, help="LRS's weight w of IOR (1 - w goes to HLR), DD-Ranking's")
    scores("--ars_lambda", type=unit, default=0.5, help="ARS's weight g of the DSA terms (1 - g: without DSA)")
    args = parse(parser, argv)
    if args.scores and not args.syn_path:
        raise UsageError("--scores scores a distilled set: give --syn_path")
    if not args.syn_path and not args.baseline:
        raise UsageError("nothing to evaluate: give --syn_path and/or --baseline random --ipc N / --baseline full")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name")
    return args


def main(argv=None):
    return run_script(parse_args, evaluate_all, argv)


RECORDED = {"dataset": "CIFAR10", "subset": "imagenette", "res": 128, "zca": None, "model": "ConvNet"}


def take_from_run(args, saved):
    """The flags that describe the set, where not given, from its run.json (else RECORDED's defaults); a given one that
    contradicts it is refused. --model may differ: evaluating on other networks is the cross-architecture protocol.
    The original's files have no run.json: defaults, and no ZCA unless --zca. Then --baseline random's ipc: --ipc,
    else run.json's (the random row then matches the set), checked here, where the set is known."""
    meta = saved.meta if saved else {}
    for key, default in RECORDED.items():
        recorded, given = meta.get(key), getattr(args, key)
        if given is None:
            setattr(args, key, default if recorded is None else recorded)
        elif recorded is not None and given != recorded and key != "model" \
                and (key in ("dataset", "zca") or meta.get("dataset") == "ImageNet"):
            raise UsageError(f"--{key} {given} contradicts the set's run.json, which says {key} {recorded}: drop "
                             f"--{key}, or evaluate another set")
    if "random" in args.baseline and args.ipc is None:
        args.ipc = meta.get("ipc")
        if args.ipc is None:
            whose = f": {saved.name} has no run.json that records its ipc" if saved else ""
            raise UsageError(f"--baseline random needs --ipc (real images per class){whose}")


def check_saved_set(saved, data, args):
    """Refuse a set that cannot be trained on this dataset's networks, before any training starts."""
    meta, images, labels = saved.meta, saved.images, saved.labels
    if images.ndim != 4 or not images.is_floating_point():
        raise UsageError(f"{saved.name}: expected float images N x C x H x W, got {images.dtype} "
                         f"of shape {tuple(images.shape)}")
    tiles = meta["canvas_size"] if meta.get("texture") else 1
    expected = (data.channel, data.im_size[0] * tiles, data.im_size[1] * tiles)
    if tuple(images.shape[1:]) != expected:
        raise UsageError(f"{saved.name}: images of shape {tuple(images.shape[1:])} do not fit {args.dataset}, "
                         f"whose {'canvases' if tiles > 1 else 'images'} are {expected}")
    soft = labels.is_floating_point() and labels.ndim == 2 and labels.shape[1] == data.num_classes
    if not soft and (labels.ndim != 1 or labels.is_floating_point()):
        raise UsageError(f"{saved.name}: expected labels as class ids (N) or label logits (N x "
                         f"{data.num_classes}), got {labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) != len(images):
        raise UsageError(f"{saved.name}: {len(labels)} labels for {len(images)} images")
    if not soft and (labels.min() < 0 or labels.max() >= data.num_classes):
        raise UsageError(f"{saved.name}: labels run from {labels.min().item()} to {labels.max().item()}, "
                         f"outside the {data.num_classes} classes of {args.dataset} (0 to {data.num_classes - 1})")
    features = data.channel * data.im_size[0] * data.im_size[1]
    if saved.zca is not None and saved.zca.mean.numel() != features:
        raise UsageError(f"{saved.name}: its zca.pt whitens {saved.zca.mean.numel()} pixels, but {args.dataset}'s "
                         f"images have {features}; delete zca.pt and pass --zca to refit the whitening")


def random_subset(data, ipc, seed):
    """ipc real training images per class, drawn by their own generator so the draw depends on the seed only."""
    smallest = smallest_class(data.labels_train, data.num_classes)
    if not 1 <= ipc <= smallest:
        raise UsageError(f"--ipc {ipc}: the random baseline needs 1 to {smallest} images per class "
                         f"(the smallest class of the training set has {smallest})")
    return draw_per_class(data.labels_train, data.num_classes, ipc, seed)


def build_sets(args, data, saved, device):
    """Every set the command asks for, checked before the first network trains: (the sets, the terms of --scores by
    name, {} without it)."""
    in_space = lambda images, whitening: images if whitening is None else whitening(data.to_pixels(images))
    refit = cache(lambda: data.fitted_zca(device))
    whitening = refit() if args.zca and (args.baseline or args.scores) else None  # real images: the set's space
    test = (in_space(data.images_test, whitening), data.labels_test)
    real = lambda name, chosen, epochs, ipc: EvalSet(name, in_space(data.images_train[chosen], whitening),
                                                     data.labels_train[chosen], args.lr, epochs, ipc, test)
    baselines = {"random": lambda ipc: real("random" if args.ipc in (None, ipc) else f"random (ipc {ipc})",
                                            random_subset(data, ipc, args.seed), args.epoch_eval_train, ipc),
                 "full": lambda ipc: real("full", slice(None), args.epochs_full, None)}  # a slice: no copy
    sets = [baselines[name](args.ipc) for name in dict.fromkeys(args.baseline)]
    if saved is None:
        return sets, {}
    check_saved_set(saved, data, args)
    # the set's own transform; the original's files carry none: the refitted one, as the original does
    own_whitening = (saved.zca or refit()) if args.zca else None
    texture = (data.im_size, saved.meta["canvas_samples"]) if saved.meta.get("texture") else None
    distilled = EvalSet(saved.name, saved.images.float(), saved.labels, saved.lr if saved.lr is not None else args.lr,
                        args.epoch_eval_train, saved.meta.get("ipc", len(saved.labels) // data.num_classes),
                        (in_space(data.images_test, own_whitening), data.labels_test), texture,
                        lr_from=saved.lr_from)
    if not args.scores:
        return [distilled, *sets], {}
    terms = score_terms(distilled, saved, sets, baselines, device, dsa=args.augmentation is not None)
    return list({eval_set.name: eval_set for eval_set in (distilled, *sets, *terms.values())}.values()), terms


def score_terms(distilled, saved, sets, baselines, device, dsa):
    """The sets behind DD-Ranking's scores, by term: the distilled set with its own labels and the evaluation's DSA
    (syn), with hard labels (a soft-label set's argmax; a hard-label set is its own), without DSA; a random real subset
    of its size labelled as the set's method labels (class ids, or for soft labels an expert's logits) with DSA and
    without; the full training set. A row the command asks for anyway (--baseline random at the set's ipc, --baseline
    full) is reused. Without DSA (--dsa False) there are no rows without it: ARS, which compares the two, is not
    computed."""
    named = {eval_set.name: eval_set for eval_set in sets}
    random = baselines["random"](distilled.ipc)  # named by its ipc where --baseline random draws another
    random = named.get(random.name, random)
    soft = distilled.labels.is_floating_point()
    if soft:  # as DATM labels: the logits of an expert of the run's buffer at the snapshot it labels with
        run = saved.meta.get("args")
        if run is None:
            raise UsageError(f"--scores on {saved.name}, a soft-label set with no run.json: the random subset's "
                             f"labels come from the experts of the run, which only a run.json names")
        directory = experts_of(argparse.Namespace(**run))
        experts, snapshot, images = Experts(directory, zca=run["zca"]), run["Label_Model_Timestamp"], random.images
        net = get_network(run["model"], images.shape[1], distilled.labels.shape[1], images.shape[2:]).to(device)
        random = replace(random, name=f"random (logits of expert 0 at snapshot {snapshot} of {directory})",
                         labels=predict(net, experts.snapshot(0, snapshot, device), images.to(device)).cpu())
    without_dsa = {"syn_no_aug": replace(distilled, name=f"{distilled.name} (no DSA)", augment=False),
                   "random_no_aug": replace(random, name=f"{random.name} (no DSA)", augment=False)} if dsa else {}
    return {"syn": distilled,
            "syn_hard": replace(distilled, name=f"{distilled.name} (hard labels)", labels=distilled.labels.argmax(1))
            if soft else distilled,
            "random": random, **without_dsa, "full": named.get("full") or baselines["full"](None)}


def normalised(x):
    """DD-Ranking's map of a score in [-1, 1] to [0, 1]: (e^x - e^-1) / (e - e^-1)."""
    return (np.exp(x) - np.exp(-1)) / (np.e - np.exp(-1))


def scores(rows, terms, model, w, g):
    """DD-Ranking's scores of one model's rows, network by network (network r of every row is seeded alike), from
    accuracies as fractions: HLR = full - syn with hard labels; IOR = syn - random, each with its own labels; LRS =
    normalised(w IOR - (1 - w) HLR); ARS = normalised(g (syn - random) + (1 - g) (syn - random, both without DSA)).
    Each as its mean, std and per-network values, with every accuracy used."""
    used = {term: next(row for row in rows if row["set"] == eval_set.name and row["model"] == model)
            for term, eval_set in terms.items()}
    acc = {term: np.array(row["test_accs"]) for term, row in used.items()}
    values = {"hlr": acc["full"] - acc["syn_hard"], "ior": acc["syn"] - acc["random"]}
    values["lrs"] = normalised(w * values["ior"] - (1 - w) * values["hlr"])
    if "syn_no_aug" in acc:  # with DSA; without, both of ARS's terms would be IOR
        values["ars"] = normalised(g * values["ior"] + (1 - g) * (acc["syn_no_aug"] - acc["random_no_aug"]))
    return {**{name: {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}
               for name, v in values.items()},
            "accuracies": {term: {"set": row["set"], "test_accs": row["test_accs"]} for term, row in used.items()}}


def columns(lines):
    """Lines of cells in left-aligned columns two spaces apart."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def evaluate_all(args, device):
    """Every set and baseline the command names, num_eval networks per model each: the table's rows."""
    with parallel.one_verdict():  # no collective inside: every rank checks the same input, rank 0 says what is wrong
        saved = load_saved_set(args.syn_path, args.iteration, args.labels_path, args.lr_path, args.ema) \
            if args.syn_path else None
        take_from_run(args, saved)
        models = eval_pool(args.eval_mode, args.model)
        for model in models:
            check_model(model, args.dataset, args.res)
        data = get_dataset(args.dataset, args.data_path, zca=False, subset=args.subset, res=args.res, device=device)
        sets, terms = build_sets(args, data, saved, device)
        if args.out and is_main():  # made once every input is checked, before hours of training; rank 0 writes it
            make_folder(Path(args.out).parent, f"--out {args.out}: its folder")
    rows = evaluate_sets([(eval_set, model) for eval_set in sets for model in models], data, args.num_eval,
                         args.seed, args.batch_train, args.augmentation, device, args.verbose)
    found = {model: scores(rows, terms, model, args.lrs_lambda, args.ars_lambda) for model in models} if terms else {}
    if is_main():
        print(columns([("set", "model", "ipc", "lr", "test acc %", "n")] + [
            (row["set"], row["model"], "all" if row["ipc"] is None else str(row["ipc"]), f"{row['lr']:.4g} "
             f"({row['lr_from']})", f"{100 * row['test_acc_mean']:.2f} +- {100 * row['test_acc_std']:.2f}",
             str(row["n"])) for row in rows]))
        if found:
            shown = lambda s: f"{100 * s['mean']:.2f} +- {100 * s['std']:.2f}" if s else "n/a: needs DSA (--dsa True)"
            print(f"DD-Ranking's scores x 100, mean +- std over {args.num_eval} networks (HLR, IOR: accuracy points; "
                  f"LRS, ARS: in [0, 100], higher is better):\n" + columns([("model", "HLR", "IOR", "LRS", "ARS")] + [
                      (model, *(shown(s.get(name)) for name in ("hlr", "ior", "lrs", "ars")))
                      for model, s in found.items()]))
        if args.out:
            save_json({"dataset": args.dataset, "syn_set": saved.name if saved else None, "rows": rows,
                       **({"scores": found} if found else {}),
                       "processes": parallel.world(), "args": vars(args), **run_info(device)}, args.out)
            print(f"rows written to {args.out}")
    return rows


if __name__ == "__main__":
    run_and_exit(main)
