"""Nothing of the user's is deleted, one evaluation's files appear together, and every failure is
one line: faults injected where they would strike (a kill at a named rename, a full disk, Ctrl-C,
SIGTERM, corrupt files)."""
import errno
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, load, locked_by_another_process, one_line_error, run_distill

import buffer
import distill
import eval as eval_script
import utils
from mtt import evaluation, matching, parallel, run_folder
from mtt.data import IDX_FILES, get_dataset
from mtt.trajectories import buffer_dir

FAST_BUFFER = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--num_experts", "1", "--train_epochs", "1"]


def distill_error(buffers, save_path, *flags):
    return one_line_error(distill.main, TINY + ["--buffer_path", buffers, "--save_path", save_path, *flags])


# ---------------------------------------------------------------------------------------------
# Data loss and wrong data


def test_export_never_removes_a_users_file_that_looks_temporary(buffers, tmp_path):
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "thesis.tmp777777").write_text("draft")
    buffer.main(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--buffer_path", str(buffers),
                 "--export_pt", str(tmp_path / "pt")])
    assert (tmp_path / "pt" / "thesis.tmp777777").read_text() == "draft"
    assert (tmp_path / "pt" / "replay_buffer_0.pt").exists()


def interrupt_rename_of(monkeypatch, name):
    """os.replace raises KeyboardInterrupt (a kill) when it is about to put `name` in place."""
    real = os.replace

    def replace(source, target):
        if Path(target).name == name:
            raise KeyboardInterrupt
        return real(source, target)

    monkeypatch.setattr(os, "replace", replace)


def kill_between_the_renames(buffers, tmp_path, monkeypatch):
    """A run killed after images_2.pt (and the iteration-2 checkpoint) are in place and before
    syn_lr_2.pt is, beside the same run left to finish: (killed folder, straight folder)."""
    flags = ["--Iteration", "2", "--eval_it", "2"]
    run_distill(buffers, tmp_path / "straight", *flags)
    interrupt_rename_of(monkeypatch, "syn_lr_2.pt")
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path / "killed", *flags)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert run_folder.journal(killed)["renaming"] and (killed / "images_2.pt").exists()
    assert not (killed / "syn_lr_2.pt").exists()
    return killed, tmp_path / "straight"


def assert_whole(killed, straight):
    assert not run_folder.journal(killed)["renaming"]
    for name in ("images_2.pt", "syn_lr_2.pt", "lr_2.pt", "images_best.pt", "syn_lr_best.pt", "lr_best.pt"):
        assert torch.equal(load(killed / name), load(straight / name)), name
    assert load(killed / "checkpoint.pt")["iteration"] == 2


def test_a_kill_between_the_renames_of_one_evaluation_is_finished_by_the_next_start(buffers, tmp_path, monkeypatch):
    """The next distill.py start puts the whole evaluation in place, so a resume continues from
    iteration 2 and --Iteration below it is refused."""
    killed, straight = kill_between_the_renames(buffers, tmp_path, monkeypatch)
    message = distill_error(buffers, killed, "--Iteration", "1", "--eval_it", "2", "--resume")
    assert "--Iteration 1 is below the iteration the run" in message and "has reached (2)" in message
    assert_whole(killed, straight)


def test_a_reader_finishes_a_save_that_a_kill_cut_short(buffers, tmp_path, monkeypatch, capsys):
    """eval.py on the killed folder finishes the commit (no process holds its lock) and then reads
    images_2.pt with syn_lr_2.pt, not with --lr; other tools then find it whole too (lr_2.pt is DATM's)."""
    killed, straight = kill_between_the_renames(buffers, tmp_path, monkeypatch)
    eval_script.main(["--dataset", "FashionMNIST-mini", "--model", "ConvNetW16", "--syn_path", str(killed),
                      "--iteration", "2", "--num_eval", "1", "--epoch_eval_train", "1", "--device", "cpu"])
    assert "(syn_lr_2.pt)" in capsys.readouterr().out
    assert_whole(killed, straight)


