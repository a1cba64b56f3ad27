"""fastrnn bench's process per library (fastrnn/bench.py run_case): a small
case for real, with a peer whose install is broken; the rounds of --rounds
with a stand-in for the processes."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastrnn import bench, bench_quantized


def test_bench_times_each_library_in_its_own_process_and_skips_a_broken_peer(
        tmp_path, monkeypatch):
    """run_case starts a process per library; a peer that fails to import
    there is left out of the case (a warning), not the end of the run."""
    broken = tmp_path / "broken" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "broken"))
    case = next(c for c in bench.CASES if c.name == "step-b1-gru")
    infer_ms, train_ms, errors, per_round = bench.run_case(case, "float32", 1, 4, ["TF"])
    assert set(infer_ms) == {"fastrnn", "limit"} and set(errors) == {"fastrnn"}
    assert set(per_round["infer"]) == {"fastrnn"}                    # no peer left
    assert infer_ms["fastrnn"] > 0 and errors["fastrnn"] < 1e-5


def test_rounds_run_every_library_in_turn_the_order_rotated():
    """run_rounds: each round runs every library once, the order rotated
    by one each round; a peer that fails is left out from then on."""
    calls = []

    def run_one(library):
        calls.append(library)
        if library == "ORT" and calls.count("ORT") == 2:
            return None
        return {"infer": len(calls)}

    results = bench.run_rounds(["fastrnn", "torch", "ORT"], 4, run_one)
    assert calls == ["fastrnn", "torch", "ORT",
                     "torch", "ORT", "fastrnn",          # round 2: ORT fails
                     "fastrnn", "torch",                 # round 3: the two left
                     "torch", "fastrnn"]                 # round 4: rotated again
    assert list(results) == ["fastrnn", "torch"]
    assert [r["infer"] for r in results["fastrnn"]] == [1, 6, 7, 10]
    assert [r["infer"] for r in results["torch"]] == [2, 4, 8, 9]
    assert bench.run_rounds(["fastrnn"], 1, run_one) == {"fastrnn": [{"infer": 11}]}
    calls.clear()   # a case's rounds start where its index says (a single round too)
    bench.run_rounds(["fastrnn", "torch", "TF"], 1, run_one, first=4)
    assert calls == ["torch", "TF", "fastrnn"]


def test_median_of_rounds_is_the_median_of_the_measured_rounds():
    rounds = [{"infer": 3.0, "train": None}, {"infer": 1.0, "train": 4.0},
              {"infer": 9.0, "train": 2.0}]
    assert bench.median_of_rounds(rounds, "infer") == 3.0
    assert bench.median_of_rounds(rounds, "train") == 3.0    # of the two measured
    assert bench.median_of_rounds([{"limit": None}], "limit") is None


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    """Each round's ratio from that round's times (the fastest numerator
    over the denominator), then their median: not the ratio of the medians,
    which here pairs fastrnn's fast round with the peer's slow one."""
    rounds_of = {"fastrnn": [1.0, 2.0, 4.0], "torch": [1.5, 8.0, 6.0],
                 "ORT": [3.0, 2.5, None]}
    # rounds: min(1.5, 3.0) / 1 = 1.5; min(8, 2.5) / 2 = 1.25; 6 / 4 = 1.5
    assert bench.paired_ratio(rounds_of, ["torch", "ORT"], "fastrnn") == 1.5
    assert bench.paired_ratio(rounds_of, ["torch"], "fastrnn") == 1.5      # 1.5, 4, 1.5
    assert np.median([1.5, 8.0, 6.0]) / np.median([1.0, 2.0, 4.0]) == 3.0  # not this
    assert np.isnan(bench.paired_ratio(rounds_of, ["TF"], "fastrnn"))   # absent
    assert np.isnan(bench.paired_ratio({"fastrnn": [None], "torch": [1.0]}, ["torch"],
                                       "fastrnn"))


def test_run_case_reports_the_median_over_rounds(monkeypatch):
    """run_case with rounds: a process per library and round (the reference
    once), each time the median of the library's rounds, errors from its
    saved output, and each library's time in each round for the speed-ups."""
    times = {"fastrnn": iter([5.0, 1.0, 3.0]), "torch": iter([2.0, 8.0, 4.0])}
    train = {"fastrnn": iter([10.0, 20.0, 40.0]), "torch": iter([15.0, 80.0, 60.0])}
    started = []

    def fake_run(argv, **kwargs):
        spec = json.loads(argv[-1])
        library = spec["library"]
        started.append(library)
        np.save(spec["output_path"], np.full(3, 1.0 if library == "reference" else 1.5))
        result = {} if library == "reference" else {
            "infer": next(times[library]), "train": next(train[library]),
            "limit": 0.5 if library == "fastrnn" else None}
        return subprocess.CompletedProcess(argv, 0, "\n" + json.dumps(result) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    case = next(c for c in bench.CASES if c.name == "step-b1-gru")
    infer_ms, train_ms, errors, per_round = bench.run_case(case, "float32", 1, 4, ["torch"],
                                                           rounds=3)
    # (the order rotated from round to round, and from case to case: this
    # case's rounds start at library number its index in the grid)
    pairs = [["fastrnn", "torch"], ["torch", "fastrnn"]]
    first = bench.CASES.index(case)
    assert started == [lib for r in range(3) for lib in pairs[(first + r) % 2]] + ["reference"]
    assert infer_ms == {"fastrnn": 3.0, "torch": 4.0, "limit": 0.5}
    assert train_ms == {"fastrnn": 20.0, "torch": 60.0}
    assert errors == {"fastrnn": 0.5, "torch": 0.5}
    assert per_round == {"infer": {"fastrnn": [5.0, 1.0, 3.0], "torch": [2.0, 8.0, 4.0]},
                         "train": {"fastrnn": [10.0, 20.0, 40.0], "torch": [15.0, 80.0, 60.0]}}


def test_int8_run_case_reports_the_median_over_rounds(monkeypatch):
    """fastrnn bench --dtype int8 --rounds: the median time of each library's
    rounds; a peer failing in a later round is left out (a warning)."""
    times = {"f32": iter([4.0, 2.0, 9.0]), "int8": iter([1.0, 3.0, 2.0]),
             "torch-q": iter([7.0])}
    outputs = {"reference": 1.0, "f32": 1.25, "int8": 2.0, "torch-q": 2.0}
    torch_runs = []

    def fake_run(argv, **kwargs):
        spec = json.loads(argv[-1])
        library = spec["library"]
        np.save(spec["output_path"], np.full(2, outputs[library]))
        if library == "torch-q":
            torch_runs.append(library)
            if len(torch_runs) == 2:   # its install breaks in round 2
                return subprocess.CompletedProcess(argv, 1, "", "a broken install")
        result = {} if library == "reference" else {
            "infer": next(times[library]), "weight_mb": 0.5}
        return subprocess.CompletedProcess(argv, 0, "\n" + json.dumps(result) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    case = next(c for c in bench.CASES if c.name == "step-b1-lstm")
    results, errors = bench_quantized.run_case(case, 1, 4, ["f32", "int8", "torch-q"], rounds=3)
    assert results == {"f32": {"infer": 4.0, "rounds": [4.0, 2.0, 9.0], "weight_mb": 0.5},
                       "int8": {"infer": 2.0, "rounds": [1.0, 3.0, 2.0], "weight_mb": 0.5}}
    assert errors == {"f32": (0.25, 0.25), "int8": (0.75, 0.75)}
    assert torch_runs == ["torch-q", "torch-q"]   # not run again in round 3


def test_rounds_reach_run_case_and_the_header_says_so(monkeypatch, capsys):
    """--rounds N: every case's run_case gets N, and the tables' first line
    says the times are medians over N rounds (float32 and int8 tables)."""
    seen = []

    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        seen.append(("float32", case.name, rounds))
        return ({"fastrnn": 1.0, "limit": 0.5}, {}, {"fastrnn": 1e-7},
                {"infer": {"fastrnn": [1.0]}, "train": {"fastrnn": [None]}})

    def fake_q_case(case, threads, repeats, libraries, rounds=1):
        seen.append(("int8", case.name, rounds))
        result = {"infer": 1.0, "rounds": [1.0], "weight_mb": 0.1}
        return ({lib: dict(result) for lib in libraries},
                {lib: (1e-3, 1e-4) for lib in libraries})

    monkeypatch.setattr(bench, "available", lambda module: False)
    monkeypatch.setattr(bench, "run_case", fake_case)
    monkeypatch.setattr(bench_quantized, "run_case", fake_q_case)
    monkeypatch.setattr(bench_quantized, "_int8_peak_line", lambda: 2.0)
    bench.main(["--cases", "step-b1-gru", "--rounds", "3"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "the median of 3 rounds" in first
    bench.main(["--dtype", "int8", "--cases", "step-b1-gru", "--rounds", "2"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "the median of 2 rounds" in first
    bench.main(["--cases", "step-b1-gru"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "rounds" not in first
    assert seen == [("float32", "step-b1-gru", 3), ("int8", "step-b1-gru", 2),
                    ("float32", "step-b1-gru", 1)]


def test_tables_print_the_paired_ratios(monkeypatch, capsys):
    """The speed-up columns and their geometric means are the medians of
    each round's ratio, not the ratios of the printed median times."""
    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        # rounds: infer 1.5, 3, 2 -> 2; train 1.5, 4, 1.5 -> 1.5 (the medians' ratios: 3)
        return ({"fastrnn": 2.0, "torch": 6.0, "limit": 1.0},
                {"fastrnn": 20.0, "torch": 60.0}, {"fastrnn": 1e-7, "torch": 1e-7},
                {"infer": {"fastrnn": [1.0, 2.0, 4.0], "torch": [1.5, 6.0, 8.0]},
                 "train": {"fastrnn": [10.0, 20.0, 40.0], "torch": [15.0, 80.0, 60.0]}})

    monkeypatch.setattr(bench, "available", lambda module: module == "torch")
    monkeypatch.setattr(bench, "_installed_version", lambda module: "0")
    monkeypatch.setattr(bench, "run_case", fake_case)
    bench.main(["--cases", "b32-h128", "--rounds", "3"])
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("b32-h128 ")).split()
    assert row[1:4] == ["2.000", "6.000", "2.00x"]
    assert "speed-up over the fastest peer 2.00x, worst 2.00x" in "\n".join(out)
    train = [line for line in out if line.startswith("b32-h128 ")][1].split()
    assert train[1:4] == ["20.000", "60.000", "1.50x"]
    assert "geometric mean speed-up over torch 1.50x, worst 1.50x" in "\n".join(out)

    def fake_q_case(case, threads, repeats, libraries, rounds=1):
        per_round = {"f32": [4.0, 2.0, 9.0], "int8": [1.0, 2.0, 3.0], "bf16": [8.0, 8.0, 8.0],
                     "ORT-q": [2.0, 6.0, 6.0]}
        return ({lib: {"infer": float(np.median(per_round[lib])), "rounds": per_round[lib],
                       "weight_mb": 0.1} for lib in libraries if lib in per_round},
                {lib: (1e-3, 1e-4) for lib in libraries if lib in per_round})

    monkeypatch.setattr(bench, "available", lambda module: module in ("onnxruntime", "onnx"))
    monkeypatch.setattr(bench_quantized, "run_case", fake_q_case)
    monkeypatch.setattr(bench_quantized, "_int8_peak_line", lambda: 2.0)
    bench.main(["--dtype", "int8", "--cases", "b32-h128", "--rounds", "3"])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("b32-h128 ")).split()
    # int8/f32: 4, 1, 3 -> 3 (medians' ratio 2); bf16/f32: 0.5, 0.25, 1.125 -> 0.5;
    # int8/peer: 2, 3, 2 -> 2 (medians' ratio 3)
    assert row[6:9] == ["3.00x", "0.50x", "2.00x"]


def test_float64_tables_have_only_the_peer_that_runs_float64(monkeypatch, capsys):
    """ONNX Runtime and TensorFlow run float32 only: at --dtype float64 their
    columns were printed all nan."""
    asked = []

    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        asked.append(list(peers))
        ms = {"fastrnn": 1.0, "limit": 0.5, **{p: 2.0 for p in peers}}
        per_round = {"infer": {lib: [ms[lib]] for lib in ["fastrnn", *peers]}, "train": {}}
        return ms, {}, {"fastrnn": 1e-12}, per_round

    monkeypatch.setattr(bench, "available", lambda module: True)
    monkeypatch.setattr(bench, "_installed_version", lambda module: "0")
    monkeypatch.setattr(bench, "run_case", fake_case)
    bench.main(["--dtype", "float64", "--cases", "step-b1-gru"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert asked == [["torch"]]
    assert header.split()[:4] == ["case", "fastrnn", "torch", "speed-up"]
    assert "nan" not in out


def test_a_peer_off_the_reference_is_not_compared_and_a_split_has_no_limit(monkeypatch, capsys):
    """A peer whose output is far from the float64 reference computed
    something else: its time is marked and left out of the speed-up (it had
    counted, only its error printed), and a note names it; a call whose
    plan splits its hidden units has no GEMM-only limit ('-': the limit's
    products cannot split them, so it bounded nothing)."""
    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        return ({"fastrnn": 2.0, "torch": 1.0, "ORT": 4.0}, {},
                {"fastrnn": 1e-7, "torch": 0.3, "ORT": 1e-7},
                {"infer": {"fastrnn": [2.0], "torch": [1.0], "ORT": [4.0]},
                 "train": {"fastrnn": [None]}})

    monkeypatch.setattr(bench, "available", lambda module: module in ("torch", "onnxruntime",
                                                                      "onnx"))
    monkeypatch.setattr(bench, "_installed_version", lambda module: "0")
    monkeypatch.setattr(bench, "run_case", fake_case)
    bench.main(["--cases", "b1-t1000-h256"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("b1-t1000-h256 "))
    assert row.split()[1:6] == ["2.000", "1.000*", "4.000", "2.00x", "-"]
    assert "note: b1-t1000-h256: torch left out (error 3.0e-01)" in out
    assert "geometric mean speed-up over the fastest peer 2.00x" in out


def test_training_table_has_the_steps_peak_time(monkeypatch, capsys):
    """The training table's peak column: the step's multiply-adds (three
    times the forward's: the input and h gradients and the weight gradients
    are each a forward product's size) at the FMA peak on every thread."""
    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        return ({"fastrnn": 2.0, "torch": 6.0, "limit": 1.0},
                {"fastrnn": 20.0, "torch": 60.0}, {"fastrnn": 1e-7, "torch": 1e-7},
                {"infer": {"fastrnn": [2.0], "torch": [6.0]},
                 "train": {"fastrnn": [20.0], "torch": [60.0]}})

    monkeypatch.setattr(bench, "available", lambda module: module == "torch")
    monkeypatch.setattr(bench, "_installed_version", lambda module: "0")
    monkeypatch.setattr(bench, "run_case", fake_case)
    monkeypatch.setattr(bench._forward, "fma_peak_gflops", lambda: 50.0)
    monkeypatch.setattr(bench._forward, "product_gflops", lambda *args: 40.0)
    bench.main(["--cases", "b32-h128", "--threads", "2"])
    out = capsys.readouterr().out.splitlines()
    header = [line.split() for line in out if line.startswith("case ")][1]
    assert header == ["case", "fastrnn", "torch", "x", "peak", "/peak"]
    train = [line for line in out if line.startswith("b32-h128 ")][1].split()
    case = next(c for c in bench.CASES if c.name == "b32-h128")
    # LSTM 64 -> 128, B=32, T=100: 2 * 100 * 32 * 512 * (64 + 128) flops forward
    assert bench.train_flops(case) == 3 * bench.case_flops(case) == 3 * 629_145_600
    peak_ms = 3 * 629_145_600 / (50e9 * 2) * 1e3
    assert float(train[4]) == pytest.approx(peak_ms, abs=5e-4)
    assert float(train[5]) == pytest.approx(20.0 / peak_ms, abs=5e-3)


def _children(pid):
    """The pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_bench_terminated_stops_its_measuring_child_and_removes_its_files(tmp_path):
    """SIGTERM (what `kill` and process managers send) ended the bench at
    once, without its cleanup: the child measuring a case ran on for
    minutes, orphaned, and the temporary directory stayed. Now SIGTERM
    raises SystemExit in the bench: the child is killed, the files go."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    bench_run = subprocess.Popen(
        [sys.executable, "-m", "fastrnn", "bench", "--cases", "b64-h512", "--repeats", "1000"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        children = []
        while not (children and list(tmp_path.glob("fastrnn-bench-*"))):
            assert bench_run.poll() is None, bench_run.stderr.read()
            assert time.monotonic() < deadline, "no measuring child started"
            time.sleep(0.05)
            children = _children(bench_run.pid)
        time.sleep(0.5)
        (child,) = children = _children(bench_run.pid)   # (still measuring)
        bench_run.send_signal(signal.SIGTERM)
        assert bench_run.wait(timeout=60) == 128 + signal.SIGTERM
        assert not os.path.exists(f"/proc/{child}")
        assert not list(tmp_path.glob("fastrnn-bench-*"))
    finally:
        if bench_run.poll() is None:
            bench_run.kill()
            bench_run.wait()
        for child in children:      # (the old behaviour's orphan)
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass


def test_table_columns_stay_apart_when_a_time_fills_its_column(monkeypatch, capsys):
    """A peer's 2664.408 ms filled its 8-character column and printed as
    "27.4222664.408" after fastrnn's time: every number now comes after a
    space, widening its column where it must (float32, training, int8)."""
    def fake_case(case, dtype, threads, repeats, peers, rounds=1):
        return ({"fastrnn": 27.422, "torch": 2664.408, "limit": 12345.678},
                {"fastrnn": 123456.789, "torch": 2664.408}, {"fastrnn": 1e-7, "torch": 1e-7},
                {"infer": {"fastrnn": [27.422], "torch": [2664.408]},
                 "train": {"fastrnn": [123456.789], "torch": [2664.408]}})

    def fake_q_case(case, threads, repeats, libraries, rounds=1):
        return ({lib: {"infer": 123456.789, "rounds": [123456.789], "weight_mb": 0.1}
                 for lib in libraries}, {lib: (1e-3, 1e-4) for lib in libraries})

    monkeypatch.setattr(bench, "available", lambda module: module == "torch")
    monkeypatch.setattr(bench, "_installed_version", lambda module: "0")
    monkeypatch.setattr(bench, "run_case", fake_case)
    monkeypatch.setattr(bench_quantized, "run_case", fake_q_case)
    monkeypatch.setattr(bench_quantized, "_int8_peak_line", lambda: 2.0)
    bench.main(["--cases", "b32-h128"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("b32-h128 ")]
    assert rows[0][1:5] == ["27.422", "2664.408", "97.16x", "12345.678"]
    assert rows[1][1:4] == ["123456.789", "2664.408", "0.02x"]
    bench.main(["--dtype", "int8", "--cases", "b32-h128"])
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("b32-h128 ")]
    # (no ONNX Runtime here: its column says "-", not nan)
    assert row[1:9] == ["123456.789"] * 4 + ["-", "1.00x", "1.00x", "1.00x"]
    assert "nan" not in out and "'-': a peer not installed or without that quantized" in out
