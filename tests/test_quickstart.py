import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from networks import flatten_params, get_network

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_runs_the_whole_pipeline_and_prints_both_accuracies(tmp_path):
    """The README's main job (quickstart.sh: buffer.py -> distill.py -> eval.py) at a tiny size.
    Evaluation networks trained for 2 epochs sit near chance (measured: distilled 15.38%, random
    13.32%), so their rows are checked for what they must be, not for a level. The expert's 2
    epochs on 5000 images do clear chance: 38.9-47.4% test accuracy over seeds 0-7 (chance 10%)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "qs"), "MODEL": "ConvNetW8",
           "EXPERTS": "1", "TRAIN_EPOCHS": "2", "ITERATIONS": "2", "EVAL_EPOCHS": "2"}
    env.pop("PYTHONUNBUFFERED", None)  # output to a pipe block-buffered, as most shells leave it
    result = subprocess.run(["bash", str(REPO / "quickstart.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr  # not a terminal: each loop's progress comes as whole lines, ending at 100%
    for loop in ("experts x epochs: 100% 2/2 ", "distill: 100% 40/40 ", "evaluating 2 networks: 100% ",
                 "evaluating 10 networks: 100% "):  # distill.py's bar counts student steps: 2 iterations of 20
        assert any(line.startswith(loop) for line in result.stderr.splitlines()), loop
    assert re.search(r"^distill: 100% 40/40 \[.*, it 2/2 loss \d\.\d{4} syn_lr 0\.\d{5}\]$", result.stderr, re.M)
    out = tmp_path / "qs"
    experts = out / "buffers/FashionMNIST-mini/ConvNetW8"
    for name in ["distilled/images_best.pt", "distilled/synthetic_0.png", "distilled/synthetic_2.png",
                 "distilled/log.jsonl", "distilled/curves.png"]:
        assert (out / name).exists(), name

    buffer = np.load(experts / "replay_buffer_0.npy")
    params = flatten_params(get_network("ConvNetW8", 1, 10, (28, 28))).numel()
    assert buffer.shape == (1, 3, params)  # one expert: its initialisation and 2 epochs
    assert (np.diff(buffer[0], axis=0) != 0).any(axis=1).all()
    assert json.loads((experts / "buffer.json").read_text())["experts"][0]["test_acc"][-1] > 0.25

    assert torch.equal(torch.load(out / "distilled/labels_2.pt"), torch.arange(10))
    assert torch.load(out / "distilled/images_2.pt").shape == (10, 1, 28, 28)
    syn_lr = torch.load(out / "distilled/syn_lr_2.pt").item()
    assert 0 < syn_lr != pytest.approx(0.01)  # learned away from --lr_teacher

    # one line per evaluation network, none per epoch (those come with --verbose); EVAL_EPOCHS 2 trains 3
    # epochs, as the original's range(Epoch + 1): the line says both
    networks = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(networks) == 2 + 2 + 5 + 5  # distill.py's evaluations at 0 and 2, eval.py's two rows
    assert re.fullmatch(r"\[random ConvNetW8 run 5/5\] 10 images, 2 epochs \(3 passes: the original trains one more\), "
                        r"lr 0\.01: "
                        r"test acc \d+\.\d\d%", networks[-1])

    table_row = r"^(\S+)\s+ConvNetW8\s+1\s.*\s(\d+\.\d+) \+- (\d+\.\d+)\s+5$"  # set, model, ipc, ..., acc, n
    printed = re.findall(table_row, result.stdout, re.MULTILINE)
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert [row["set"] for row in saved] == [name for name, _, _ in printed] == ["distilled/images_2.pt", "random"]
    assert [row["lr"] for row in saved] == [pytest.approx(syn_lr), 0.01]  # the distilled set trains at its own lr
    for row, (_, mean, std) in zip(saved, printed):
        assert (f"{100 * row['test_acc_mean']:.2f}", f"{100 * row['test_acc_std']:.2f}") == (mean, std)
        correct = np.array(row["test_accs"]) * 1000  # of the 1000 test images
        assert len(correct) == row["n"] == 5 and np.abs(correct - correct.round()).max() < 1e-9
        assert row["test_acc_mean"] == pytest.approx(correct.mean() / 1000)
        assert row["test_acc_std"] == pytest.approx(correct.std() / 1000)


STUB_PYTHON3 = """#!/bin/sh
# `python3 -m venv .venv` makes a venv whose pip records its arguments and whose python records
# its arguments and exits with the status in $PYTEST_STATUS.
mkdir -p .venv/bin
printf '#!/bin/sh\\necho "$*" >> calls\\n' > .venv/bin/pip
printf '#!/bin/sh\\necho "$*" >> calls\\nexit %s\\n' "$PYTEST_STATUS" > .venv/bin/python
chmod +x .venv/bin/pip .venv/bin/python
"""


@pytest.mark.parametrize("status", [0, 1, 5])
def test_ci_runs_the_readmes_tests_and_exits_with_pytests_status(tmp_path, status):
    """5 is pytest's 'no tests collected': CI must fail on it. A stub python3 stands in for the
    venv, pip and pytest, so this runs offline in a moment."""
    repo, stubs = tmp_path / "repo", tmp_path / "bin"
    (repo / ".ci").mkdir(parents=True)
    stubs.mkdir()
    (repo / ".ci" / "run").write_text((REPO / ".ci" / "run").read_text())
    (stubs / "python3").write_text(STUB_PYTHON3)
    (stubs / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTEST_STATUS": str(status)}
    result = subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == status
    assert (repo / "calls").read_text().splitlines() == ["install -q -r requirements-dev.txt", "-m pytest -q"]


WITHOUT_EXTRAS = """
import json, sys
for name in ("yaml", "tqdm", "matplotlib"):
    sys.modules[name] = None  # importing them now raises ImportError, as where they are not installed
