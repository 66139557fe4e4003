"""--chunk_syn under torchrun: two CPU processes with the Gloo backend, each computing its share of every
minibatch in chunks, give one process's whole-minibatch gradients."""
import pytest
import torch
from helpers import relative_error
from test_torchrun import torchrun
from torchrun_chunks import gradients


def test_chunks_of_two_processes_shares_give_the_gradient_of_one_process_without_chunks(tmp_path):
    """Unroll and low-memory replay, DSA, texture crops and soft labels; shares of 1 and 3 crops in chunks of 2
    (the last uneven): every gradient within 1e-5 of one process computing each minibatch at once."""
    result = torchrun("tests/torchrun_chunks.py", tmp_path / "grads.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "grads.pt", weights_only=False)
    assert saved["world"] == 2
    for low_memory in (False, True):
        loss, grads = gradients(low_memory, chunk_syn=None)
        split_loss, split_grads = saved["results"][low_memory]
        assert split_loss.item() == pytest.approx(loss.item(), rel=1e-6), low_memory
        assert sorted(split_grads) == sorted(grads) == ["images", "label_logits", "syn_lr"]
        for name in grads:
            assert grads[name].abs().sum() > 0, (low_memory, name)
            assert relative_error(split_grads[name], grads[name]) <= 1e-5, (low_memory, name)
