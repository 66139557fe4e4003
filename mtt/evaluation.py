"""The evaluation protocol of DC, DSA and MTT (distill.py, eval.py): train fresh networks on a
set, test them on real images, one row of mean and std per set and model."""
import time
from dataclasses import dataclass

import numpy as np
import torch

from mtt import parallel
from mtt.augment import DSA_STRATEGY
from mtt.flags import positive_int, switch
from mtt.memory import check_room, moving
from mtt.progress import progress
from mtt.training import accuracy, decay_epoch, train_epoch
from networks import get_network
from utils import eta, run_seed, say, set_seed
from utils import rank as this_rank

EVAL_POOLS = {
    "M": ["ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL"], "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
}
EVAL_MODE_HELP = ("models each evaluation trains: S = the distillation model (BN -> instance norm), C = it and "
                  "ConvNet, M = ConvNet AlexNet VGG11 ResNet18_AP ResNet18, W = widths, D = depths, "
                  "A = activations, P = poolings, N = norms")


def add_flags(parser, networks_help):
    """The evaluation's flags, distill.py's and eval.py's alike (the original's names and defaults)."""
    parser.add_argument("--eval_mode", default="S", choices=["S", "C", *EVAL_POOLS], help=EVAL_MODE_HELP)
    parser.add_argument("--num_eval", type=positive_int, default=5, help=networks_help)
    parser.add_argument("--epoch_eval_train", type=positive_int, default=1000, help="epochs of each evaluation network")
    switch(parser, "--verbose", "also print each evaluation network's training accuracy at every tenth of its epochs "
                                "(default: one line per network, and the bar)")


def eval_pool(eval_mode, model):
    """The models to evaluate a set with: S = the distillation model (batch norm swapped for instance norm, as the
    original does), C = that model and ConvNet, else a named pool."""
    return {"S": [model.split("BN")[0]], "C": list(dict.fromkeys([model, "ConvNet"])), **EVAL_POOLS}[eval_mode]


def evaluate_synset(net, images, labels, test_images, test_labels, lr, epochs=1000, batch_train=256,
                    dsa_strategy=DSA_STRATEGY, texture=None, say=None, on_epoch=None):
    """Train `net` (fresh) on images/labels with SGD (momentum 0.9, weight decay 5e-4), lr x0.1 after epoch
    decay_epoch(epochs), DSA unless dsa_strategy is None; return the final (train accuracy, test accuracy). Like the
    original: epochs + 1 passes, the optimiser (momentum too) restarted at the decay; on_epoch() after each pass."""
    device = next(net.parameters()).device
    images, labels = images.to(device), labels.to(device)
    sgd = lambda lr: torch.optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=5e-4)
    optimizer, start, passes = sgd(lr), time.time(), epochs + 1
    for ep in range(passes):
        train_acc = train_epoch(net, images, labels, optimizer, batch_train, dsa_strategy, texture)
        if ep == decay_epoch(epochs):
            lr *= 0.1
            optimizer = sgd(lr)
        if on_epoch:
            on_epoch()
        if say and (ep + 1) % max(1, passes // 10) == 0:
            say(f"  epoch {ep + 1}/{passes} train acc {train_acc:.3f} ({eta(time.time() - start, ep + 1, passes)})")
    return train_acc.item(), accuracy(net, test_images.to(device), test_labels.to(device))


@dataclass
class EvalSet:
    """A set to evaluate (distilled, random real or full) and its real test images, in its own space (ZCA or not)."""
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
    augment: bool = True  # DSA as the command says; False: none (DD-Ranking's ARS compares both)


def evaluate_sets(pairs, data, num_eval, seed, batch_train=256, dsa_strategy=DSA_STRATEGY, device="cpu",
                  verbose=False):
    """Train num_eval fresh networks per (EvalSet, model) pair and test each: a table row per pair, a line per network
    (verbose: its epochs too). Network r of a pair is seeded by (seed, r) alone, so a row repeats whatever else runs;
    torchrun spreads the networks over the ranks (same results), and rank 0 prints their lines (not verbose epochs)."""
    rank, ranks = this_rank(), parallel.world()
    # network k is run k % num_eval of pair k // num_eval, on rank k % ranks; ranges, not lists, so that a huge
    # --num_eval starts at once. The bar counts images trained on: a full-data network weighs its cost.
    mine = range(rank, len(pairs) * num_eval, ranks)
    below = lambda k: len(range(rank, k, ranks))  # this rank's networks among the first k
    work = sum(len(eval_set.images) * (eval_set.epochs + 1) * (below((pair + 1) * num_eval) - below(pair * num_eval))
               for pair, (eval_set, _) in enumerate(pairs))
    for eval_set in {eval_set.name: eval_set for eval_set, _ in pairs}.values():
        check_room(moving([eval_set.images, *eval_set.test], torch.device(device)),
                   f"{eval_set.name}'s and the test images need", torch.device(device))
    results = {}
    networks = f"{len(mine)} network{'s' * (len(mine) != 1)}" + (f" of {len(pairs) * num_eval}" if ranks > 1 else "")
    with progress(total=work, desc=f"evaluating {networks}", unit="img") as bar:
        for pair, run in map(lambda k: divmod(k, num_eval), mine):
            eval_set, model = pairs[pair]
            set_seed(run_seed(seed, run))
            net = get_network(model, data.channel, data.num_classes, data.im_size).to(device)
            tag = f"[{eval_set.name} {model} run {run + 1}/{num_eval}]"
            bar.set_postfix_str(tag[1:-1])
            _, test_acc = evaluate_synset(net, eval_set.images, eval_set.labels, *eval_set.test, eval_set.lr,
                                          eval_set.epochs, batch_train, dsa_strategy if eval_set.augment else None,
                                          eval_set.texture, say=(lambda line: say(tag + line)) if verbose else None,
                                          on_epoch=lambda: bar.update(len(eval_set.images)))
            val_acc = accuracy(net, *(t.to(device) for t in eval_set.validation)) if eval_set.validation else None
            validation = "" if val_acc is None else f", validation {100 * val_acc:.2f}%"
            line = (f"{tag} {len(eval_set.images)} images, {eval_set.epochs} epochs ({eval_set.epochs + 1} passes: "
                    f"the original trains one more), lr {eval_set.lr:.4g}: test acc {100 * test_acc:.2f}%{validation}")
            say(line)
            results[pair, run] = (test_acc, val_acc, line)
    own = set(results)
    for found in parallel.gather_objects(results):
        results.update(found)
    for key in sorted(results.keys() - own):  # say prints on rank 0 only: the other ranks' networks, once each
        say(results[key][2])
    rows = []
    for pair, (eval_set, model) in enumerate(pairs):
        test_accs, val_accs, _ = zip(*(results[pair, run] for run in range(num_eval)))
        row = {"set": eval_set.name, "model": model, "ipc": eval_set.ipc, "images": len(eval_set.images),
               "lr": eval_set.lr, "lr_from": eval_set.lr_from, "epochs": eval_set.epochs,
               "dsa": bool(dsa_strategy) and eval_set.augment, "test_acc_mean": float(np.mean(test_accs)),
               "test_acc_std": float(np.std(test_accs)), "test_accs": list(test_accs), "n": num_eval}
        if eval_set.validation:
            row.update(val_acc_mean=float(np.mean(val_accs)), val_acc_std=float(np.std(val_accs)),
                       val_accs=list(val_accs))
        rows.append(row)
    return rows