import buffer, distill, eval
for main, argv in [(buffer.main, ["--help"]), (distill.main, ["--help"]), (eval.main, ["--help"])] + PIPELINE:
    try:
        main(argv)
    except SystemExit as leaving:
        print(f"exit {leaving.code}", flush=True)
print("imported", json.dumps(sorted({name.split(".")[0] for name, module in sys.modules.items() if module})))
"""
PROJECT = {"buffer", "distill", "eval", "networks", "utils", "mtt"}
# Modules no package installs, made at run time: the script itself (and multiprocessing's name for it),
# the shared modules of Cython-compiled extensions (numpy's), the standard library's build settings,
# and the module torch.distributed writes from a template and imports
MADE_AT_RUN_TIME = re.compile(r"__main__|__mp_main__|_cython_[\d_]+|cython_runtime|_sysconfigdata_.*"
                              r"|_remote_module_non_scriptable")


def installed_by(*packages):
    """The distributions the packages need, theirs included, read from their metadata: what
    installing them installs here (with the extras they ask of one another; markers of another
    platform, and extras nobody asks for, left out)."""
    found, todo = set(), [Requirement(package) for package in packages]
    while todo:
        wanted = todo.pop()
        name = canonicalize_name(wanted.name)
        if (name, *sorted(wanted.extras)) in found:
            continue
        found.add((name, *sorted(wanted.extras)))
        for line in metadata.requires(name) or []:
            needed = Requirement(line)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra})
                                            for extra in {"", *wanted.extras}):
                todo.append(needed)
    return {name for name, *_ in found}


def foreign_imports(imported):
    """The top-level modules among `imported` that are neither the standard library, nor the
    project's, nor installed by torch, torchvision and numpy."""
    allowed = installed_by("torch", "torchvision", "numpy")
    ours = {module for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(dist) in allowed for dist in dists)}
    return sorted(name for name in set(imported) - ours - PROJECT - set(sys.stdlib_module_names)
                  - set(sys.builtin_module_names) if not MADE_AT_RUN_TIME.fullmatch(name))


