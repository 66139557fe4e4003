"""--cfg files: DATM's own as they are, ours in configs/ (one per published row), the README's
tables generated from them, and the defaults that make a peer's command mean what it means there."""
import json
from pathlib import Path

import pytest
import yaml
from helpers import one_line_error

import buffer
import distill
import eval as eval_script
from mtt.trajectories import buffer_dir
from tools import published

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
SPC = "samples_predicted_correctly"

# DATM's configs/CIFAR-10/ConvIN/IPC10.yaml, written as DATM writes it.
DATM_CIFAR10_IPC10 = """\
dataset: CIFAR10
device: [3]

ipc: 10
syn_steps: 80
expert_epochs: 2
lr_img: 100
lr_teacher: 0.01
buffer_path: ../buffer_storage/
data_path: ../dataset
ema_decay: 0.9995
Iteration: 10000
batch_syn: 100

# wandb
project: CIFAR10_ipc10

num_eval: 1
eval_it: 500
skip_first_eva: True

lr_y: 2.0
Momentum_y: 0.9
threshold: 1.
pix_init: samples_predicted_correctly
batch_train: 128

min_start_epoch: 0
current_max_start_epoch: 10
max_start_epoch: 20
expansion_end_epoch: 1000

lr_lr: 0.00001
zca: True
"""

# DATM's configs/TinyImageNet/ConvIN/IPC1.yaml: its older names Initial_Step and learn_end_epoch, two GPUs.
DATM_TINY_IPC1 = """\
dataset: Tiny
res: 64
model: ConvNetD4
device: [0,1]

ipc: 1
syn_steps: 40
expert_epochs: 2
lr_img: 10000
lr_teacher: 0.01
buffer_path: ../buffer_storage/
data_path: ../dataset/tiny-imagenet-200
ema_decay: 0.9995
Iteration: 10000
batch_syn: 1000

# wandb
project: Tiny

num_eval: 1
eval_it: 500
skip_first_eva: True

lr_y: 10.0
Momentum_y: 0.9
threshold: 1.
pix_init: samples_predicted_correctly
learn_end_epoch: 2000
batch_train: 128
min_start_epoch: 0
Initial_Step: 15
max_start_epoch: 20
lr_lr: 0.0001

zca: True
"""

# DATM's CIFAR-100 IPC50: random real images, a fixed window, four GPUs.
DATM_CIFAR100_IPC50 = """\
dataset: CIFAR100
device: [0,1,2,3]
ipc: 50
syn_steps: 80
expert_epochs: 2
lr_img: 1000
lr_teacher: 0.01
ema_decay: 0.9995
Iteration: 10000
batch_syn: 1000
project: CIFAR100_ipc50
num_eval: 1
eval_it: 500
skip_first_eva: False
lr_y: 10.0
Momentum_y: 0.9
threshold: 1.
pix_init: real
Sequential_Generation: False
batch_train: 128
min_start_epoch: 20
max_start_epoch: 70
lr_lr: 0.00001
zca: True
"""

IGNORED_DEVICE = "device: DATM's GPUs {} for CUDA_VISIBLE_DEVICES; here --device cuda:N, or torchrun for several"
IGNORED_EMA = "ema_decay: DATM.py reads it nowhere (give --ema_decay on the command line for FTD's image EMA)"
IGNORED_PROJECT = "project: DATM's wandb project (no wandb here: log.jsonl holds the curves)"


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def picked(args, expected):
    return {key: getattr(args, key) for key in expected}