def test_a_reader_waits_for_a_live_writer_and_then_refuses(buffers, tmp_path, monkeypatch):
    """While another process holds the folder's lock, the save is its to finish: the reader waits
    COMMIT_WAIT, then refuses in one line, and renames nothing."""
    killed, _ = kill_between_the_renames(buffers, tmp_path, monkeypatch)
    monkeypatch.setattr(run_folder, "COMMIT_WAIT", 0.2)
    with locked_by_another_process(killed):
        message = one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--syn_path", killed,
                                                    "--iteration", "2"])
    assert "in the middle of saving an evaluation that cannot be finished here" in message and "in use" in message
    assert run_folder.journal(killed)["renaming"] and not (killed / "syn_lr_2.pt").exists()


@pytest.mark.parametrize("renaming", [
    {"notes.txt": "x.tmp1"},  # over a user's file
    {"../escaped.txt": "draft.tmp777777"},  # out of the folder
    {"notes.txt": ".notes.txt.mtt-partial-1"},  # a temporary name of ours, onto a name not ours
    {"images_best.pt": "draft.tmp777777"},  # a user's file onto a set file
    {"images_best.pt": ".labels_best.pt.mtt-partial-1"},  # another file's temporary name
    {"images_best.pt/../../x": ".images_best.pt/../../x.mtt-partial-1"},
])
def test_a_hostile_journal_renames_nothing_on_resume_or_read(buffers, tmp_path, renaming):
    """A run folder from elsewhere whose journal lists renames of other files: distill.py --resume and
    eval.py each refuse in one line, and every file stays where and as it was."""
    run = tmp_path / "run"
    run_distill(buffers, run, "--Iteration", "1")
    for name, text in {"notes.txt": "notes", "x.tmp1": "x", "draft.tmp777777": "draft",
                       ".notes.txt.mtt-partial-1": "partial", ".labels_best.pt.mtt-partial-1": "labels"}.items():
        (run / name).write_text(text)
    journal = {"generation": 9, "iteration": 1, "renaming": renaming}
    (run / ".mtt-commit.json").write_text(json.dumps(journal))
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    for message in (distill_error(buffers, run, "--Iteration", "2", "--resume"),
                    one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--syn_path", run])):
        assert f"{run / '.mtt-commit.json'} is not a journal distill.py writes (it would rename" in message
        assert "nothing was renamed" in message
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file() and path.name != ".lock"} == \
        {path: data for path, data in before.items() if path.name != ".lock"}


