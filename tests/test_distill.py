"""distill.py's command line on the embedded dataset, with experts from buffer.py: outputs, resume,
divergence, bad input, and the images it gave before the learnable-state refactor."""
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, crash_at, load, locked_by_another_process, one_line_error, run_distill
from PIL import Image

import distill
from mtt import matching, run_folder
from mtt.data import ZCA
from mtt.trajectories import buffer_dir

REFERENCE = Path(__file__).parent / "fixtures" / "mtt_reference.pt"


def error_of(buffers, save_path, *flags):
    return one_line_error(distill.main, TINY + ["--buffer_path", buffers, "--save_path", save_path, *flags])


def test_cli_writes_every_output(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "3", "--eval_it", "2")
    names = {p.name for p in tmp_path.iterdir()}
    for name in ["images_best.pt", "labels_best.pt", "syn_lr_best.pt", "lr_best.pt", "images_0.pt", "images_3.pt",
                 "labels_3.pt", "syn_lr_3.pt", "lr_3.pt", "synthetic_0.png", "synthetic_2.png", "synthetic_3.png",
                 "run.json", "log.jsonl", "checkpoint.pt"]:
        assert name in names, name
    images, labels = load(tmp_path / "images_3.pt"), load(tmp_path / "labels_3.pt")
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10))
    assert not torch.equal(images, load(tmp_path / "images_0.pt"))  # three updates happened
    assert torch.equal(load(tmp_path / "lr_3.pt"), load(tmp_path / "syn_lr_3.pt"))
    meta = json.loads((tmp_path / "run.json").read_text())
    assert (meta["dataset"], meta["model"], meta["ipc"], meta["zca"], meta["im_size"], meta["processes"]) == (
        "FashionMNIST-mini", "ConvNetW16", 1, False, [28, 28], 1)
    assert "subset" not in meta and "res" not in meta  # ImageNet's alone: a Fashion-MNIST run has neither
    assert meta["torch_version"] == torch.__version__ and meta["device_name"].startswith("cpu")
    head = subprocess.run(["git", "-C", str(Path(distill.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert meta["git_commit"] == head and len(head) == 40
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    steps = [r for r in rows if r["type"] == "iteration"]
    evals = [r for r in rows if r["type"] == "evaluation"]
    assert [r["it"] for r in steps] == [0, 1, 2] and [r["it"] for r in evals] == [0, 2, 3]
    assert all(r["loss"] > 0 for r in steps)
    assert steps[-1]["syn_lr"] == load(tmp_path / "syn_lr_3.pt").item()  # logged after its update
    # one network tested on the 1000 test images: accuracies in steps of 1/1000, best the highest so far
    assert all(abs(1000 * r["test_acc_mean"] - round(1000 * r["test_acc_mean"])) < 1e-9 for r in evals)
    for k, row in enumerate(evals):
        best = max(evals[:k + 1], key=lambda r: (r["test_acc_mean"], -r["it"]))
        assert (row["best_it"], row["best_test_acc_mean"]) == (best["it"], best["test_acc_mean"])


def reference_buffers(folder):
    """The expert tests/fixtures/mtt_reference.pt was distilled from, as a buffer directory."""
    reference = torch.load(REFERENCE, weights_only=True)
    directory = Path(buffer_dir(str(folder), "FashionMNIST-mini", "ConvNetW16", False))
    directory.mkdir(parents=True)
    np.save(directory / "replay_buffer_0.npy", reference["expert"].numpy())
    (directory / "buffer.json").write_text(reference["sidecar"])
    return reference


def test_without_new_flags_the_images_are_those_of_the_code_before_the_refactor(tmp_path):
    """tests/fixtures/mtt_reference.pt holds an expert and the images and syn_lr that distill.py
    gave from it at commit 3a5dad0 (before this layout) for these flags: ipc 2 and a minibatch
    smaller than the set. On the machine that made them the unroll reproduces them bit for bit;
    other CPUs round convolutions differently, hence the tolerance, which is far below the
    1e-2 a changed random stream gives (test_golden.py)."""
    reference = reference_buffers(tmp_path / "buffers")
    for low_memory, key in ((False, "unroll"), (True, "low_memory")):
        save = tmp_path / key
        distill.main(reference["flags"] + ["--buffer_path", str(tmp_path / "buffers"), "--save_path", str(save)]
                     + ["--low_memory"] * low_memory)
        images, syn_lr = load(save / "images_4.pt"), load(save / "syn_lr_4.pt")
        expected_images, expected_lr = reference[key]
        assert (images - expected_images).abs().max() <= 1e-5 * expected_images.abs().max()
        assert abs(syn_lr - expected_lr) <= 1e-6 * expected_lr


def test_the_image_ema_leaves_the_learned_images_unchanged(tmp_path):
    """The EMA only watches: a run with --ema_decay learns the images and syn_lr of a run without,
    bit for bit, so one run gives both the MTT set and its EMA."""
    reference = reference_buffers(tmp_path / "buffers")
    for run, ema in (("plain", []), ("ema", ["--ema_decay", "0.9"])):
        distill.main(reference["flags"] + ["--buffer_path", str(tmp_path / "buffers"),
                                           "--save_path", str(tmp_path / run), *ema])
    for name in ("images_4.pt", "syn_lr_4.pt"):
        assert torch.equal(load(tmp_path / "ema" / name), load(tmp_path / "plain" / name))
    assert not torch.equal(load(tmp_path / "ema" / "ema_images_4.pt"), load(tmp_path / "plain" / "images_4.pt"))


def test_zca_run_saves_the_transform_and_dewhitened_images(buffers, tmp_path):
    """Trajectory contents do not matter to the file layout: relabel the experts as ZCA ones."""
    zca_buffers = tmp_path / "zca_buffers"
    source = buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", zca=False)
    target = buffer_dir(str(zca_buffers), "FashionMNIST-mini", "ConvNetW16", zca=True)
    shutil.copytree(source, target)
    meta = json.loads((Path(target) / "buffer.json").read_text())
    (Path(target) / "buffer.json").write_text(json.dumps({**meta, "zca": True}))
    run_distill(zca_buffers, tmp_path / "run", "--Iteration", "1", "--zca", "--data_path", str(tmp_path / "data"))
    run = tmp_path / "run"
    zca = ZCA.load(run / "zca.pt")
    images = load(run / "images_1.pt")
    assert torch.allclose(load(run / "images_zca_1.pt"), zca.inverse(images), atol=1e-5)
    assert json.loads((run / "run.json").read_text())["zca"] is True


def test_resume_after_an_interruption_gives_the_same_images(buffers, tmp_path, monkeypatch):
    flags = ["--Iteration", "4", "--eval_it", "2", "--seed", "3"]
    run_distill(buffers, tmp_path / "straight", *flags)
    real_backward = crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path / "resumed", *flags)
    monkeypatch.setitem(matching.BACKWARD, False, real_backward)
    assert load(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 2
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:
        log.write('{"type": "iteration", "it": 3, "lo')  # a line torn by the kill
    run_distill(buffers, tmp_path / "resumed", *flags, "--resume")
    for name in ("images_4.pt", "syn_lr_4.pt"):
        assert torch.equal(load(tmp_path / "straight" / name), load(tmp_path / "resumed" / name))
    logs = [[json.loads(line) for line in open(tmp_path / run / "log.jsonl")] for run in ("straight", "resumed")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(logs[0]) == strip(logs[1])


def test_resume_applies_new_learning_rates_and_refuses_fixed_flags(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "2", "--eval_it", "2")
    assert "cannot change --ipc (1 in the checkpoint, 2 now)" in error_of(
        buffers, tmp_path, "--Iteration", "4", "--eval_it", "2", "--resume", "--ipc", "2")
    assert "cannot change --model" in error_of(
        buffers, tmp_path, "--Iteration", "4", "--resume", "--model", "ConvNetW8")
    run_distill(buffers, tmp_path, "--Iteration", "4", "--eval_it", "2", "--resume", "--lr_img", "50", "--lr_lr", "0")
    optimizers = load(tmp_path / "checkpoint.pt")["optimizers"]
    assert optimizers["images"]["param_groups"][0]["lr"] == 50 and optimizers["syn_lr"]["param_groups"][0]["lr"] == 0
    resumed = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"resume"' in line]
    assert resumed == [{"type": "resume", "it": 2, "changed": {"Iteration": [2, 4], "lr_img": [10.0, 50.0],
                                                               "lr_lr": [1e-06, 0.0]}}]
    lrs = [json.loads(line)["syn_lr"] for line in open(tmp_path / "log.jsonl") if '"iteration"' in line]
    assert lrs[2] == lrs[3] != lrs[0]  # --lr_lr 0 froze syn_lr from the resume on


def test_evaluating_more_often_does_not_change_the_images(buffers, tmp_path):
    run_distill(buffers, tmp_path / "every", "--Iteration", "3", "--eval_it", "1")
    run_distill(buffers, tmp_path / "end", "--Iteration", "3", "--eval_it", "3")
    assert torch.equal(load(tmp_path / "every" / "images_3.pt"), load(tmp_path / "end" / "images_3.pt"))


def test_low_memory_flag_runs_the_replay_and_gives_the_same_images(buffers, tmp_path, monkeypatch):
    called = {False: 0, True: 0}
    for low_memory, backward in list(matching.BACKWARD.items()):
        def counted(*args, low_memory=low_memory, backward=backward):
            called[low_memory] += 1
            return backward(*args)
        monkeypatch.setitem(matching.BACKWARD, low_memory, counted)
    run_distill(buffers, tmp_path / "full", "--Iteration", "2", "--eval_it", "2")
    assert called == {False: 2, True: 0}
    run_distill(buffers, tmp_path / "low", "--Iteration", "2", "--eval_it", "2", "--low_memory")
    assert called == {False: 2, True: 2}
    full, low = (load(tmp_path / run / "images_2.pt") for run in ("full", "low"))
    assert not torch.equal(full, load(tmp_path / "full" / "images_0.pt"))
    assert (full - low).abs().max().item() <= 1e-4 * full.abs().max().item()


def test_chunk_syn_gives_the_same_images_and_is_recorded(buffers, tmp_path):
    """10 images in chunks of 3 (3, 3, 3, 1) through the replay: the images of the whole minibatch at once."""
    run_distill(buffers, tmp_path / "whole", "--Iteration", "2", "--eval_it", "2")
    run_distill(buffers, tmp_path / "chunks", "--Iteration", "2", "--eval_it", "2", "--chunk_syn", "3", "--low_memory")
    whole, chunks = (load(tmp_path / run / "images_2.pt") for run in ("whole", "chunks"))
    assert not torch.equal(whole, load(tmp_path / "whole" / "images_0.pt"))
    assert (whole - chunks).abs().max().item() <= 1e-4 * whole.abs().max().item()
    args = [json.loads((tmp_path / run / "run.json").read_text())["args"] for run in ("whole", "chunks")]
    assert (args[0]["chunk_syn"], args[1]["chunk_syn"]) == (None, 3)
    assert "--chunk_syn: must be an integer from 1 to 2^31-1, not 0" in error_of(buffers, tmp_path / "bad",
                                                                                 "--chunk_syn", "0")
    assert not (tmp_path / "bad").exists()


def test_a_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(buffers, tmp_path, monkeypatch):
    real, calls = matching.BACKWARD[False], []

    def nan_at_the_second_iteration(*args):
        calls.append(1)
        return torch.tensor(math.nan) if len(calls) == 2 else real(*args)

    monkeypatch.setitem(matching.BACKWARD, False, nan_at_the_second_iteration)
    message = error_of(buffers, tmp_path, "--Iteration", "5", "--eval_it", "1")
    assert "matching loss became nan at iteration 1" in message and "--resume (the new flags apply)" in message
    assert f"the checkpoint and sets of iteration 1 are in {tmp_path}" in message
    assert load(tmp_path / "checkpoint.pt")["iteration"] == 1 and (tmp_path / "images_0.pt").exists()


def test_a_loss_that_diverges_before_anything_is_learned_names_lr_teacher(buffers, tmp_path):
    message = error_of(buffers, tmp_path, "--Iteration", "5", "--lr_teacher", "3e38")
    assert "at iteration 0" in message and "its first syn_lr, --lr_teacher 3e+38: lower it" in message
    assert "--lr_img" not in message


def test_a_non_finite_gradient_stops_the_run(buffers, tmp_path, monkeypatch):
    def poisoned(net, synset, *args):
        synset.images.grad = torch.full_like(synset.images, float("inf"))
        synset.syn_lr.grad = torch.zeros_like(synset.syn_lr)
        return torch.tensor(0.5)

    monkeypatch.setitem(matching.BACKWARD, False, poisoned)
    assert "the gradient of images became non-finite at iteration 0" in error_of(buffers, tmp_path, "--Iteration", "3")


def test_exploding_pixels_stop_the_run_and_nothing_non_finite_is_saved(buffers, tmp_path):
    """lr_img 1e12 sends the pixels to ~1e9 in one step while instance norm keeps the loss near 1."""
    message = error_of(buffers, tmp_path, "--Iteration", "3", "--lr_img", "1e12")
    assert "images reached" in message and "over 100x its largest initial value" in message
    saved = [p for p in tmp_path.glob("*.pt") if p.name != "checkpoint.pt"]
    assert {p.name for p in saved} >= {"images_0.pt", "images_best.pt"} and "images_1.pt" not in {p.name for p in saved}
    assert all(load(p).isfinite().all() for p in saved)


def test_resume_after_divergence_uses_the_lowered_rate(buffers, tmp_path):
    error_of(buffers, tmp_path, "--Iteration", "3", "--lr_img", "1e12")
    run_distill(buffers, tmp_path, "--Iteration", "3", "--lr_img", "10", "--resume")
    assert load(tmp_path / "images_3.pt").abs().max() < 100


def test_a_folder_with_files_but_no_checkpoint_is_refused_unless_resume(buffers, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    assert "holds files (notes.txt...) but no checkpoint" in error_of(buffers, tmp_path, "--Iteration", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    run_distill(buffers, tmp_path, "--Iteration", "1", "--resume")
    assert (tmp_path / "images_1.pt").exists() and (tmp_path / "notes.txt").read_text() == "keep me"


def test_an_existing_run_is_not_overwritten_without_resume(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    assert "already holds a run: pass --resume" in error_of(buffers, tmp_path, "--Iteration", "1")


def test_a_truncated_checkpoint_is_one_line(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert f"cannot read {checkpoint} as a checkpoint" in error_of(buffers, tmp_path, "--Iteration", "2", "--resume")


def test_only_this_projects_partial_writes_of_dead_processes_are_removed(buffers, tmp_path):
    """Partial writes are named .{name}.mtt-partial-{pid}; files of the user's that merely look
    temporary (thesis.tmp777777, the old *.tmpPID) are never touched."""
    run_distill(buffers, tmp_path, "--Iteration", "1")
    dead = 2**22 + 12345  # above Linux's default pid_max
    ours_dead, ours_alive = (tmp_path / f".images_9.pt.mtt-partial-{pid}" for pid in (dead, os.getpid()))
    users = [tmp_path / "thesis.tmp777777", tmp_path / f"images_9.pt.tmp{dead}", tmp_path / f"notes.mtt-partial-{dead}"]
    for path in [ours_dead, ours_alive, *users]:
        path.write_text("draft")
    run_distill(buffers, tmp_path, "--Iteration", "2", "--resume")
    assert not ours_dead.exists() and ours_alive.exists() and all(path.read_text() == "draft" for path in users)


def test_a_folder_of_user_files_that_look_temporary_is_no_empty_folder(buffers, tmp_path):
    (tmp_path / "thesis.tmp777777").write_text("draft")
    assert "holds files (thesis.tmp777777...) but no checkpoint" in error_of(buffers, tmp_path, "--Iteration", "1")
    run_distill(buffers, tmp_path, "--Iteration", "1", "--resume")
    assert (tmp_path / "thesis.tmp777777").read_text() == "draft" and (tmp_path / "images_1.pt").exists()


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(buffers, tmp_path):
    with locked_by_another_process(tmp_path):
        assert "is in use by another distill.py run" in error_of(buffers, tmp_path, "--Iteration", "1")


def test_the_grid_is_enlarged_and_ipc_1_is_one_row_of_classes(buffers, tmp_path):
    run_distill(buffers, tmp_path / "one", "--Iteration", "0")
    run_distill(buffers, tmp_path / "two", "--Iteration", "0", "--ipc", "2")
    one, two = (Image.open(tmp_path / run / "synthetic_0.png") for run in ("one", "two"))
    side, caption = 28 * 4 + 2, 12  # nearest x4 and a 2-pixel border; the class's name under it
    assert one.size == (10 * side + 2, side + caption + 2)  # ten classes side by side
    assert two.size == (2 * side + 2, 10 * (side + caption) + 2)  # a row of two per class
    pixels = np.asarray(one.convert("L"))
    assert (pixels[2:6, 2:6] == pixels[2, 2]).all()  # each source pixel became a 4x4 block
    strips = [pixels[2 + 112:2 + 112 + caption, 2 + side * k:side * (k + 1)] for k in range(10)]
    assert all((strip < 128).sum() > 20 for strip in strips)  # each class named in black under its image
    rows = np.asarray(two.convert("L"))
    assert (rows[114:126, 116:228] == 255).all()  # at ipc 2 a row's second image of the class is not named again


def test_the_default_run_name_tells_a_sweep_apart():
    names = {distill.run_name(distill.parse_args(TINY + flags)) for flags in (
        [], ["--lr_img", "100"], ["--lr_lr", "1e-5"], ["--lr_teacher", "0.001"], ["--batch_syn", "5"])}
    assert len(names) == 5
    assert distill.run_name(distill.parse_args(TINY)) == (
        "ConvNetW16_ipc1_syn2_exp1_max1_img10_lrlr1e-06_teacher0.01_batchall_seed0")


def test_experts_selection_flags_reach_the_sampler(buffers, tmp_path):
    """Three experts in two files (copies of the session's expert, moved apart): several are drawn
    without flags; --max_files 1 --max_experts 1 --load_all leave exactly one."""
    source = Path(buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", False))
    directory = Path(buffer_dir(str(tmp_path / "three"), "FashionMNIST-mini", "ConvNetW16", False))
    directory.mkdir(parents=True)
    expert = np.load(source / "replay_buffer_0.npy")
    np.save(directory / "replay_buffer_0.npy", expert)
    np.save(directory / "replay_buffer_1.npy", np.concatenate([expert + 0.01, expert - 0.01]))
    meta = json.loads((source / "buffer.json").read_text())
    meta["experts"] = [{**meta["experts"][0], "file": f"replay_buffer_{file}.npy", "row": row, "index": index}
                       for index, (file, row) in enumerate([(0, 0), (1, 0), (1, 1)])]
    (directory / "buffer.json").write_text(json.dumps({**meta, "next_index": 3}))
    experts_used = lambda run: {json.loads(line)["expert"] for line in open(run / "log.jsonl") if '"iteration"' in line}
    run_distill(tmp_path / "three", tmp_path / "all", "--Iteration", "6", "--eval_it", "6")
    run_distill(tmp_path / "three", tmp_path / "one", "--Iteration", "6", "--eval_it", "6", "--max_files", "1",
                "--max_experts", "1", "--load_all")
    assert len(experts_used(tmp_path / "all")) > 1 and experts_used(tmp_path / "one") == {0}


@pytest.mark.parametrize("flags,message", [
    (["--ipc", "501"], "--ipc 501 needs 501 real images per class"),
    (["--max_start_epoch", "2", "--expert_epochs", "2"], "goes beyond the experts' 3 snapshots"),
    (["--texture", "--zca"], "--texture cannot be combined with --zca"),
    (["--syn_steps", "0"], "argument --syn_steps: must be an integer from 1 to 2^31-1, not 0"),
    (["--max_experts", "0"], "argument --max_experts: must be an integer from 1 to 2^31-1, not 0"),
    (["--batch_syn", "-1"], "argument --batch_syn: must be an integer from 1 to 2^31-1, not -1"),
    (["--batch_train", "0"], "argument --batch_train: must be an integer from 1 to 2^31-1, not 0"),
    (["--lr_teacher", "-0.01"],
     "argument --lr_teacher: must be a positive number up to 3.4e38 (float32's largest), not -0.01"),
    (["--epoch_eval_train", "-1"], "argument --epoch_eval_train: must be an integer from 1 to 2^31-1, not -1"),
    (["--Iteration", "-1"], "argument --Iteration: must be an integer from 0 to 2^31-1, not -1"),
    (["--eval_mode", "Q"], "argument --eval_mode: invalid choice: 'Q'"),
    (["--dsa_strategy", "color_blur"], "argument --dsa_strategy: unknown DSA op(s) blur"),
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--ema_decay", "1.5"], "argument --ema_decay: must be in (0, 1), not 1.5"),
    (["--no_aug", "yes please"], "argument --no_aug: expected True or False, not 'yes please'"),
    (["--model", "ConvNetW7"], "argument --model: invalid choice: 'ConvNetW7'"),
])
def test_bad_input_gets_one_clear_line_and_creates_nothing(buffers, tmp_path, flags, message):
    assert message in error_of(buffers, tmp_path / "run", "--Iteration", "1", *flags)
    assert not (tmp_path / "run").exists()


def test_a_missing_gpu_or_an_unwritable_save_path_is_one_line(buffers, tmp_path):
    if not torch.cuda.is_available():
        assert "this machine has no CUDA GPU" in error_of(buffers, tmp_path / "run", "--device", "cuda")
    (tmp_path / "file").write_text("")
    assert "a file is in the way" in error_of(buffers, tmp_path / "file", "--Iteration", "0")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if os.access(read_only, os.W_OK):  # root writes anywhere: a path under a file fails for everyone
        read_only = tmp_path / "file" / "below"
    assert "--save_path" in error_of(buffers, read_only / "run", "--Iteration", "0")


def test_missing_or_mismatched_buffers_are_refused(buffers, tmp_path):
    with pytest.raises(SystemExit, match="no expert trajectories in .*python buffer.py --dataset FashionMNIST-mini"):
        run_distill(tmp_path / "empty", tmp_path / "run")
    copied = tmp_path / "copied"
    shutil.copytree(buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", False),
                    buffer_dir(str(copied), "FashionMNIST-mini", "ConvNetW32", False))
    with pytest.raises(SystemExit, match="holds experts with model 'ConvNetW16' but this run needs 'ConvNetW32'"):
        distill.main(TINY[:2] + ["--model", "ConvNetW32"] + TINY[4:] + ["--buffer_path", str(copied),
                                                                       "--save_path", str(tmp_path / "run2")])


def test_an_expert_with_identical_snapshots_is_refused_with_its_own_line(buffers, tmp_path):
    """The original's buffer.py on a CPU saves aliases: every snapshot equals the last."""
    copied = tmp_path / "aliased"
    directory = buffer_dir(str(copied), "FashionMNIST-mini", "ConvNetW16", False)
    shutil.copytree(buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", False), directory)
    path = Path(directory) / "replay_buffer_0.npy"
    array = np.load(path)
    array[:] = array[:, -1:]
    np.save(path, array)
    message = error_of(copied, tmp_path / "run", "--Iteration", "2")
    assert "has the same parameters at epochs 0 and 1" in message and "lower --lr_img" not in message


def test_texture_mode_learns_canvases_of_real_tiles_and_trains_on_their_crops(buffers, tmp_path, mini):
    run_distill(buffers, tmp_path, "--Iteration", "1", "--texture", "--canvas_size", "2", "--canvas_samples", "2")
    canvases, learned = load(tmp_path / "images_0.pt"), load(tmp_path / "images_1.pt")
    assert canvases.shape == learned.shape == (10, 1, 56, 56) and not torch.equal(canvases, learned)
    for label, canvas in enumerate(canvases):  # at iteration 0 each tile is a real image of the canvas's class
        for tile in (canvas[:, :28, :28], canvas[:, 28:, 28:]):
            matches = (mini.images_train == tile).flatten(1).all(1)
            assert mini.labels_train[matches].tolist()[:1] == [label]
    meta = json.loads((tmp_path / "run.json").read_text())
    assert (meta["texture"], meta["canvas_size"], meta["canvas_samples"]) == (True, 2, 2)


def test_noise_initialisation_is_standard_normal_and_no_real_image(buffers, tmp_path, mini):
    run_distill(buffers, tmp_path, "--Iteration", "0", "--pix_init", "noise", "--ipc", "2")
    images = load(tmp_path / "images_0.pt")
    assert images.shape == (20, 1, 28, 28) and abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05
    assert not (mini.images_train[:, None] == images[None]).flatten(2).all(2).any()


def test_no_aug_turns_dsa_off_in_the_unroll_only(buffers, tmp_path, monkeypatch):
    seen = {"unroll": [], "evaluation": []}
    real_schedule, real_evaluate = distill.draw_schedule, distill.evaluate_sets
    monkeypatch.setattr(distill, "draw_schedule", lambda images, steps, batch, augmentation, texture: (
        seen["unroll"].append(augmentation) or real_schedule(images, steps, batch, augmentation, texture)))
    monkeypatch.setattr(distill, "evaluate_sets", lambda *args: seen["evaluation"].append(args[5]) or
                        real_evaluate(*args))
    run_distill(buffers, tmp_path / "plain", "--Iteration", "1")
    run_distill(buffers, tmp_path / "no_aug", "--Iteration", "1", "--no_aug")
    strategy = "color_crop_cutout_flip_scale_rotate"
    assert seen == {"unroll": [strategy, None], "evaluation": [strategy] * 4}


def test_the_grid_stops_at_ipc_50_unless_force_save(buffers, tmp_path):
    run_distill(buffers, tmp_path / "plain", "--Iteration", "0", "--ipc", "50")
    run_distill(buffers, tmp_path / "forced", "--Iteration", "0", "--ipc", "50", "--force_save")
    assert not list((tmp_path / "plain").glob("*synthetic_*.png")) and (tmp_path / "plain" / "images_0.pt").exists()
    assert Image.open(tmp_path / "forced" / "synthetic_0.png").size == (50 * 114 + 2, 10 * 126 + 2)


def test_a_syn_lr_that_is_no_longer_positive_stops_the_run(buffers, tmp_path, monkeypatch):
    def pushes_syn_lr_below_zero(net, synset, *args):
        synset.images.grad = torch.zeros_like(synset.images)
        synset.syn_lr.grad = torch.tensor(1e5)  # lr_lr 1e-6: one step takes syn_lr from 0.01 to -0.09
        return torch.tensor(0.5)

    monkeypatch.setitem(matching.BACKWARD, False, pushes_syn_lr_below_zero)
    assert "syn_lr became -0.09 at iteration 0" in error_of(buffers, tmp_path, "--Iteration", "3")


def test_label_model_timestamp_picks_the_snapshot_that_labels_the_images(buffers, tmp_path):
    """With --pix_init real, DATM's initial label logits are one expert's logits at that snapshot."""
    expert = np.load(Path(buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", False)) / "replay_buffer_0.npy")
    net = distill.get_network("ConvNetW16", 1, 10, (28, 28))
    logits = {}
    for timestamp in (0, -1):
        save = tmp_path / str(timestamp)
        run_distill(buffers, save, "--Iteration", "0", "--soft_label", "--pix_init", "real",
                    "--Label_Model_Timestamp", str(timestamp))
        images, logits[timestamp] = load(save / "images_0.pt"), load(save / "labels_0.pt")
        expected = distill.predict(net, torch.from_numpy(expert[0, timestamp]), images)
        assert torch.allclose(logits[timestamp], expected, atol=1e-5)
    assert not torch.allclose(logits[0], logits[-1], atol=1e-2)


def test_curves_png_shows_the_loss_syn_lr_and_accuracy_of_every_evaluation(buffers, tmp_path, monkeypatch):
    committed, real_commit = {}, run_folder.commit
    monkeypatch.setattr(run_folder, "commit", lambda folder, files, iteration: (
        committed.update({iteration: "curves.png" in files}), real_commit(folder, files, iteration)))
    run_distill(buffers, tmp_path, "--Iteration", "4", "--eval_it", "2")
    assert committed == {0: False, 2: True, 4: True}  # drawn from the first iteration on
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert pixels.shape == (320, 1200, 3)
    panels = np.array_split(pixels, 3, axis=1)  # matching loss | syn_lr | test accuracy
    colour = lambda panel, rgb: (np.abs(panel.astype(int) - rgb).sum(2) < 30).sum()
    assert colour(panels[0], (31, 119, 180)) > 100 and colour(panels[1], (255, 127, 14)) > 100
    assert colour(panels[2], (31, 119, 180)) > 100  # the first (set, model)'s accuracies


def test_the_grid_wraps_many_classes_into_rows_of_ten():
    from mtt.run_folder import grid
    images, names = torch.zeros(200, 3, 64, 64), [f"n{k:08d}" for k in range(200)]  # Tiny ImageNet at ipc 1
    # x2 to 128 px, 2 px borders and a 12-pixel strip for the class's name
    assert grid(images, lambda x: x, 1, names).shape == (20 * 142 + 2, 10 * 130 + 2, 3)
    assert grid(images, lambda x: x, 2, sorted(names[:100] * 2)).shape == (100 * 142 + 2, 2 * 130 + 2, 3)


def test_a_short_run_s_curves_have_no_moving_average_of_one(buffers, tmp_path, monkeypatch):
    """The loss's moving average takes a 50th of the iterations: under 100 it would be the curve
    itself, labelled "mean of 1"."""
    from matplotlib.axes import Axes
    labels, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda axes, *args, **kwargs: (labels.append(kwargs.get("label")),
                                                                     plot(axes, *args, **kwargs))[1])
    evaluation = {"type": "evaluation", "it": 0, "set": "images", "model": "ConvNet", "test_acc_mean": 0.5,
                  "best_test_acc_mean": 0.5}
    rows = lambda n: [{"type": "iteration", "it": it, "loss": 1 / (it + 1), "syn_lr": 0.01} for it in range(n)] + [
        evaluation]
    run_folder.curves(rows(10))
    assert "matching loss" in labels and not [label for label in labels if label and label.startswith("mean")]
    run_folder.curves(rows(500))
    assert "mean of 10" in labels


class FakeBoard:
    """torch.utils.tensorboard's SummaryWriter, recording what it is given."""
    calls = []

    def __init__(self, folder):
        FakeBoard.calls.append(("folder", folder))

    def add_scalar(self, name, value, step):
        FakeBoard.calls.append(("scalar", name, value, step))

    def add_image(self, name, array, step, dataformats):
        FakeBoard.calls.append(("image", name, array.shape, step, dataformats))

    def flush(self):
        pass

    def close(self):
        FakeBoard.calls.append(("close",))


def test_tensorboard_gets_the_logged_scalars_and_grids_or_one_line_without_it(buffers, tmp_path, monkeypatch):
    import importlib.util
    import sys
    import types
    assert "pip install tensorboard" in error_of(buffers, tmp_path / "none", "--Iteration", "1", "--tensorboard") \
        or importlib.util.find_spec("tensorboard") is not None
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeBoard))
    # tensorboard counts as installed for distill.py alone: patching importlib's find_spec itself broke the
    # first import of torch._dynamo (which looks up specs) when a step happened to make it
    monkeypatch.setattr(distill, "installed", lambda package: True)
    FakeBoard.calls = []
    run_distill(buffers, tmp_path, "--Iteration", "2", "--eval_it", "2", "--tensorboard")
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    expected = [("folder", str(tmp_path / "tensorboard"))]
    for row in rows:
        if row["type"] == "iteration":
            expected += [("scalar", "matching loss", row["loss"], row["it"]),
                         ("scalar", "syn_lr", row["syn_lr"], row["it"])]
        else:
            expected += [("scalar", "test accuracy/images ConvNetW16", row["test_acc_mean"], row["it"]),
                         ("scalar", "best test accuracy/images ConvNetW16", row["best_test_acc_mean"], row["it"]),
                         ("image", "images", (128, 1142, 3), row["it"], "HWC")]  # 28 px x4, borders, names
    assert FakeBoard.calls == expected + [("close",)]  # the writer's thread flushes on close


def forced_free_memory(monkeypatch, fraction_of_the_unroll):
    """distill.py sees this fraction of the unroll's forecast peak free, whatever the machine has."""
    real = distill.choose_backward

    def choose(args, peak, batch_syn, free):
        return real(args, peak, batch_syn, fraction_of_the_unroll * peak(False, batch_syn, args.chunk_syn))

    monkeypatch.setattr(distill, "choose_backward", choose)


def test_the_replay_runs_where_the_unroll_would_not_fit(buffers, tmp_path, monkeypatch, capsys):
    forced_free_memory(monkeypatch, 0.5)
    run_distill(buffers, tmp_path / "auto", "--Iteration", "2", "--syn_steps", "20")
    out = capsys.readouterr().out
    assert re.search(r"^the full unroll would need about [\d.]+ GB, more than [\d.]+ GB \(the [\d.]+ GB free less a "
                     r"10% margin\): running the low-memory replay instead \(the same gradient\), about [\d.]+ GB$",
                     out, re.M)
    monkeypatch.undo()
    run_distill(buffers, tmp_path / "replay", "--Iteration", "2", "--syn_steps", "20", "--low_memory")
    assert torch.equal(load(tmp_path / "auto" / "images_2.pt"), load(tmp_path / "replay" / "images_2.pt"))


def test_a_forced_unroll_that_would_not_fit_stops_before_any_work(buffers, tmp_path, monkeypatch):
    forced_free_memory(monkeypatch, 0.5)
    message = error_of(buffers, tmp_path / "run", "--Iteration", "2", "--syn_steps", "20", "--low_memory", "False")
    assert re.fullmatch(r"error: one iteration with the full unroll needs about [\d.]+ GB, more than [\d.]+ GB \(the "
                        r"[\d.]+ GB free less a 10% margin\); these would fit: --low_memory, or --batch_syn \d+",
                        message), message
    assert not (tmp_path / "run").exists()


def test_when_nothing_fits_the_line_says_so(buffers, tmp_path, monkeypatch):
    forced_free_memory(monkeypatch, 0.001)
    message = error_of(buffers, tmp_path / "run", "--Iteration", "2", "--syn_steps", "20")
    assert "nothing fits, not even --low_memory --chunk_syn 1: lower --syn_steps" in message
    assert not (tmp_path / "run").exists()


def test_an_out_of_memory_error_that_still_happens_is_one_line_and_keeps_the_checkpoint(buffers, tmp_path,
                                                                                         monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(matching.BACKWARD, False, out_of_memory)
    message = error_of(buffers, tmp_path, "--Iteration", "2")
    assert message.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); stopped: the "
                              f"checkpoint and sets of iteration 0 are in {tmp_path}: lower the peak with "
                              "--low_memory, --chunk_syn N or --batch_syn N and --resume"), message
    assert load(tmp_path / "checkpoint.pt")["iteration"] == 0


def test_a_mistyped_resume_folder_is_refused_beside_the_run_it_resembles(buffers, tmp_path, capsys):
    """A multi-hour run in runs/mtt_cifar10, resumed as --save_path runs/mtt_cifr10: one line naming
    the run, nothing made. A name like no run's starts a new run, and says it is a new folder."""
    run_distill(buffers, tmp_path / "mtt_cifar10", "--Iteration", "1")
    message = error_of(buffers, tmp_path / "mtt_cifr10", "--Iteration", "2", "--resume")
    assert message == (f"error: --resume --save_path {tmp_path / 'mtt_cifr10'}: no such folder, but "
                       f"{tmp_path / 'mtt_cifar10'} beside it holds a run: give --save_path {tmp_path / 'mtt_cifar10'} "
                       f"to continue it, or a name less like it for a new run")
    assert not (tmp_path / "mtt_cifr10").exists()
    capsys.readouterr()
    run_distill(buffers, tmp_path / "datm_tiny", "--Iteration", "1", "--resume")
    assert f"--resume: a new folder {tmp_path / 'datm_tiny'}; starting at iteration 0" in capsys.readouterr().out