def test_datm_s_config_file_starts_the_run_datm_would(tmp_path, capsys):
    path = write(tmp_path, DATM_CIFAR10_IPC10)
    args = distill.parse_args(["--cfg", str(path)])
    expected = {"dataset": "CIFAR10", "ipc": 10, "syn_steps": 80, "expert_epochs": 2, "lr_img": 100.0,
                "lr_teacher": 0.01, "buffer_path": "../buffer_storage/", "data_path": "../dataset",
                "Iteration": 10000, "batch_syn": 100, "num_eval": 1, "eval_it": 500, "skip_first_eva": True,
                "lr_y": 2.0, "Momentum_y": 0.9, "threshold": 1.0, "pix_init": SPC, "batch_train": 128,
                "min_start_epoch": 0, "current_max_start_epoch": 10, "max_start_epoch": 20,
                "expansion_end_epoch": 1000, "lr_lr": 1e-05, "zca": True,
                # what DATM.py does without being told: it always learns its labels, grows the window, and
                # reads its file's ema_decay nowhere
                "soft_label": True, "Sequential_Generation": True, "Label_Model_Timestamp": -1, "ema_decay": None,
                "model": "ConvNet", "eval_mode": "S", "epoch_eval_train": 1000, "dsa": True, "datm": True}
    assert picked(args, expected) == expected
    assert args.method_defaults == {"soft_label": True, "Label_Model_Timestamp": -1, "Sequential_Generation": True}
    assert capsys.readouterr().out.splitlines() == [
        f"--cfg {path}: ignored {IGNORED_DEVICE.format([3])}; {IGNORED_EMA}; {IGNORED_PROJECT}",
        "DATM's defaults (a DATM flag is given): --soft_label True --Label_Model_Timestamp -1 "
        "--Sequential_Generation True; give a flag to change one"]
    assert distill.start_epoch_window(args, 0) == (0, 10) and distill.start_epoch_window(args, 1000) == (0, 20)


def test_datm_s_older_names_and_tiny_imagenet_file(tmp_path, capsys):
    path = write(tmp_path, DATM_TINY_IPC1)
    args = distill.parse_args(["--cfg", str(path)])
    expected = {"dataset": "Tiny", "res": 64, "model": "ConvNetD4", "current_max_start_epoch": 15,
                "expansion_end_epoch": 2000, "max_start_epoch": 20, "lr_y": 10.0, "lr_lr": 1e-4, "batch_syn": 1000,
                "data_path": "../dataset/tiny-imagenet-200", "soft_label": True, "pix_init": SPC}
    assert picked(args, expected) == expected
    assert capsys.readouterr().out.splitlines()[0] == \
        f"--cfg {path}: ignored {IGNORED_DEVICE.format([0, 1])}; {IGNORED_EMA}; {IGNORED_PROJECT}"


def test_datm_s_real_image_row_still_learns_labels(tmp_path):
    args = distill.parse_args(["--cfg", str(write(tmp_path, DATM_CIFAR100_IPC50))])
    expected = {"pix_init": "real", "soft_label": True, "Sequential_Generation": False, "skip_first_eva": False,
                "min_start_epoch": 20, "max_start_epoch": 70, "ema_decay": None}
    assert picked(args, expected) == expected
    assert args.method_defaults == {"soft_label": True, "Label_Model_Timestamp": -1, "current_max_start_epoch": 20,
                                    "expansion_end_epoch": 3000}  # DATM's, though its fixed window reads neither
    assert distill.start_epoch_window(args, 0) == (20, 70)


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    path = write(tmp_path, DATM_CIFAR10_IPC10)
    args = distill.parse_args(["--ipc", "50", "--cfg", str(path), "--soft_label", "False", "--ema_decay", "0.999",
                               "--zca", "False", "--threshold", "2"])
    expected = {"ipc": 50, "soft_label": False, "ema_decay": 0.999, "zca": False, "threshold": 2.0, "syn_steps": 80}
    assert picked(args, expected) == expected
    assert "soft_label" not in args.method_defaults