@pytest.mark.parametrize("journal,said", [
    ({}, "missing or mistyped generation, renaming"),
    ({"generation": 1, "iteration": 1, "renaming": "images_1.pt"}, "missing or mistyped renaming"),
    ([], "it holds a JSON list, not an object"),
])
def test_a_malformed_journal_is_one_line(buffers, tmp_path, journal, said):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    (tmp_path / ".mtt-commit.json").write_text(json.dumps(journal))
    for message in (distill_error(buffers, tmp_path, "--Iteration", "2", "--resume"),
                    one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--syn_path", tmp_path])):
        assert said in message and ".mtt-commit.json" in message


def test_a_reader_waits_for_an_evaluations_save_in_flight_and_reads_all_of_it(tmp_path, monkeypatch):
    """A second save is between its renames (images_1.pt in place, syn_lr_1.pt not yet) when a
    reader starts: it reads once the save lands, both new files, never the new images at the old rate."""
    def files(value):
        return {"images_1.pt": torch.full((2, 1, 8, 8), value), "labels_1.pt": torch.arange(2),
                "syn_lr_1.pt": torch.tensor(value / 100)}

    run_folder.commit(tmp_path, files(1.0), iteration=1)
    interrupt_rename_of(monkeypatch, "syn_lr_1.pt")
    with pytest.raises(KeyboardInterrupt):
        run_folder.commit(tmp_path, files(2.0), iteration=1)
    monkeypatch.undo()
    landing = threading.Timer(0.3, run_folder.finish_commit, [tmp_path])  # the save going on
    landing.start()
    saved = run_folder.load_saved_set(tmp_path / "images_1.pt")
    landing.join()
    assert torch.equal(saved.images, files(2.0)["images_1.pt"]) and saved.lr == pytest.approx(0.02)


def test_an_evaluation_cut_short_before_its_journal_leaves_the_previous_files(buffers, tmp_path, monkeypatch):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}
    real, written = run_folder.file_bytes, []

    def dies_at_the_third_file(name, value):
        written.append(name)
        if len(written) == 3:
            raise KeyboardInterrupt
        return real(name, value)

    monkeypatch.setattr(run_folder, "file_bytes", dies_at_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        run_distill(buffers, tmp_path, "--Iteration", "2", "--resume")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before
    assert not [p for p in tmp_path.iterdir() if "mtt-partial" in p.name]


@pytest.mark.parametrize("flags,message", [
    (["--lr_teacher", "1e6"], "expert #0 diverged: its parameters became non-finite in epoch 1 (--lr_teacher 1e+06"),
    (["--lr_teacher", "inf"],
     "argument --lr_teacher: must be a positive number up to 3.4e38 (float32's largest), not inf"),
    (["--l2", "inf"], "argument --l2: must be a number from 0 to 3.4e38 (float32's largest), not inf"),
])
def test_buffer_saves_no_non_finite_expert(tmp_path, flags, message):
    assert message in one_line_error(buffer.main, FAST_BUFFER + ["--buffer_path", tmp_path, *flags])
    directory = Path(buffer_dir(str(tmp_path), "FashionMNIST-mini", "ConvNetW8", False))
    assert not list(directory.glob("replay_buffer_*")) if directory.exists() else True
    if (directory / "buffer.json").exists():
        assert json.loads((directory / "buffer.json").read_text())["experts"] == []


def test_distill_names_a_non_finite_buffer_as_the_cause(buffers, tmp_path):
    directory = Path(buffer_dir(str(tmp_path / "nan"), "FashionMNIST-mini", "ConvNetW16", False))
    directory.mkdir(parents=True)
    source = Path(buffer_dir(str(buffers), "FashionMNIST-mini", "ConvNetW16", False))
    expert = np.load(source / "replay_buffer_0.npy")
    expert[0, 1:] = np.nan
    np.save(directory / "replay_buffer_0.npy", expert)
    (directory / "buffer.json").write_text((source / "buffer.json").read_text())
    message = distill_error(tmp_path / "nan", tmp_path / "run", "--Iteration", "2")
    assert "expert 0 of the buffer holds non-finite parameters" in message and "--lr_img" not in message


def test_importing_the_same_files_twice_skips_them_and_says_so(tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    torch.manual_seed(0)
    shapes = [p.shape for p in buffer.get_network("ConvNetW8", 1, 10, (28, 28)).parameters()]
    torch.save([[[torch.randn(s) for s in shapes] for _ in range(2)]], old / "replay_buffer_0.pt")
    argv = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--import_pt", str(old), "--train_epochs", "1",
            "--buffer_path", str(tmp_path)]
    buffer.main(argv)
    capsys.readouterr()
    buffer.main(argv)
    assert capsys.readouterr().out.splitlines() == [
        f"skipped {old / 'replay_buffer_0.pt'}: its experts are already imported, in replay_buffer_0.npy"]
    meta = buffer.read_sidecar(buffer_dir(str(tmp_path), "FashionMNIST-mini", "ConvNetW8", False))
    assert len(meta["experts"]) == 1


def test_exploding_label_logits_stop_the_run(buffers, tmp_path):
    message = distill_error(buffers, tmp_path, "--Iteration", "3", "--soft_label", "--lr_y", "1e30",
                            "--threshold", "10")
    assert "label_logits reached" in message and "over 100x its largest initial value" in message
    assert all(load(p).isfinite().all() for p in tmp_path.glob("labels_*.pt"))


def test_resume_refuses_a_changed_lr_teacher_and_says_why(buffers, tmp_path):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    message = distill_error(buffers, tmp_path, "--Iteration", "2", "--resume", "--lr_teacher", "0.02")
    assert ("cannot change --lr_teacher (0.01 in the checkpoint, 0.02 now): it only sets syn_lr at iteration 0"
            in message)


def test_a_refused_resume_changes_nothing_and_prints_nothing_before_its_line(buffers, tmp_path, capsys):
    run_distill(buffers, tmp_path, "--Iteration", "2", "--eval_it", "2")
    run_json = (tmp_path / "run.json").read_text()
    capsys.readouterr()
    assert "--Iteration 1 is below" in distill_error(buffers, tmp_path, "--Iteration", "1", "--resume")
    assert (tmp_path / "run.json").read_text() == run_json and "resumed" not in capsys.readouterr().out
    with locked_by_another_process(tmp_path):
        capsys.readouterr()
        assert "in use by another" in distill_error(buffers, tmp_path, "--Iteration", "3", "--resume")
        assert "resumed" not in capsys.readouterr().out


def test_the_interrupted_line_says_whether_a_checkpoint_exists(tmp_path):
    assert run_folder.resume_hint(tmp_path) == "no checkpoint was saved yet; nothing to resume"
    run_folder.commit(tmp_path, {"checkpoint.pt": {"iteration": 7}}, iteration=7)
    assert run_folder.resume_hint(tmp_path) == (f"the checkpoint of iteration 7 is in {tmp_path}; run the same "
                                                f"command with --resume to continue")


@pytest.mark.parametrize("script,flag", [(distill.main, "--save_path"), (distill.main, "--buffer_path"),
                                         (buffer.main, "--buffer_path"), (eval_script.main, "--out")])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(script, flag):
    assert f"argument {flag}: an empty path" in one_line_error(script, ["--dataset", "FashionMNIST-mini", flag, ""])


# ---------------------------------------------------------------------------------------------
# Failures that are one line


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_buffer_py_allocates_its_file_is_one_line(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    message = one_line_error(buffer.main, FAST_BUFFER + ["--buffer_path", tmp_path])
    directory = Path(buffer_dir(str(tmp_path), "FashionMNIST-mini", "ConvNetW8", False))
    assert message.startswith(f"error: no space left in {directory} for replay_buffer_0.npy (") and "MB)" in message
    assert sorted(p.name for p in directory.iterdir()) == [".lock"]


def test_a_full_disk_while_saving_is_one_line_and_changes_nothing(buffers, tmp_path, monkeypatch):
    run_distill(buffers, tmp_path / "run", "--Iteration", "1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "log.jsonl"}
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    message = distill_error(buffers, tmp_path / "run", "--Iteration", "2", "--resume")
    assert message.startswith(f"error: no space left in {tmp_path / 'run'} for ")
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name != "log.jsonl"}
    assert after == before
    message = one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--baseline", "random", "--ipc", "1",
                                                "--num_eval", "1", "--epoch_eval_train", "1", "--model", "ConvNetW8",
                                                "--out", tmp_path / "rows.json"])
    assert message.startswith(f"error: no space left in {tmp_path} for rows.json (")
    assert not (tmp_path / "rows.json").exists()


