"""The distillation step: one student update, the matching loss, and its two exact backward passes
(the full unroll and the low-memory replay), over every learnable tensor."""
import itertools

import pytest
import torch
from helpers import relative_error

import distill
from distill import init_images
from mtt import matching, parallel
from mtt.augment import DSA_STRATEGY
from mtt.matching import BACKWARD, SyntheticSet, draw_schedule
from mtt.training import cross_entropy
from networks import ConvNet, flatten_params, get_network
from utils import UsageError


def problem(dtype, texture=False, soft=False, model=None, side=8, seed=0):
    """A tiny network (model: a constructor), a target 0.05 away from its initialisation and 8 synthetic images of 4
    classes (16 px canvases in texture mode), with label logits when soft."""
    torch.manual_seed(seed)
    net = (ConvNet(1, 4, (side, side), width=8, depth=2) if model is None else model()).to(dtype)
    theta0 = flatten_params(net)
    target = theta0 + 0.05 * torch.randn_like(theta0)
    images = torch.randn(8, 1, 2 * side if texture else side, 2 * side if texture else side, dtype=dtype)
    logits = torch.randn(8, 4, dtype=dtype) if soft else None
    return net, theta0, target, SyntheticSet(images, torch.arange(4).repeat_interleave(2),
                                             torch.tensor(0.05, dtype=dtype), logits)


def gradients(low_memory, dtype, texture=False, soft=False, model=None, side=8, syn_steps=5, batch_syn=3,
              chunk_syn=None):
    """Loss and the gradient of every learnable tensor for one iteration with DSA on and
    batch_syn < the set, so the unroll cycles through several minibatches; the same seed gives both
    backward passes one schedule."""
    net, theta0, target, synset = problem(dtype, texture, soft, model, side)
    torch.manual_seed(1)
    schedule = draw_schedule(synset.images, syn_steps, batch_syn, DSA_STRATEGY, ((side, side), 2) if texture else None)
    loss = BACKWARD[low_memory](net, synset, theta0, target, schedule, chunk_syn)
    return loss, {name: tensor.grad for name, tensor in synset.tensors.items()}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("texture,soft", [(False, False), (True, False), (False, True), (True, True)])
def test_low_memory_backward_equals_the_full_unroll_for_every_learnable_tensor(dtype, tolerance, texture, soft):
    loss_full, full = gradients(False, dtype, texture, soft)
    loss_low, low = gradients(True, dtype, texture, soft)
    assert sorted(full) == sorted(low) == sorted(["images", "syn_lr"] + ["label_logits"] * soft)
    assert abs(loss_low.item() - loss_full.item()) <= tolerance * abs(loss_full.item())
    for name in full:
        assert full[name].abs().sum() > 0, name
        assert relative_error(low[name], full[name]) <= tolerance, name


@pytest.mark.parametrize("name,model,side", [
    ("ConvNetBN", lambda: ConvNet(1, 4, (8, 8), width=8, depth=2, norm="batchnorm"), 8),
    ("LeNet (torch.func path)", lambda: get_network("LeNet", 1, 4, (16, 16)), 16),
])
def test_low_memory_backward_equals_the_full_unroll_for_other_architectures(name, model, side):
    """Batch norm couples the images of a minibatch; LeNet runs through torch.func.functional_call."""
    loss_full, full = gradients(False, torch.float64, soft=True, model=model, side=side)
    loss_low, low = gradients(True, torch.float64, soft=True, model=model, side=side)
    assert abs(loss_low.item() - loss_full.item()) <= 1e-10 * abs(loss_full.item())
    for key in full:
        assert full[key].abs().sum() > 0 and relative_error(low[key], full[key]) <= 1e-10, (name, key)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("low_memory", [False, True], ids=["unroll", "replay"])
def test_a_minibatch_in_chunks_gives_the_whole_minibatchs_gradient_for_every_learnable_tensor(low_memory, dtype,
                                                                                             tolerance):
    """Texture crops (2 per canvas), soft labels and DSA; minibatches of 4 and 6 crops in chunks of 4, so the last
    chunk of a minibatch of 6 is uneven."""
    loss, whole = gradients(low_memory, dtype, texture=True, soft=True)
    chunked_loss, chunked = gradients(low_memory, dtype, texture=True, soft=True, chunk_syn=4)
    assert sorted(chunked) == sorted(whole) == ["images", "label_logits", "syn_lr"]
    assert abs(chunked_loss.item() - loss.item()) <= tolerance * loss.item()
    for name in whole:
        assert whole[name].abs().sum() > 0 and relative_error(chunked[name], whole[name]) <= tolerance, name


@pytest.mark.parametrize("low_memory", [False, True], ids=["unroll", "replay"])
def test_the_student_runs_its_network_on_chunks_of_chunk_syn_images(low_memory, monkeypatch):
    """8 images in batches of 3 give minibatches of 2, 3 and 3 images; in chunks of 2 the network sees 2 | 2, 1 |
    2, 1 images, and the replay then runs the steps again in reverse for their VJPs."""
    seen, real_forward = [], matching.forward_flat
    counted = lambda net, theta, x: seen.append(len(x)) or real_forward(net, theta, x)
    monkeypatch.setattr(matching, "forward_flat", counted)
    gradients(low_memory, torch.float64, syn_steps=3, chunk_syn=2)
    assert seen == [2, 2, 1, 2, 1] + [2, 1, 2, 1, 2] * low_memory


