"""What the papers say of the layers' training-only regularisers: on a task an
unregularised LSTM overfits, ``recurrent_dropout`` and ``input_dropout`` (Gal
and Ghahramani 2016), ``zoneout`` (Krueger et al. 2017) and ``weight_dropout``
(DropConnect on W_hh, Merity et al. 2017) each leave it fitting the training
noise less and generalising better than the same net, seed, data, optimizer
and epochs without them. A short version of fastrnn/examples/regularisation.py
(which has the full run and the measured figures), and its command line's
refusals."""
import pytest

from fastrnn.__main__ import cli
from fastrnn.examples import regularisation as example

# the short run: T = 10 instead of 20, 30 epochs instead of 40, 500 validation
# sequences; measured at seeds 0-11 (the test checks seed 0), each regulariser's
# validation MSE after the last epoch over the unregularised net's: recurrent_dropout
# 0.29-0.52 (seed 0: 0.41), input_dropout 0.18-0.48 (0.48), zoneout 0.23-0.40 (0.38),
# weight_dropout 0.38-0.94 (0.69); its training MSE over the unregularised one's
# 1.37-4.66 (seed 0: 1.51-2.19); the unregularised net's validation MSE 0.32-0.64,
# its training MSE 0.18-0.41 (the noise's variance is 1)
SHORT = dict(hidden=128, steps=10, n_train=200, noise=1.0, epochs=30, rate=0.5, lr=3e-3,
             n_val=500, seeds=(0,), verbose=False)
REGULARISERS = ("recurrent_dropout", "input_dropout", "zoneout", "weight_dropout")


def overfitting_reduced(results, name, seed=0):
    """Whether ``name``'s net ends with a lower validation MSE and a higher
    training MSE than the unregularised one at ``seed``."""
    plain, regularised = results[("none", seed)], results[(name, seed)]
    return (regularised["val"][-1] < plain["val"][-1]
            and regularised["train"][-1] > plain["train"][-1])


@pytest.fixture(scope="module")
def short_run():
    return example.main(**SHORT)


def test_the_unregularised_net_overfits(short_run):
    """It fits the noisy targets well below the noise's variance (1) while its
    validation MSE rises to over twice its best epoch's."""
    plain = short_run[("none", 0)]
    assert plain["train"][-1] < 0.6 and plain["val"][-1] > 2 * min(plain["val"])


@pytest.mark.parametrize("name", REGULARISERS)
def test_the_regulariser_reduces_overfitting(short_run, name):
    plain, regularised = short_run[("none", 0)], short_run[(name, 0)]
    assert overfitting_reduced(short_run, name), (
        f"{name}: validation MSE {regularised['val'][-1]:.4f} (none: {plain['val'][-1]:.4f}), "
        f"training MSE {regularised['train'][-1]:.4f} (none: {plain['train'][-1]:.4f})")


def test_the_check_fails_without_the_regularisers():
    """At rate 0 each option is off (the layer is the plain one): the check
    above then finds no regulariser reducing overfitting, so it is not passed
    by anything but the options' effect."""
    results = example.main(**{**SHORT, "rate": 0.0, "epochs": 3})
    assert all(results[(name, 0)] == results[("none", 0)] for name in REGULARISERS)
    assert not any(overfitting_reduced(results, name) for name in REGULARISERS)


def test_the_command_is_listed_and_refuses_bad_options(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command line trained with a bad option")

    monkeypatch.setattr(example, "main", refuse)
    assert cli(["--help"]) == 0
    assert "  regularise  example 5:" in capsys.readouterr().out
    for argv, message in [(["--rate", "0"], "--rate: expected a number in (0.0, 1.0)"),
                          (["--rate", "1"], "--rate: expected a number in (0.0, 1.0)"),
                          (["--epochs", "0"], "--epochs: expected an integer from 1 to 100000"),
                          (["--steps", "1"], "--steps: expected an integer from 2 to 10000"),
                          (["--regularisers", "zoneout,dropconnect"],
                           "unknown regulariser 'dropconnect'"),
                          (["--seeds", "0,x"], "--seeds: expected comma-separated integers"),
                          (["--kind", "RNN"], "invalid choice: 'RNN'"),
                          (["--noise", "-1"], "--noise: expected a number in [0.0, 1000000.0)")]:
        assert cli(["regularise", *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("usage: fastrnn regularise "), argv
        assert message in err, (argv, err)


def test_the_command_passes_its_options(monkeypatch):
    calls = []
    monkeypatch.setattr(example, "main", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cli(["regularise", "--kind", "gru", "--rate", "0.3", "--epochs", "5",
                "--regularisers", "zoneout,weight_dropout,zoneout", "--seeds", "4,5"]) == 0
    (args, kwargs), = calls
    assert args[0] == "GRU" and kwargs["rate"] == 0.3 and kwargs["epochs"] == 5
    assert kwargs["regularisers"] == ("none", "zoneout", "weight_dropout")
    assert kwargs["seeds"] == (4, 5)


@pytest.mark.parametrize("name", REGULARISERS)
def test_build_sets_the_option(name):
    model = example.build("LSTM", 8, 4, seed=0, regulariser=name, rate=0.25)
    assert f"{name}=0.25" in repr(model[0])
    assert repr(example.build("LSTM", 8, 4, seed=0)[0]) == "LSTM(4, 8, batch_first=True)"
