"""Callbacks against Keras: the order of the hooks in fit, what stopping
does, and each callback's effect (EarlyStopping, ReduceLROnPlateau,
LearningRateScheduler, CSVLogger, TerminateOnNaN), driven by the same values
in both; ModelCheckpoint and LambdaCallback; errors.
"""
import csv
import itertools
import os

import numpy as np
import pytest

import fastrnn
from fastrnn import optim

HOOKS = ["on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
         "on_test_begin", "on_test_batch_begin", "on_test_batch_end", "on_test_end",
         "on_epoch_end", "on_train_end"]

# Keras (TensorFlow) warns about numpy 2 internally
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _keras():
    return pytest.importorskip("keras")


def _data(seed=0, n=10):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3)).astype(np.float32),
            rng.standard_normal((n, 2)).astype(np.float32))


def _model(lr=0.01, seed=0):
    model = fastrnn.Sequential([fastrnn.Linear(3, 2, seed=seed)], seed=seed)
    model.compile("mse", optim.SGD(lr=lr))
    return model


def _keras_model(lr=0.01):
    keras = _keras()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", optimizer=keras.optimizers.SGD(learning_rate=lr))
    return model


class Recorder(fastrnn.Callback):
    """Every hook, with its step index, as fastrnn calls it."""

    def __init__(self, stop_at=None):
        self.events = []
        self.stop_at = stop_at

    def _record(self, hook, index=None):
        self.events.append(hook if index is None else (hook, index))


for _hook in HOOKS:
    def _method(self, model, *args, _hook=_hook):
        index = args[0] if args and isinstance(args[0], int) else None
        self._record(_hook, index)
        if (_hook, index) == self.stop_at:
            model.stop_training = True
    setattr(Recorder, _hook, _method)


def _keras_recorder(stop_at=None):
    keras = _keras()

    class KerasRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.events = []

    for hook in HOOKS:
        def method(self, *args, _hook=hook, **kwargs):
            index = args[0] if args and isinstance(args[0], int) else None
            self.events.append(_hook if index is None else (_hook, index))
            if (_hook, index) == stop_at:
                self.model.stop_training = True
        setattr(KerasRecorder, hook, method)
    return KerasRecorder()


@pytest.mark.parametrize("stop_at", [None, ("on_train_batch_end", 1), ("on_epoch_end", 0)])
def test_hook_order_and_stopping_match_keras(stop_at):
    x, y = _data()
    xv, yv = _data(1, n=6)
    ours, theirs = Recorder(stop_at), _keras_recorder(stop_at)
    _model().fit(x, y, epochs=2, batch_size=4, validation_data=(xv, yv), callbacks=[ours],
                 verbose=0)
    _keras_model().fit(x, y, epochs=2, batch_size=4, validation_data=(xv, yv),
                       validation_batch_size=4, callbacks=[theirs], verbose=0)
    # validation here runs at max(batch_size, 256) per batch, Keras' at 4: compare the
    # validation batches as a block
    def squash(events):
        return [e for e in events if not (isinstance(e, tuple) and e[0].startswith("on_test_b"))]
    assert squash(ours.events) == squash(theirs.events)
    assert ("on_test_batch_end", 0) in ours.events


def test_batch_logs_are_the_epoch_running_values():
    x, y = _data()
    seen = []
    log = fastrnn.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
    model = _model(lr=0.0)
    model.compile("mse", optim.SGD(lr=0.0), metrics=["mae"])
    history = model.fit(x, y, batch_size=4, shuffle=False, callbacks=[log], verbose=0)
    assert [list(logs) for logs in seen] == [["loss", "mae"]] * 3
    assert seen[-1]["loss"] == pytest.approx(history.history["loss"][0], rel=1e-12)
    pred = model.predict(x[:4])
    assert seen[0]["loss"] == pytest.approx(float(((pred - y[:4]) ** 2).mean()), rel=1e-6)


# --- EarlyStopping -----------------------------------------------------------------------------
def _drive_ours(callback, values, monitor="val_loss"):
    model = _model()
    callback.set_model(model)
    callback.on_train_begin(model)
    states = []
    for epoch, value in enumerate(values):
        model.layers[0].load_state_dict({"bias": np.full(2, float(epoch), np.float32)},
                                        strict=False)
        states.append(epoch)
        logs = {monitor: value}
        callback.on_epoch_end(model, epoch, logs)
        if model.stop_training:
            break
    callback.on_train_end(model)
    return epoch, float(model.layers[0].bias[0]), logs


