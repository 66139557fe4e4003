"""Distill a dataset by matching training trajectories (Cazenavette et al., CVPR 2022), with the additions of DATM
(Guo et al., ICLR 2024) and FTD (Du et al., CVPR 2023) as options: a small synthetic set and a learnable learning
rate syn_lr are trained so that syn_steps SGD steps on the set, started from an expert's parameters at epoch t, land
close to where the expert was at epoch t + expert_epochs. Experts come from buffer.py:

    python buffer.py --dataset CIFAR10 --zca
    python distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30 --expert_epochs 2 \\
        --max_start_epoch 20 --lr_img 100 --lr_lr 1e-05 --lr_teacher 0.001 --zca
    python distill.py --cfg configs/mtt/cifar10_ipc10.yaml      # the same, from its file
    torchrun --standalone --nproc_per_node 8 distill.py ...     # each minibatch split over 8 GPUs

The step (the learnable SyntheticSet, the student update and its two exact gradients: the full unroll, or with
--low_memory the replay whose memory grows only by the stored parameter vectors theta_0..theta_N) is in
mtt/matching.py, the run folder in mtt/run_folder.py: a checkpoint follows every evaluation, and --resume continues
bit for bit. Give any DATM flag (--soft_label, --pix_init samples_predicted_correctly, --threshold, the start-epoch
window, ...) and the others take DATM's defaults, soft labels included, as DATM always runs (printed at start, kept
in run.json); give none and this is MTT exactly. --cfg FILE.yaml reads the flags from a file (configs/ holds every
published row; DATM's own files load as they are).
"""
import argparse
import json
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import mtt  # noqa: F401  before torch loads: Ctrl-C or SIGTERM while the script starts is one line

import torch

from mtt import parallel, run_folder
from mtt.data import DATASETS, Data, draw_per_class, get_dataset, images_per_class, smallest_class
from mtt.evaluation import EvalSet, eval_pool, evaluate_sets
from mtt.evaluation import add_flags as add_eval_flags
from mtt.flags import (Parser, add_common_args, boolean, check_model, checked, folder_path, fraction,
                       non_negative_float, non_negative_int, parse, positive_float, positive_int, switch, take_defaults)
from mtt.matching import BACKWARD, SyntheticSet, draw_schedule
from mtt.memory import check_room, choose_backward, forecast, free_memory, moving
from mtt.parallel import main_decides, one_verdict, run_and_exit, run_script, stalls_are_one_line
from mtt.progress import progress
from mtt.training import predict
from mtt.trajectories import Experts, buffer_dir, experts_of, fill_command
from networks import flatten_params, get_network
from utils import UsageError, installed, is_main, make_folder, run_seed, save_json, save_torch, say, set_seed

# DATM's flags and their defaults in DATM's code. They apply as a whole once any of them is given with a value MTT
# does not have (DATM always learns its labels, from images an expert classifies correctly); with none given, MTT's
# values below stand in for those that would change MTT's run.
DATM_DEFAULTS = {"soft_label": True, "pix_init": "samples_predicted_correctly", "Label_Model_Timestamp": -1,
                 "lr_y": 2.0, "Momentum_y": 0.9, "threshold": 1.0, "min_start_epoch": 0, "current_max_start_epoch": 20,
                 "expansion_end_epoch": 3000, "Sequential_Generation": True}
MTT_VALUES = {"soft_label": False, "pix_init": "real", "threshold": None, "Sequential_Generation": False}
IGNORED_IN_DATM_FILES = {"ema_decay": "DATM.py reads it nowhere (give --ema_decay on the command line for FTD's "
                                      "image EMA)"}

# Which flags matter, one list per use, each in its own order. FIXED_ON_RESUME: a flag that defines the saved set is
# fixed on --resume (the first changed is named); any other may change: the new value applies and is logged. RUN_JSON:
# what run.json states for eval.py to evaluate the set as it was distilled (subset and res: ImageNet's alone).
# NOT_THE_RESULT: the flags that leave the result as it is (where it is read and written, how the same gradient is
# computed, what is printed), so that any other flag defines it (the evaluation flags too: they pick images_best.pt).
FIXED_ON_RESUME = {**dict.fromkeys(("dataset", "subset", "res", "model", "zca", "ipc", "texture", "canvas_size",
                                    "pix_init", "soft_label", "Label_Model_Timestamp", "seed", "val_per_class"),
                                   "it defines the saved set"),
    "lr_teacher": "it only sets syn_lr at iteration 0, and a resumed run goes on with its learned syn_lr"}
RUN_JSON = ("dataset", "subset", "res", "model", "ipc", "zca", "texture", "canvas_size", "canvas_samples",
            "dsa_strategy", "soft_label")
NOT_THE_RESULT = {"cfg", "save_path", "buffer_path", "data_path", "device", "deterministic", "resume", "tensorboard",
                  "step_timeout", "low_memory", "chunk_syn", "load_all", "force_save", "verbose", "seed", "batch_real",
                  "lr_init", "augmentation", "datm", "method_defaults"}