def loss_and_grads(low_memory, synset, net, theta0, target, schedule):
    synset = SyntheticSet(*(t.detach().clone() for t in (synset.images, synset.labels, synset.syn_lr)),
                          synset.tensors["label_logits"].detach().clone() if synset.soft else None)
    loss = BACKWARD[low_memory](net, synset, theta0, target, schedule)
    return loss.item(), synset


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("name", ["images", "syn_lr", "label_logits"])
def test_every_gradient_matches_a_central_finite_difference(low_memory, name):
    """d loss / d tensor along a random direction, against (L(x + h d) - L(x - h d)) / 2h in float64."""
    net, theta0, target, synset = problem(torch.float64, soft=True)
    torch.manual_seed(1)
    schedule = draw_schedule(synset.images, 4, 3, DSA_STRATEGY)
    _, at = loss_and_grads(low_memory, synset, net, theta0, target, schedule)
    direction = torch.randn_like(synset.tensors[name])
    analytic = (at.tensors[name].grad * direction).sum().item()

    def shifted(h):
        moved = SyntheticSet(synset.images.detach().clone(), synset.labels, synset.syn_lr.detach().clone(),
                             synset.tensors["label_logits"].detach().clone())
        with torch.no_grad():
            moved.tensors[name] += h * direction
        return loss_and_grads(low_memory, moved, net, theta0, target, schedule)[0]

    h = 1e-6
    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    assert abs(analytic) > 1e-4
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)


def test_soft_cross_entropy_of_large_one_hot_logits_equals_the_hard_one():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 4, 2, 2, 1, 3])
    one_hot = 100 * torch.nn.functional.one_hot(labels, 5).double()  # softmax: 1 up to e^-100
    assert abs(cross_entropy(logits, one_hot).item() - cross_entropy(logits, labels).item()) <= 1e-12
    uniform = torch.zeros(6, 5, dtype=torch.float64)  # and a soft target is not a hard one
    assert abs(cross_entropy(logits, uniform).item() - cross_entropy(logits, labels).item()) > 1e-3


def test_schedule_cycles_through_the_set_in_chunks_taken_from_the_end():
    images = torch.zeros(10, 1, 4, 4)
    torch.manual_seed(0)
    schedule = draw_schedule(images, 7, 4)
    torch.manual_seed(0)
    permutation = torch.randperm(10)
    assert [len(step.rows) for step in schedule] == [2, 4, 4, 2, 4, 4, 2]
    assert torch.equal(schedule[0].rows, permutation[8:]) and torch.equal(schedule[2].rows, permutation[:4])
    assert sorted(torch.cat([s.rows for s in schedule[:3]]).tolist()) == list(range(10))
    assert all(step.augmentation == [] and step.batch == len(step.rows) for step in schedule)


def test_texture_schedule_crops_each_canvas_several_times():
    canvases = torch.randn(6, 3, 16, 16)
    torch.manual_seed(0)
    step = draw_schedule(canvases, 1, 6, DSA_STRATEGY, texture=((8, 8), 3))[0]
    assert step.inputs(canvases).shape == (18, 3, 8, 8) and step.batch == 18
    assert torch.equal(step.rows, step.rows[:6].repeat(3))


def test_a_share_of_a_step_is_the_matching_slice_of_its_images(monkeypatch):
    """Splitting a minibatch among processes must hand each the same images it would have in one
    process: Step.share() on each of 3 ranks slices the rows, crops and DSA draws together, so the
    shares' inputs put together are the whole minibatch's."""
    canvases = torch.randn(7, 3, 16, 16)
    torch.manual_seed(0)
    (step,) = draw_schedule(canvases, 1, 7, DSA_STRATEGY + "_scale", texture=((8, 8), 2))
    whole = step.inputs(canvases)
    monkeypatch.setattr(parallel, "world", lambda: 3)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(parallel, "rank", lambda rank=rank: rank)
        part = step.share()
        assert part.batch == step.batch == 14
        parts.append(part.inputs(canvases))
    assert [len(p) for p in parts] == [5, 5, 4]
    assert torch.equal(torch.cat(parts), whole)


def peak_allocated_bytes(run):
    """The most bytes torch's CPU allocator held at once during run() beyond what it held before,
    from the profiler's record of each op's allocations and frees, in the order they ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    held = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_the_replay_holds_one_chunks_graph_at_a_time():
    """8 images in one minibatch, in chunks of 2: at its peak the replay (forward pass and VJPs)
    holds under half the memory it holds for the whole minibatch (measured: a third), while the
    unroll keeps every chunk's graph (measured: the same peak)."""
    peaks = {}
    for low_memory, chunk_syn in itertools.product((False, True), (None, 2)):
        net, theta0, target, synset = problem(torch.float64)
        schedule = draw_schedule(synset.images, 2, 8)
        peaks[low_memory, chunk_syn] = peak_allocated_bytes(
            lambda: BACKWARD[low_memory](net, synset, theta0, target, schedule, chunk_syn))
    assert peaks[True, 2] < peaks[True, None] / 2
    assert peaks[False, 2] > peaks[False, None] / 2


