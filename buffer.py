"""Train expert trajectories for trajectory matching and save them as memory-mappable numpy buffers.

    python buffer.py --dataset CIFAR10 --zca                  # 100 experts x 50 epochs, as published
    python buffer.py --dataset FashionMNIST-mini --num_experts 5 --train_epochs 10
    python buffer.py --dataset CIFAR10 --zca --rho_max 0.01 --rho_min 0.01   # FTD's flat experts (adaptive GSAM)
    python buffer.py --cfg configs/buffers/mtt_cifar10_zca.yaml   # a published setting (configs/)
    python -m torch.distributed.run --standalone --nproc_per_node 8 buffer.py --dataset CIFAR10 --zca   # 8 GPUs
    python buffer.py --import_pt OLD_DIR --dataset CIFAR10 --zca   # the original's replay_buffer_{n}.pt files
    python buffer.py --export_pt NEW_DIR --dataset CIFAR10 --zca   # ... and back, for MTT, TESLA and DATM

Each expert is a network trained from random init with SGD on the full real training set (DSA on every
batch); its flat parameters at init and after every epoch go into the buffer directory mtt/trajectories.py
describes. With --rho_max > 0 SGD applies FTD's GSAM gradient instead (gsam_step; the GSAM flags below say how).

A rerun appends experts: expert k of a directory starts from set_seed(expert_seed(--seed, k)), and the
sidecar's next_index counts every expert the directory ever held, so no index or seed is used twice; other
settings are refused rather than mixing trajectories. One buffer.py at a time writes a directory (its .lock).
A file is written under a temporary name, renamed when complete, then listed in the sidecar; the next run
lists a complete file that a kill left unlisted if its experts are the seeded ones it expects
("recovered": true), else sets it aside as replay_buffer_{n}.npy.orphan.

Under torchrun the files are numbered up front and file j is trained by rank j mod ranks, each expert with
the index and seed one process would give it (the same arrays, bit for bit on CPU). Rank 0 alone holds the
lock, recovers, prints and writes the sidecar after every round; its "pending" entry lets the next run list
a file finished in a round that was cut short.
"""
import hashlib
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from itertools import zip_longest
from pathlib import Path

import mtt  # noqa: F401  before torch loads: Ctrl-C or SIGTERM while the script starts is one line

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mtt import parallel
from mtt.data import DATASETS, get_dataset
from mtt.memory import check_room, moving
from mtt.flags import (Parser, add_common_args, check_model, folder_path, non_negative_float, parse, positive_float,
                       positive_int, switch, take_defaults)
from mtt.parallel import Interrupted, main_decides, one_verdict, run_and_exit, run_script
from mtt.progress import progress
from mtt.training import accuracy, decay_epoch, sgd_step, train_epoch
from mtt.trajectories import (SIDECAR, Experts, buffer_file, experts_of, new_buffer_file, next_number,
                              numbered_files, open_checked, read_original, read_sidecar, set_aside, write_original)
from networks import flatten_params, get_network
from utils import UsageError, eta, folder_lock, is_main, make_folder, rank, save_json, say, set_seed

SHARED = ("dataset", "model", "zca", "num_params", "train_epochs", "lr_teacher", "batch_train", "dsa", "dsa_strategy",
          "mom", "l2", "decay", "rho_max", "rho_min", "alpha", "adaptive")  # all experts of a directory, in its sidecar