DIVERGED = 100  # pixels or label logits beyond 100x their largest initial magnitude mean the run diverged
SAVE_EVERY = 1000  # images_{it}.pt at every evaluation that improves, and every this many iterations
GRID_MAX_IPC = 50  # the original draws no grid from ipc 50 on, unless --force_save
PRINT_EVERY = 10  # iterations between printed loss lines (the bar is on stderr)
momentum = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
seconds = checked(float, lambda v: 0 < v <= 1e9, "a positive number of seconds up to 1e9")


def parse_args(argv=None):
    parser = Parser(__doc__)
    add_common_args(parser)
    flag = parser.add_argument
    flag("--ipc", type=positive_int, default=1, help="synthetic images per class")
    add_eval_flags(parser, "networks trained per model at each evaluation")
    flag("--eval_it", type=positive_int, default=100, help="evaluate every this many iterations (and at 0 and the end)")
    switch(parser, "--skip_first_eva", "no evaluation (nor checkpoint) at iteration 0 (DATM's flag)")
    flag("--Iteration", type=non_negative_int, default=5000, help="distillation iterations")
    flag("--lr_img", type=positive_float, default=1000, help="learning rate of the pixels (SGD, momentum 0.5)")
    flag("--lr_lr", type=non_negative_float, default=1e-05, help="learning rate of syn_lr (SGD, momentum 0.5)")
    flag("--lr_teacher", type=positive_float, default=0.01, help="initial syn_lr (the experts' learning rate)")
    flag("--lr_init", type=float, default=0.01, help="unused (syn_lr starts at --lr_teacher, as in the original)")
    flag("--batch_real", type=int, default=256, help="unused; kept so the original's commands run")
    flag("--batch_syn", type=positive_int, help="student minibatch (default: the whole synthetic set)")
    # default one chunk: on the CPU it was slow only as glibc unmapped freed activations (utils.keep_freed_memory)
    flag("--chunk_syn", type=positive_int, help="student images per forward/backward pass; a minibatch (or its "
         "torchrun share) is computed in chunks of this many and their updates summed: the same update, with the "
         "memory of one chunk in the --low_memory replay (default: the whole minibatch at once)")
    flag("--pix_init", choices=["real", "noise", "samples_predicted_correctly"], help="initial images: random real "
         "ones, N(0,1) noise, or (DATM) real ones an expert classifies correctly (default: real; "
         "samples_predicted_correctly with DATM's flags)")
    flag("--buffer_path", default="./buffers", type=folder_path,
         help="the --buffer_path buffer.py trained the experts into")
    flag("--expert_epochs", type=positive_int, default=3, help="expert epochs the student must cover")
    flag("--syn_steps", type=positive_int, default=20, help="student steps per iteration")
    flag("--max_start_epoch", type=positive_int, default=25, help="start epochs are drawn from [0, this)")
    switch(parser, "--load_all", "read the experts into RAM instead of memory-mapping them")
    switch(parser, "--no_aug", "no DSA inside the unroll (evaluations keep --dsa)")
    switch(parser, "--texture", "learn canvases and train on random toroidal crops of them")
    flag("--canvas_size", type=positive_int, default=2, help="canvas side in images (texture)")
    flag("--canvas_samples", type=positive_int, default=1, help="crops per canvas per step (texture)")
    flag("--max_files", type=positive_int, help="a random subset (seeded) of this many buffer files (default: all)")
    flag("--max_experts", type=positive_int, help="the first this many experts of each buffer file (default: all)")
    switch(parser, "--force_save", f"write the PNG grid even when ipc >= {GRID_MAX_IPC}")
    switch(parser, "--low_memory", "the same gradient by reverse replay: memory of one student step plus the stored "
           "parameter vectors (default: the full unroll where its forecast peak fits in the free memory, else the "
           "replay; --low_memory False forces the unroll)", default=None)
    flag("--save_path", type=folder_path, help="output folder (default: logged_files/{dataset}/{run name})")
    switch(parser, "--resume", "continue the run in --save_path from its checkpoint (from iteration 0 if it has "
                               "none); new learning rates and other changeable flags apply")
    flag("--val_per_class", type=non_negative_int, default=0, help="hold out this many real training images per class "
         "(seeded) and pick 'best' on them, not on the test set (0: as the original)")
    switch(parser, "--tensorboard", "also log the curves and image grids for TensorBoard, in {save_path}/tensorboard "
                                    "(needs the tensorboard package)")
    flag("--step_timeout", type=seconds, default=parallel.STEP_TIMEOUT.total_seconds(),
         help="torchrun: seconds a training step's collective waits for the other processes before the job "
              "stops with a line naming the one that stopped answering (evaluations may wait 2 hours)")
    datm = parser.add_argument_group("DATM (any of these turns DATM's defaults on)").add_argument
    switch(parser, "--soft_label", "learn soft labels (label logits) too (default: False; True with DATM's flags)",
           default=None)
    datm("--Label_Model_Timestamp", type=int,
         help="expert snapshot that classifies (pix_init) and labels the images (default -1: the last)")
    datm("--lr_y", type=positive_float, help="learning rate of the label logits (default 2.0)")
    datm("--Momentum_y", type=momentum, help="momentum of the label logits (default 0.9)")
    datm("--threshold", type=positive_float, help="skip the update of an iteration whose matching loss exceeds this "
         "(default 1.0)")
    datm("--min_start_epoch", type=non_negative_int, help="lowest start epoch (default 0)")
    datm("--current_max_start_epoch", type=positive_int, help="upper end of the start-epoch window at iteration 0 "
         "(default 20)")
    datm("--expansion_end_epoch", type=positive_int, help="iteration at which the window reaches --max_start_epoch "
         "(default 3000)")
    datm("--Sequential_Generation", type=boolean, metavar="{True,False}",
         help="grow the start-epoch window with the iterations (default True)")
    parser.add_argument_group("FTD").add_argument("--ema_decay", type=fraction, nargs="?", const=0.999, help="keep "
         "an EMA of the images with this decay (0.999 if no value), evaluated and saved beside them (default: none, "
         "no EMA)")
    args = parse(parser, argv, ignore=lambda values: IGNORED_IN_DATM_FILES if uses_datm(values.get) else {})
    args.datm = uses_datm(lambda name: getattr(args, name))
    take_defaults(args, DATM_DEFAULTS, MTT_VALUES, args.datm, "DATM's defaults (a DATM flag is given)")
    if args.save_path is None:
        args.save_path = os.path.join("logged_files", args.dataset, run_name(args))
    # the checks that involve several flags, before any file or folder is read or made
    if args.tensorboard and not installed("tensorboard"):
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (curves.png is "
                         "written without it)")
    if not installed("matplotlib"):
        say("matplotlib is not installed: no curves.png (pip install matplotlib); log.jsonl holds the same figures")
    channel, (h, w), num_classes = DATASETS[args.dataset].shape(args.res)
    tiles = args.canvas_size if args.texture else 1
    check_room(3 * 4 * args.ipc * num_classes * channel * h * w * tiles * tiles,  # images, gradient, momentum
               f"--ipc {args.ipc}'s synthetic set" + f" of --canvas_size {tiles} canvases" * args.texture + " needs",
               torch.device("cpu"))
    if args.texture and args.zca:
        raise UsageError("--texture cannot be combined with --zca (the original does not support it either)")
    if not args.min_start_epoch < min(args.max_start_epoch, start_epoch_window(args, 0)[1]):
        raise UsageError(f"--min_start_epoch {args.min_start_epoch} leaves no start epoch below "
                         f"--max_start_epoch / --current_max_start_epoch")
    if parallel.launched() and "BN" in args.model:
        raise UsageError(f"--model {args.model} under torchrun: batch norm couples the images of a minibatch, "
                         f"which the processes split; distill with the instance-norm model (the original "
                         f"evaluates BN runs with it too)")
    return args