def _drive_keras(callback, values, monitor="val_loss"):
    model = _keras_model()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        kernel, _ = model.layers[0].get_weights()
        model.layers[0].set_weights([kernel, np.full(2, float(epoch), np.float32)])
        logs = {monitor: value}
        callback.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback.on_train_end()
    return epoch, float(model.layers[0].get_weights()[1][0]), logs


EARLY = [dict(patience=0), dict(patience=2), dict(patience=3, min_delta=0.05),
         dict(patience=2, baseline=0.5), dict(patience=1, baseline=0.0),
         dict(patience=2, start_from_epoch=3), dict(patience=2, restore_best_weights=True),
         dict(patience=1, restore_best_weights=True, start_from_epoch=2, baseline=0.8),
         dict(patience=2, mode="max", restore_best_weights=True)]


@pytest.mark.parametrize("kwargs", EARLY)
@pytest.mark.parametrize("seed", range(4))
def test_early_stopping_matches_keras(kwargs, seed):
    keras = _keras()
    values = list(np.round(np.random.default_rng(seed).random(12), 2))
    ours = fastrnn.EarlyStopping(**kwargs)
    theirs = keras.callbacks.EarlyStopping(**kwargs)
    last, weights, _ = _drive_ours(ours, values)
    klast, kweights, _ = _drive_keras(theirs, values)
    assert (last, weights) == (klast, kweights)
    assert (ours.stopped_epoch or 0) == theirs.stopped_epoch
    if ours.best_epoch is not None:
        assert ours.best_epoch == theirs.best_epoch and ours.best == theirs.best


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # (the divergence)
def test_a_nan_epoch_is_never_the_best(tmp_path, capsys):
    """[failed before] A first epoch whose loss was NaN became the best (the
    reference was None): no later epoch could beat it, and restoring its
    weights at the end of fit raised from load_state_dict (diverged
    weights), losing the History. NaN never improves: the best is the
    first finite epoch; weights holding NaN or inf (a run that diverged
    from its first epoch: Keras keeps that epoch's weights to restore) are
    not restored, with a warning."""
    values = [float("nan"), 0.5, 0.7, 0.4, 0.6, 0.9]
    es = fastrnn.EarlyStopping(patience=2, restore_best_weights=True)
    assert _drive_ours(es, values)[:2] == (5, 3.0)      # stopped at 5, epoch 3's weights
    assert es.best == 0.4 and es.best_epoch == 3 and es.stopped_epoch == 5
    plateau = fastrnn.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5)
    model = _model(lr=0.1)
    plateau.set_model(model)
    plateau.on_train_begin(model)
    plateau.on_epoch_end(model, 0, {"loss": float("nan")})
    assert model.optimizer.lr == pytest.approx(0.05)        # no improvement: reduced
    # save_best_only: a NaN first epoch is not saved (verbose: it formatted None as a float)
    checkpoint = fastrnn.ModelCheckpoint(str(tmp_path / "m.npz"), monitor="loss",
                                         save_best_only=True, verbose=1)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(model, 0, {"loss": float("nan")})
    assert capsys.readouterr().out == "Epoch 1: loss did not improve from None\n"
    assert checkpoint.best is None and not (tmp_path / "m.npz").exists()
    # through fit: every epoch diverged; fit returns its History, weights as they ended
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((32, 6, 3)) * 1e3).astype(np.float32)
    y = (rng.standard_normal((32, 1)) * 1e18).astype(np.float32)
    model = fastrnn.Sequential([fastrnn.GRU(3, 8, batch_first=True, seed=0), fastrnn.LastStep(),
                                fastrnn.Linear(8, 1, seed=1)], seed=2)
    model.compile(loss="mse", optimizer=optim.SGD(lr=10.0))
    es = fastrnn.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)
    with pytest.warns(RuntimeWarning, match=r"EarlyStopping: the weights of epoch 1 hold NaN "
                                             r"or inf \(training diverged\): not restored"):
        history = model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[es])
    assert all(np.isnan(history.history["loss"]))
    assert es.best is None and es.stopped_epoch == 1


