"""Distill a dataset by matching training trajectories (Cazenavette et al., CVPR 2022).

A small synthetic set and a learnable learning rate syn_lr are trained so that syn_steps SGD
steps on the synthetic set, started from an expert's parameters at epoch t, land close to
where the expert was at epoch t + expert_epochs. Experts come from buffer.py:

    python buffer.py --dataset CIFAR10 --zca
    python distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30 --expert_epochs 2 \\
        --max_start_epoch 20 --lr_img 100 --lr_lr 1e-05 --lr_teacher 0.001 --zca

--low_memory computes the same gradient by replaying the unroll backwards one step at a time,
so memory no longer grows with syn_steps.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from buffer import expert_files, read_sidecar
from networks import flatten_params, forward_flat, get_network
from utils import (UsageError, add_common_args, apply_augmentation, atomic_path, buffer_dir, draw_augmentation,
                   draw_texture_crops, eta, eval_pool, EvalSet, evaluate_sets, get_dataset, images_per_class,
                   pick_device,
                   require_positive, run_seed, save_json, set_seed, texture_crops)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--ipc", type=int, default=1, help="synthetic images per class")
    parser.add_argument("--eval_mode", default="S", help="models to evaluate with: S, C, M, W, D, A, P, N")
    parser.add_argument("--num_eval", type=int, default=5, help="networks trained per evaluation")
    parser.add_argument("--eval_it", type=int, default=100, help="evaluate every this many iterations")
    parser.add_argument("--epoch_eval_train", type=int, default=1000, help="epochs of each evaluation training")
    parser.add_argument("--Iteration", type=int, default=5000, help="distillation iterations")
    parser.add_argument("--lr_img", type=float, default=1000, help="learning rate of the synthetic pixels")
    parser.add_argument("--lr_lr", type=float, default=1e-05, help="learning rate of syn_lr")
    parser.add_argument("--lr_teacher", type=float, default=0.01, help="initial syn_lr (the experts' lr)")
    parser.add_argument("--batch_real", type=int, default=256, help="unused; kept so the original's commands run")
    parser.add_argument("--batch_syn", type=int, default=None, help="student minibatch (default: the whole set)")
    parser.add_argument("--pix_init", default="real", choices=["real", "noise"])
    parser.add_argument("--buffer_path", default="./buffers")
    parser.add_argument("--expert_epochs", type=int, default=3, help="expert epochs the student must cover")
    parser.add_argument("--syn_steps", type=int, default=20, help="student steps per iteration")
    parser.add_argument("--max_start_epoch", type=int, default=25, help="start epochs are drawn from [0, this)")
    parser.add_argument("--load_all", action="store_true", help="read every expert into RAM instead of mapping")
    parser.add_argument("--no_aug", nargs="?", const=True, default=False, type=lambda s: s.lower() in ("true", "1"),
                        help="no DSA inside the unroll")
    parser.add_argument("--texture", action="store_true", help="learn canvases and train on random crops")
    parser.add_argument("--canvas_size", type=int, default=2, help="canvas side in images (texture)")
    parser.add_argument("--canvas_samples", type=int, default=1, help="crops per canvas per step (texture)")
    parser.add_argument("--max_files", type=int, default=None, help="use only the first this many buffer files")
    parser.add_argument("--max_experts", type=int, default=None, help="use only this many experts per file")
    parser.add_argument("--force_save", action="store_true", help="write the PNG grid even when ipc >= 50")
    parser.add_argument("--low_memory", action="store_true",
                        help="exact gradient by reverse replay: memory of one student step, not syn_steps")
    parser.add_argument("--save_path", default=None, help="default: logged_files/{dataset}/{run name}")
    parser.add_argument("--resume", action="store_true", help="continue from save_path/checkpoint.pt")
    args = parser.parse_args(argv)
    if args.save_path is None:
        name = (f"{args.model}_ipc{args.ipc}_syn{args.syn_steps}_exp{args.expert_epochs}_max{args.max_start_epoch}"
                f"{'_zca' if args.zca else ''}{'_texture' if args.texture else ''}_seed{args.seed}")
        args.save_path = os.path.join("logged_files", args.dataset, name)
    return args


class Diverged(RuntimeError):
    """The loss or syn_lr left the range where training means anything."""


# ---------------------------------------------------------------------------------------------
# Experts


class Experts:
    """The trajectories of buffer.py, memory-mapped: an iteration reads only its two snapshots.

    --max_experts caps the experts per file, or in all with --load_all (as in the original)."""

    def __init__(self, directory, max_files=None, max_experts=None, load_all=False):
        self.meta = read_sidecar(directory)
        arrays = [np.load(path, mmap_mode=None if load_all else "r") for path in expert_files(directory)[:max_files]]
        if not arrays:
            raise UsageError(f"no replay_buffer_*.npy files in {directory}: run buffer.py first")
        if load_all:
            arrays = [np.concatenate(arrays)[:max_experts]]
        self.trajectories = [(array, i) for array in arrays for i in range(len(array[:max_experts]))]
        self.num_snapshots = arrays[0].shape[1]

    def sample(self, max_start_epoch, expert_epochs, device):
        """A random expert and start epoch t: its parameters at t and at t + expert_epochs."""
        expert = torch.randint(len(self.trajectories), ()).item()
        start = torch.randint(max_start_epoch, ()).item()
        array, i = self.trajectories[expert]
        snapshot = lambda epoch: torch.from_numpy(np.array(array[i, epoch])).to(device)
        return snapshot(start), snapshot(start + expert_epochs), expert, start


# ---------------------------------------------------------------------------------------------
# The student unroll and its two exact backward passes


@dataclass
class Step:
    """One student update's minibatch: which items, their texture crops and their DSA draw, kept
    so that the low-memory backward rebuilds exactly the batch the forward used."""
    indices: torch.Tensor
    labels: torch.Tensor
    augmentation: list = field(default_factory=list)
    crops: torch.Tensor = None  # texture mode: toroidal offsets, one row per crop
    crop_size: tuple = None

    def images(self, synthetic):
        x = synthetic[self.indices]
        if self.crops is not None:
            x = texture_crops(x, self.crops, self.crop_size)
        return apply_augmentation(x, self.augmentation)


@torch.no_grad()
def draw_schedule(synthetic, labels, syn_steps, batch_syn, dsa_strategy=None, texture=None):
    """syn_steps minibatches: a random permutation of the set (from the CPU generator) cut into
    chunks of batch_syn, taken from the last, redrawn when used up: the original's order.
    texture = (crop size, crops per canvas); dsa_strategy None: no DSA."""
    schedule, chunks = [], []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(len(labels)).to(labels.device).split(batch_syn))
        indices = chunks.pop()
        step = Step(indices, labels[indices])
        shape = (len(indices), *synthetic.shape[1:])
        if texture is not None:
            step.crop_size, samples = texture
            step.crops = draw_texture_crops(synthetic[indices], samples)
            step.labels = step.labels.repeat(samples)
            shape = (len(step.crops), synthetic.shape[1], *step.crop_size)
        if dsa_strategy:
            template = torch.empty(shape, device=synthetic.device, dtype=synthetic.dtype)
            step.augmentation = draw_augmentation(template, dsa_strategy)
        schedule.append(step)
    return schedule


def student_gradient(net, theta, synthetic, step, create_graph):
    loss = F.cross_entropy(forward_flat(net, theta, step.images(synthetic)), step.labels)
    return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


def unroll_backward(net, synthetic, syn_lr, theta0, target, schedule):
    """Matching loss ||theta_N - theta*||^2 / ||theta_0 - theta*||^2 of the unrolled student,
    backpropagated through every step at once (memory grows with syn_steps). Fills .grad."""
    theta = theta0.detach().requires_grad_()
    for step in schedule:
        theta = theta - syn_lr * student_gradient(net, theta, synthetic, step, create_graph=True)
    loss = (theta - target).square().sum() / (theta0 - target).square().sum()
    loss.backward()
    return loss.detach()


def replay_backward(net, synthetic, syn_lr, theta0, target, schedule):
    """The same loss and exactly the same gradient, computed in reverse one step at a time.

    Forward without graphs, keeping only theta_0..theta_N. Then with lam = dL/dtheta_{i+1},
    step i (theta_{i+1} = theta_i - syn_lr * g_i) contributes -lam.g_i to dL/dsyn_lr and
    -syn_lr (dg_i/dX)^T lam to dL/dX, and passes back lam - syn_lr H_i lam: both products come
    from one backward of lam.g_i through step i's rebuilt graph. Fills .grad."""
    lr = syn_lr.detach()
    thetas = [theta0.detach()]
    for step in schedule:
        theta = thetas[-1].detach().requires_grad_()
        thetas.append((theta - lr * student_gradient(net, theta, synthetic.detach(), step, False)).detach())
    distance = (theta0 - target).square().sum()
    lam = 2 * (thetas[-1] - target) / distance
    grad_images, grad_lr = torch.zeros_like(synthetic), torch.zeros_like(lr)
    for theta, step in zip(reversed(thetas[:-1]), reversed(schedule)):
        theta = theta.detach().requires_grad_()
        g = student_gradient(net, theta, synthetic, step, create_graph=True)
        hessian_lam, images_lam = torch.autograd.grad(g @ lam, (theta, synthetic))
        grad_lr -= g.detach() @ lam
        grad_images -= lr * images_lam
        lam = lam - lr * hessian_lam
    for tensor, grad in ((synthetic, grad_images), (syn_lr, grad_lr)):
        tensor.grad = grad if tensor.grad is None else tensor.grad + grad
    return (thetas[-1] - target).square().sum() / distance