PLAIN_SGD = {"rho_max": 0, "rho_min": 0, "alpha": 0, "adaptive": False}  # what a sidecar from before GSAM means
# GSAM's defaults as FTD's buffer code runs it (and DATM's copy of it): its --adaptive is declared
# type=bool, so any text, even False, parses as True, and its --alpha defaults to 0.4.
FTD_GSAM = {"adaptive": True, "alpha": 0.4}
GSAM_EPS = 1e-12  # GSAM's perturb_eps


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_common_args(parser)
    flag = parser.add_argument
    flag("--num_experts", type=positive_int, default=100, help="experts to train")
    flag("--lr_teacher", type=positive_float, default=0.01, help="the experts' SGD learning rate")
    flag("--batch_real", type=int, default=256, help="unused here; kept so the original's commands run")
    flag("--buffer_path", default="./buffers", type=folder_path,
         help="root of the expert directories {buffer_path}/{dataset}[_NO_ZCA]/{model}")
    flag("--train_epochs", type=positive_int, default=50, help="epochs per expert (snapshots: this + 1)")
    switch(parser, "--decay", "lr x0.1 after epoch train_epochs // 2 + 1")
    flag("--mom", type=non_negative_float, default=0, help="SGD momentum")
    flag("--l2", type=non_negative_float, default=0, help="SGD weight decay")
    flag("--save_interval", type=positive_int, default=10, help="experts per replay_buffer file")
    flag("--rho_max", type=non_negative_float, default=0,
         help="GSAM perturbation radius rho (FTD's flat experts; FTD uses 0.01); 0 trains with plain SGD. GSAM "
              "scales rho linearly with the lr, from rho_max at --lr_teacher to rho_min at lr_teacher / 10: here "
              "rho is rho_max throughout, or rho_min after --decay")
    flag("--rho_min", type=non_negative_float, default=0, help="GSAM rho after --decay's x0.1 (at most --rho_max)")
    flag("--alpha", type=non_negative_float, default=None,
         help="GSAM: how much of the gradient orthogonal to the perturbed one is subtracted; needs --rho_max "
              "(default: 0.4 with --rho_max, as FTD's code; FTD's paper gives 0.3 or 1 per dataset)")
    switch(parser, "--adaptive", "GSAM: scale the perturbation per weight by w**2 (adaptive SAM); needs --rho_max "
                                 "(default: True with --rho_max, as FTD's code runs every expert)", default=None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--import_pt", metavar="OLD_DIR", type=folder_path,
                      help="convert the original's replay_buffer_{n}.pt files in OLD_DIR instead of training "
                           "(one process: refused under torchrun)")
    mode.add_argument("--export_pt", metavar="NEW_DIR", type=folder_path,
                      help="write this directory's experts into NEW_DIR as the original's replay_buffer_{n}.pt "
                           "files (--save_interval experts each), which MTT, TESLA and DATM read (one process: "
                           "refused under torchrun)")
    args = parse(parser, argv)
    num_params = check_model(args.model, args.dataset, args.res)
    if not (args.import_pt or args.export_pt):
        check_room(4 * args.num_experts * (args.train_epochs + 1) * num_params,
                   f"{args.num_experts} experts of {args.train_epochs + 1} snapshots needs", args.buffer_path)
    if args.rho_min > args.rho_max:
        raise UsageError(f"--rho_min {args.rho_min} is above --rho_max {args.rho_max}")
    if (args.alpha or args.adaptive) and not args.rho_max:
        raise UsageError("--alpha and --adaptive set up GSAM: give --rho_max too (GSAM is off at rho 0)")
    take_defaults(args, FTD_GSAM, PLAIN_SGD, args.rho_max > 0, "GSAM as FTD's buffer code runs it")
    if parallel.launched() and (args.import_pt or args.export_pt):
        raise UsageError("--import_pt and --export_pt convert files in one process: run them with python, not torchrun")
    return args


def main(argv=None):
    return run_script(parse_args, run, argv, interrupted)


def interrupted(args):
    """What an interrupted buffer.py leaves, in one line."""
    if args.export_pt:
        return f"the replay_buffer_{{n}}.pt files listed above are complete in {args.export_pt}"
    return (f"the experts listed in {experts_of(args)}/{SIDECAR} are complete and kept; the file being written "
            f"was discarded; run the command again to add experts")


def run(args, device):
    return import_pt(args) if args.import_pt else export_pt(args) if args.export_pt else train(args, device)


