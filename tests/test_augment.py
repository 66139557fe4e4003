from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mtt import augment
from mtt.augment import DSA_GROUPS, DSA_OPS, apply_augmentation, draw_augmentation


def batch(n=4, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8, dtype=dtype)


def test_replaying_a_draw_gives_identical_output():
    x = batch()
    for seed in range(10):
        torch.manual_seed(seed)
        draw = draw_augmentation(x)
        first = apply_augmentation(x, draw)
        torch.randn(100)  # the global RNG moves on; the replay must not depend on it
        assert torch.equal(apply_augmentation(x, draw), first)


N = 4000  # draws per op: enough that each range is covered to within 2% of its ends
PROBE = torch.arange(3.0).view(1, 3, 1, 1).repeat(N, 1, 8, 8)  # channels 0, 1, 2: mean 1 per pixel and image
# op -> (what a draw does, from its parameters and the augmented probe; the range DSA documents: scale factors in
# [1/1.2, 1.2], rotations of +-15 degrees, shifts of up to 1/8 of the side, brightness +-0.5, saturation x[0, 2],
# contrast x[0.5, 1.5])
DOCUMENTED_RANGES = {
    "scale": (lambda params, out: params[:, [0, 1], [0, 1]], 1 / 1.2, 1.2),
    "rotate": (lambda params, out: torch.atan2(params[:, 1, 0], params[:, 0, 0]).rad2deg(), -15, 15),
    "crop": (lambda params, out: params / 8, -0.125, 0.125),  # shift as a fraction of the side
    "brightness": (lambda params, out: out[:, 2] - 2, -0.5, 0.5),
    "saturation": (lambda params, out: out[:, 2] - 1, 0, 2),  # the factor: channel 2 sits 1 above the mean
    "contrast": (lambda params, out: out[:, 2] - 1, 0.5, 1.5),
}


@pytest.mark.parametrize("op", DOCUMENTED_RANGES)
def test_each_op_draws_over_its_documented_range(op):
    torch.manual_seed(0)
    params = DSA_OPS[op][0](N, PROBE)
    measure, low, high = DOCUMENTED_RANGES[op]
    drawn = measure(params, apply_augmentation(PROBE, [(op, params)]))
    margin = 0.02 * (high - low)
    assert low - 1e-6 <= drawn.min().item() <= low + margin
    assert high - margin <= drawn.max().item() <= high + 1e-6


def test_mode_s_draws_each_group_equally_often_and_flip_flips_half():
    """Counts of 1000 and a rate of 0.5 expected; the bounds are 3.5 and 6 standard deviations."""
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 4, 4)
    counts = Counter(tuple(op for op, _ in draw_augmentation(x)) for _ in range(6000))
    assert set(counts) == set(DSA_GROUPS.values()) and all(900 <= n <= 1100 for n in counts.values())
    marked = torch.zeros(N, 1, 1, 2)
    marked[..., 0] = 1
    flipped = apply_augmentation(marked, [("flip", DSA_OPS["flip"][0](N, marked))])[..., 1]
    assert 0.45 < flipped.mean().item() < 0.55


