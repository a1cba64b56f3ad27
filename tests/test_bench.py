"""fastrnn bench's process per library (fastrnn/bench.py run_case): a small
case for real, with a peer whose install is broken."""
from fastrnn import bench


def test_bench_times_each_library_in_its_own_process_and_skips_a_broken_peer(
        tmp_path, monkeypatch):
    """run_case starts a process per library; a peer that fails to import
    there is left out of the case (a warning), not the end of the run."""
    broken = tmp_path / "broken" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('a broken install')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "broken"))
    case = next(c for c in bench.CASES if c.name == "step-b1-gru")
    infer_ms, train_ms, errors = bench.run_case(case, "float32", 1, 4, ["TF"])
    assert set(infer_ms) == {"fastrnn", "limit"} and set(errors) == {"fastrnn"}
    assert infer_ms["fastrnn"] > 0 and errors["fastrnn"] < 1e-5