def interrupt_in_the_step(monkeypatch, signum):
    """The process sends itself `signum` during the step of iteration 1, as Ctrl-C or a cluster would."""
    calls, real = [], matching.BACKWARD[False]

    def signalled(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setitem(matching.BACKWARD, False, signalled)


@pytest.mark.parametrize("signum,said", [(signal.SIGINT, "stopped by Ctrl-C"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_ctrl_c_and_sigterm_end_with_one_line_saying_how_to_resume(buffers, tmp_path, monkeypatch, capsys,
                                                                      signum, said):
    interrupt_in_the_step(monkeypatch, signum)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert parallel.exit_status(lambda: run_distill(buffers, tmp_path, "--Iteration", "3")) == 130
    finally:
        signal.signal(signal.SIGTERM, handler)
    progress_bar = re.compile(r"^[\w ]+: +\d+% \d+/\d+ \[")  # the loops' progress lines share stderr
    assert [line for line in capsys.readouterr().err.splitlines() if not progress_bar.match(line)] == [
        f"{said}: the checkpoint of iteration 0 is in {tmp_path}; run the same command with --resume to continue"]
    run_distill(buffers, tmp_path, "--Iteration", "3", "--resume")
    assert load(tmp_path / "checkpoint.pt")["iteration"] == 3


def corrupt_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


CORRUPT_CHECKPOINTS = {
    "no iteration": (lambda s: s.pop("iteration"), "missing or mistyped iteration"),
    "a tensor of another shape": (lambda s: s["tensors"].update(images=torch.zeros(3, 1, 28, 28)),
                                  "does not fit this run: it holds"),
    "a bad random-number state": (lambda s: s.update(rng_cpu=torch.zeros(5, dtype=torch.uint8)),
                                  "does not fit this run"),
    "no optimizers": (lambda s: s.update(optimizers={}), "no optimizer states"),
    "best an int": (lambda s: s.update(best=5), "missing or mistyped best"),
    "a best mark an int": (lambda s: s.update(best={"ConvNetW16": 5}), "a best mark that is not"),
    "NaN images": (lambda s: s["tensors"]["images"].view(-1)[7].fill_(math.nan), "non-finite values in images"),
    "an inf momentum": (lambda s: next(iter(s["optimizers"]["syn_lr"]["state"].values()))["momentum_buffer"].fill_(
        math.inf), "non-finite values in syn_lr's momentum"),
}


@pytest.mark.parametrize("case", CORRUPT_CHECKPOINTS)
def test_a_corrupt_checkpoint_is_one_line_naming_it(buffers, tmp_path, case):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    change, said = CORRUPT_CHECKPOINTS[case]
    corrupt_checkpoint(tmp_path / "checkpoint.pt", change)
    message = distill_error(buffers, tmp_path, "--Iteration", "2", "--resume")
    assert "checkpoint" in message and said in message and "move it away" in message


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


ITERATION = '{"type": "iteration", "it": 1}'


@pytest.mark.parametrize("content,said", [
    (f'{ITERATION}\n{{"foo": 1}}\n{ITERATION}\n', "line 2 is not a line distill.py writes"),
    (f'[1, 2]\n{ITERATION}\n', "line 1 is not a line distill.py writes"),
    (f'text\n{ITERATION}\n', "line 1 is not a line distill.py writes"),
    (f'{{"type": "iteration", "it": "x"}}\n{ITERATION}\n', "line 1 is not a line distill.py writes"),
    (b"\x80\x81\xfe\n" + ITERATION.encode(), "is not text, so not a log distill.py writes"),
])
def test_a_corrupt_log_is_refused_before_anything_is_written(buffers, tmp_path, content, said):
    """The resume is refused in one line naming log.jsonl, and the folder (run.json, checkpoint,
    sets) is left byte for byte as it was."""
    run_distill(buffers, tmp_path, "--Iteration", "1")
    (tmp_path / "log.jsonl").write_bytes(content.encode() if isinstance(content, str) else content)
    before = files_of(tmp_path)
    message = distill_error(buffers, tmp_path, "--Iteration", "3", "--resume")
    assert f"{tmp_path / 'log.jsonl'} {said}" in message
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("name", ["log.jsonl", "run.json", "zca.pt"])
def test_a_folder_in_place_of_a_run_file_is_refused_before_anything_is_written(buffers, tmp_path, name):
    run_distill(buffers, tmp_path, "--Iteration", "1")
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).mkdir()
    before = files_of(tmp_path)
    assert f"{tmp_path / name} is not a file; move it away" in distill_error(buffers, tmp_path, "--Iteration", "2",
                                                                              "--resume")
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("change,said", [
    ({"model": "Foo"}, "an unknown model 'Foo'"), ({"model": 123}, "missing or mistyped model"),
    ({"texture": True, "canvas_size": None}, "missing or mistyped canvas_size"),
    ({"canvas_size": "2"}, "missing or mistyped canvas_size"),
    ({"texture": True, "canvas_size": 0}, "a texture run without canvas sizes of 1 or more"),
])
def test_a_corrupt_run_json_is_one_line_naming_it(buffers, tmp_path, change, said):
    run_distill(buffers, tmp_path, "--Iteration", "0")
    meta = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**meta, **change}))
    message = one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--syn_path", tmp_path])
    assert f"{tmp_path / 'run.json'} is not a run.json distill.py writes: {said}" in message