def uses_datm(value):
    """Whether any DATM flag has a value MTT does not have; value(name) is the flag's value or None."""
    return any(value(name) not in (None, MTT_VALUES.get(name)) for name in DATM_DEFAULTS)


def run_name(args):
    """The default folder name: the flags a sweep varies, so that two runs of a sweep never meet."""
    return "_".join([args.model, f"ipc{args.ipc}", f"syn{args.syn_steps}", f"exp{args.expert_epochs}",
                     f"max{args.max_start_epoch}", f"img{args.lr_img:g}", f"lrlr{args.lr_lr:g}",
                     f"teacher{args.lr_teacher:g}", f"batch{args.batch_syn or 'all'}"] + ["zca"] * args.zca
                    + ["texture"] * args.texture + ([f"soft{args.lr_y:g}"] if args.soft_label else [])
                    + ([f"ema{args.ema_decay:g}"] if args.ema_decay is not None else []) + [f"seed{args.seed}"])


class Stopped(UsageError):
    """Training left the range where it means anything, or the memory ran out: one line, with what is kept and how to
    go on. learned: whether a learned value can be the cause (iteration 0's loss and gradients precede any)."""

    def __init__(self, what, args, learned=True, fix="lower --lr_img, --lr_lr or --lr_y"):
        kept = run_folder.last_iteration(args.save_path)
        where = (f"nothing is learned at iteration 0, so the student diverged at its first syn_lr, --lr_teacher "
                 f"{args.lr_teacher:g}: lower it and start again in a new --save_path" if not learned else
                 "nothing was saved yet" if kept is None else
                 f"the checkpoint and sets of iteration {kept} are in {args.save_path}: {fix} and --resume (the new "
                 f"flags apply), or start again")
        super().__init__(f"{what}; stopped: {where}")