# --- ReduceLROnPlateau --------------------------------------------------------------------------
PLATEAU = [dict(patience=0), dict(patience=2, factor=0.5), dict(patience=1, cooldown=2),
           dict(patience=1, factor=0.2, min_lr=0.002), dict(patience=2, mode="max"),
           dict(patience=1, min_delta=0.1)]


@pytest.mark.parametrize("kwargs", PLATEAU)
def test_reduce_lr_on_plateau_matches_keras(kwargs):
    keras = _keras()
    values = list(np.round(np.random.default_rng(5).random(15), 2))
    ours = fastrnn.ReduceLROnPlateau(**kwargs)
    theirs = keras.callbacks.ReduceLROnPlateau(**kwargs)
    model, ref = _model(lr=0.1), _keras_model(lr=0.1)
    ours.set_model(model)
    ours.on_train_begin(model)
    theirs.set_model(ref)
    theirs.on_train_begin()
    for epoch, value in enumerate(values):
        logs, klogs = {"val_loss": value}, {"val_loss": value}
        ours.on_epoch_end(model, epoch, logs)
        theirs.on_epoch_end(epoch, klogs)
        assert logs["learning_rate"] == pytest.approx(klogs["learning_rate"], rel=1e-6)
        assert model.optimizer.lr == pytest.approx(float(ref.optimizer.learning_rate), rel=1e-6)


@pytest.mark.parametrize("mode, values, min_delta, reduced", [
    # Keras 3's form, value + min_delta < best, in float64:
    # 0.98 + 0.02 < 1.0 is False (no improvement: patience 0 reduces), where
    # (0.98 - 1.0) + 0.02 < 0 is True
    ("min", [1.0, 0.98], 0.02, True),
    ("max", [1.0, 1.02], 0.02, True),
    ("min", [1.0, 0.97], 0.02, False),
    # 0.027 + 0.053 < 0.08 is False, where Keras 2's 0.027 < 0.08 - 0.053 is True
    ("min", [0.08, 0.027], 0.053, True),
])
def test_reduce_lr_on_plateau_compares_as_keras_at_the_min_delta_boundary(mode, values,
                                                                           min_delta, reduced):
    """[failed before: ('min', 0.98) counted as an improvement; then (0.027,
    0.053), in Keras 2's form]"""
    model = _model(lr=0.1)
    plateau = fastrnn.ReduceLROnPlateau(patience=0, factor=0.5, min_delta=min_delta, mode=mode)
    plateau.set_model(model)
    plateau.on_train_begin(model)
    for epoch, value in enumerate(values):
        plateau.on_epoch_end(model, epoch, {"val_loss": value})
    assert model.optimizer.lr == (0.05 if reduced else 0.1)


def test_reduce_lr_on_plateau_boundaries_against_keras():
    """Decimal values and deltas at their boundaries, decided as the
    installed Keras does, where float32 rounding does not decide the case
    (Keras' TensorFlow backend compares in float32, fastrnn in float64)."""
    keras = _keras()
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(60):
        best = round(float(rng.uniform(0.05, 1.0)), 3)
        delta = round(float(rng.uniform(0.001, best / 2)), 3)
        value = round(best - delta, 3)   # at the boundary, up to rounding
        f32 = np.float32(value) + np.float32(delta) < np.float32(best)
        if f32 != (value + delta < best):
            continue   # float32 decides otherwise than float64: not comparable
        model, ref = _model(lr=0.1), _keras_model(lr=0.1)
        ours = fastrnn.ReduceLROnPlateau(patience=0, factor=0.5, min_delta=delta)
        theirs = keras.callbacks.ReduceLROnPlateau(patience=0, factor=0.5, min_delta=delta)
        ours.set_model(model)
        ours.on_train_begin(model)
        theirs.set_model(ref)
        theirs.on_train_begin()
        for epoch, v in enumerate([best, value]):
            ours.on_epoch_end(model, epoch, {"val_loss": v})
            theirs.on_epoch_end(epoch, {"val_loss": v})
        assert model.optimizer.lr == pytest.approx(float(ref.optimizer.learning_rate)), \
            (best, value, delta)
        checked += 1
    assert checked > 30


def test_reduce_lr_on_plateau_in_fit_adds_the_rate_to_history():
    x, y = _data()
    model = _model(lr=0.1)
    history = model.fit(x, y, epochs=4, validation_data=(x, y), verbose=0,
                        callbacks=[fastrnn.ReduceLROnPlateau(monitor="loss", patience=0,
                                                             min_delta=10.0, factor=0.5)])
    # the rate each epoch ran with; the first epoch is an improvement (nothing to beat)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert model.optimizer.lr == pytest.approx(0.0125)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau: factor must lie in \[0, 1\)"):
        fastrnn.ReduceLROnPlateau(factor=1.0)