def expert_seed(seed, index):
    """A hash of --seed and the index, so that no two experts of a directory share a seed, whatever --seed made them."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def describe(args, seed):
    """The sidecar of a new directory for experts trained (or imported) with these flags."""
    channel, im_size, num_classes = DATASETS[args.dataset].shape(args.res)
    shapes = [list(p.shape) for p in get_network(args.model, channel, num_classes, im_size).parameters()]
    flags = ("dataset", "subset", "res", "model", "zca", "lr_teacher", "train_epochs", "batch_train", "batch_real",
             "dsa", "dsa_strategy", "mom", "l2", "decay", "rho_max", "rho_min", "alpha", "adaptive")
    return {**{flag: getattr(args, flag) for flag in flags}, "method_defaults": args.method_defaults,
            "channel": channel, "im_size": list(im_size), "num_classes": num_classes,
            "num_params": sum(int(np.prod(s)) for s in shapes), "param_shapes": shapes, "seed": seed,
            "torch_version": torch.__version__, "next_index": 0, "experts": []}


def count(experts):
    return f"{experts} expert{'s' * (experts != 1)}"


def open_directory(directory, settings, seed):
    """The locked directory's sidecar, its experts checked to be made like these and unlisted files recovered."""
    meta = {**PLAIN_SGD, **read_sidecar(directory)} if (Path(directory) / SIDECAR).exists() else settings
    defaults = settings["method_defaults"]
    differences = [f"{key} {meta.get(key)!r} (this run: {settings[key]!r}"
                   + (f", a default: give --{key} {meta.get(key)} to match)" if key in defaults else ")")
                   for key in SHARED if meta.get(key) != settings[key]]
    if differences:
        raise UsageError(f"{directory} holds experts with {', '.join(differences)}; choose another "
                         f"--buffer_path rather than mix trajectories")
    meta.setdefault("next_index", len(meta["experts"]))
    planned = meta.pop("pending", {})  # a killed multi-process run's files: name -> index of its first expert
    listed = {expert["file"] for expert in meta["experts"]}
    unlisted = [path for path in numbered_files(directory, "npy") if path.name not in listed]
    for path in unlisted:
        recover(path, meta, seed, planned.get(path.name, meta["next_index"]))
    if unlisted or planned:
        save_json(meta, Path(directory) / SIDECAR)
    return meta


def initialisation(meta, seed):
    """Snapshot 0 of the expert seeded with `seed`: the network train_expert starts from."""
    set_seed(seed)
    return flatten_params(get_network(meta["model"], meta["channel"], meta["num_classes"], meta["im_size"])).numpy()


def recover(path, meta, seed, first):
    """List a file a killed run left unlisted if its experts start from the initialisations of indices `first`..
    under `seed`, else set it aside; either way its indices are never given again."""
    try:
        array = open_checked(path, 1, meta["train_epochs"] + 1, meta["num_params"])
    except UsageError as err:
        return set_aside(path, str(err))
    seeds = [expert_seed(seed, first + row) for row in range(len(array))]
    if all(np.array_equal(array[row, 0], initialisation(meta, s)) for row, s in enumerate(seeds)):
        meta["experts"] += [{"file": path.name, "index": first + row, "row": row, "seed": s, "train_acc": [],
                             "test_acc": [], "recovered": True} for row, s in enumerate(seeds)]
        say(f"recovered {path}: {count(len(array))} a killed run wrote but never listed in {SIDECAR} "
              f"(indices {first}..{first + len(array) - 1}; their per-epoch accuracies are unknown)")
    else:
        set_aside(path, f"its experts do not start from the initialisations of indices {first}.. under --seed {seed}")
    meta["next_index"] = max(meta["next_index"], first + len(array))


