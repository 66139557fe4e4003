"""tools/gpu_check.py: one line and no work without a GPU; at CPU sizes, every section's table with the
values it must hold; and a gradient or a forecast that is off fails its check."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtt import matching
from tools import gpu_check

SCRIPT = [sys.executable, str(Path(gpu_check.__file__))]
CPU = torch.device("cpu")


def tables(output):
    """{section number: [{column: cell}]}: the Markdown table under each '**N. ...**' heading."""
    found, number, header = {}, None, None
    for line in output.splitlines():
        heading = re.match(r"\*\*(\d)\. ", line)
        if heading:
            number, header = int(heading[1]), None
            found[number] = []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                found[number].append(dict(zip(header, cells)))
    return found


def test_without_a_gpu_it_says_so_in_one_line_and_does_nothing():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on a machine with one too
    result = subprocess.run(SCRIPT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("error: no CUDA GPU here") and len(result.stderr.splitlines()) == 1, result.stderr


def test_at_cpu_sizes_every_check_passes_with_the_values_each_must_hold():
    """The whole command on one thread (about 35 s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(SCRIPT + ["--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("CPU, ") and f"torch {torch.__version__}" in lines[0]
    assert lines[0].endswith("tools/gpu_check.py --device cpu`")
    assert re.fullmatch(r"all 17 checks pass \(\d+ s\)", lines[-1])
    found = tables(out)
    assert sorted(found) == [1, 2, 3, 4, 5, 6]

    # 1: float32 against float64 on identical inputs: a real difference (rounding), but below the tolerance
    step = found[1]
    cases = {(backward, dsa, labels) for backward in ("unroll", "replay") for dsa in ("on", "off")
             for labels in ("hard", "soft")}
    assert {(row["backward"], row["DSA"], row["labels"]) for row in step} == cases
    for row in step:
        compared = ["loss", "grad images", "grad syn_lr"] + ["grad label_logits"] * (row["labels"] == "soft")
        assert all(0 < float(row[column]) < gpu_check.STEP_TOLERANCE for column in compared), row
        assert row["grad label_logits"] == "-" or row["labels"] == "soft"
        assert row["check"] == "pass"

    # 2: the replay against the unroll (bit for bit on the CPU: 0 is right here)
    assert len(found[2]) == 4
    for row in found[2]:
        assert all(0 <= float(row[column]) < gpu_check.REPLAY_TOLERANCE for column in ["loss", "grad images",
                                                                                      "grad syn_lr"]), row

    # 3: the forecast within 25% of a peak measured in a fresh process, and the ratio is of the printed figures
    assert [(row["images"], row["backward"]) for row in found[3]] == [
        ("1x28x28", "unroll"), ("1x28x28", "replay"), ("3x32x32", "unroll"), ("3x32x32", "replay")]
    for row in found[3]:
        measured, forecast = float(row["measured MB"]), float(row["forecast MB"])
        assert measured > 30 and abs(forecast / measured - float(row["forecast / measured"])) < 0.02, row
        assert abs(forecast / measured - 1) <= 0.26 and row["check"] == "pass", row
    unroll, replay = (float(row["measured MB"]) for row in found[3][2:])
    assert unroll > 2 * replay  # the unroll keeps every step's graph: a measurement that could not see it is wrong

    # 4 and 5: measurements, each a positive figure
    assert [row["ipc"] for row in found[4]] == ["1", "2", "5"] and {row["TF32"] for row in found[4]} == {"n/a on CPU"}
    assert all(float(row["unroll s/it"]) > 0 and float(row["replay s/it"]) > 0 for row in found[4])
    assert [row["images"] for row in found[5]] == ["1000", "100"]
    assert all(float(row["images/s"].replace(",", "")) > 0 for row in found[5])

    # 6: the distilled set beats chance (10%) by the stated 20 points; the random subset is reported beside it
    distilled, random_row = found[6]
    assert distilled["set (ipc 1)"] == "distilled" and distilled["check"] == "pass (above 30)"
    assert float(distilled["test acc %"].split(" ± ")[0]) > 30
    assert random_row["set (ipc 1)"] == "random real subset" and 10 < float(random_row["test acc %"].split(" ± ")[0])
    assert "python eval.py --syn_path TMP/run --baseline random --ipc 1" in out


@pytest.mark.parametrize("replay, factor, failing", [
    (False, 1.01, {1: 4, 2: 4}),  # 1e-2 off: the unroll's rows of section 1 and all of section 2
    (True, 1.0002, {1: 0, 2: 4}),  # 2e-4 off: within float32's tolerance, not within the replay's
])
def test_a_gradient_off_on_the_device_fails_its_checks(monkeypatch, capsys, replay, factor, failing):
    """One backward gives a syn_lr gradient off by `factor` in float32 only (a kernel wrong on the
    device), at a tiny size, in this process."""
    right = matching.BACKWARD[replay]

    def wrong(net, synset, *args):
        loss = right(net, synset, *args)
        if synset.images.dtype == torch.float32:
            synset.syn_lr.grad = synset.syn_lr.grad * factor
        return loss
    monkeypatch.setitem(matching.BACKWARD, replay, wrong)
    sizes = dataclasses.replace(gpu_check.SIZES["cpu"], step_ipc=1, step_syn_steps=2, step_batch=5)
    runs = gpu_check.step_runs(sizes, CPU)
    checks = {**gpu_check.step_section(runs, 0, CPU, sizes), **gpu_check.replay_section(runs, CPU)}
    for number, count in failing.items():
        assert sum(not passed for name, passed in checks.items() if name.startswith(f"{number}.")) == count, checks
    if failing[1]:
        assert all("unroll" in name for name, passed in checks.items() if name.startswith("1.") and not passed)
    assert capsys.readouterr().out.count("| FAIL |") == sum(failing.values())


def test_a_forecast_off_by_more_than_a_quarter_fails(capsys):
    peaks = {(1, 1, False): (100.0, 124.0), (1, 1, True): (100.0, 126.0), (3, 1, False): (100.0, 74.0),
             (3, 1, True): (0.0, 50.0)}
    checks = gpu_check.forecast_section(peaks, 0, CPU, gpu_check.SIZES["cpu"])
    assert list(checks.values()) == [True, False, False, False]
    rows = tables(capsys.readouterr().out)[3]
    assert [row["forecast / measured"] for row in rows] == ["1.24", "1.26", "0.74", "inf"]