def test_bilinear_sample_equals_grid_sample_inside_and_outside_the_image():
    """The deterministic sampler must be grid_sample(align_corners=True, zero padding) exactly, on
    random points (a third outside [-1, 1]) and on the pixel centres, in value and in pixel gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    random_points = torch.rand(3, 4, 6, 2, dtype=torch.float64) * 3 - 1.5
    pixel_centres = F.affine_grid(torch.eye(2, 3, dtype=torch.float64).expand(3, 2, 3), x.shape, align_corners=True)
    for grid in (random_points, pixel_centres):
        ours, torchs = augment.bilinear_sample(x, grid), F.grid_sample(x, grid, align_corners=True)
        assert (ours - torchs).abs().max().item() <= 1e-12
        weights = torch.randn_like(ours)
        (ours_grad,), (torchs_grad,) = (torch.autograd.grad((out * weights).sum(), x) for out in (ours, torchs))
        assert (ours_grad - torchs_grad).abs().max().item() <= 1e-12


def test_a_draw_applies_one_group_of_the_strategy():
    x = batch()
    groups = {tuple(op for op, _ in draw_augmentation(x)) for _ in range(200)}
    assert groups == set(DSA_GROUPS.values())
    assert {tuple(op for op, _ in draw_augmentation(x, "flip_crop")) for _ in range(50)} == {("flip",), ("crop",)}
    assert draw_augmentation(x, "none") == []


@pytest.mark.parametrize("op", list(DSA_OPS))
def test_every_op_gradcheck_in_the_pixels(op):
    x = batch(2, torch.float64).requires_grad_()
    torch.manual_seed(1)
    params = DSA_OPS[op][0](2, x)
    assert torch.autograd.gradcheck(lambda images: apply_augmentation(images, [(op, params)]), (x,))


@pytest.mark.parametrize("op", list(DSA_OPS))
def test_every_op_treats_each_image_by_its_own_draw(op):
    """Siamese per image: augmenting a batch equals augmenting each image alone with its row of the
    draw, which is what lets a minibatch split over processes see the same images."""
    x = batch(3, torch.float64)
    torch.manual_seed(2)
    params = DSA_OPS[op][0](3, x)
    out = apply_augmentation(x, [(op, params)])
    assert out.dtype == torch.float64 and not torch.equal(out, x)
    for i in range(3):
        assert torch.allclose(apply_augmentation(x[i:i + 1], [(op, params[i:i + 1])]), out[i:i + 1], atol=1e-12)


def test_flip_twice_is_the_identity():
    x = batch()
    flip_all = [("flip", torch.zeros(len(x), 1, 1, 1))]  # u = 0 < 0.5: every image flips
    once = apply_augmentation(x, flip_all)
    assert torch.equal(once, x.flip(3)) and not torch.equal(once, x)
    assert torch.equal(apply_augmentation(once, flip_all), x)


def test_crop_translates_with_zero_fill_and_zero_shift_is_the_identity():
    x = batch()
    assert torch.equal(apply_augmentation(x, [("crop", torch.zeros(len(x), 2, dtype=torch.long))]), x)
    down = apply_augmentation(x, [("crop", torch.tensor([[1, 0]] * len(x)))])
    assert torch.equal(down[:, :, :-1], x[:, :, 1:]) and torch.equal(down[:, :, -1], torch.zeros_like(x[:, :, -1]))
    right = apply_augmentation(x, [("crop", torch.tensor([[0, -2]] * len(x)))])
    assert torch.equal(right[:, :, :, 2:], x[:, :, :, :-2]) and (right[:, :, :, :2] == 0).all()


def test_crop_draws_at_most_an_eighth_of_the_side():
    x = torch.zeros(5000, 1, 32, 32)
    shift = DSA_OPS["crop"][0](len(x), x)
    assert shift.min().item() == -4 and shift.max().item() == 4


def test_cutout_zeroes_one_square_of_half_the_side():
    x = torch.ones(2, 1, 8, 8)
    out = apply_augmentation(x, [("cutout", torch.tensor([[4, 4], [0, 7]]))])
    assert torch.equal(out[0, 0, 2:6, 2:6], torch.zeros(4, 4)) and out[0].sum() == 64 - 16
    assert out[1].sum() == 64 - 2 * 3  # clipped at the corner: rows 0-1, columns 5-7


def test_colour_ops_follow_their_formulas():
    x = batch(2)
    u = torch.full((2, 1, 1, 1), 0.25)
    assert torch.allclose(apply_augmentation(x, [("brightness", u)]), x - 0.25)
    m = x.mean(1, keepdim=True)
    assert torch.allclose(apply_augmentation(x, [("saturation", u)]), (x - m) * 0.5 + m)
    m = x.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(apply_augmentation(x, [("contrast", u)]), (x - m) * 0.75 + m)


def test_scale_and_rotate_with_identity_parameters_are_the_identity():
    x = batch()
    eye = torch.eye(2, 3).expand(len(x), 2, 3)
    for op in ("scale", "rotate"):
        assert torch.allclose(apply_augmentation(x, [(op, eye)]), x, atol=1e-5)
    torch.manual_seed(0)
    assert not torch.allclose(apply_augmentation(x, [("rotate", DSA_OPS["rotate"][0](len(x), x))]), x, atol=1e-2)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown DSA op"):
        draw_augmentation(batch(), "color_blur")


def test_texture_crops_roll_the_canvas():
    canvas = torch.arange(2 * 16.0).view(1, 2, 4, 4)
    crops = augment.texture_crops(canvas, torch.tensor([[0, 0], [1, 3]]), (2, 2))
    assert crops.shape == (2, 2, 2, 2)
    assert torch.equal(crops[0], canvas[0, :, :2, :2])
    assert torch.equal(crops[1], torch.roll(canvas[0], (1, 3), (1, 2))[:, :2, :2])


# The original's draws, op by op: how many numbers each takes from the CPU's generator for a batch
# of n, beside the group choice (torch.randint on the CPU). Scale draws sx and sy, rotate one angle,
# each torch.rand(n) on the CPU; flip, colour, crop and cutout draw on the images' device.
ORIGINAL_CPU_DRAWS = {"scale": lambda n: [torch.rand(n), torch.rand(n)], "rotate": lambda n: [torch.rand(n)],
                      "flip": lambda n: [], "color": lambda n: [], "crop": lambda n: [], "cutout": lambda n: []}


@pytest.mark.parametrize("group", ORIGINAL_CPU_DRAWS)
def test_each_op_draws_from_the_generator_the_original_draws_from(group):
    """Images on the `meta` device stand in for a GPU's: a draw on their device takes nothing from
    the CPU's generator, so the CPU stream after the draw tells which generator each op used. The
    group choice stays on the CPU; the scale and rotate parameters arrive on the images' device."""
    n, images = 5, torch.empty(5, 3, 8, 8, device="meta")
    torch.manual_seed(0)
    draw = draw_augmentation(images, group)
    ours = torch.get_rng_state()
    torch.manual_seed(0)
    torch.randint(1, ())
    ORIGINAL_CPU_DRAWS[group](n)
    assert torch.equal(ours, torch.get_rng_state())
    assert all(params.device.type == "meta" for _, params in draw)