def gsam_step(net, x, y, optimizer, rho, alpha, adaptive):
    """One GSAM step (Zhuang et al. 2022; FTD's flat experts): gradients g at w and g_p at w + e_w (e_w = rho g / ||g||,
    or rho g w**2 / || |w| g || with `adaptive`), then `optimizer` steps from w with g_p - alpha * (the part of g
    orthogonal to g_p). Batch norm's running statistics see the first pass only, as in GSAM. Returns outputs at w."""
    norm = lambda tensors: torch.stack([t.norm() for t in tensors]).norm()  # all as one vector: GSAM's _grad_norm
    params = list(net.parameters())
    out = net(x)
    g = torch.autograd.grad(F.cross_entropy(out, y), params)
    with torch.no_grad():
        scale = rho / (norm([p.abs() * gi for p, gi in zip(params, g)] if adaptive else g) + GSAM_EPS)
        e_w = [gi * scale * (p ** 2 if adaptive else 1) for p, gi in zip(params, g)]
        for p, e in zip(params, e_w):
            p.add_(e)
    with frozen_running_stats(net):
        g_p = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    with torch.no_grad():
        for p, e in zip(params, e_w):
            p.sub_(e)
        g_norm, g_p_norm = norm(g), norm(g_p)
        cos = sum((a * b).sum() for a, b in zip(g, g_p)) / (g_p_norm * g_norm + GSAM_EPS)
        for p, a, b in zip(params, g, g_p):
            p.grad = b - alpha * (a - cos * g_norm * b / (g_p_norm + GSAM_EPS))
    optimizer.step()
    return out.detach()


@contextmanager
def frozen_running_stats(net):
    """Batch norm momentum 0, so a forward pass leaves the running statistics (GSAM's disable_running_stats)."""
    momenta = {m: m.momentum for m in net.modules() if isinstance(m, _BatchNorm)}
    for m in momenta:
        m.momentum = 0
    try:
        yield
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum


def train_expert(args, data, snapshots):
    """Train a fresh network from torch's RNG as the original does; write its flat parameters at
    init and after every epoch into snapshots; yield (train acc, test acc, images/s) per epoch."""
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(data.images_train.device)
    sgd = lambda lr: torch.optim.SGD(net.parameters(), lr, momentum=args.mom, weight_decay=args.l2)
    optimizer, rho = sgd(args.lr_teacher), args.rho_max
    snapshots[0] = flatten_params(net).cpu().numpy()
    for epoch in range(args.train_epochs):
        start = time.time()
        step = partial(gsam_step, rho=rho, alpha=args.alpha, adaptive=args.adaptive) if rho else sgd_step
        train_acc = train_epoch(net, data.images_train, data.labels_train, optimizer, args.batch_train,
                                args.augmentation, step=step).item()
        images_per_second = len(data.images_train) / (time.time() - start)
        test_acc = accuracy(net, data.images_test, data.labels_test)
        snapshots[epoch + 1] = flatten_params(net).cpu().numpy()
        if args.decay and epoch == decay_epoch(args.train_epochs):
            optimizer, rho = sgd(args.lr_teacher * 0.1), args.rho_min  # momentum restarts; GSAM's rho follows the lr
        yield train_acc, test_acc, images_per_second


def train_file(args, data, num_params, file, entries):
    """Train and write one planned file, appending its sidecar entries to `entries`; yield (index, epoch,
    train acc, test acc, images/s) per epoch. The file appears, complete, only after the last epoch."""
    path, first, size = file
    with new_buffer_file(path, (size, args.train_epochs + 1, num_params)) as array:
        for row in range(size):
            index, seed = first + row, expert_seed(args.seed, first + row)
            set_seed(seed)
            entry = {"file": path.name, "index": index, "row": row, "seed": seed, "train_acc": [], "test_acc": []}
            for epoch, (train_acc, test_acc, speed) in enumerate(train_expert(args, data, array[row]), 1):
                if not np.isfinite(array[row, epoch]).all():
                    rho = f", --rho_max {args.rho_max:g}, --rho_min {args.rho_min:g}" * bool(args.rho_max)
                    raise UsageError(f"expert #{index} diverged: its parameters became non-finite in epoch {epoch} "
                                     f"(--lr_teacher {args.lr_teacher:g}, --mom {args.mom:g}, --l2 {args.l2:g}{rho}); "
                                     f"lower them. Nothing of its file is saved; files finished before it are kept")
                entry["train_acc"].append(train_acc)
                entry["test_acc"].append(test_acc)
                yield index, epoch, train_acc, test_acc, speed
            entries.append(entry)


