"""What several test files share: tiny distill.py flags, one-line errors, relative errors."""
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

import distill
from mtt import matching

# distill.py at the smallest size that still runs every stage: 10 images of 28 px, a width-16 ConvNet,
# two student steps, one evaluation network trained for one epoch.
TINY = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--ipc", "1", "--syn_steps", "2",
        "--expert_epochs", "1", "--max_start_epoch", "1", "--num_eval", "1", "--epoch_eval_train", "1",
        "--lr_img", "10", "--lr_lr", "1e-6", "--device", "cpu"]


def run_distill(buffers, save_path, *flags):
    return distill.main(TINY + ["--buffer_path", str(buffers), "--save_path", str(save_path), *flags])


def one_line_error(main, argv):
    """The message a script's main(argv) exits with, checked to be one line starting with 'error: '."""
    with pytest.raises(SystemExit) as raised:
        main(list(map(str, argv)))
    message = str(raised.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def small(data):
    """The embedded data cut to 512 training and 200 test images: for tests about files, not learning."""
    return replace(data, images_train=data.images_train[:512], labels_train=data.labels_train[:512],
                   images_test=data.images_test[:200], labels_test=data.labels_test[:200])


def load(path):
    return torch.load(path, weights_only=True)


def relative_error(ours, theirs):
    return ((ours - theirs).norm() / theirs.norm()).item()


def crash_at(monkeypatch, iteration):
    """Make the distillation step raise KeyboardInterrupt at the given (0-based) iteration."""
    calls, real_backward = [], matching.BACKWARD[False]

    def crashing(*args):
        calls.append(1)
        if len(calls) == iteration + 1:
            raise KeyboardInterrupt
        return real_backward(*args)

    monkeypatch.setitem(matching.BACKWARD, False, crashing)
    return real_backward


@contextmanager
def locked_by_another_process(folder):
    """`folder`'s lock held by another process while the block runs, as a second run would hold it."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(folder / '.lock')!r}, 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.wait()