def imports_of(program, cwd=REPO):
    result = subprocess.run([sys.executable, "-c", program], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, json.loads(result.stdout.rsplit("imported ", 1)[1])


def test_the_scripts_need_only_torch_torchvision_and_numpy(tmp_path):
    """With PyYAML, tqdm and matplotlib unimportable: --help of each script, the quickstart's three
    scripts (small), and --cfg, which alone needs PyYAML and says so in one line."""
    out = tmp_path / "qs"
    data = ["--dataset", "FashionMNIST-mini", "--model", "ConvNetW8", "--device", "cpu"]
    pipeline = [
        ("buffer.main", data + ["--buffer_path", out / "buffers", "--num_experts", "1", "--train_epochs", "2"]),
        ("distill.main", data + ["--buffer_path", out / "buffers", "--save_path", out / "distilled", "--ipc", "1",
                                 "--syn_steps", "2", "--expert_epochs", "1", "--max_start_epoch", "1", "--Iteration",
                                 "2", "--eval_it", "1", "--num_eval", "1", "--epoch_eval_train", "1"]),
        ("eval.main", data + ["--syn_path", out / "distilled", "--iteration", "2", "--baseline", "random", "--ipc",
                              "1", "--num_eval", "1", "--epoch_eval_train", "1"]),
        ("distill.main", ["--cfg", REPO / "configs" / "mtt" / "cifar10_ipc1.yaml"]),
    ]
    program = WITHOUT_EXTRAS.replace("PIPELINE", "[" + ", ".join(f"({main}, {list(map(str, argv))!r})"
                                                                  for main, argv in pipeline) + "]")
    result, imported = imports_of(program)
    assert foreign_imports(imported) == []
    exits = [line for line in result.stdout.splitlines() if line.startswith("exit ")]
    assert exits == ["exit 0"] * 3 + [f"exit error: --cfg {REPO / 'configs/mtt/cifar10_ipc1.yaml'}: reading a config "
                                      f"file needs PyYAML: pip install pyyaml"]
    assert result.stdout.count("usage: ") == 3 and "matplotlib is not installed: no curves.png" in result.stdout
    assert re.search(r"^distill: 100% 4/4 \[", result.stderr, re.MULTILINE)  # progress as lines, without tqdm
    assert (out / "distilled" / "images_2.pt").exists() and not (out / "distilled" / "curves.png").exists()
    assert "rows written" not in result.stdout and re.search(r"^random\s+ConvNetW8\s+1\s", result.stdout, re.M)


def test_a_module_outside_the_three_packages_fails_the_check(tmp_path):
    """The check above, tested: utils.py with `import pytest` planted, in a copy of the scripts."""
    for path in [*REPO.glob("*.py"), REPO / "mtt"]:
        (shutil.copytree if path.is_dir() else shutil.copy)(path, tmp_path / path.name)
    (tmp_path / "utils.py").write_text("import pytest\n" + (REPO / "utils.py").read_text())
    _, imported = imports_of(WITHOUT_EXTRAS.replace("PIPELINE", "[]"), cwd=tmp_path)
    assert "pytest" in foreign_imports(imported)


def test_quickstart_deletes_only_what_it_made(tmp_path):
    """OUT is a folder of the user's: quickstart.sh refuses it, and everything in it stays."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("draft")
    result = subprocess.run(["bash", str(REPO / "quickstart.sh")], env={**os.environ, "OUT": str(tmp_path / "mine")},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (1, f"error: OUT={tmp_path / 'mine'} exists and was not made by "
                                                     f"quickstart.sh; give a new folder\n")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


SMALL = {"--model": "ConvNetW8", "--num_experts": "1", "--train_epochs": "2", "--syn_steps": "2",
         "--expert_epochs": "1", "--max_start_epoch": "1", "--Iteration": "2", "--eval_it": "1", "--num_eval": "1",
         "--epoch_eval_train": "1", "--iteration": "2"}


def test_the_readmes_quickstart_commands_run_as_printed_in_order(tmp_path):
    """The README's 'What the quickstart does' block, at the sizes of SMALL (every other word as
    printed), run one after the other in an empty folder: each finds what the one before wrote."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## What the quickstart does", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in block.replace("\\\n", " ").splitlines()]
    assert commands[0] == ["source", ".venv/bin/activate"] and "python3 -m venv .venv" in readme.split("\n", 5)[3]
    for words in commands[1:]:
        assert words[0] == "python"
        argv = [SMALL.get(before, word) for before, word in zip([""] + words, words)]
        result = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:], "--device", "cpu"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (argv, result.stderr[-2000:])
    rows = json.loads((tmp_path / "quickstart" / "results.json").read_text())["rows"]
    assert [(row["set"], row["model"]) for row in rows] == [("distilled/images_2.pt", "ConvNetW8"),
                                                            ("random", "ConvNetW8")]