def test_a_file_without_datm_keys_is_mtt_and_keeps_its_ema(tmp_path, capsys):
    args = distill.parse_args(["--cfg", str(write(tmp_path, "ipc: 10\nema_decay: 0.9995\nlr_lr: 1e-5\n"))])
    expected = {"ipc": 10, "ema_decay": 0.9995, "lr_lr": 1e-5, "soft_label": False, "pix_init": "real",
                "threshold": None, "Sequential_Generation": False, "datm": False, "method_defaults": {}}
    assert picked(args, expected) == expected
    assert capsys.readouterr().out == ""


def test_any_datm_flag_brings_soft_labels_and_datm_s_images_unless_told_otherwise():
    args = distill.parse_args(["--threshold", "1.2"])
    assert (args.soft_label, args.pix_init, args.threshold) == (True, SPC, 1.2)
    assert set(args.method_defaults) == set(distill.DATM_DEFAULTS) - {"threshold"}
    told = distill.parse_args(["--threshold", "1.2", "--soft_label", "False", "--pix_init", "real"])
    assert (told.soft_label, told.pix_init) == (False, "real")
    mtt = distill.parse_args(["--soft_label", "False", "--pix_init", "real", "--Sequential_Generation", "False"])
    assert (mtt.datm, mtt.threshold, mtt.method_defaults) == (False, None, {})


@pytest.mark.parametrize("text,message", [
    (None, "cannot read it (No such file or directory)"),
    ("ipc: [1, 2\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ("ipc 10\nzca: True\n", "not valid YAML: mapping values are not allowed here (line 2, column 4)"),
    ("", "holds nothing, not `flag: value` lines"),
    ("- ipc: 10\n", "holds list, not `flag: value` lines"),
    ("ipc: 1.\n", "argument --ipc: expected an integer from 1 to 2^31-1, not '1.0'"),
    ("ipc: 0\n", "argument --ipc: must be an integer from 1 to 2^31-1, not 0"),
    ("zca: maybe\n", "argument --zca: expected True or False, not 'maybe'"),
    ("ipc: [1, 10]\n", "ipc: expected one value, got [1, 10]"),
    ("lr_img: fast\n", "argument --lr_img: expected a positive number up to 3.4e38 (float32's largest), not 'fast'"),
    ("lr_img: -5\n", "argument --lr_img: must be a positive number up to 3.4e38 (float32's largest), not -5"),
    ("pix_init: smart\n", "argument --pix_init: invalid choice: 'smart' (choose from 'real', 'noise', "
                          "'samples_predicted_correctly')"),
    ("train_epochs: 50\n", "unknown key train_epochs: no such flag here (--help lists the flags)"),
    ("ipc: 1\nzca: True\nipc: 10\n", "ipc given more than once (line 1)"),
    ("Initial_Step: 10\ncurrent_max_start_epoch: 20\n",
     "both current_max_start_epoch and Initial_Step (DATM's older name for it) are given"),
    ("cfg: other.yaml\n", "cfg: a --cfg file cannot name another; give both flags' values in one file"),
    ("Initialize_Label_With_Another_Model: True\n",
     "Initialize_Label_With_Another_Model: True (labels from a model other than the experts) is not supported here"),
])
def test_bad_config_input_is_one_line_before_any_folder(tmp_path, text, message):
    path = tmp_path / "config.yaml" if text is None else write(tmp_path, text)
    save_path = tmp_path / "run"
    assert one_line_error(distill.main, ["--cfg", path, "--save_path", save_path]) == f"error: --cfg {path}: {message}"
    assert not save_path.exists()


def test_a_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert one_line_error(distill.main, ["--cfg", path]) == f"error: --cfg {path}: cannot read it as text (a binary " \
                                                            f"file?)"


def test_buffer_and_eval_configs_hold_their_own_flags(tmp_path):
    path = write(tmp_path, "ipc: 10\n")
    assert one_line_error(buffer.main, ["--cfg", path]).endswith("unknown key ipc: no such flag here (--help lists "
                                                                 "the flags)")
    assert one_line_error(eval_script.main, ["--cfg", write(tmp_path, "baseline: random\n")]).endswith(
        "baseline: expected a list, got 'random'")
    args = eval_script.parse_args(["--cfg", str(write(tmp_path, "baseline: [random, full]\nipc: 10\nema: True\n"))])
    assert (args.baseline, args.ipc, args.ema) == (["random", "full"], 10, True)


def test_ftd_s_buffer_command_trains_adaptive_gsam_with_alpha_04_and_says_so(capsys):
    ftd = buffer.parse_args(["--rho_max", "0.01", "--rho_min", "0.01"])
    assert (ftd.adaptive, ftd.alpha, ftd.method_defaults) == (True, 0.4, {"adaptive": True, "alpha": 0.4})
    assert capsys.readouterr().out == "GSAM as FTD's buffer code runs it: --adaptive True --alpha 0.4; give a flag " \
                                      "to change one\n"
    told = buffer.parse_args(["--rho_max", "0.01", "--rho_min", "0.01", "--adaptive", "False", "--alpha", "0.3"])
    assert (told.adaptive, told.alpha, told.method_defaults) == (False, 0.3, {})
    plain = buffer.parse_args([])
    assert (plain.adaptive, plain.alpha, plain.method_defaults) == (False, 0, {})
    assert capsys.readouterr().out == ""


def test_a_gsam_directory_of_other_defaults_is_refused_with_the_flag_that_matches(tmp_path, capsys):
    flags = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--num_experts", "1", "--train_epochs", "1",
             "--dsa", "False", "--buffer_path", tmp_path, "--device", "cpu", "--rho_max", "0.01", "--rho_min", "0.01"]
    buffer.main(list(map(str, flags)) + ["--adaptive", "False"])
    directory = Path(buffer_dir(tmp_path, "FashionMNIST-mini", "ConvNetW8", False))
    meta = json.loads((directory / "buffer.json").read_text())
    assert (meta["adaptive"], meta["alpha"], meta["method_defaults"]) == (False, 0.4, {"alpha": 0.4})
    assert one_line_error(buffer.main, flags) == (
        f"error: {directory} holds experts with adaptive False (this run: True, a default: give --adaptive False to "
        f"match); choose another --buffer_path rather than mix trajectories")