# --- LearningRateScheduler ----------------------------------------------------------------------
def test_learning_rate_scheduler_matches_keras():
    keras = _keras()
    x, y = _data()

    def schedule(epoch, lr):
        return lr if epoch < 2 else lr * 0.5

    ours = _model(lr=0.1).fit(x, y, epochs=4, verbose=0,
                              callbacks=[fastrnn.LearningRateScheduler(schedule)]).history
    theirs = _keras_model(lr=0.1).fit(x, y, epochs=4, verbose=0, callbacks=[
        keras.callbacks.LearningRateScheduler(schedule)]).history
    assert ours["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-6)
    # one-argument schedules, and epochs counted from initial_epoch
    model = _model(lr=0.1)
    history = model.fit(x, y, epochs=5, initial_epoch=3, verbose=0,
                        callbacks=[fastrnn.LearningRateScheduler(lambda epoch: 0.01 * epoch)])
    assert history.epoch == [3, 4]
    assert history.history["learning_rate"] == pytest.approx([0.03, 0.04])
    with pytest.raises(TypeError, match=r"LearningRateScheduler: schedule\(0\) must return a "
                                        r"number, got str"):
        model.fit(x, y, verbose=0, callbacks=[fastrnn.LearningRateScheduler(lambda e: "x")])
    with pytest.raises(ValueError, match=r"LearningRateScheduler: schedule\(0\) must return a "
                                         r"finite number >= 0, got -1"):
        model.fit(x, y, verbose=0, callbacks=[fastrnn.LearningRateScheduler(lambda e: -1)])


# --- CSVLogger -----------------------------------------------------------------------------------
def test_csv_logger_writes_what_keras_writes(tmp_path):
    keras = _keras()
    x, y = _data()
    ours_path, theirs_path = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    _model().fit(x, y, epochs=3, validation_data=(x, y), verbose=0,
                 callbacks=[fastrnn.CSVLogger(ours_path)])
    _keras_model().fit(x, y, epochs=3, validation_data=(x, y), verbose=0,
                       callbacks=[keras.callbacks.CSVLogger(str(theirs_path))])
    ours = list(csv.reader(ours_path.open()))
    theirs = list(csv.reader(theirs_path.open()))
    assert ours[0] == theirs[0] == ["epoch", "loss", "val_loss"]
    assert [row[0] for row in ours] == [row[0] for row in theirs]
    assert ours_path.read_bytes().count(b"\r\n") == theirs_path.read_bytes().count(b"\r\n")
    # append: resuming adds rows without a second header
    _model().fit(x, y, epochs=5, initial_epoch=3, validation_data=(x, y), verbose=0,
                 callbacks=[fastrnn.CSVLogger(ours_path, append=True)])
    rows = list(csv.reader(ours_path.open()))
    assert [row[0] for row in rows] == ["epoch", "0", "1", "2", "3", "4"]
    _model().fit(x, y, epochs=1, verbose=0,
                 callbacks=[fastrnn.CSVLogger(tmp_path / "semi.csv", separator=";")])
    assert (tmp_path / "semi.csv").read_text().splitlines()[0] == "epoch;loss"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_csv_logger_leaves_no_file_open_when_fit_raises(tmp_path):
    """A fit that raises never reaches on_train_end: the logger's file stayed
    open for as long as the logger lived (one more per failed fit)."""
    x, y = _data()
    path = tmp_path / "log.csv"
    logger = fastrnn.CSVLogger(path)

    def fail(epoch, logs):
        raise KeyError("a callback's own error")

    for _ in range(3):
        with pytest.raises(KeyError, match="a callback's own error"):
            _model().fit(x, y, epochs=3, verbose=0,
                         callbacks=[logger, fastrnn.LambdaCallback(on_epoch_end=fail)])
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.islink(f"/proc/self/fd/{fd}")]
    assert str(path) not in open_files
    assert path.read_text().splitlines()[:2][0] == "epoch,loss"


