"""What only a GPU run would show, checked on the CPU: torch.cuda's functions replaced by a fake GPU,
images on the `meta` device (which holds no values, so reading one back raises), fake cgroup files."""
import os
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_distill

import distill
from mtt import memory, parallel, zca
from mtt.matching import SyntheticSet, draw_schedule, replay_backward, unroll_backward
from mtt.training import accuracy, train_epoch
from networks import get_network
from utils import UsageError

GB = 2**30
CUDA = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as a GPU with 10 GB free to the driver, of which torch's allocator holds 3 GB
    reserved and 1 GB allocated: 2 GB are free to torch but used to the driver."""
    gpu = types.SimpleNamespace(free=10 * GB, reserved=3 * GB, allocated=1 * GB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu.free, 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gpu.reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gpu.allocated)
    return gpu


def test_free_gpu_memory_counts_what_torch_holds_but_has_freed(fake_gpu):
    assert memory.free_memory(CUDA) == 12 * GB


def on(device, gigabytes):
    """A stand-in for a tensor of this many GB on `device` (moving reads only these two)."""
    return types.SimpleNamespace(device=torch.device(device), nbytes=int(gigabytes * GB))


def test_a_size_check_counts_only_what_is_still_to_move_to_the_gpu(fake_gpu):
    """The evaluation during distillation: the set and the test images are on the GPU already,
    larger than what is free; nothing is refused. Images still on the CPU are."""
    memory.check_room(memory.moving([on("cuda:0", 20), on("cuda:0", 5)], CUDA), "the images need", CUDA)
    with pytest.raises(UsageError, match=r"^the images need 13.00 GB on cuda:0, more than its 12.00 GB free"):
        memory.check_room(memory.moving([on("cuda:0", 20), on("cpu", 13)], CUDA), "the images need", CUDA)


def test_the_test_images_are_on_the_device_before_the_forecast_reads_the_free_memory(buffers, tmp_path,
                                                                                      monkeypatch):
    """They stay there for the whole run: the free figure the backward is chosen by must not count
    their memory as the step's."""
    calls = []
    check_room, free_memory = distill.check_room, distill.free_memory
    monkeypatch.setattr(distill, "check_room", lambda needed, what, where: calls.append(what)
                        or check_room(needed, what, where))
    monkeypatch.setattr(distill, "free_memory", lambda device: calls.append("free memory") or free_memory(device))
    run_distill(buffers, tmp_path, "--Iteration", "0")
    assert calls[1:3] == ["the test and validation images need", "free memory"]  # after the set's size check


def test_a_forecast_within_the_margin_of_the_free_memory_does_not_run_the_unroll():
    """The unroll's forecast is 95% of the free memory: over the 90% a forecast may take, so the
    replay runs; forced, the unroll is one line saying the margin."""
    peak = lambda low_memory, batch, chunk: 0.3 * GB if low_memory else 0.95 * GB
    args = types.SimpleNamespace(low_memory=None, chunk_syn=None)
    assert memory.choose_backward(args, peak, 10, 1 * GB) is True
    said = r"needs about 0.95 GB, more than 0.90 GB \(the 1.00 GB free less a 10% margin\); these would fit: --low_mem"
    with pytest.raises(UsageError, match=said):
        memory.choose_backward(types.SimpleNamespace(low_memory=False, chunk_syn=None), peak, 10, 1 * GB)


def cgroup(tmp_path, version, limit, usage, cache):
    """Fake cgroup files of one version: a limit, a usage and reclaimable page cache, in the group
    /proc/self/cgroup names (v1 beside other controllers)."""
    mount, limit_file, usage_file, cache_key = memory.CGROUP_FILES[version]
    folder = tmp_path / mount / "job"
    folder.mkdir(parents=True)
    (folder / limit_file).write_text(f"{limit}\n")
    (folder / usage_file).write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"anon {usage - cache}\n{cache_key} {cache}\n")
    membership = tmp_path / "self_cgroup"
    membership.write_text("0::/job\n" if version == "v2" else "5:cpu,cpuacct:/job\n4:memory:/job\n0::/\n")
    return {"root": tmp_path, "membership": membership}


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_cpus_free_memory_is_what_the_jobs_cgroup_allows(tmp_path, monkeypatch, version):
    """A 4 GB limit, 3 GB used of which 1 GB is page cache the kernel drops: 2 GB of room, less than
    the machine's MemAvailable; two torchrun processes on the machine share it."""
    files = cgroup(tmp_path, version, 4 * GB, 3 * GB, 1 * GB)
    assert memory.cgroup_room(**files) == 2 * GB
    monkeypatch.setattr(memory, "cgroup_room", partial(memory.cgroup_room, **files))
    assert memory.free_memory(torch.device("cpu")) == 2 * GB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.free_memory(torch.device("cpu")) == 1 * GB


@pytest.mark.parametrize("limit", ["max", str(2**63 - 4096)])
def test_a_cgroup_without_a_limit_leaves_memavailable(tmp_path, limit):
    files = cgroup(tmp_path, "v2" if limit == "max" else "v1", 4 * GB, 3 * GB, 0)
    limit_file = next(Path(tmp_path).rglob("memory.max" if limit == "max" else "memory.limit_in_bytes"))
    limit_file.write_text(limit)
    assert memory.cgroup_room(**files) is None


