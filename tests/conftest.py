import pytest
import torch

import buffer
from data import get_dataset

# Bit-for-bit references (tests/fixtures) were made with torch's 2 CPU threads: a reduction split
# over another number of threads rounds differently, so every machine runs the suite with 2.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def buffers(tmp_path_factory):
    """One ConvNetW16 expert of 2 epochs on the embedded data (no DSA), shared by the tests of distill.py."""
    path = tmp_path_factory.mktemp("buffers")
    buffer.main(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--num_experts", "1",
                 "--train_epochs", "2", "--dsa", "False", "--buffer_path", str(path), "--device", "cpu"])
    return path


@pytest.fixture(scope="session")
def mini():
    """The embedded Fashion-MNIST subset, normalised: 5000 training and 1000 test images."""
    return get_dataset("FashionMNIST-mini")
