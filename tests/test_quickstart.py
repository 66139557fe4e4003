import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_runs_the_whole_pipeline_and_prints_both_accuracies(tmp_path):
    """The README's main job (quickstart.sh: buffer.py -> distill.py -> eval.py) at a tiny size."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "qs"), "MODEL": "ConvNetW8",
           "EXPERTS": "1", "TRAIN_EPOCHS": "2", "ITERATIONS": "2", "EVAL_EPOCHS": "2"}
    result = subprocess.run(["bash", str(REPO / "quickstart.sh")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "qs"
    experts = "buffers/FashionMNIST-mini/ConvNetW8"
    for name in [f"{experts}/replay_buffer_0.npy", f"{experts}/buffer.json", "distilled/images_2.pt",
                 "distilled/labels_2.pt", "distilled/syn_lr_2.pt", "distilled/images_best.pt",
                 "distilled/synthetic_0.png", "distilled/synthetic_2.png", "distilled/log.jsonl", "results.json"]:
        assert (out / name).exists(), name
    rows = re.findall(r"^(\S+)\s+ConvNetW8\s+1\s+(\d+\.\d+) \+- (\d+\.\d+)\s+5$", result.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == ["distilled/images_2.pt", "random"]
    assert all(0 <= float(mean) <= 100 and 0 <= float(std) <= 100 for _, mean, std in rows)
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert [round(100 * row["test_acc_mean"], 2) for row in saved] == [float(mean) for _, mean, _ in rows]