BACKWARD = {False: unroll_backward, True: replay_backward}


# ---------------------------------------------------------------------------------------------
# Set-up, outputs and the main loop


def init_synthetic(data, ipc, pix_init, texture, canvas_size):
    """ipc items per class, labels fixed by class: random real images of the class (tiled into
    canvas_size x canvas_size canvases in texture mode) or N(0, 1) noise."""
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    tiles = canvas_size if texture else 1
    (h, w), c = data.im_size, data.channel
    if pix_init == "noise":
        return torch.randn(len(labels), c, h * tiles, w * tiles), labels
    per_class = images_per_class(data.labels_train, data.num_classes)
    needed = ipc * tiles * tiles
    smallest = min(len(idx) for idx in per_class)
    if needed > smallest:
        raise UsageError(f"--ipc {ipc} needs {needed} real images per class for --pix_init real, "
                         f"but the smallest class has {smallest}")
    chosen = torch.cat([idx[torch.randperm(len(idx))[:needed]] for idx in per_class])
    images = data.images_train[chosen].view(len(labels), tiles, tiles, c, h, w)
    return images.permute(0, 3, 1, 4, 2, 5).reshape(len(labels), c, h * tiles, w * tiles), labels


def check_experts(args, experts, num_params):
    meta, length = experts.meta, experts.num_snapshots
    expected = {"model": args.model, "dataset": args.dataset, "zca": args.zca, "num_params": num_params}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UsageError(f"the buffers hold {key} {meta.get(key)!r} but this run needs {value!r}: "
                             f"train matching experts with buffer.py")
    if args.max_start_epoch + args.expert_epochs > length:
        raise UsageError(f"--max_start_epoch {args.max_start_epoch} + --expert_epochs {args.expert_epochs} "
                         f"goes beyond the experts' {length} snapshots (epochs 0..{length - 1})")