def run_args(path):
    """The parsed flags of a configs/ file, by the script it is for."""
    return (buffer if path.parent.name == "buffers" else distill).parse_args(["--cfg", str(path)])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_config_file_parses_passes_the_checks_and_applies_every_flag(path):
    values = yaml.safe_load(path.read_text())
    args = run_args(path)
    for key, value in values.items():
        if key not in published.DATA_KEYS:
            got = getattr(args, key)
            assert got == (float(value) if isinstance(got, float) else value), key
    if path.parent.name == "buffers":
        return
    experts = run_args(REPO / values["experts"])
    where = lambda a: buffer_dir(a.buffer_path, a.dataset, a.model, a.zca, a.subset, a.res)
    assert where(experts) == where(args)
    assert experts.train_epochs >= args.max_start_epoch + args.expert_epochs
    accuracy = values["published"]["accuracy"]
    assert (accuracy is None or 0 < accuracy < 100) and values["published"]["source"]


def test_configs_hold_every_published_row_and_every_buffer_is_used():
    rows = {family: {(v["dataset"], v.get("subset"), v["ipc"]) for v in published.read_configs(family).values()}
            for family in published.FAMILIES}
    three = {(dataset, None, ipc) for dataset in ("CIFAR10", "CIFAR100", "Tiny") for ipc in (1, 10, 50)}
    subsets = {("ImageNet", subset, ipc) for subset in ("imagenette", "imagewoof", "imagefruit", "imagemeow",
                                                        "imagesquawk", "imageyellow") for ipc in (1, 10)}
    assert rows == {"mtt": three | subsets, "ftd": three - {("Tiny", None, 50)}, "datm": three}
    used = {v["experts"] for family in published.FAMILIES for v in published.read_configs(family).values()}
    assert used == {f"configs/buffers/{path.name}" for path in (REPO / "configs" / "buffers").glob("*.yaml")}