def test_a_zca_transform_of_the_wrong_shape_is_one_line(tmp_path):
    torch.save(torch.randn(10, 1, 28, 28), tmp_path / "images_best.pt")
    torch.save(torch.arange(10), tmp_path / "labels_best.pt")
    zca = utils.torch_bytes({"mean": torch.zeros(12), "transform": torch.eye(12), "inverse_transform": torch.eye(12),
                             "eps": 0.1})
    (tmp_path / "zca.pt").write_bytes(zca)
    message = one_line_error(eval_script.main, ["--dataset", "FashionMNIST-mini", "--syn_path", tmp_path, "--zca"])
    assert "its zca.pt whitens 12 pixels, but FashionMNIST-mini's images have 784" in message


@pytest.mark.parametrize("cut", [lambda data: data[:-100], lambda data: b"garbage" + data])
def test_a_truncated_or_foreign_idx_file_is_one_line_naming_it(tmp_path, cut):
    rng = np.random.default_rng(0)
    for name in IDX_FILES:
        shape = (20, 28, 28) if "images" in name else (20,)
        header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + rng.integers(0, 10, shape, np.uint8).tobytes()))
    broken = tmp_path / "train-images-idx3-ubyte.gz"
    broken.write_bytes(cut(broken.read_bytes()))
    with pytest.raises(utils.UsageError, match=f"^{broken} is truncated or not an IDX file"):
        get_dataset("FashionMNIST", data_path=str(tmp_path))


