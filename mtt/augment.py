"""Differentiable Siamese augmentation (DSA, Zhao and Bilen 2021) and texture crops.

draw_augmentation draws random parameters ((op, tensor) pairs, one draw per image), apply_augmentation applies them
differentiably in the pixels: apart, so that matching.py's low-memory replay repeats a step's exact augmentation. Each
op draws from the original DiffAugment's generator in its order (scale and rotate: the CPU's, moved to the images'
device; flip, colour, crop and cutout: the images' device's), so a seeded run draws what the original does, GPU too."""
import math
from functools import partial

import torch
import torch.nn.functional as F

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DSA_PARAMS = dict(flip=0.5, scale=1.2, rotate=15.0, crop=0.125, cutout=0.5, brightness=1.0, saturation=2.0,
                  contrast=0.5)
DSA_GROUPS = {"color": ("brightness", "saturation", "contrast"), "crop": ("crop",), "cutout": ("cutout",),
              "flip": ("flip",), "scale": ("scale",), "rotate": ("rotate",)}


def strategy_groups(strategy):
    """The groups of a --dsa_strategy string ([] for none); a ValueError names unknown ones."""
    if strategy in ("", "none", "None"):
        return []
    groups = strategy.split("_")
    if unknown := set(groups) - set(DSA_GROUPS):
        raise ValueError(f"unknown DSA op(s) {', '.join(sorted(unknown))}; choose from {', '.join(DSA_GROUPS)}")
    return groups


def draw_augmentation(x, strategy=DSA_STRATEGY):
    """Random DSA parameters for x: one group of the strategy at random (the original's mode 'S'), a draw per image."""
    groups = strategy_groups(strategy)
    if not groups:
        return []
    group = groups[torch.randint(len(groups), ()).item()]
    return [(op, DSA_OPS[op][0](len(x), x)) for op in DSA_GROUPS[group]]


def apply_augmentation(x, draw):
    for op, params in draw:
        x = DSA_OPS[op][1](x, params)
    return x


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


def _cpu_rand(n, x):
    """n uniforms from the CPU's generator, as the original's scale and rotate draw them, on x's device (unwaited)."""
    return torch.rand(n).to(x.device, x.dtype, non_blocking=True)


def _draw_scale(n, x):
    r = DSA_PARAMS["scale"]
    sx, sy = (_cpu_rand(n, x) * (r - 1 / r) + 1 / r for _ in range(2))
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)


def _draw_rotate(n, x):
    angle = (_cpu_rand(n, x) - 0.5) * 2 * DSA_PARAMS["rotate"] / 180 * math.pi
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
    (h, w), (size_h, size_w) = x.shape[2:], _cutout_size(x.shape[2:])
    top, left = centre[:, :1] - size_h // 2, centre[:, 1:] - size_w // 2  # python ints: no copy from the host
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size_h)  # n x h
    in_cols = (cols >= left) & (cols < left + size_w)  # n x w
    return x * (~(in_rows[:, :, None] & in_cols[:, None, :])).to(x.dtype)[:, None]


def _blend(x, mean, factor):
    return (x - mean) * factor + mean


DSA_OPS = {  # op -> (draw(n, x), apply(x, params))
    "flip": (_uniform, lambda x, u: torch.where(u < DSA_PARAMS["flip"], x.flip(3), x)),
    "scale": (_draw_scale, _affine),
    "rotate": (_draw_rotate, _affine),
    "crop": (partial(_draw_shift, ratio=DSA_PARAMS["crop"]), _crop),
    "cutout": (_draw_cutout, _cutout),
    "brightness": (_uniform, lambda x, u: x + (u - 0.5) * DSA_PARAMS["brightness"]),
    "saturation": (_uniform, lambda x, u: _blend(x, x.mean(dim=1, keepdim=True), u * DSA_PARAMS["saturation"])),
    "contrast": (_uniform, lambda x, u: _blend(x, x.mean(dim=(1, 2, 3), keepdim=True), u + DSA_PARAMS["contrast"])),
}


def draw_texture_crops(canvases, samples):
    """Texture mode (each item a canvas): random toroidal offsets of `samples` crops per canvas, (samples * n) x 2."""
    n, (h, w) = len(canvases), canvases.shape[2:]
    offsets = torch.stack([torch.randint(h, (samples * n,)), torch.randint(w, (samples * n,))], 1)
    return offsets.to(canvases.device, non_blocking=True)


def texture_crops(canvases, offsets, res):
    """Crops of the canvases rolled by `offsets` (the canvases repeated once per sample)."""
    h, w = canvases.shape[2:]
    source = canvases.repeat(len(offsets) // len(canvases), 1, 1, 1)
    rows = (torch.arange(res[0], device=offsets.device) - offsets[:, :1]) % h
    cols = (torch.arange(res[1], device=offsets.device) - offsets[:, 1:]) % w
    batch = torch.arange(len(source), device=offsets.device).view(-1, 1, 1)
    return source[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