def failures_reported(epochs):
    """The epochs, then, if they stop on a UsageError, ("failed", its message) for the gather to carry to every rank."""
    try:
        yield from epochs
    except UsageError as err:
        yield "failed", str(err)


def load_data(args, device, settings):
    data = get_dataset(args.dataset, args.data_path, args.zca, args.subset, args.res, device)
    shape = [data.channel, list(data.im_size), data.num_classes]
    assert shape == [settings["channel"], settings["im_size"], settings["num_classes"]], "DatasetInfo.shape disagrees"
    check_room(moving([data.images_train, data.images_test], device), "the training and test images need", device)
    return replace(data, images_train=data.images_train.to(device), labels_train=data.labels_train.to(device),
                   images_test=data.images_test.to(device), labels_test=data.labels_test.to(device))


def open_run(args, directory, settings, world, run_lock):
    """On rank 0, alone in the locked directory before the others start: recover, and number this run's files up
    front as (path, index of its first expert, experts), in the order one process writes them, for every rank."""
    run_lock.enter_context(folder_lock(make_folder(directory, "--buffer_path"), "buffer.py run"))
    meta = open_directory(directory, settings, args.seed)
    number, index = next_number(directory, meta), meta["next_index"]
    plan = [(buffer_file(directory, number + j), index + first, min(args.save_interval, args.num_experts - first))
            for j, first in enumerate(range(0, args.num_experts, args.save_interval))]
    if world > 1:  # ranks finish the files of a round in any order: the next run must know which indices each holds
        meta["pending"] = {path.name: first for path, first, _ in plan}
        save_json(meta, Path(directory) / SIDECAR)
    return meta, plan


def train(args, device):
    directory = Path(experts_of(args))
    settings, world = describe(args, args.seed), parallel.world()
    with ExitStack() as run_lock:  # rank 0 holds the directory's lock for the whole run; the others never take it
        meta, plan = main_decides(lambda: open_run(args, directory, settings, world, run_lock))
        with one_verdict():  # no collective inside: a rank that fails goes straight to the verdict
            if not directory.is_dir():
                raise UsageError(f"{directory} does not exist on this machine: on several machines --buffer_path "
                                 f"must be a folder they all share")
            data = load_data(args, device, settings)
        where = device if world == 1 else f"{world} processes on {device.type}, file j on rank j mod {world}"
        say(f"{args.num_experts} {args.model} experts x {args.train_epochs} epochs on {args.dataset} "
            f"({len(data.images_train)} images, {where}) -> {directory}")
        try:
            train_rounds(args, data, settings, directory, meta, plan, world)
        except KeyboardInterrupt as stop:  # the line says how many experts are kept, so a rerun ends with those asked
            raise Interrupted(stopped(stop, args, directory, plan)) from None


def train_rounds(args, data, settings, directory, meta, plan, world):
    """Train the planned files, a round of one file per rank at a time, listing each round's experts in the sidecar
    when it ends. The bar counts every rank's expert-epochs; the ETA counts the rounds' steps (the wall time)."""
    rounds = [plan[j:j + world] for j in range(0, len(plan), world)]  # file j on rank j mod world
    steps = [max(size for _, _, size in files) * args.train_epochs for files in rounds]
    start, done, total = time.time(), 0, sum(steps)
    with progress(total=args.num_experts * args.train_epochs, desc="experts x epochs", unit="epoch") as bar:
        for files, round_steps in zip(rounds, steps):
            entries = []
            mine = files[rank()] if rank() < len(files) else None
            epochs = train_file(args, data, settings["num_params"], mine, entries) if mine else ()
            # one gather an epoch, a rank whose file is done sending None: no collective waits longer than an epoch
            for epoch_report, _ in zip_longest(failures_reported(epochs), range(round_steps)):
                done += 1
                reports = parallel.gather_objects(epoch_report)
                for failed_rank, report in enumerate(reports):
                    if report and report[0] == "failed":
                        raise UsageError(report[1], rank=failed_rank if world > 1 else None)
                received = list(filter(None, reports))
                for index, epoch, train_acc, test_acc, speed in received:
                    say(f"expert {index - plan[0][1] + 1}/{args.num_experts} (#{index}) epoch "
                        f"{epoch}/{args.train_epochs}: train acc {train_acc:.4f} test acc {test_acc:.4f}, "
                        f"{speed:.0f} images/s, {eta(time.time() - start, done, total)}")
                    bar.set_postfix_str(f"expert {index - plan[0][1] + 1} test acc {test_acc:.4f}", refresh=False)
                bar.update(len(received))
            finished = [entry for share in parallel.gather_objects(entries) for entry in share]
            if is_main():
                meta["experts"] += finished
                meta["next_index"] += len(finished)
                if files is rounds[-1]:
                    meta.pop("pending", None)
                save_json(meta, Path(directory) / SIDECAR)
                for path, _, size in files:
                    say(f"wrote {path} ({count(size)})")