def check_args(args):
    if args.texture and args.zca:
        raise UsageError("--texture cannot be combined with --zca (the original does not support it either)")
    require_positive(args, "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "eval_it", "num_eval",
                     "canvas_size", "canvas_samples")


def save_grid(images, path, data, ipc):
    """One row per class, de-whitened or de-normalised and clipped to [0, 1]."""
    grid = torchvision.utils.make_grid(data.to_pixels(images).clamp(0, 1), nrow=ipc, padding=1)
    with atomic_path(path) as tmp:
        torchvision.utils.save_image(grid, tmp, format="png")


def save_tensor(tensor, path):
    with atomic_path(path) as tmp:
        torch.save(tensor.detach().cpu(), tmp)


class Log:
    """log.jsonl: one line per iteration and per evaluated model. On resume, lines after the
    checkpoint are dropped so the log reads as one uninterrupted run."""

    def __init__(self, path, resume_iteration=None):
        self.path = path
        if resume_iteration is not None and os.path.exists(path):
            rows = [json.loads(line) for line in open(path)]
            keep = [row for row in rows if row["it"] < resume_iteration
                    or (row["it"] == resume_iteration and row["type"] == "evaluation")]
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in keep)
        elif os.path.exists(path):
            os.remove(path)

    def write(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate(images, labels, syn_lr, data, test_images, args, it, device):
    """eval.py's protocol on the current set: (mean, std) test accuracy per model of the pool.
    It runs on its own RNG stream, seeded by (seed, it), so how often we evaluate never changes
    the distilled images."""
    texture = (data.im_size, args.canvas_samples) if args.texture else None
    train_set = EvalSet(f"it {it}", images.detach().clone(), labels, syn_lr.item(), args.epoch_eval_train, args.ipc,
                        (test_images, data.labels_test), texture)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        rows = evaluate_sets([(train_set, model) for model in eval_pool(args.eval_mode, args.model)], data,
                             args.num_eval, run_seed(args.seed, it), args.batch_train,
                             args.dsa_strategy if args.dsa else None, device)
    return {row["model"]: (row["test_acc_mean"], row["test_acc_std"]) for row in rows}


def save_checkpoint(path, it, images, syn_lr, optimizers, best, device):
    """Everything --resume needs to continue bit for bit, written atomically."""
    with atomic_path(path) as tmp:
        torch.save({"iteration": it, "images": images.detach().cpu(), "syn_lr": syn_lr.detach().cpu(),
                    "optimizers": [opt.state_dict() for opt in optimizers], "best": best,
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, tmp)


def load_checkpoint(path, images, syn_lr, optimizers, device):
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        images.copy_(state["images"])
        syn_lr.copy_(state["syn_lr"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(opt_state)
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state["rng_cuda"] is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return state["best"], state["iteration"]


def save_outputs(save_path, it, tags, images, labels, syn_lr, data, zca, args):
    """The original's files (images_{tag}.pt, labels_{tag}.pt, images_zca_{tag}.pt) plus
    syn_lr_{tag}.pt, and a PNG grid of the images."""
    for tag in tags:
        for name, tensor in (("images", images), ("labels", labels), ("syn_lr", syn_lr)):
            save_tensor(tensor, save_path / f"{name}_{tag}.pt")
        if zca is not None:
            save_tensor(zca.inverse(images.detach()), save_path / f"images_zca_{tag}.pt")
    if args.ipc < 50 or args.force_save:
        save_grid(images.detach().cpu(), save_path / f"synthetic_{it}.png", data, args.ipc)


def write_run_json(path, args, data):
    """What eval.py needs to evaluate the set as it was distilled."""
    save_json({"dataset": args.dataset, "subset": args.subset, "res": args.res, "model": args.model,
                "ipc": args.ipc, "zca": args.zca, "texture": args.texture, "canvas_size": args.canvas_size,
                "canvas_samples": args.canvas_samples, "channel": data.channel, "im_size": list(data.im_size),
                "num_classes": data.num_classes, "mean": data.mean, "std": data.std,
                "dsa_strategy": args.dsa_strategy, "args": vars(args)}, path)


def distill(args):
    check_args(args)
    device = pick_device(args.device)
    set_seed(args.seed)
    save_path = Path(args.save_path)
    checkpoint_path = save_path / "checkpoint.pt"
    if checkpoint_path.exists() and not args.resume:
        raise UsageError(f"{save_path} already holds a run: pass --resume to continue it or choose --save_path")
    if args.resume and not checkpoint_path.exists():
        raise UsageError(f"--resume: no checkpoint in {save_path}")
    data = get_dataset(args.dataset, args.data_path, args.zca, args.subset, args.res)
    experts = Experts(buffer_dir(args.buffer_path, args.dataset, args.model, args.zca, args.subset, args.res),
                      args.max_files, args.max_experts, args.load_all)
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    check_experts(args, experts, flatten_params(net).numel())

    images, labels = init_synthetic(data, args.ipc, args.pix_init, args.texture, args.canvas_size)
    images, labels = images.to(device).requires_grad_(), labels.to(device)
    syn_lr = torch.tensor(args.lr_teacher, device=device).requires_grad_()
    optimizers = (torch.optim.SGD([images], lr=args.lr_img, momentum=0.5),
                  torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5))
    best, start_it = {}, 0
    if args.resume:
        best, start_it = load_checkpoint(checkpoint_path, images, syn_lr, optimizers, device)
        print(f"resumed {save_path} at iteration {start_it}")
    save_path.mkdir(parents=True, exist_ok=True)
    log = Log(save_path / "log.jsonl", start_it if args.resume else None)
    zca = data.zca.to(device) if data.zca is not None else None
    if zca is not None:
        data.zca.save(save_path / "zca.pt")
    write_run_json(save_path / "run.json", args, data)

    test_images = data.images_test.to(device)
    batch_syn = args.batch_syn or len(labels)
    dsa_strategy = args.dsa_strategy if args.dsa and not args.no_aug else None
    texture = (data.im_size, args.canvas_samples) if args.texture else None
    backward = BACKWARD[args.low_memory]
    train_seconds = 0.0  # the ETA counts distillation steps only: evaluations come in bursts
    for it in range(start_it, args.Iteration + 1):
        if (it % args.eval_it == 0 or it == args.Iteration) and not (args.resume and it == start_it):
            results = evaluate(images, labels, syn_lr, data, test_images, args, it, device)
            improved = [model for model, (mean, _) in results.items() if model not in best or mean > best[model][0]]
            best.update({model: (*results[model], it) for model in improved})
            for model, (mean, std) in results.items():
                print(f"it {it} {model}: test acc {100 * mean:.2f} +- {100 * std:.2f} (final); "
                      f"best {100 * best[model][0]:.2f} +- {100 * best[model][1]:.2f} at it {best[model][2]}")
                log.write(type="evaluation", it=it, model=model, test_acc_mean=mean, test_acc_std=std,
                          best_test_acc_mean=best[model][0], best_test_acc_std=best[model][1],
                          best_it=best[model][2], syn_lr=syn_lr.item())
            tags = (["best"] if improved else []) + ([it] if improved or it % 1000 == 0 or it == args.Iteration else [])
            save_outputs(save_path, it, tags, images, labels, syn_lr, data, zca, args)
            save_checkpoint(checkpoint_path, it, images, syn_lr, optimizers, best, device)
        if it == args.Iteration:
            break

        step_start = time.time()
        theta0, target, expert, start_epoch = experts.sample(args.max_start_epoch, args.expert_epochs, device)
        schedule = draw_schedule(images, labels, args.syn_steps, batch_syn, dsa_strategy, texture)
        loss = backward(net, images, syn_lr, theta0, target, schedule).item()
        if not math.isfinite(loss):
            raise Diverged(f"the matching loss became {loss} at iteration {it}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        lr = syn_lr.item()
        if not lr > 0:
            raise Diverged(f"syn_lr became {lr:.3g} at iteration {it}")
        seconds = time.time() - step_start
        train_seconds += seconds
        log.write(type="iteration", it=it, loss=loss, syn_lr=lr, expert=expert, start_epoch=start_epoch,
                  seconds=seconds)
        if it % 10 == 0:
            done = it + 1 - start_it
            print(f"it {it:05d}/{args.Iteration} loss {loss:.4f} syn_lr {lr:.5f} "
                  f"{done / train_seconds:.2f} it/s {eta(train_seconds, done, args.Iteration - start_it)}")
    return best


def main(argv=None):
    args = parse_args(argv)
    try:
        best = distill(args)
    except UsageError as err:
        sys.exit(f"error: {err}")
    except Diverged as err:
        sys.exit(f"error: {err}; stopped. The last checkpoint and images are in {args.save_path}: "
                 f"lower --lr_img or --lr_lr and --resume, or start again")
    for model, (mean, std, it) in best.items():
        print(f"best {model}: {100 * mean:.2f} +- {100 * std:.2f} at iteration {it}")


if __name__ == "__main__":
    main()