def readme_blocks():
    """{the heading above it: its text} of every bash block in the README."""
    blocks, heading = {}, "top"
    for part in re.split(r"(^## [^\n]*$|^```bash\n.*?^```$)", (REPO / "README.md").read_text(), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:]
        elif part.startswith("```bash"):
            blocks[heading] = blocks.get(heading, "") + part[8:-3]
    return blocks


# The README's blocks this machine cannot run, and why; every other block is run by a test below.
CANNOT_RUN_HERE = {
    "top": "creates a venv with pip (the CI's own job: .ci/run runs the second line)",
    "Reproducing the published settings": "CIFAR-10 is downloaded (no internet here); its last line runs below",
    "DATM and FTD": "CIFAR-10 is downloaded",
    "Evaluating a distilled set": "CIFAR-10 is downloaded",
    "More than one GPU or machine": "torchrun over 8 GPUs or 2 machines",
    "On a GPU": "needs a GPU; without one it is one line and exit 1 (tests/test_gpu_check.py)",
}
RUN_HERE = {"What the quickstart does", "Fair scores: DD-Ranking's LRS and ARS"}


def test_every_readme_block_runs_in_a_test_or_says_why_it_cannot():
    assert set(readme_blocks()) == RUN_HERE | set(CANNOT_RUN_HERE)


def test_every_folder_the_readmes_commands_write_is_git_ignored():
    """What the commands as printed write (runs/, results/, ...) never shows in `git status`."""
    text = "\n".join(readme_blocks().values())
    folders = {Path(path).parts[0] for path in re.findall(r"--(?:buffer_path|save_path|out|data_path) (\S+)", text)}
    folders |= {"logged_files", "data", "quickstart"}  # distill.py's default --save_path, the default --data_path
    assert {"runs", "results", "buffers"} <= folders
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", *(f"{folder}/x" for folder in folders)],
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(f"{folder}/x" for folder in folders)


def test_the_readmes_fair_scores_block_runs_as_printed(tmp_path):
    """The Fair scores block, on the embedded data at the sizes of SMALL (every other word as
    printed, its shell variables too), in an empty folder; then the published-settings block's
    `tools/published.py results/*.json` on what it wrote."""
    block = readme_blocks()["Fair scores: DD-Ranking's LRS and ARS"].replace("FashionMNIST ", "FashionMNIST-mini ")
    for flag, value in {**SMALL, "--ipc": "1", "--epochs_full": "1", "--iteration": "2"}.items():
        block = re.sub(rf"{flag} [^\s\"]+", f"{flag} {value}", block)  # a closing quote stays
    compare = next(line for line in readme_blocks()["Reproducing the published settings"].splitlines()
                   if "tools/published.py" in line)
    script = f'python() {{ "{sys.executable}" "{REPO}/$1" "${{@:2}}"; }}\nset -e\n{block}\n{compare}\n'
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("mtt", "datm", "ftd"):
        scores = json.loads((tmp_path / "results" / f"{name}_scores.json").read_text())["scores"]["ConvNetW8"]
        assert {"hlr", "ior", "lrs", "ars"} <= set(scores)
    assert result.stdout.count("| not from configs/ |") == 3  # one row per set, none of them a published row