@dataclass
class Run:  # what the loop works on, as set_up leaves it
    args: argparse.Namespace
    device: torch.device
    data: Data
    experts: Experts
    net: torch.nn.Module
    synset: SyntheticSet
    optimizers: dict  # learnable tensor's name -> its SGD
    bounds: dict  # learnable tensor's name -> the magnitude past which the run diverged
    ema: "torch.Tensor | None"  # FTD's EMA of the images, or None
    best: dict  # per set and model: the best evaluation so far
    start_it: int
    resumed: bool  # whether start_it's evaluation is the checkpoint's (a resume does not repeat it)
    test: tuple  # (images, labels) on the device
    validation: "tuple | None"
    texture: "tuple | None"  # texture mode: (image size, crops per canvas per step)
    backward: callable  # matching.unroll_backward or replay_backward
    log: run_folder.Log
    skips: int = 0  # DATM's gate: updates skipped in this run
    last: str = ""  # the last iteration's loss and syn_lr, for the bar


def distill(args, device):
    with ExitStack() as run_lock:  # rank 0 holds the run folder's lock while the run lasts
        run = set_up(args, device, run_lock)
        # the bar counts student steps, so that a long iteration moves it too; evaluations are its pauses
        steps = args.syn_steps
        with run.log, progress(total=args.Iteration * steps, initial=run.start_it * steps, desc="distill",
                               unit="step", pauses_left=lambda n: len(evaluations(args, n // steps + 1))) as bar:
            for it in range(run.start_it, args.Iteration + 1):
                if it in evaluations(args, it) and not (run.resumed and it == run.start_it):
                    with bar.pause():
                        evaluate_and_save(run, it)
                if it == args.Iteration:
                    break
                step(run, it, bar)
    picked = "on validation" if args.val_per_class else "on the test set"
    for key, mark in run.best.items():
        say(f"best {key} (picked {picked}): {100 * mark['test_acc_mean']:.2f} +- {100 * mark['test_acc_std']:.2f} "
            f"at iteration {mark['it']}")
    return run.best


def evaluations(args, start):
    """The iterations from `start` on that are evaluated: every eval_it and the last (and 0 unless --skip_first_eva)."""
    every = range(math.ceil(start / args.eval_it) * args.eval_it, args.Iteration + 1, args.eval_it)
    return {it for it in (*every, args.Iteration) if it >= start and not (args.skip_first_eva and it == 0)}


def set_up(args, device, run_lock):
    """The checkpoint to continue from, data, experts, the learnable set and its optimizers, the backward that fits,
    the run folder; bad input on any rank stops every rank here, with one line."""
    save_path = Path(args.save_path)
    new_folder = not save_path.exists()
    state, changes, log_rows = main_decides(lambda: open_run(save_path, args, run_lock))
    with one_verdict():  # no collective inside: a rank that fails goes straight to the verdict
        num_params = check_model(args.model, args.dataset, args.res)  # before any file: a model too deep is one line
        set_seed(args.seed)
        directory = experts_of(args)
        experts = Experts(directory, args.max_files, args.max_experts, args.load_all, args.seed, args.zca)
        check_experts(args, experts, directory, num_params)
        data = get_dataset(args.dataset, args.data_path, args.zca, args.subset, args.res, device)  # the cache: last
        net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
        held_out, pool = validation_split(data, args.val_per_class, args.seed)
        # on the device before the forecast reads the free memory: what they take is not the step's
        test, validation = (data.images_test, data.labels_test), (data.images_train[held_out],
                                                                  data.labels_train[held_out])
        check_room(moving([*test, *validation], device), "the test and validation images need", device)
        test, validation = (tuple(t.to(device) for t in pair) for pair in (test, validation))
        synset = initial_set(args, data, experts, net, pool, device)
        optimizers = {name: torch.optim.SGD([t], *OPTIMIZERS[name](args)) for name, t in synset.tensors.items()}
        bounds = {name: DIVERGED * synset.tensors[name].detach().abs().max().item()
                  for name in ("images", "label_logits") if name in synset.tensors}
        ema = synset.images.detach().clone() if args.ema_decay is not None else None
        best, start_it, ema = ({}, 0, ema) if state is None else restore(state, synset, optimizers, ema, args, device)
        texture = (data.im_size, args.canvas_samples) if args.texture else None
        peak = forecast(net, flatten_params(net).to(device), synset, args.syn_steps,
                        None if args.no_aug else args.augmentation, texture)
        low_memory = choose_backward(args, peak, args.batch_syn or len(synset.labels), free_memory(device))
    low_memory = any(parallel.gather_objects(low_memory))  # the ranks run one backward: the replay if any needs it
    main_decides(lambda: describe_run_folder(save_path, args, data, device, run_lock))
    if state is not None:
        say(f"resumed {save_path} at iteration {start_it}" + "".join(
            f"; --{k} {old} -> {new}" for k, (old, new) in changes.items()))
    elif args.resume:
        say(f"--resume: {'a new folder' if new_folder else 'no checkpoint in'} {save_path}; starting at iteration 0")
    else:
        say(f"distilling into {save_path}")
    parallel.broadcast_([*synset.tensors.values()] + ([ema] if ema is not None else []))
    log = run_folder.Log(save_path, log_rows, is_main(), args.tensorboard)
    if changes:
        log.write(type="resume", it=start_it, changed={k: list(v) for k, v in changes.items()})
    return Run(args, device, data, experts, net, synset, optimizers, bounds, ema, best, start_it, state is not None,
               test, validation if args.val_per_class else None, texture, BACKWARD[low_memory], log)


def evaluate_and_save(run, it):
    """eval.py's protocol on the set and its EMA, by its own random stream, seeded by (seed, it), so that how often we
    evaluate never changes the distilled images; then the files and the checkpoint, committed together (rank 0)."""
    args, synset, ema, data = run.args, run.synset, run.ema, run.data
    variants = {"": synset.images, **({"ema_": ema} if ema is not None else {})}
    pairs = [(EvalSet(f"{prefix}images", images.detach().clone(), synset.eval_labels(), synset.syn_lr.item(),
                      args.epoch_eval_train, args.ipc, run.test, run.texture, run.validation, "learned"), model)
             for prefix, images in variants.items() for model in eval_pool(args.eval_mode, args.model)]
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        rows = evaluate_sets(pairs, data, args.num_eval, run_seed(args.seed, it), args.batch_train, args.augmentation,
                             run.device, args.verbose)
    improved = record(rows, run.best, it, run.log)
    if not is_main():
        return
    zca = data.zca.to(run.device) if data.zca is not None else None
    files = {run_folder.CHECKPOINT: checkpoint(it, synset, run.optimizers, ema, run.best, args, run.device)}
    for prefix, images in variants.items():
        tags = ["best"] * (f"{prefix}images" in improved)
        tags += [it] * bool(tags or it % SAVE_EVERY == 0 or it == args.Iteration)
        files.update(run_folder.set_files(prefix, tags, images, synset.eval_labels(), synset.syn_lr, zca))
        if args.ipc < GRID_MAX_IPC or args.force_save:
            classes = [data.class_names[label] for label in synset.labels.tolist()]
            files[f"{prefix}synthetic_{it}.png"] = run_folder.grid(images, data.to_pixels, args.ipc, classes)
            run.log.image(f"{prefix}images", files[f"{prefix}synthetic_{it}.png"], it)
    if it > 0 and installed("matplotlib"):  # at iteration 0 there is no curve to draw
        files[run_folder.CURVES] = run_folder.curves(run.log.rows)
    run_folder.commit(args.save_path, files, iteration=it)


class Ticking(list):
    """A schedule that moves the bar at each student step (the forward pass of either backward iterates it once; the
    replay's reverse pass does not)."""

    def __init__(self, schedule, bar):
        super().__init__(schedule)
        self.bar = bar

    def __iter__(self):
        for student_step in super().__iter__():
            yield student_step
            self.bar.update()


def step(run, it, bar):
    """One iteration: an expert segment, the student's unroll, the matching loss, the update."""
    args, synset = run.args, run.synset
    start = time.time()
    bar.set_postfix_str(f"it {it + 1}/{args.Iteration}{run.last}")
    theta0, target, expert, start_epoch = draw_segment(run.experts, start_epoch_window(args, it), args.expert_epochs,
                                                       run.device)
    schedule = Ticking(draw_schedule(synset.images, args.syn_steps, args.batch_syn or len(synset.labels),
                                     None if args.no_aug else args.augmentation, run.texture), bar)
    with stalls_are_one_line(), out_of_memory_is_one_line(args):
        loss = run.backward(run.net, synset, theta0, target, schedule, args.chunk_syn).item()
    skipped = args.threshold is not None and loss > args.threshold  # DATM's gate
    for optimizer in run.optimizers.values():
        if not skipped:
            optimizer.step()
    check_diverged(synset, loss, run.bounds, it, args)
    for optimizer in run.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    if run.ema is not None and not skipped:  # FTD's, with no warm-up nor bias correction: it only watches the images
        run.ema.mul_(args.ema_decay).add_(synset.images.detach(), alpha=1 - args.ema_decay)
    lr = synset.syn_lr.item()
    run.log.write(type="iteration", it=it, loss=loss, syn_lr=lr, expert=expert, start_epoch=start_epoch,
                  seconds=time.time() - start, **({"skipped": True} if skipped else {}))
    run.skips += skipped
    gate = f" skipped {run.skips} (loss over --threshold {args.threshold:g})" if args.threshold else ""
    run.last = f" loss {loss:.4f} syn_lr {lr:.5f}{gate}"
    bar.set_postfix_str(f"it {it + 1}/{args.Iteration}{run.last}", refresh=False)
    if it % PRINT_EVERY == 0:
        say(f"it {it:05d}/{args.Iteration} loss {loss:.4f} syn_lr {lr:.5f}{gate}")


@contextmanager
def out_of_memory_is_one_line(args):
    """An allocation that fails in spite of the forecast (a GPU shared with others, RAM taken meanwhile): one line with
    what lowers the peak; the last checkpoint is kept."""
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError on a GPU; the CPU allocator's RuntimeError
        if not any(said in str(err) for said in ("out of memory", "can't allocate memory")):
            raise
        raise Stopped(f"out of memory ({str(err).splitlines()[0][:120]})", args, fix="lower the peak with "
                      "--low_memory, --chunk_syn N or --batch_syn N") from None


def main(argv=None):
    return run_script(parse_args, distill, argv, interrupted=lambda args: run_folder.resume_hint(args.save_path))


def open_run(save_path, args, run_lock):
    """On rank 0, before any data is read: the checkpoint to continue from, the flags --resume changes ({flag: (old,
    new)}; FIXED_ON_RESUME's refused) and the log's rows up to it, or (None, {}, None) to start afresh. The folder is
    locked first (finishing a commit a kill cut short); all the resume reads is checked before anything is written."""
    if not run_folder.check_save_path(save_path, args.resume):
        return None, {}, None
    run_lock.enter_context(run_folder.lock(save_path))
    state = run_folder.read_checkpoint(save_path)
    if args.Iteration < state["iteration"]:
        raise UsageError(f"--Iteration {args.Iteration} is below the iteration the run in {args.save_path} has "
                         f"reached ({state['iteration']}): give {state['iteration']} or more")
    saved = state["args"]
    changes = {k: (saved.get(k), v) for k, v in vars(args).items() if k not in ("resume", "save_path")
               and saved.get(k) != v}
    for name, reason in FIXED_ON_RESUME.items():
        if name in changes:
            old, new = changes[name]
            raise UsageError(f"--resume cannot change --{name} ({old} in the checkpoint, {new} now): {reason}; "
                             f"use the old value or a new --save_path")
    return state, changes, run_folder.read_log(save_path / run_folder.LOG, state["iteration"])


def describe_run_folder(save_path, args, data, device, run_lock):
    """On rank 0, once the set-up has passed every check: the folder made, locked (which clears it of killed runs'
    partial writes) and described: run.json (RUN_JSON, the data's shape, where the run came from), with ZCA zca.pt."""
    make_folder(save_path, "--save_path")
    run_lock.enter_context(run_folder.lock(save_path))
    flags = [flag for flag in RUN_JSON if args.dataset == "ImageNet" or flag not in ("subset", "res")]
    save_json({**{flag: getattr(args, flag) for flag in flags}, "channel": data.channel, "im_size": list(data.im_size),
               "num_classes": data.num_classes, "mean": data.mean, "std": data.std, "processes": parallel.world(),
               **run_folder.run_info(device), "args": vars(args)}, save_path / run_folder.RUN_JSON)
    if data.zca is not None:
        save_torch(data.zca.state_dict(), save_path / run_folder.ZCA_FILE)


def validation_split(data, per_class, seed):
    """per_class real training images of each class held out (drawn by their own generator, so the distillation's
    random stream is untouched): (their indices, a mask of the rest)."""
    keep = torch.ones(len(data.labels_train), dtype=torch.bool)
    held = draw_per_class(data.labels_train, data.num_classes, per_class, seed) if per_class else torch.zeros(
        0, dtype=torch.long)
    keep[held] = False
    return held, keep


def initial_set(args, data, experts, net, pool, device):
    """The SyntheticSet to start from: images by --pix_init, syn_lr = lr_teacher, label logits with --soft_label
    (DATM), from the experts' snapshot at --Label_Model_Timestamp."""
    label_thetas = [experts.snapshot(k, args.Label_Model_Timestamp, device) for k in range(len(experts))
                    if args.soft_label or args.pix_init == "samples_predicted_correctly"]
    images, labels = init_images(data, args.ipc, args.pix_init, args.canvas_size if args.texture else 1, pool,
                                 label_thetas, net)
    images, labels = images.to(device), labels.to(device)
    label_logits = init_label_logits(net, images, labels, label_thetas,
                                     args.pix_init == "samples_predicted_correctly") if args.soft_label else None
    return SyntheticSet(images, labels, torch.tensor(args.lr_teacher, device=device), label_logits)


def init_images(data, ipc, pix_init="real", tiles=1, pool=None, expert_thetas=(), net=None):
    """ipc items per class with labels fixed by class: real images of the class from `pool` (a mask of the training
    set; default all), tiled into tiles x tiles canvases in texture mode, or N(0, 1) noise."""
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    (h, w), c = data.im_size, data.channel
    if pix_init == "noise":
        return torch.randn(len(labels), c, h * tiles, w * tiles), labels
    pool = torch.ones(len(data.labels_train), dtype=torch.bool) if pool is None else pool
    needed, smallest = ipc * tiles * tiles, smallest_class(data.labels_train, data.num_classes, pool)
    if needed > smallest:
        raise UsageError(f"--ipc {ipc} needs {needed} real images per class for --pix_init {pix_init}, but the "
                         f"smallest class has {smallest}" + (" (after --val_per_class)" if not pool.all() else ""))
    chosen = choose_real(data, pool, needed, pix_init, expert_thetas, net)
    images = data.images_train[chosen].view(len(labels), tiles, tiles, c, h, w)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(len(labels), c, h * tiles, w * tiles), labels


def choose_real(data, pool, ipc, pix_init, expert_thetas, net):
    """ipc indices of real training images per class from `pool` (a mask): random ones, or (DATM) the first ipc of a
    random order of the class that the first expert classifies correctly, then the next expert's, and so on."""
    chosen = []
    for label, idx in enumerate(images_per_class(data.labels_train, data.num_classes)):
        idx = idx[pool[idx]]
        order = idx[torch.randperm(len(idx))]
        if pix_init != "samples_predicted_correctly":
            chosen.append(order[:ipc])
            continue
        picked = torch.zeros(len(order), dtype=torch.bool)
        images = data.images_train[order]
        for theta in expert_thetas:
            correct = (predict(net, theta, images.to(theta.device)).argmax(1) == label).cpu()
            new = (correct & ~picked).nonzero().flatten()[:ipc - int(picked.sum())]
            picked[new] = True
            if picked.sum() == ipc:
                break
        if picked.sum() < ipc:
            raise UsageError(f"--pix_init samples_predicted_correctly: the experts classify only {int(picked.sum())} "
                             f"images of class {label} ({data.class_names[label]}) correctly, fewer than --ipc {ipc}")
        chosen.append(order[picked.nonzero().flatten()])
    return torch.cat(chosen)


def init_label_logits(net, images, labels, expert_thetas, filtered):
    """DATM's initial label logits: the raw logits (no softmax) of the experts, averaged over those that classify the
    image correctly (filtered), or of the first expert alone."""
    if not filtered:
        return predict(net, expert_thetas[0], images)
    total, count = 0, 0
    for theta in expert_thetas:
        logits = predict(net, theta, images)
        correct = (logits.argmax(1) == labels).unsqueeze(1)
        total, count = total + logits * correct, count + correct
    return total / count.clamp_min(1)


# Learnable tensor -> (its learning rate, its momentum), from the flags; 0.5 is the original's momentum.
OPTIMIZERS = {"images": lambda args: (args.lr_img, 0.5), "syn_lr": lambda args: (args.lr_lr, 0.5),
              "label_logits": lambda args: (args.lr_y, args.Momentum_y)}


def start_epoch_window(args, it):
    """[low, high) of the start epochs drawn at iteration it: MTT's [0, max_start_epoch), or DATM's window, whose
    upper end grows from current_max_start_epoch to max_start_epoch by expansion_end_epoch iterations."""
    high = args.max_start_epoch
    if args.Sequential_Generation:
        grown = int((args.max_start_epoch - args.current_max_start_epoch) * it / args.expansion_end_epoch)
        high = min(high, args.current_max_start_epoch + grown)
    return args.min_start_epoch, high


def draw_segment(experts, window, expert_epochs, device):
    """A random expert and start epoch t in the window: its parameters at t and t + expert_epochs."""
    expert = torch.randint(len(experts), ()).item()
    start = torch.randint(*window, ()).item()
    theta0, target = (experts.snapshot(expert, epoch, device) for epoch in (start, start + expert_epochs))
    if not (theta0.isfinite().all() and target.isfinite().all()):
        raise UsageError(f"expert {expert} of the buffer holds non-finite parameters at epoch {start} or "
                         f"{start + expert_epochs}: it diverged when buffer.py trained it; retrain it")
    if torch.equal(theta0, target):
        raise UsageError(f"expert {expert} has the same parameters at epochs {start} and {start + expert_epochs}: "
                         f"its snapshots are copies of one another (the original's buffer.py on a CPU saves aliases); "
                         f"retrain it with buffer.py")
    return theta0, target, expert, start


def check_experts(args, experts, directory, num_params):
    meta, length = experts.meta, experts.num_snapshots
    expected = {"model": args.model, "dataset": args.dataset, "zca": args.zca, "num_params": num_params}
    for key, value in expected.items():
        if meta.get(key) != value:
            elsewhere = buffer_dir("BUFFERS", args.dataset, args.model, args.zca, args.subset, args.res)
            raise UsageError(f"{directory} holds experts with {key} {meta.get(key)!r} but this run needs {value!r}: "
                             f"train matching ones into another folder, {fill_command(elsewhere, args.zca)}, and "
                             f"distill with --buffer_path BUFFERS")
    if args.max_start_epoch + args.expert_epochs > length:
        raise UsageError(f"--max_start_epoch {args.max_start_epoch} + --expert_epochs {args.expert_epochs} "
                         f"goes beyond the experts' {length} snapshots (epochs 0..{length - 1})")
    if not -length <= args.Label_Model_Timestamp < length:
        raise UsageError(f"--Label_Model_Timestamp {args.Label_Model_Timestamp}: the experts have {length} snapshots")


def check_diverged(synset, loss, bounds, it, args):
    """After the update, before anything is saved: a non-finite loss, gradient or value, a learnable tensor beyond
    DIVERGED x its largest initial magnitude, or a syn_lr no longer positive stop the run."""
    if not math.isfinite(loss):
        raise Stopped(f"the matching loss became {loss} at iteration {it}", args, learned=it > 0)
    for name, tensor in synset.tensors.items():
        if tensor.grad is not None and not tensor.grad.isfinite().all():
            raise Stopped(f"the gradient of {name} became non-finite at iteration {it}", args, learned=it > 0)
        if not tensor.isfinite().all():
            raise Stopped(f"{name} became non-finite at iteration {it}", args)
        largest = tensor.detach().abs().max().item()
        if name in bounds and largest > bounds[name]:
            raise Stopped(f"{name} reached {largest:.3g} at iteration {it}, over {DIVERGED}x its largest initial "
                           f"value ({bounds[name] / DIVERGED:.3g})", args)
    if not synset.syn_lr.item() > 0:
        raise Stopped(f"syn_lr became {synset.syn_lr.item():.3g} at iteration {it}", args)


def record(rows, best, it, log):
    """Update `best` (per set and model, on validation if any) and report the rows; the sets that improved."""
    improved = set()
    for row in rows:
        key = row["model"] + (" EMA" if row["set"] == "ema_images" else "")
        score = row.get("val_acc_mean", row["test_acc_mean"])
        if key not in best or score > best[key]["score"]:
            best[key] = {"score": score, "it": it, **{k: row[k] for k in ("test_acc_mean", "test_acc_std")}}
            improved.add(row["set"])
        mark, picked = best[key], "validation" if "val_acc_mean" in row else "test"
        validation = f", validation {100 * row['val_acc_mean']:.2f}" if "val_acc_mean" in row else ""
        say(f"it {it} {key}: test acc {100 * row['test_acc_mean']:.2f} +- {100 * row['test_acc_std']:.2f}"
            f"{validation} (final); best on {picked}: test acc {100 * mark['test_acc_mean']:.2f} +- "
            f"{100 * mark['test_acc_std']:.2f} at it {mark['it']}")
        log.write(type="evaluation", it=it, set=row["set"], model=row["model"], test_acc_mean=row["test_acc_mean"],
                  test_acc_std=row["test_acc_std"], val_acc_mean=row.get("val_acc_mean"),
                  best_picked_on=picked, best_test_acc_mean=mark["test_acc_mean"],
                  best_test_acc_std=mark["test_acc_std"], best_it=mark["it"], syn_lr=row["lr"])
    return improved


def checkpoint(it, synset, optimizers, ema, best, args, device):
    """Everything --resume needs to continue bit for bit. `best` and the flags go through JSON: pickle writes a string
    two of them share as one object, so the file's bytes would depend on where each string came from (a resume's)."""
    plain = lambda value: json.loads(json.dumps(value))
    return {"iteration": it, "tensors": {k: t.detach().cpu() for k, t in synset.tensors.items()},
            "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
            "ema": None if ema is None else ema.cpu(), "best": plain(best), "args": plain(vars(args)),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore(state, synset, optimizers, ema, args, device):
    """Load a checkpoint into the set, the optimizers (the flags' learning rates and momenta over the saved ones) and
    the random stream: (best, the iteration, the EMA); one that does not fit this run is one line."""
    unfit = lambda what: UsageError(f"the checkpoint in {args.save_path} does not fit this run: {what}; "
                                    f"{run_folder.START_AGAIN}")
    saved, wanted = ({name: tuple(t.shape) for name, t in held.items()} for held in (state["tensors"], synset.tensors))
    if saved != wanted or set(state["optimizers"]) != set(optimizers):
        raise unfit(f"it holds {saved} and optimizers for {sorted(state['optimizers'])}, this run {wanted}")
    with torch.no_grad():
        for name, tensor in synset.tensors.items():
            tensor.copy_(state["tensors"][name])
    try:
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            buffers = [s["momentum_buffer"] for s in optimizer.state.values() if s.get("momentum_buffer") is not None]
            if any(b.shape != synset.tensors[name].shape for b in buffers):
                raise ValueError(f"a momentum of {name} of another shape")
            for group in optimizer.param_groups:
                group.update(zip(("lr", "momentum"), OPTIMIZERS[name](args)))
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    except (ValueError, KeyError, RuntimeError) as err:
        raise unfit(str(err).splitlines()[0]) from err
    if ema is not None:
        saved_ema = state["ema"]
        if saved_ema is not None and saved_ema.shape != synset.images.shape:
            raise unfit(f"EMA images of shape {tuple(saved_ema.shape)}")
        ema = (synset.images.detach() if saved_ema is None else saved_ema).to(device).clone()
    return state["best"], state["iteration"], ema


if __name__ == "__main__":
    run_and_exit(main)