# --- TerminateOnNaN -----------------------------------------------------------------------------
def test_terminate_on_nan_stops_after_the_batch(capsys):
    keras = _keras()
    x, y = _data(n=12)
    x[5, 0] = np.nan                        # the second batch of 4
    ours, theirs = Recorder(), _keras_recorder()
    history = _model().fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0,
                           callbacks=[fastrnn.TerminateOnNaN(), ours])
    assert "Batch 1: Invalid loss, terminating training" in capsys.readouterr().out
    _keras_model().fit(x, y, epochs=3, batch_size=4, shuffle=False, verbose=0,
                       callbacks=[keras.callbacks.TerminateOnNaN(), theirs])
    assert ours.events == theirs.events
    assert len(history.epoch) == 1 and np.isnan(history.history["loss"][0])
    with pytest.raises(RuntimeError, match=r"TerminateOnNaN: NaN or Inf loss encountered at "
                                           r"batch 1"):
        _model().fit(x, y, batch_size=4, shuffle=False, verbose=0,
                     callbacks=[fastrnn.TerminateOnNaN(raise_error=True)])


# --- ModelCheckpoint ----------------------------------------------------------------------------
def test_model_checkpoint_saves_every_epoch_or_the_best(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((32, 4)), rng.standard_normal((32, 1))
    xv, yv = rng.standard_normal((16, 4)), 0.1 * rng.standard_normal((16, 1))
    states = []
    keep = fastrnn.LambdaCallback(on_epoch_end=lambda epoch, logs: states.append(
        (model.state_dict(), logs["val_loss"])))
    model = fastrnn.Sequential([fastrnn.Linear(4, 1, dtype="float64", seed=0)], seed=0)
    model.compile("mse", optim.Adam(lr=0.2))
    every = fastrnn.ModelCheckpoint(tmp_path / "sub" / "e{epoch:02d}-{val_loss:.3f}.npz",
                                    save_best_only=False)
    best = fastrnn.ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
    model.fit(x, y, epochs=6, batch_size=8, validation_data=(xv, yv), verbose=0,
              callbacks=[keep, every, best])
    names = sorted(p.name for p in (tmp_path / "sub").iterdir())
    assert names == [f"e{i + 1:02d}-{val:.3f}.npz" for i, (_, val) in enumerate(states)]
    best_epoch = int(np.argmin([val for _, val in states]))
    loaded = fastrnn.load(tmp_path / "best.npz")
    assert all(np.array_equal(loaded.state_dict()[k], v)
               for k, v in states[best_epoch][0].items())
    assert isinstance(loaded.optimizer, optim.Adam)     # with its optimizer, to resume
    assert best.best == pytest.approx(min(val for _, val in states))
    with pytest.raises(ValueError, match=r"ModelCheckpoint: cannot format filepath"):
        model.fit(x, y, verbose=0, callbacks=[fastrnn.ModelCheckpoint(tmp_path / "{nope}.npz")])


# --- LambdaCallback and plain objects -----------------------------------------------------------
def test_lambda_callback_refuses_a_function_of_other_arguments():
    """[failed before: a bare TypeError from inside fit at the first epoch]"""
    with pytest.raises(TypeError, match=r"LambdaCallback: on_epoch_end must take \(epoch, "
                       r"logs\), Keras' arguments, got a function of \(model, epoch, logs\)"):
        fastrnn.LambdaCallback(on_epoch_end=lambda model, epoch, logs: None)
    with pytest.raises(TypeError, match=r"on_train_begin must take \(logs\)"):
        fastrnn.LambdaCallback(on_train_begin=lambda: None)
    with pytest.raises(TypeError, match=r"on_train_batch_end must take \(batch, logs\)"):
        fastrnn.LambdaCallback(on_train_batch_end=lambda batch: None)
    # what takes the arguments passes: defaults, *args, builtins without a signature
    fastrnn.LambdaCallback(on_epoch_end=lambda *args: None, on_train_end=print,
                           on_epoch_begin=lambda epoch, logs=None, extra=1: None)


def test_lambda_callback_and_duck_typed_callbacks():
    x, y = _data()
    calls = []
    log = fastrnn.LambdaCallback(
        on_train_begin=lambda logs: calls.append(("begin", logs)),
        on_epoch_begin=lambda epoch, logs: calls.append(("epoch", epoch)),
        on_epoch_end=lambda epoch, logs: calls.append(("end", epoch, sorted(logs))),
        on_train_end=lambda logs: calls.append(("done", sorted(logs))))

    class Plain:                              # not a Callback subclass: any object with hooks
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, model, epoch, logs):
            self.epochs.append(epoch)

        def on_train_end(self, model):         # the old one-argument form still works
            self.ended = True

    plain = Plain()
    _model().fit(x, y, epochs=2, verbose=0, callbacks=[log, plain])
    assert calls == [("begin", {}), ("epoch", 0), ("end", 0, ["loss"]), ("epoch", 1),
                     ("end", 1, ["loss"]), ("done", ["loss"])]
    assert plain.epochs == [0, 1] and plain.ended


