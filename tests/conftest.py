import pytest

import buffer


@pytest.fixture(scope="session")
def buffers(tmp_path_factory):
    """One ConvNetW16 expert of 2 epochs on the embedded data (no DSA), shared by the tests of
    distill.py; tests/fixtures/mtt_reference_images.pt was made from exactly this buffer."""
    path = tmp_path_factory.mktemp("buffers")
    buffer.main(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--num_experts", "1",
                 "--train_epochs", "2", "--dsa", "False", "--buffer_path", str(path), "--device", "cpu"])
    return path
