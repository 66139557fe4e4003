import fcntl
import os
import signal

# Ctrl-C is tested as a user sends it: a shell that starts the suite in the background ignores SIGINT in
# it, which its children (the scripts under test) would inherit; Python's own handler undoes that.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Set before torch loads OpenMP: with two test workers on two cores, threads that spin while
# waiting for work take the core the other worker needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import buffer  # noqa: E402
from helpers import small  # noqa: E402
from mtt.data import get_dataset  # noqa: E402

# One thread per test worker (pytest.ini runs two): a second thread per worker only contends for
# the same cores (161 s against 183 s for the suite with two). Pinned, not the machine's count, so
# that a reduction splits the same way, and rounds the same way, on every machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def buffers(tmp_path_factory):
    """One ConvNetW16 expert of 2 epochs on the embedded data (no DSA), shared by the tests of
    distill.py: trained once per test session, by the first worker that needs it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    path = shared / "buffers"
    with open(shared / "buffers.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "buffers.done").exists():
            buffer.main(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--num_experts", "1",
                         "--train_epochs", "2", "--dsa", "False", "--buffer_path", str(path), "--device", "cpu"])
            (shared / "buffers.done").touch()
    return path


@pytest.fixture(scope="session")
def mini():
    """The embedded Fashion-MNIST subset, normalised: 5000 training and 1000 test images."""
    return get_dataset("FashionMNIST-mini")


@pytest.fixture
def small_data(monkeypatch, mini):
    """buffer.py sees helpers.small's data."""
    monkeypatch.setattr(buffer, "get_dataset", lambda *args: small(mini))