def test_nccl_raises_a_timed_out_collective_in_python(monkeypatch):
    """Under NCCL the step's one-line report of a stalled rank needs the timeout as a Python error:
    blocking wait is set before the process group starts (and a user's own setting is kept)."""
    started = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: started.append(
        (backend, os.environ.get("TORCH_NCCL_BLOCKING_WAIT"))))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: None)
    assert parallel.setup(torch.device("cuda")) == CUDA
    assert started == [("nccl", "1")]
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    parallel.setup(torch.device("cuda"))
    assert started[-1] == ("nccl", "0")
    parallel.setup(torch.device("cpu"))
    assert started[-1] == ("gloo", "0")


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_one_flag_for_convolutions_and_matmuls_said_at_start_on_a_gpu(monkeypatch, capsys, tf32):
    monkeypatch.setattr(parallel, "pick_device", lambda name: CUDA)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake H100")
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    try:
        assert parallel.setup_device(types.SimpleNamespace(device="cuda", tf32=tf32, deterministic=False)) == CUDA
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    said = {True: "Fake H100: TF32 on in convolutions and matmuls (--tf32 False for full float32)",
            False: "Fake H100: TF32 off in convolutions and matmuls (--tf32 True for TF32, as the original)"}
    assert capsys.readouterr().out == said[tf32] + "\n"


def test_the_inner_loops_read_nothing_back_from_the_device(monkeypatch):
    """The unroll, the replay, their minibatches' draws (every DSA group) and an evaluation epoch,
    all on the meta device: reading a value back (.item(), bool(), a copy to the host) raises
    there. No tensor is built from a list on the device, and every copy from the host is
    non-blocking."""
    meta, copies, real_to = torch.device("meta"), [], torch.Tensor.to

    def to(tensor, *args, **kwargs):
        moved = real_to(tensor, *args, **kwargs)
        if moved.device != tensor.device:
            copies.append(kwargs.get("non_blocking", False))
        return moved

    def no_list_on_the_device(data, *args, device=None, **kwargs):
        assert device is None or torch.device(device).type == "cpu", "a tensor built from a list on the device"
        return real_tensor(data, *args, device=device, **kwargs)

    real_tensor = torch.tensor
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch, "tensor", no_list_on_the_device)
    net = get_network("ConvNetW8", 1, 10, (28, 28)).to(meta)
    theta0 = torch.empty(sum(p.numel() for p in net.parameters()), device=meta)
    synset = SyntheticSet(torch.empty(10, 1, 28, 28, device=meta), torch.arange(10, device=meta),
                          torch.empty((), device=meta))
    copies.clear()
    for group in ("color", "crop", "cutout", "flip", "scale", "rotate"):
        schedule = draw_schedule(synset.images, 3, 5, group)
        for backward in (unroll_backward, replay_backward):
            assert backward(net, synset, theta0, torch.empty_like(theta0), schedule).device == meta
    optimizer = torch.optim.SGD(net.parameters(), 0.01)
    images, labels = torch.empty(20, 1, 28, 28, device=meta), torch.zeros(20, dtype=torch.long, device=meta)
    assert train_epoch(net, images, labels, optimizer, 8, "color_crop_cutout_flip_scale_rotate").device == meta
    assert copies and all(copies)


def test_accuracy_reads_its_count_back_once(monkeypatch):
    """1200 test images are three inference batches: one read from the device, not one per batch."""
    reads, real = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda tensor: reads.append(1) or real(tensor))
    net = get_network("ConvNetW8", 1, 10, (28, 28))
    assert 0 <= accuracy(net, torch.randn(1200, 1, 28, 28), torch.zeros(1200, dtype=torch.long)) <= 1
    assert len(reads) == 1


def test_a_zca_that_does_not_fit_on_the_gpu_is_fitted_on_the_cpu_or_is_one_line(monkeypatch, capsys):
    """ImageNet at 128 px: 49,152 pixels, six 19 GB float64 matrices at the fit's peak."""
    free = {"cuda": 80 * GB, "cpu": 512 * GB}
    monkeypatch.setattr(zca, "free_memory", lambda device: free[device.type])
    assert zca.fit_device(49152, CUDA) == torch.device("cpu")
    assert capsys.readouterr().out == ("ZCA: the fit on 49152 pixels needs about 108.00 GB, more than the 80.00 GB "
                                       "free on cuda:0: fitting it on the CPU\n")
    assert zca.fit_device(3072, CUDA) == CUDA  # CIFAR's: 0.45 GB
    free["cpu"] = 64 * GB
    with pytest.raises(UsageError, match=r"^--zca on 49152 pixels: fitting the whitening needs about 108.00 GB, more "
                                         r"than the 80.00 GB free on cuda:0 or the 64.00 GB free on cpu; lower --res"):
        zca.fit_device(49152, CUDA)