@pytest.mark.parametrize("script,flags,said", [
    (distill.main, ["--ipc", "2000000000"], "--ipc 2000000000's synthetic set needs"),
    (distill.main, ["--texture", "--canvas_size", "99999"], "--ipc 1's synthetic set of --canvas_size 99999 canvases "
                                                             "needs"),
    (buffer.main, ["--num_experts", "2000000000"], "2000000000 experts of 2 snapshots needs"),
    (buffer.main, ["--num_experts", "1e12"],
     "argument --num_experts: expected an integer from 1 to 2^31-1, not '1e12'"),
    (distill.main, ["--model", "ConvNetD8"], "--model ConvNetD8 does not fit FashionMNIST-mini's 28x28 images"),
    (eval_script.main, ["--model", "ConvNetD8", "--baseline", "full"], "--model ConvNetD8 does not fit"),
])
def test_impossible_sizes_are_one_line_before_any_folder(tmp_path, script, flags, said):
    """Each names the flag that is the cause."""
    argv = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--train_epochs", "1"] if script is buffer.main \
        else (["--dataset", "FashionMNIST-mini"] if script is eval_script.main else list(TINY))
    argv += ["--buffer_path", tmp_path / "b"] if script is not eval_script.main else []
    argv += ["--save_path", tmp_path / "run"] if script is distill.main else []
    assert said in one_line_error(script, argv + flags)
    assert list(tmp_path.iterdir()) == []


HUGE = "99999999999999999999"
RATE, SIZE, COUNT = ("a positive number up to 3.4e38 (float32's largest)",
                     "a number from 0 to 3.4e38 (float32's largest)", "an integer from 1 to 2^31-1")


@pytest.mark.parametrize("script,flags,said", [
    (buffer.main, ["--lr_teacher", "1e308"], f"argument --lr_teacher: must be {RATE}, not 1e308"),
    (buffer.main, ["--l2", "1e308"], f"argument --l2: must be {SIZE}, not 1e308"),
    (buffer.main, ["--batch_train", HUGE], f"argument --batch_train: must be {COUNT}, not {HUGE}"),
    (distill.main, ["--lr_img", "1e308"], f"argument --lr_img: must be {RATE}, not 1e308"),
    (distill.main, ["--lr_lr", "1e308"], f"argument --lr_lr: must be {SIZE}, not 1e308"),
    (distill.main, ["--lr_y", "1e308"], f"argument --lr_y: must be {RATE}, not 1e308"),
    (distill.main, ["--step_timeout", "1e308"], "argument --step_timeout: must be a positive number of seconds up to"),
    (distill.main, ["--batch_syn", HUGE], f"argument --batch_syn: must be {COUNT}, not {HUGE}"),
    (distill.main, ["--texture", "--canvas_samples", HUGE], f"argument --canvas_samples: must be {COUNT}"),
    (eval_script.main, ["--num_eval", HUGE], f"argument --num_eval: must be {COUNT}, not {HUGE}"),
])
def test_a_number_beyond_what_the_machine_represents_is_one_line_when_parsed(tmp_path, script, flags, said):
    argv = FAST_BUFFER if script is buffer.main else (["--baseline", "full"] if script is eval_script.main else TINY)
    assert said in one_line_error(script, argv + ["--buffer_path", tmp_path / "b", "--save_path", tmp_path / "run"]
                                  * (script is distill.main) + flags)
    assert list(tmp_path.iterdir()) == []


