"""The examples run and give the results the README states."""
import numpy as np
import pytest

from fastrnn.datasets import load_hamlet, load_sunspots, windows
from fastrnn.examples import char_lm, sunspots


def test_bundled_data():
    years, values = load_sunspots()
    assert years[0] == 1700 and years[-1] == 2008 and len(values) == 309
    assert values.min() >= 0 and values.max() > 100
    text = load_hamlet()
    assert text.startswith("Hamlet") and len(text) > 50_000
    x, y = windows(np.arange(12.0), 10)
    np.testing.assert_array_equal(x[:, :, 0], [np.arange(10), np.arange(1, 11)])
    np.testing.assert_array_equal(y[:, 0], [10, 11])
    series = np.arange(12.0)
    x, y = windows(series, 10)
    x += 1
    y += 1                                      # new arrays: the series stays as it was
    np.testing.assert_array_equal(series, np.arange(12.0))
    with pytest.raises(TypeError, match="windows: steps must be an int, got float"):
        windows(series, 2.5)


def test_sunspot_model_beats_the_naive_forecast(tmp_path, capsys):
    plot = tmp_path / "loss.png"
    history, val_mse, naive_mse = sunspots.main(epochs=50, plot=str(plot), verbose=0)
    assert len(history.history["val_loss"]) == 50
    assert val_mse < 0.6 * naive_mse            # the Keras original: 0.0101 vs 0.0304
    out = capsys.readouterr().out
    assert "naive last-value" in out
    assert plot.exists() or "matplotlib is not installed" in out


def test_char_lm_learns_and_samples(capsys):
    val = char_lm.main(hidden=64, epochs=4, windows_per_epoch=960, verbose=0)
    # uniform guessing scores log(66) = 4.19 nats, character frequencies alone ~2.9
    assert val < 2.8
    assert "HAMLET:" in capsys.readouterr().out


def test_a_plot_path_in_a_missing_directory_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sunspots.cli(["--plot", str(tmp_path / "missing" / "loss.png"), "--epochs", "1"])
    assert exit_info.value.code == 2
    assert "argument --plot: the directory" in capsys.readouterr().err


def test_the_adding_problems_gradient_ratio_compares_disjoint_windows():
    """Its first and last 10 steps overlapped below 20 steps and were the
    same steps at 10 or fewer: the ratio read 1.00 (no decay) for any cell.
    Now the first and last half of so short a sequence."""
    from fastrnn.examples import adding_problem
    rng = np.random.default_rng(0)
    x, y = adding_problem.make_data(64, 6, rng)
    model = adding_problem.build("RNN", 8, 0)
    model.compile(loss="mse", optimizer="sgd")
    ratio = adding_problem.early_gradient_ratio(model, x, y)
    assert np.isfinite(ratio) and abs(ratio - 1) > 1e-3