def test_callback_errors():
    x, y = _data()
    model = _model()
    with pytest.raises(TypeError, match=r"Sequential.fit: callbacks must be a list"):
        model.fit(x, y, verbose=0, callbacks=fastrnn.TerminateOnNaN())
    with pytest.raises(TypeError, match=r"Sequential.fit: callbacks\[0\] is a str, not a "
                                        r"callback"):
        model.fit(x, y, verbose=0, callbacks=["early"])
    with pytest.raises(ValueError, match=r"EarlyStopping: monitor 'val_loss' is not among the "
                                         r"logged values \['loss'\]"):
        model.fit(x, y, verbose=0, callbacks=[fastrnn.EarlyStopping()])
    with pytest.raises(ValueError, match=r"EarlyStopping: cannot tell whether monitor "
                                         r"'val_score' should be minimised or maximised"):
        model.fit(x, y, validation_data=(x, y), verbose=0,
                  callbacks=[fastrnn.EarlyStopping(monitor="val_score")])
    with pytest.raises(ValueError, match=r"ModelCheckpoint: mode must be 'auto', 'min' or "
                                         r"'max'"):
        fastrnn.ModelCheckpoint("m.npz", mode="best")
    with pytest.raises(TypeError, match=r"LambdaCallback: on_epoch_end must be callable"):
        fastrnn.LambdaCallback(on_epoch_end=3)
    with pytest.raises(TypeError, match=r"LearningRateScheduler: schedule must be callable"):
        fastrnn.LearningRateScheduler(0.1)
    with pytest.raises(ValueError, match=r"EarlyStopping: start_from_epoch must be >= 0"):
        fastrnn.EarlyStopping(start_from_epoch=-1)
    with pytest.raises(TypeError, match=r"EarlyStopping: baseline must be a number or None"):
        fastrnn.EarlyStopping(baseline="low")


def test_auto_mode_maximises_accuracies():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 3)), rng.integers(0, 3, 20)
    model = fastrnn.Sequential([fastrnn.Linear(3, 3, seed=0)], seed=0)
    model.compile(fastrnn.CrossEntropyLoss(), optim.SGD(lr=0.0), metrics=["accuracy"])
    stop = fastrnn.EarlyStopping(monitor="val_accuracy", patience=1)
    model.fit(x, y, epochs=3, validation_data=(x, y), verbose=0, callbacks=[stop])
    assert stop._sign == -1.0
    for combo in itertools.product(["loss", "val_loss", "mae"], ["min"]):
        assert fastrnn.EarlyStopping(monitor=combo[0], mode=combo[1])


def test_settings_that_would_be_read_otherwise_than_meant_are_refused(tmp_path):
    """verbose other than 0 or 1 (kept and read as true or false), an
    infinite min_delta or min_lr (nothing could ever count as a change or
    lower the rate) and a NaN threshold (every comparison false)."""
    C = fastrnn.callbacks
    for make in (lambda verbose: C.EarlyStopping(verbose=verbose),
                 lambda verbose: C.ModelCheckpoint(str(tmp_path / "m.npz"), verbose=verbose),
                 lambda verbose: C.ReduceLROnPlateau(verbose=verbose),
                 lambda verbose: C.LearningRateScheduler(lambda epoch, lr: lr, verbose=verbose)):
        for bad, error in (("yes", TypeError), (2, ValueError), (0.5, TypeError),
                           (None, TypeError)):
            with pytest.raises(error, match=r"verbose must be 0 or 1, got "):
                make(bad)
        assert make(True).verbose == 1 and make(0).verbose == 0
    with pytest.raises(ValueError, match="EarlyStopping: min_delta must be finite, got inf"):
        C.EarlyStopping(min_delta=float("inf"))
    with pytest.raises(ValueError, match="ReduceLROnPlateau: min_lr must be a finite number"):
        C.ReduceLROnPlateau(min_lr=float("inf"))
    with pytest.raises(ValueError, match="BinaryAccuracy: threshold must not be NaN"):
        fastrnn.metrics.BinaryAccuracy(threshold=float("nan"))