def stopped(stop, args, directory, plan):
    """The line a Ctrl-C (or SIGTERM) during training ends with. The experts kept are those of this run's
    complete files: a file appears only then, and one the sidecar does not list yet is listed by the next run."""
    said, kept = str(stop) or "stopped by Ctrl-C", sum(size for path, _, size in plan if path.exists())
    left = args.num_experts - kept
    if not left:
        return f"{said}: all {count(kept)} this command asked for are complete and kept in {directory}"
    again = f"run it again with --num_experts {left} to add the other {left}" if kept else "run the same command again"
    return (f"{said}: {kept} of the {count(args.num_experts)} this command asked for are complete and kept in "
            f"{directory} (the file being written was discarded); {again}")


def import_pt(args):
    sources = numbered_files(args.import_pt, "pt")
    if not sources:
        raise UsageError(f"no replay_buffer_{{n}}.pt files in {args.import_pt}")
    directory = make_folder(experts_of(args), "--buffer_path")
    with folder_lock(directory, "buffer.py run"):
        meta = open_directory(directory, describe(args, seed=None), args.seed)
        for source in sources:
            digest = hashlib.sha256()
            with open(source, "rb") as f:  # in blocks: an original file can be gigabytes (3.10 has no file_digest)
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            digest = digest.hexdigest()
            imported = {entry.get("source_sha256"): entry["file"] for entry in meta["experts"]}
            if digest in imported:
                say(f"skipped {source}: its experts are already imported, in {imported[digest]}")
                continue
            experts = read_original(source, meta["param_shapes"], args.train_epochs)
            path = buffer_file(directory, next_number(directory, meta))
            with new_buffer_file(path, (len(experts), args.train_epochs + 1, meta["num_params"])) as array:
                for row, expert in enumerate(experts):
                    for epoch, snapshot in enumerate(expert):
                        array[row, epoch] = torch.cat([p.reshape(-1) for p in snapshot]).float().numpy()
            meta["experts"] += [{"file": path.name, "index": meta["next_index"] + row, "row": row, "seed": None,
                                 "train_acc": [], "test_acc": [], "source": str(source), "source_sha256": digest}
                                for row in range(len(experts))]
            meta["next_index"] += len(experts)
            save_json(meta, Path(directory) / SIDECAR)
            say(f"{source} -> {path} ({count(len(experts))})")


def export_pt(args):
    """The directory's experts as the original's replay_buffer_{n}.pt files, --save_interval experts each."""
    experts = Experts(experts_of(args), zca=args.zca)
    shapes = [torch.Size(shape) for shape in experts.meta["param_shapes"]]
    folder = make_folder(args.export_pt, "--export_pt")
    with folder_lock(folder, "buffer.py --export_pt"):
        if numbered_files(folder, "pt"):
            raise UsageError(f"--export_pt {folder} already holds replay_buffer_{{n}}.pt files; choose an empty folder")
        for n, first in enumerate(range(0, len(experts), args.save_interval)):
            chosen = range(first, min(first + args.save_interval, len(experts)))
            path = folder / f"replay_buffer_{n}.pt"
            write_original(path, [experts.trajectory(k) for k in chosen], shapes)
            say(f"wrote {path} ({count(len(chosen))})")


if __name__ == "__main__":
    run_and_exit(main)