def test_eval_starts_at_once_with_a_huge_num_eval(monkeypatch):
    """2^31-1 networks per row: the first trains at once (the jobs are ranges, not a list to build first)."""
    def first_network(*args, **kwargs):
        raise KeyboardInterrupt("the first network")

    monkeypatch.setattr(evaluation, "evaluate_synset", first_network)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="the first network"):
        eval_script.main(["--dataset", "FashionMNIST-mini", "--baseline", "random", "--ipc", "1", "--num_eval",
                          str(2**31 - 1), "--device", "cpu"])
    assert time.monotonic() - start < 20


def test_gsam_that_diverges_names_rho(tmp_path):
    message = one_line_error(buffer.main, FAST_BUFFER + ["--buffer_path", tmp_path, "--rho_max", "3e38",
                                                         "--rho_min", "3e38"])
    assert "expert #0 diverged" in message and "--rho_max 3e+38, --rho_min 3e+38); lower them" in message


def test_idx_labels_out_of_range_are_one_line_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    for name in IDX_FILES:
        shape = (20, 28, 28) if "images" in name else (20,)
        values = rng.integers(0, 10, shape, np.uint8) + (10 * (name == "t10k-labels-idx1-ubyte"))
        header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))
    message = one_line_error(eval_script.main, ["--dataset", "FashionMNIST", "--data_path", tmp_path, "--baseline",
                                                "random", "--ipc", "1"])
    assert f"{tmp_path / 't10k-labels-idx1-ubyte.gz'} holds 20 labels up to 19 for 20 images of 10 classes" in message


@pytest.mark.parametrize("script", ["buffer.py", "distill.py", "eval.py"])
def test_ctrl_c_and_sigterm_while_torch_loads_are_one_line(script):
    """Signalled once torch's libraries are being mapped (its import takes seconds): one line, status 130."""
    for signum, said in ((signal.SIGINT, "stopped by Ctrl-C"), (signal.SIGTERM, "stopped by SIGTERM")):
        process = subprocess.Popen([sys.executable, script, "--help"], cwd=utils.REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        maps = Path(f"/proc/{process.pid}/maps")
        while process.poll() is None and "libtorch" not in maps.read_text():
            time.sleep(0.01)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
        assert (process.returncode, err, out) == (130, f"{said}: nothing was written\n", "")


def test_a_read_only_run_folder_is_one_line(buffers, tmp_path, monkeypatch):
    run_distill(buffers, tmp_path, "--Iteration", "1")

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return open(path, *args, **kwargs)

    monkeypatch.setattr(utils, "open", read_only, raising=False)
    assert distill_error(buffers, tmp_path, "--Iteration", "2", "--resume") == (
        f"error: {tmp_path} cannot be written (Read-only file system): a distill.py run needs to write there")


def test_a_download_that_fails_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train, download):
        Path(root, "cifar-10-batches-py").mkdir(parents=True)  # as torchvision makes its folder, then downloads
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    message = one_line_error(eval_script.main, ["--dataset", "CIFAR10", "--data_path", tmp_path / "new" / "data",
                                                "--baseline", "random", "--ipc", "1"])
    assert "CIFAR10 is not in" in message and list(tmp_path.iterdir()) == []


def test_missing_experts_are_found_before_the_data_is_cached(tmp_path):
    """The hint names every flag the run needs (--zca too, which a FashionMNIST directory's name does
    not carry), and nothing is made: no cache in --data_path, no run folder."""
    message = one_line_error(distill.main, TINY + ["--zca", "--data_path", tmp_path / "data", "--buffer_path",
                                                   tmp_path / "b", "--save_path", tmp_path / "run"])
    assert message.endswith(f"train them with python buffer.py --dataset FashionMNIST-mini --zca --model ConvNetW16 "
                            f"--buffer_path {tmp_path / 'b'}")
    assert list(tmp_path.iterdir()) == []