def test_chunks_cut_a_process_share_in_order_with_its_crops_and_dsa_draws(monkeypatch):
    """7 crops (texture, DSA): in chunks of 3 the inputs are the minibatch's, in order, and every chunk keeps the
    whole minibatch's size as the weight's denominator; rank 1 of 2 cuts its share of 3 into 2 + 1, and a rank
    with no image has no chunk."""
    canvases = torch.randn(7, 3, 16, 16)
    torch.manual_seed(0)
    (step,) = draw_schedule(canvases, 1, 7, DSA_STRATEGY + "_scale", texture=((8, 8), 1))
    chunks = step.chunks(3)
    assert [len(chunk.rows) for chunk in chunks] == [3, 3, 1] and {chunk.batch for chunk in chunks} == {7}
    assert torch.equal(torch.cat([chunk.inputs(canvases) for chunk in chunks]), step.inputs(canvases))
    (whole,) = step.chunks(None)
    assert torch.equal(whole.rows, step.rows) and torch.equal(whole.inputs(canvases), step.inputs(canvases))
    monkeypatch.setattr(parallel, "world", lambda: 2)
    monkeypatch.setattr(parallel, "rank", lambda: 1)
    assert [chunk.rows.tolist() for chunk in step.chunks(2)] == [step.rows[4:6].tolist(), step.rows[6:].tolist()]
    monkeypatch.setattr(parallel, "world", lambda: 8)
    monkeypatch.setattr(parallel, "rank", lambda: 7)
    assert step.chunks(2) == [] and step.chunks(None) == []


def test_the_default_leaves_the_quickstart_minibatch_in_one_chunk_as_before():
    """The quickstart distills 10 images (ipc 1) with batch_syn = all: under distill.py's default chunk_syn each
    step is one chunk, the whole minibatch: the student update runs the code before (whose gradients
    tests/test_golden.py checks against the original's)."""
    args = distill.parse_args(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW32", "--ipc", "1"])
    images = torch.randn(10, 1, 28, 28)
    torch.manual_seed(0)
    for step in draw_schedule(images, 20, 10, DSA_STRATEGY):
        (chunk,) = step.chunks(args.chunk_syn)
        assert torch.equal(chunk.rows, step.rows) and chunk.batch == step.batch == 10
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(chunk.augmentation, step.augmentation, strict=True))


def test_matching_loss_falls_on_a_fixed_trajectory(mini):
    """Distill 20 iterations (5 student steps each) towards one real expert segment of a width-8
    ConvNet on the embedded data. Measured over seeds 0-3: the mean loss of the first 5 iterations
    is 0.47-0.52, of the last 5 0.21-0.26. Asserting the last below 75% of the first leaves room
    for seed noise; images that did not learn (a broken gradient) leave the loss flat and fail."""
    data = mini
    torch.manual_seed(0)
    net = ConvNet(1, 10, (28, 28), width=8, depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    theta0 = flatten_params(net)
    for idx in torch.randperm(len(data.labels_train))[:1024].split(64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(data.images_train[idx]), data.labels_train[idx]).backward()
        opt.step()
    target = flatten_params(net)
    images, labels = init_images(data, 2)
    synset = SyntheticSet(images, labels, torch.tensor(0.01))
    optimisers = [torch.optim.SGD([synset.images], lr=100, momentum=0.5),
                  torch.optim.SGD([synset.syn_lr], lr=1e-5, momentum=0.5)]
    losses = []
    for _ in range(20):
        schedule = draw_schedule(synset.images, 5, len(labels), DSA_STRATEGY)
        losses.append(BACKWARD[True](net, synset, theta0, target, schedule).item())
        for optimiser in optimisers:
            optimiser.step()
            optimiser.zero_grad()
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_real_initialisation_takes_distinct_images_of_each_class(mini):
    data = mini
    torch.manual_seed(0)
    images, labels = init_images(data, 3)
    assert images.shape == (30, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    for image, label in zip(images, labels):
        matches = (data.images_train == image).flatten(1).all(1).nonzero().flatten()
        assert len(matches) >= 1 and data.labels_train[matches[0]] == label
    assert len({image.numpy().tobytes() for image in images}) == 30
    canvases, _ = init_images(data, 1, tiles=2)
    assert canvases.shape == (10, 1, 56, 56)
    tile = canvases[0, :, 28:, :28]  # each tile is a real image of the class
    assert data.labels_train[(data.images_train == tile).flatten(1).all(1)].tolist()[:1] == [0]
    with pytest.raises(UsageError, match="--ipc 501 needs 501 real images per class"):
        init_images(data, 501)