def test_the_readme_s_published_tables_are_generated_from_configs():
    readme = (REPO / "README.md").read_text()
    generated = readme.split(published.BEGIN + "\n", 1)[1].split("\n" + published.END, 1)[0]
    assert generated == "\n".join(published.tables()), "run: python published.py --readme"


def evaluated_run(tmp_path, name, distill_flags, eval_flags):
    """A run folder whose run.json holds distill.py's parsed flags, and an eval.py --out file of it."""
    cfg = REPO / "configs/mtt/cifar10_ipc10.yaml"
    run = tmp_path / name
    run.mkdir()
    run_args = vars(distill.parse_args(["--cfg", str(cfg), "--save_path", str(run), *distill_flags]))
    (run / "run.json").write_text(json.dumps({"args": run_args}))
    eval_args = eval_script.parse_args(["--syn_path", str(run), *eval_flags])
    eval_args.model = eval_args.model or run_args["model"]  # as eval.py takes it from run.json
    rows = [{"set": f"{name}/images_best.pt", "model": eval_args.model, "test_acc_mean": 0.6, "test_acc_std": 0.01,
             "n": 5}, {"set": "random", "model": "ConvNet", "test_acc_mean": 0.3, "test_acc_std": 0.01, "n": 5}]
    (tmp_path / f"{name}.json").write_text(json.dumps({"args": vars(eval_args), "rows": rows}))
    return tmp_path / f"{name}.json"


def test_published_vs_ours_compares_only_a_run_of_the_row(tmp_path):
    """A run started from the row's file, its buffers and folders elsewhere, evaluated by the protocol:
    compared. One started from it with another dataset, model and length, evaluated for 10 epochs:
    printed without a difference, naming what differs (it was reported as that row, +1.30)."""
    same = evaluated_run(tmp_path, "same", ["--buffer_path", "elsewhere", "--low_memory"], [])
    other = evaluated_run(tmp_path, "other", ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW32",
                                              "--Iteration", "2"], ["--epoch_eval_train", "10"])
    assert published.compare([same, other])[2:] == [
        "| configs/mtt/cifar10_ipc10.yaml | same/images_best.pt | ConvNet | 65.3 ± 0.7 | 60.00 ± 1.00 (n=5) | -5.30 |",
        "| configs/mtt/cifar10_ipc10.yaml | other/images_best.pt | ConvNetW32 | 65.3 ± 0.7 | 60.00 ± 1.00 (n=5) | "
        "not the row's: --dataset FashionMNIST-mini (row: CIFAR10), --model ConvNetW32 (row: ConvNet), --Iteration 2 "
        "(row: 5000), eval.py --epoch_eval_train 10 (row: 1000), evaluated by ConvNetW32 (row: ConvNet) |"]


def test_published_vs_ours_compares_each_model_only_with_the_rows_model(tmp_path):
    """eval.py --eval_mode M: five models' rows of the same set. The papers' number is ConvNet's:
    only that row gets a difference; the others say why they get none (they were set beside it,
    -35.30 and -20.30)."""
    result = evaluated_run(tmp_path, "same", [], ["--eval_mode", "M"])
    saved = json.loads(result.read_text())
    own = saved["rows"][0]
    saved["syn_set"] = own["set"]
    saved["rows"] = [{**own, "model": model, "test_acc_mean": accuracy}
                     for model, accuracy in [("ConvNet", 0.66), ("AlexNet", 0.30), ("VGG11", 0.45),
                                             ("ResNet18_AP", 0.40), ("ResNet18", 0.45)]]
    result.write_text(json.dumps(saved))
    assert [line.rsplit(" | ", 2)[1:] for line in published.compare([result])[2:]] == [
        ["66.00 ± 1.00 (n=5)", "+0.70 |"],
        *[[f"{100 * accuracy:.2f} ± 1.00 (n=5)", f"not the row's: evaluated by {model} (row: ConvNet) |"]
          for model, accuracy in [("AlexNet", 0.30), ("VGG11", 0.45), ("ResNet18_AP", 0.40), ("ResNet18", 0.45)]]]


