"""bench.py's rounds and tables, on made-up figures, and the memory forecast against a measured peak."""
import argparse

import pytest
import torch

from tools import bench


def test_every_round_runs_every_configuration_in_order():
    calls = []
    results = bench.alternate(["a", "b"], lambda config: calls.append(config) or len(calls), repeats=3)
    assert calls == ["a", "b"] * 3
    assert results == {"a": [1, 3, 5], "b": [2, 4, 6]}


def test_the_ratio_is_the_median_of_the_per_round_ratios():
    unroll = [{"seconds": s, "peak_mb": [m]} for s, m in ((1.0, 500), (2.0, 520), (4.0, 510))]
    low = [{"seconds": s, "peak_mb": [m]} for s, m in ((1.5, 100), (2.0, 90), (2.0, 95))]
    table = bench.backward_table({(1, 10, False): unroll, (1, 10, True): low}, [1], [10])
    # per-round ratios 1.5, 1.0, 0.5: the ratio of the medians (2.0 / 2.0) would say 1.00 too, but not its spread
    assert table.splitlines()[-1] == ("| 1 | 10 | 2.000 [1.000-4.000] | 2.000 [1.500-2.000] | 1.00 [0.50-1.50] "
                                      "| 510 [500-520] | 95 [90-100] |")


def test_the_speed_up_is_over_one_process_of_one_thread_and_peaks_are_per_rank():
    named = bench.settings([1, 2], torch.device("cpu"))
    assert named == {"1 proc x 1 thread": bench.Setting(1, 1), "2 procs x 1 thread": bench.Setting(2, 1),
                     "1 proc x 2 threads": bench.Setting(1, 2)}
    assert list(bench.settings([1, 2], torch.device("cuda"))) == ["1 proc x 1 thread", "2 procs x 1 thread"]
    figures = {"1 proc x 1 thread": [(4.0, [100])] * 3, "2 procs x 1 thread": [(2.0, [60, 58]), (2.5, [62, 58]),
                                                                               (1.0, [61, 57])],
               "1 proc x 2 threads": [(3.0, [110])] * 3}
    results = {(10, 20, low, name): [{"seconds": s, "peak_mb": m} for s, m in rounds]
               for low in (False, True) for name, rounds in figures.items()}
    rows = bench.settings_table(results, [10], [20], named, dict.fromkeys(named, "1 proc x 1 thread"),
                                "1x1").splitlines()
    assert rows[0] == "| ipc | syn_steps | backward | setting | s/it | speed-up over 1x1 | peak MB per rank |"
    assert len(rows) == 2 + 2 * 3
    assert rows[2] == "| 10 | 20 | unroll | 1 proc x 1 thread | 4.000 [4.000-4.000] | 1.00 [1.00-1.00] | 100 |"
    assert rows[3] == "| 10 | 20 | unroll | 2 procs x 1 thread | 2.000 [1.000-2.500] | 2.00 [1.60-4.00] | 61 / 58 |"
    assert rows[4] == "| 10 | 20 | unroll | 1 proc x 2 threads | 3.000 [3.000-3.000] | 1.33 [1.33-1.33] | 110 |"
    assert rows[5].startswith("| 10 | 20 | low-memory | 1 proc x 1 thread |")


def test_buffer_throughput_speed_up_is_per_round():
    table = bench.buffer_table({1: [100.0, 110.0, 90.0], 2: [150.0, 220.0, 180.0]}).splitlines()
    assert table[:2] == ["| processes (1 thread each) | images/s | speed-up over 1 |", "|---|---|---|"]
    assert table[2:] == ["| 1 | 100 [90-110] | 1.00 [1.00-1.00] |", "| 2 | 180 [150-220] | 2.00 [1.50-2.00] |"]


def test_each_chunk_size_is_compared_with_the_code_before_at_the_same_threads():
    named = bench.chunk_settings([None, 100], torch.device("cpu"))
    Setting = bench.Setting
    assert named == {"1 thread, before: all, glibc default": Setting(threads=1, glibc_default=True),
                     "1 thread, chunk_syn all": Setting(threads=1),
                     "1 thread, chunk_syn 100": Setting(threads=1, chunk_syn=100),
                     "2 threads, before: all, glibc default": Setting(threads=2, glibc_default=True),
                     "2 threads, chunk_syn all": Setting(threads=2),
                     "2 threads, chunk_syn 100": Setting(threads=2, chunk_syn=100)}
    baselines = bench.before_of(named)
    assert baselines["2 threads, chunk_syn 100"] == baselines["2 threads, chunk_syn all"] == \
        "2 threads, before: all, glibc default"
    seconds = dict(zip(named, (40.0, 25.0, 20.0, 30.0, 15.0, 12.0)))
    results = {(50, 20, low, name): [{"seconds": s, "peak_mb": [900]}] * 3 for low in (False, True)
               for name, s in seconds.items()}
    rows = bench.settings_table(results, [50], [20], named, baselines, "before").splitlines()
    assert rows[0].endswith("| s/it | speed-up over before | peak MB per rank |") and len(rows) == 2 + 2 * 6
    assert rows[4] == "| 50 | 20 | unroll | 1 thread, chunk_syn 100 | 20.000 [20.000-20.000] | 2.00 [2.00-2.00] | 900 |"
    assert rows[7].startswith("| 50 | 20 | unroll | 2 threads, chunk_syn 100 | 12.000 [12.000-12.000] | 2.50 [2.50-")


@pytest.mark.parametrize("low_memory", [False, True], ids=["unroll", "replay"])
def test_the_forecast_is_within_35_percent_of_the_peak_a_fresh_process_measures(low_memory):
    """distill.py picks the backward and refuses what would not fit by memory.forecast. Measured
    independently: the growth of the peak resident set of a fresh process over one iteration's
    set-up (bench.measure), ConvNetW32 on 10 CIFAR-shaped images, syn_steps 20 (239 and 72 MB in
    BENCHMARKS.md section 10). A forecast off by 2x, either way, fails."""
    args = argparse.Namespace(model="ConvNetW32", device="cpu", iterations=1)
    found = bench.iteration(args, 1, 20, low_memory, bench.Setting(threads=1))
    ratio = found["forecast_mb"][0] / found["peak_mb"][0]
    assert 1 / 1.35 <= ratio <= 1.35, found