def test_model_checkpoint_skips_a_diverged_epoch_and_keeps_the_best_it_wrote(tmp_path,
                                                                              monkeypatch):
    """A run diverging under TerminateOnNaN and a ModelCheckpoint ended in
    save's ValueError out of fit (no History, no on_train_end): the epoch is
    now skipped with a warning. And save_best_only took an epoch's value as
    the best before writing it: a save that failed left a best no file
    held, so a later, better epoch was not saved."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5, 3)).astype(np.float32)
    y = (rng.standard_normal((40, 1)) * 1e3).astype(np.float32)
    model = fastrnn.Sequential([fastrnn.RNN(3, 6, batch_first=True, seed=0, nonlinearity="relu"),
                                fastrnn.LastStep(), fastrnn.Linear(6, 1, seed=1)], seed=2)
    model.compile(loss="mse", optimizer=optim.SGD(lr=10.0))      # diverges in epoch 1
    ended = []
    with pytest.warns(RuntimeWarning, match=r"ModelCheckpoint: epoch 1 not saved, the run "
                                            r"diverged \(Sequential.save: .* non-finite"):
        history = model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[
            fastrnn.TerminateOnNaN(), fastrnn.ModelCheckpoint(tmp_path / "c.npz", monitor="loss"),
            fastrnn.LambdaCallback(on_train_end=lambda logs: ended.append(1))])
    assert len(history.history["loss"]) == 1 and ended == [1]
    assert not (tmp_path / "c.npz").exists()

    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(4, 1, seed=1)])
    model.compile(loss="mse", optimizer="sgd")
    checkpoint = fastrnn.ModelCheckpoint(tmp_path / "best.npz", monitor="loss",
                                         save_best_only=True, mode="min")
    checkpoint.on_epoch_end(model, 0, {"loss": 1.0})
    saved = model.save

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model, "save", failing)
    with pytest.raises(OSError):
        checkpoint.on_epoch_end(model, 1, {"loss": 0.5})
    assert checkpoint.best == 1.0                  # the value of the file on disk
    monkeypatch.setattr(model, "save", saved)
    checkpoint.on_epoch_end(model, 2, {"loss": 0.7})
    assert checkpoint.best == 0.7


def test_an_evaluate_during_fit_leaves_the_epochs_metrics_alone():
    """evaluate (from a callback, or from another thread while fit runs)
    reset and fed the Metric objects fit's epoch was accumulating: History's
    mae came out of other data (and a concurrent evaluate's own result of
    fit's batches). Each pass now keeps its own."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5, 3)).astype(np.float32)
    y = rng.standard_normal((12, 1)).astype(np.float32)
    x_other, y_other = x[:4] * 3, y[:4] + 5

    def fitted(callbacks):
        model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                    fastrnn.LastStep(), fastrnn.Linear(4, 1, seed=1)])
        model.compile("mse", optim.SGD(lr=0.01), metrics=["mae"])
        return model, model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0,
                                validation_data=(x, y), callbacks=callbacks)

    _, plain = fitted([])
    # a Metric object given to compile: each pass its own copy, reset (the
    # object itself had gone on adding up across epochs once reset went)
    model = fastrnn.Sequential([fastrnn.GRU(3, 4, batch_first=True, seed=0),
                                fastrnn.LastStep(), fastrnn.Linear(4, 1, seed=1)])
    model.compile("mse", optim.SGD(lr=0.01), metrics=[fastrnn.metrics.MeanAbsoluteError()])
    given = model.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0,
                      validation_data=(x, y))
    assert given.history == {key.replace("mae", "mean_absolute_error"): value
                             for key, value in plain.history.items()}
    assert model.evaluate(x, y) == model.evaluate(x, y)
    seen = []
    probe = fastrnn.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
        probe.model.evaluate(x_other, y_other, return_dict=True)["mae"]))
    model, probed = fitted([probe])
    assert probed.history == plain.history
    evaluated = model.evaluate(x_other, y_other, return_dict=True)["mae"]
    assert len(seen) == 6 and seen[-1] == pytest.approx(evaluated, rel=1e-6)