@pytest.mark.parametrize("flag,value,row", [("--eval_it", "50", 100), ("--num_eval", "1", 5),
                                            ("--epoch_eval_train", "300", 1000), ("--eval_mode", "C", "S")])
def test_the_flags_that_pick_the_best_iteration_define_the_result(tmp_path, flag, value, row):
    """distill.py's evaluations decide which iteration is saved as images_best.pt, the set eval.py reads."""
    result = evaluated_run(tmp_path, "run", [flag, value], [])
    assert published.compare([result])[2].endswith(f"| not the row's: {flag} {value} (row: {row}) |")


def test_published_vs_ours_compares_the_sets_own_rows_not_those_of_its_scores(tmp_path):
    """eval.py --scores adds the set without DSA, with hard labels, and random subsets: none of them
    is the row's result."""
    result = evaluated_run(tmp_path, "same", [], [])
    saved = json.loads(result.read_text())
    own = saved["rows"][0]
    saved["syn_set"] = own["set"]
    saved["rows"] += [{**own, "set": f"{own['set']} (no DSA)"}, {**own, "set": f"{own['set']} (hard labels)"},
                      {**own, "set": "random (no DSA)"}]
    result.write_text(json.dumps(saved))
    assert [line.split(" | ")[1] for line in published.compare([result])[2:]] == ["same/images_best.pt"]


def test_results_files_that_are_not_eval_py_s_are_one_line_naming_them(tmp_path):
    """`python tools/published.py results/*.json` where the pattern matches nothing: the shell passes
    it as it is (it was a FileNotFoundError's traceback); a file that is not an eval.py --out file too."""
    give = "give the JSON files eval.py --out writes"
    pattern = tmp_path / "results" / "*.json"
    assert one_line_error(published.main, [pattern]) == (
        f"error: {pattern} does not exist (a pattern that matches no file reaches here as it is): {give}")
    text, listed, run_json = tmp_path / "notes.json", tmp_path / "list.json", tmp_path / "run.json"
    text.write_text("not JSON")
    listed.write_text("[]")
    run_json.write_text(json.dumps({"dataset": "CIFAR10", "ipc": 10}))
    assert one_line_error(published.main, [text]) == (
        f"error: cannot read {text} as an eval.py --out results file (Expecting value: line 1 column 1 (char 0)); "
        f"{give}")
    assert one_line_error(published.main, [listed]) == (
        f"error: {listed} is not an eval.py --out results file: it holds a JSON list, not an object; {give}")
    assert one_line_error(published.main, [run_json]) == (
        f"error: {run_json} is not an eval.py --out results file (missing or mistyped args, rows); {give}")
    result = evaluated_run(tmp_path, "same", [], [])
    saved = json.loads(result.read_text())
    del saved["rows"][0]["test_acc_mean"]
    result.write_text(json.dumps(saved))
    assert one_line_error(published.main, [result]) == (
        f"error: {result} is not an eval.py --out results file (missing or mistyped test_acc_mean); {give}")
    assert one_line_error(published.main, [tmp_path]).startswith(f"error: cannot read {tmp_path} as an eval.py --out")


@pytest.mark.parametrize("script", [buffer, distill, eval_script], ids=lambda script: script.__name__)
def test_help_shows_every_flag_s_default(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = [block for block in options.split("\n  -")[1:] if not block.startswith("h, --help")]
    assert len(blocks) > 20 and [block for block in blocks if "(default" not in block] == []
    assert "FashionMNIST-mini is shipped in assets/ (no download)" in " ".join(options.split())  # --dataset's help
