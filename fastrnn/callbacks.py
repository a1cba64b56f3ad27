"""Callbacks for ``Sequential.fit``: Keras' set and behaviour.

``fit`` calls, in this order (as Keras): ``on_train_begin``; per epoch
``on_epoch_begin``, per batch ``on_train_batch_begin`` and
``on_train_batch_end``, then, with validation data, ``on_test_begin``, per
validation batch ``on_test_batch_begin`` / ``on_test_batch_end``, and
``on_test_end``; then ``on_epoch_end``; at the end ``on_train_end``.
The callbacks run in the order given (but for a ``ModelCheckpoint`` listed
before a learning-rate schedule or ``ReduceLROnPlateau``: it saves at the
epoch's end just after the last of them, so that its file holds the rate the
next epoch starts from), then ``fit`` records the epoch's logs
in its ``History`` and prints them, so a callback that adds to the logs
(``ReduceLROnPlateau`` and ``LearningRateScheduler`` add
``'learning_rate'``) is seen in both. Setting ``model.stop_training = True``
stops training after the current batch (its epoch still ends, with
validation and ``on_epoch_end``).

Every hook takes the model first (fastrnn's protocol, unlike Keras', whose
hooks find it in ``self.model``; a ``Callback`` has ``self.model`` too):
``on_epoch_end(model, epoch, logs)``, ``on_train_batch_end(model, batch,
logs)``, ``on_train_begin(model)``... Any object with some of these methods
is a callback (the learning-rate schedules of ``fastrnn.optim`` are); a
``Callback`` subclass overrides the ones it needs. ``on_train_begin`` and
``on_train_end`` also receive the logs (the last epoch's, at the end) when
they take a second argument. The batch logs hold the epoch's running
values: ``'loss'`` and the metrics over the batches so far.
"""
from __future__ import annotations

import csv
import inspect
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fastrnn import _validation as v
from fastrnn._saving import DivergedError

if TYPE_CHECKING:
    from fastrnn.model import Sequential

HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
         "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
         "on_test_batch_begin", "on_test_batch_end")


class History:
    """What ``fit`` returns (and leaves in ``model.history``):
    ``history.history['loss']`` (and every metric, ``'val_'`` ones with
    validation data), one value per epoch; ``history.epoch`` the epoch
    indices."""

    def __init__(self) -> None:
        self.history = {}
        self.epoch = []

    def _append(self, epoch, logs):
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


class Callback:
    """Base of the callbacks: every hook does nothing.

    Override the hooks you need; ``self.model`` is the model being trained
    (set when training begins). Set ``model.stop_training = True`` to stop.
    """
    model = None

    def set_model(self, model: Sequential) -> None:
        """Called by ``fit`` before ``on_train_begin``."""
        self.model = model

    def on_train_begin(self, model: Sequential, logs: dict[str, float] | None = None) -> None:
        """Training starts."""

    def on_train_end(self, model: Sequential, logs: dict[str, float] | None = None) -> None:
        """Training ends; ``logs`` are the last epoch's."""

    def on_epoch_begin(self, model: Sequential, epoch: int, logs: dict[str, float]) -> None:
        """An epoch starts (``epoch`` counts from 0, or from ``initial_epoch``)."""

    def on_epoch_end(self, model: Sequential, epoch: int, logs: dict[str, float]) -> None:
        """An epoch ends: ``logs`` hold its loss and metrics (``val_`` ones
        with validation data); a callback may add to them."""

    def on_train_batch_begin(self, model: Sequential, batch: int, logs: dict[str, float]) -> None:
        """A training batch starts (``batch`` counts from 0 in each epoch)."""

    def on_train_batch_end(self, model: Sequential, batch: int, logs: dict[str, float]) -> None:
        """A training batch ends: ``logs`` hold the epoch's running values."""

    def on_test_begin(self, model: Sequential, logs: dict[str, float] | None = None) -> None:
        """Validation (or ``evaluate``) starts."""

    def on_test_end(self, model: Sequential, logs: dict[str, float]) -> None:
        """Validation (or ``evaluate``) ends: ``logs`` hold its results,
        without the ``val_`` prefix."""

    def on_test_batch_begin(self, model: Sequential, batch: int, logs: dict[str, float]) -> None:
        """A validation batch starts."""

    def on_test_batch_end(self, model: Sequential, batch: int, logs: dict[str, float]) -> None:
        """A validation batch ends: ``logs`` hold the running values."""


def _check_verbose(owner, verbose):
    """0 or 1 (a bool too), as Keras' callbacks take it: anything else had
    been kept and read as true or false."""
    if isinstance(verbose, (bool, np.bool_)) or (isinstance(verbose, numbers.Integral)
                                                 and verbose in (0, 1)):
        return int(verbose)
    raise (ValueError if isinstance(verbose, numbers.Integral) else TypeError)(
        f"{owner}: verbose must be 0 or 1, got {verbose!r}")


def _takes_logs(method):
    """Whether on_train_begin / on_train_end take (model, logs)."""
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _checkpoints_after_rate_changes(methods):
    """on_epoch_end's methods in the list's order, except that a checkpoint
    listed before a callback that changes the learning rate (a schedule,
    ReduceLROnPlateau) runs just after the last such one: its file holds the
    rate the next epoch starts from, so resuming goes on bit for bit."""
    from fastrnn.optim import LRScheduler

    def owner(method):
        return getattr(method, "__self__", None)

    setters = [i for i, m in enumerate(methods)
               if isinstance(owner(m), (LRScheduler, ReduceLROnPlateau))]
    if not setters:
        return methods
    last = setters[-1]
    early = [m for m in methods[:last] if isinstance(owner(m), ModelCheckpoint)]
    return ([m for m in methods[:last + 1] if not any(m is e for e in early)] + early
            + methods[last + 1:])


class CallbackList:
    """The callbacks of one ``fit`` or ``evaluate``: per hook, the callbacks
    that implement it, found once (so hooks nobody uses cost nothing)."""

    def __init__(self, owner, callbacks, model):
        if callbacks is None:
            callbacks = []
        if not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"{owner}: callbacks must be a list, got "
                            f"{type(callbacks).__name__}")
        self.callbacks = list(callbacks)
        for i, cb in enumerate(self.callbacks):
            if isinstance(cb, (str, bytes, numbers.Number)) or not any(
                    callable(getattr(cb, hook, None)) for hook in HOOKS):
                raise TypeError(f"{owner}: callbacks[{i}] is a {type(cb).__name__}, not a "
                                f"callback (an object with on_epoch_end, on_train_batch_end, "
                                f"... methods)")
        self.hooks = {}
        for hook in HOOKS:
            methods = []
            for cb in self.callbacks:
                method = getattr(cb, hook, None)
                if not callable(method):
                    continue
                if isinstance(cb, Callback) and getattr(type(cb), hook, None) is \
                        getattr(Callback, hook) and hook not in vars(cb):
                    continue   # the base class's no-op
                methods.append(method)
            if hook == "on_epoch_end":
                methods = _checkpoints_after_rate_changes(methods)
            self.hooks[hook] = methods
        self.with_logs = {id(m): _takes_logs(m) for hook in ("on_train_begin", "on_train_end")
                          for m in self.hooks[hook]}
        self.model = model

    def wants(self, hook):
        return bool(self.hooks[hook])

    def set_model(self):
        for cb in self.callbacks:
            if isinstance(cb, Callback):
                cb.set_model(self.model)

    def train_begin(self):
        for method in self.hooks["on_train_begin"]:
            if self.with_logs[id(method)]:
                method(self.model, {})
            else:
                method(self.model)

    def train_end(self, logs):
        for method in self.hooks["on_train_end"]:
            if self.with_logs[id(method)]:
                method(self.model, logs)
            else:
                method(self.model)

    def call(self, hook, *args):
        for method in self.hooks[hook]:
            method(self.model, *args)


# --- monitoring a value ------------------------------------------------------------
class _MonitorCallback(Callback):
    """What EarlyStopping, ModelCheckpoint and ReduceLROnPlateau share: the
    monitored value, its direction and what counts as an improvement
    (Keras' ``MonitorCallback``)."""

    def __init__(self, monitor, mode, min_delta, baseline=None, baseline_name="baseline"):
        owner = type(self).__name__
        if not isinstance(monitor, str):
            raise TypeError(f"{owner}: monitor must be a str, got {type(monitor).__name__}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"{owner}: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) \
                or math.isnan(min_delta):
            raise TypeError(f"{owner}: min_delta must be a number, got {min_delta!r}")
        if math.isinf(min_delta):   # (no change could ever count as one)
            raise ValueError(f"{owner}: min_delta must be finite, got {min_delta}")
        if baseline is not None and (isinstance(baseline, bool)
                                     or not isinstance(baseline, numbers.Real)):
            raise TypeError(f"{owner}: {baseline_name} must be a number or None, got "
                            f"{baseline!r}")
        if baseline is not None and math.isnan(baseline):
            raise ValueError(f"{owner}: {baseline_name} must be a number or None, got NaN")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.baseline = None if baseline is None else float(baseline)
        self._sign = None   # +1: smaller is better; -1: larger is

    def _resolve_mode(self, model):
        if self.mode != "auto":
            self._sign = 1.0 if self.mode == "min" else -1.0
            return
        name = self.monitor[4:] if self.monitor.startswith("val_") else self.monitor
        direction = "down" if name == "loss" else None
        directions = getattr(model, "_metric_directions", None)
        if direction is None and callable(directions):
            direction = directions().get(name)
        if direction is None:
            raise ValueError(f"{type(self).__name__}: cannot tell whether monitor "
                             f"{self.monitor!r} should be minimised or maximised; pass "
                             f"mode='min' or mode='max'")
        self._sign = 1.0 if direction == "down" else -1.0

    def _current(self, model, logs):
        if self._sign is None:
            self._resolve_mode(model)
        if self.monitor not in logs:
            raise ValueError(f"{type(self).__name__}: monitor {self.monitor!r} is not among "
                             f"the logged values {sorted(logs)} (val_ values need validation "
                             f"data)")
        return float(logs[self.monitor])

    def _is_improvement(self, value, reference):
        """value beats reference by more than min_delta (reference None: yes),
        in Keras 3's form for both callbacks: value -/+ min_delta compared
        with the reference (where min_delta goes decides at the boundary:
        best 0.08, value 0.027, min_delta 0.053 is no improvement in this
        form, one in value < best - min_delta, Keras 2's ReduceLROnPlateau).
        In float64: Keras' TensorFlow backend compares in float32, so values
        within float32 rounding of the boundary may decide otherwise there.
        A NaN value (a diverged epoch) never improves, not even on None
        (Keras 3 takes a NaN first epoch as the best, which no later epoch
        then beats, and restores or keeps its weights)."""
        if math.isnan(value):
            return False
        if reference is None:
            return True
        return (value + self.min_delta < reference if self._sign > 0 else
                value - self.min_delta > reference)


class EarlyStopping(_MonitorCallback):
    """Stop when ``monitor`` has stopped improving (Keras' ``EarlyStopping``).

    An epoch improves on the best so far if it beats it by more than
    ``min_delta``; training stops once ``patience`` epochs have passed
    since the last improvement (and, with ``baseline``, since the last
    improvement that also beat the baseline). An epoch whose value is NaN
    never improves (unlike Keras 3, where a NaN first epoch stays the best:
    restoring would bring back diverged weights).

    Parameters
    ----------
    monitor : str, default 'val_loss'
    min_delta : float, default 0
    patience : int, default 0
    mode : {'auto', 'min', 'max'}, default 'auto'
        'auto': minimise losses and errors, maximise accuracies; for a
        metric of a user function, pass 'min' or 'max'.
    restore_best_weights : bool, default False
        End with the weights of the best epoch (also when training was not
        stopped early).
    baseline : float, optional
        Stop unless the monitored value beats this within ``patience``
        epochs.
    start_from_epoch : int, default 0
        Epochs to let pass before monitoring (warm-up).
    verbose : {0, 1}, default 0

    Attributes
    ----------
    best : float or None
        The best value seen.
    best_epoch : int or None
    stopped_epoch : int or None
        The epoch after which training stopped, None if it was not stopped.

    Raises
    ------
    ValueError
        At the end of an epoch, if ``monitor`` is not in the logs.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0,
                 mode: str = "auto", restore_best_weights: bool = False,
                 baseline: float | None = None, start_from_epoch: int = 0,
                 verbose: int = 0) -> None:
        super().__init__(monitor, mode, min_delta, baseline)
        self.patience = v.check_int("EarlyStopping", "patience", patience, minimum=0)
        self.start_from_epoch = v.check_int("EarlyStopping", "start_from_epoch",
                                            start_from_epoch, minimum=0)
        self.restore_best_weights = v.check_bool("EarlyStopping", "restore_best_weights",
                                                 restore_best_weights)
        self.verbose = _check_verbose(type(self).__name__, verbose)
        self.best = self.best_epoch = self.best_weights = self.stopped_epoch = None
        self.wait = 0

    def on_train_begin(self, model):
        self.best, self.best_epoch, self.best_weights, self.wait = None, None, None, 0
        self.stopped_epoch = None

    def on_epoch_end(self, model, epoch, logs):
        current = self._current(model, logs)
        if epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights, self.best_epoch = model.state_dict(), epoch
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = model.state_dict()
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model):
        if self.stopped_epoch is not None and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if not all(np.isfinite(value).all() for value in self.best_weights.values()
                       if np.asarray(value).dtype.kind == "f"):
                # (Keras restores them; load_state_dict refuses them, and
                # fit would lose its History to the error)
                warnings.warn(f"EarlyStopping: the weights of epoch {self.best_epoch + 1} "
                              f"hold NaN or inf (training diverged): not restored",
                              RuntimeWarning, stacklevel=2)
                return
            if self.verbose:
                print(f"Restoring model weights from the end of the best epoch: "
                      f"{self.best_epoch + 1}.")
            model.load_state_dict(self.best_weights)


class ModelCheckpoint(_MonitorCallback):
    """Save the model at the end of every epoch, or only when ``monitor``
    improved (Keras' ``ModelCheckpoint``).

    The file is the model's ``save`` file, with its optimizer and random
    states (``include_optimizer``): ``fastrnn.load`` it and call ``fit``
    with ``initial_epoch`` to go on training from it. Listed before a
    learning-rate schedule or ``ReduceLROnPlateau``, it saves at the epoch's
    end just after the last of them (the others keep the list's order), so
    the file holds the rate the next epoch starts from.

    Parameters
    ----------
    filepath : str or os.PathLike
        May hold ``{epoch}`` (counting from 1) and the names of logged
        values as ``str.format`` fields, e.g.
        ``'ckpt-{epoch:02d}-{val_loss:.3f}.npz'``. Missing directories are
        made.
    monitor : str, default 'val_loss'
    save_best_only : bool, default False
        Save only when the monitored value beats the best so far (kept
        across ``fit`` calls, as Keras does). A NaN value never does, not
        even the first (Keras saves a NaN first epoch, diverged weights).
        The best is taken once its file is written (a save that failed
        leaves the one before). Weights holding NaN or inf are never saved
        (a warning; the file stays as it was, and fit goes on, as
        TerminateOnNaN stops it).
    mode : {'auto', 'min', 'max'}, default 'auto'
    initial_value_threshold : float, optional
        The best value to beat at first.
    include_optimizer : bool, default True
    verbose : {0, 1}, default 0
    """

    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "val_loss",
                 save_best_only: bool = False, mode: str = "auto",
                 initial_value_threshold: float | None = None, include_optimizer: bool = True,
                 verbose: int = 0) -> None:
        super().__init__(monitor, mode, 0.0, initial_value_threshold, "initial_value_threshold")
        try:
            self.filepath = os.fspath(filepath)
        except TypeError:
            raise TypeError(f"ModelCheckpoint: filepath must be a str or path, got "
                            f"{type(filepath).__name__}") from None
        if not isinstance(self.filepath, str):
            raise TypeError("ModelCheckpoint: filepath must be a str path, got bytes")
        self.save_best_only = v.check_bool("ModelCheckpoint", "save_best_only", save_best_only)
        self.include_optimizer = v.check_bool("ModelCheckpoint", "include_optimizer",
                                              include_optimizer)
        self.verbose = _check_verbose(type(self).__name__, verbose)
        self.best = self.baseline

    def on_epoch_end(self, model, epoch, logs):
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint: cannot format filepath {self.filepath!r} with "
                             f"epoch and the logged values {sorted(logs)}: "
                             f"{type(exc).__name__}: {exc}") from None
        current = None
        if self.save_best_only:
            current = self._current(model, logs)
            best = "None" if self.best is None else f"{self.best:.5f}"
            if not self._is_improvement(current, self.best):   # (a NaN: not even on None)
                if self.verbose:
                    print(f"Epoch {epoch + 1}: {self.monitor} did not improve from {best}")
                return
            if self.verbose:
                print(f"Epoch {epoch + 1}: {self.monitor} improved from {best} to "
                      f"{current:.5f}, saving model to {path}")
        elif self.verbose:
            print(f"Epoch {epoch + 1}: saving model to {path}")
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            model.save(path, include_optimizer=self.include_optimizer)
        except DivergedError as exc:
            # (Keras saves them; fit would lose its History to the error, as
            # TerminateOnNaN stops it gracefully)
            warnings.warn(f"ModelCheckpoint: epoch {epoch + 1} not saved, the run diverged "
                          f"({exc})", RuntimeWarning, stacklevel=2)
            return
        if current is not None:   # (the best is the one on disk: set once it is written)
            self.best = current


class ReduceLROnPlateau(_MonitorCallback):
    """Multiply the learning rate by ``factor`` when ``monitor`` has not
    improved for ``patience`` epochs (Keras' ``ReduceLROnPlateau``).

    Adds ``'learning_rate'`` to the epoch's logs: the optimizer's rate when
    this callback's ``on_epoch_end`` runs (as Keras), so a schedule listed
    before it that steps at the epoch's end shows its next rate. A NaN
    value never improves, not even the first (in Keras 3 a NaN first epoch
    is the best, which no later epoch beats).

    Parameters
    ----------
    monitor : str, default 'val_loss'
    factor : float in [0, 1), default 0.1
    patience : int, default 10
    mode : {'auto', 'min', 'max'}, default 'auto'
    min_delta : float, default 1e-4
    cooldown : int, default 0
        Epochs to wait after a reduction before counting again.
    min_lr : float, default 0
    verbose : {0, 1}, default 0
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0, verbose: int = 0) -> None:
        super().__init__(monitor, mode, min_delta)
        owner = "ReduceLROnPlateau"
        for name, value in (("factor", factor), ("min_lr", min_lr)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or math.isnan(value):
                raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
        if not 0 <= factor < 1:
            raise ValueError(f"{owner}: factor must lie in [0, 1) (a reduction), got {factor}")
        if not 0 <= min_lr < math.inf:   # (an infinite one never lets a reduction happen)
            raise ValueError(f"{owner}: min_lr must be a finite number >= 0, got {min_lr}")
        self.factor, self.min_lr = float(factor), float(min_lr)
        self.patience = v.check_int(owner, "patience", patience, minimum=0)
        self.cooldown = v.check_int(owner, "cooldown", cooldown, minimum=0)
        self.verbose = _check_verbose(type(self).__name__, verbose)
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_train_begin(self, model):
        self.best, self.wait, self.cooldown_counter = None, 0, 0

    def on_epoch_end(self, model, epoch, logs):
        optimizer = model.optimizer
        logs["learning_rate"] = float(optimizer.lr)
        current = self._current(model, logs)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = float(optimizer.lr)
                if old > np.float32(self.min_lr):
                    optimizer.lr = max(old * self.factor, self.min_lr)
                    if self.verbose:
                        print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate "
                              f"to {optimizer.lr}.")
                    self.cooldown_counter, self.wait = self.cooldown, 0


class TerminateOnNaN(Callback):
    """Stop training when a batch's loss is NaN or infinite (Keras'
    ``TerminateOnNaN``).

    Parameters
    ----------
    raise_error : bool, default False
        Raise ``RuntimeError`` instead of stopping after the batch.
    """

    def __init__(self, raise_error: bool = False) -> None:
        self.raise_error = v.check_bool("TerminateOnNaN", "raise_error", raise_error)

    def on_train_batch_end(self, model, batch, logs):
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            if self.raise_error:
                raise RuntimeError(f"TerminateOnNaN: NaN or Inf loss encountered at batch "
                                   f"{batch}. Loss value: {loss}. Terminating training "
                                   f"immediately.")
            print(f"Batch {batch}: Invalid loss, terminating training")
            model.stop_training = True


class LearningRateScheduler(Callback):
    """Set the learning rate at the start of every epoch to
    ``schedule(epoch, lr)`` (or ``schedule(epoch)``), Keras'
    ``LearningRateScheduler``. ``epoch`` counts from 0 across ``fit``
    calls that pass ``initial_epoch``, so a resumed run follows the same
    schedule. Adds ``'learning_rate'`` to the epoch's logs.

    Parameters
    ----------
    schedule : callable
        ``schedule(epoch, lr) -> new lr`` (a non-negative number).
    verbose : {0, 1}, default 0
    """

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"LearningRateScheduler: schedule must be callable, got "
                            f"{type(schedule).__name__}")
        self.schedule = schedule
        self.verbose = _check_verbose(type(self).__name__, verbose)
        self._arity = _arity(schedule)

    def on_epoch_begin(self, model, epoch, logs):
        optimizer = model.optimizer
        if self._arity == 1:
            lr = self.schedule(epoch)
        else:
            lr = self.schedule(epoch, float(optimizer.lr))
        if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real):
            raise TypeError(f"LearningRateScheduler: schedule({epoch}) must return a number, "
                            f"got {type(lr).__name__}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"LearningRateScheduler: schedule({epoch}) must return a finite "
                             f"number >= 0, got {lr}")
        optimizer.lr = float(lr)
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to "
                  f"{optimizer.lr}.")

    def on_epoch_end(self, model, epoch, logs):
        logs["learning_rate"] = float(model.optimizer.lr)


def _arity(fn):
    """1 if fn takes only the epoch, else 2 (Keras tries two arguments)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return 1 if len(positional) == 1 else 2


class CSVLogger(Callback):
    """Write each epoch's logs as a row of a CSV file (Keras' ``CSVLogger``):
    an ``epoch`` column (from 0), then the logged values in the sorted order
    of their names, taken from the first epoch.

    Parameters
    ----------
    filename : str or os.PathLike
    separator : str, default ','
    append : bool, default False
        Add to an existing file (without repeating its header) rather than
        replacing it; for resumed training.
    """

    def __init__(self, filename: str | os.PathLike[str], separator: str = ",",
                 append: bool = False) -> None:
        try:
            self.filename = os.fspath(filename)
        except TypeError:
            raise TypeError(f"CSVLogger: filename must be a str or path, got "
                            f"{type(filename).__name__}") from None
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator must be one character, got {separator!r}")
        self.separator = separator
        self.append = v.check_bool("CSVLogger", "append", append)
        self._header = self._keys = None

    # The file is opened for each write and closed after it: a fit that
    # raises (a callback's error, a bad batch) never reaches on_train_end, and
    # a file kept open between epochs stayed open for as long as the logger
    # lived (100 failed fits: 100 open files).
    def on_train_begin(self, model):
        header = True
        if self.append and os.path.exists(self.filename):
            with open(self.filename, encoding="utf-8") as f:
                header = not f.readline()
        open(self.filename, "a" if self.append else "w", encoding="utf-8").close()
        self._header = header
        self._keys = None

    def on_epoch_end(self, model, epoch, logs):
        if self._header is None:
            raise RuntimeError("CSVLogger: on_epoch_end before on_train_begin")
        with open(self.filename, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=self.separator, lineterminator="\r\n")
            if self._keys is None:
                self._keys = sorted(logs)
                if self._header:
                    writer.writerow(["epoch"] + self._keys)
            writer.writerow([epoch] + [logs.get(key, "NA") for key in self._keys])


class LambdaCallback(Callback):
    """A callback made of functions with Keras' signatures (Keras'
    ``LambdaCallback``): ``on_epoch_begin(epoch, logs)``,
    ``on_epoch_end(epoch, logs)``, ``on_train_batch_begin(batch, logs)``,
    ``on_train_batch_end(batch, logs)``, ``on_train_begin(logs)``,
    ``on_train_end(logs)``.

    Examples
    --------
    >>> losses = []
    >>> log = fastrnn.LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    """

    def __init__(self, on_epoch_begin: Callable[..., Any] | None = None,
                 on_epoch_end: Callable[..., Any] | None = None,
                 on_train_begin: Callable[..., Any] | None = None,
                 on_train_end: Callable[..., Any] | None = None,
                 on_train_batch_begin: Callable[..., Any] | None = None,
                 on_train_batch_end: Callable[..., Any] | None = None) -> None:
        functions = {"on_epoch_begin": on_epoch_begin, "on_epoch_end": on_epoch_end,
                     "on_train_begin": on_train_begin, "on_train_end": on_train_end,
                     "on_train_batch_begin": on_train_batch_begin,
                     "on_train_batch_end": on_train_batch_end}
        for name, fn in functions.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"LambdaCallback: {name} must be callable, got "
                                f"{type(fn).__name__}")
            if fn is None:
                continue
            _check_keras_signature(name, fn)
            if name in ("on_train_begin", "on_train_end"):
                self.__dict__[name] = (lambda f: lambda model, logs=None: f(logs))(fn)
            else:
                self.__dict__[name] = (lambda f: lambda model, step, logs: f(step, logs))(fn)


def _check_keras_signature(name, fn):
    """LambdaCallback's functions take Keras' arguments, not the model first
    as fastrnn's own hooks do: a function that cannot take them is refused
    here (at the first epoch it would fail inside fit, unexplained)."""
    args = ("logs",) if name in ("on_train_begin", "on_train_end") else (
        ("epoch", "logs") if name.startswith("on_epoch") else ("batch", "logs"))
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):   # (some builtins have none to read)
        return
    try:
        signature.bind(*args)
    except TypeError:
        raise TypeError(f"LambdaCallback: {name} must take ({', '.join(args)}), Keras' "
                        f"arguments, got a function of {signature} (a Callback subclass's "
                        f"hooks take the model first; LambdaCallback's do not)") from None


class ProgressBar:
    """Keras-like progress: a bar with the running loss and metrics and the
    time left on a terminal, one line per epoch otherwise (logs, CI)."""

    def __init__(self, verbose, epochs, steps, stream=None):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self.stream = stream or sys.stdout
        self.live = verbose == 1 and hasattr(self.stream, "isatty") and self.stream.isatty()

    def start_epoch(self, epoch):
        self.t0 = time.perf_counter()
        self.epoch = epoch
        self.seen = 0

    def update(self, step, logs):
        if not self.live:
            return
        elapsed = time.perf_counter() - self.t0
        values = " - ".join(f"{k}: {val:.4g}" for k, val in logs.items())
        if self.steps:
            left = elapsed / step * (self.steps - step)
            done = int(30 * step / self.steps)
            bar = "=" * max(done - 1, 0) + (">" if done < 30 else "=") + "." * (30 - done)
            self.stream.write(f"\rEpoch {self.epoch + 1}/{self.epochs} [{bar}] {step}/"
                              f"{self.steps} - {values} - ETA: {left:.1f}s ")
        else:
            self.stream.write(f"\rEpoch {self.epoch + 1}/{self.epochs} {step} steps - "
                              f"{values} - {elapsed:.1f}s ")
        self.stream.flush()

    def end_epoch(self, logs):
        if self.verbose == 0:
            return
        elapsed = time.perf_counter() - self.t0
        values = " - ".join(f"{k}: {val:.4g}" for k, val in logs.items())
        prefix, pad = ("\r", " " * 10) if self.live else ("", "")
        self.stream.write(f"{prefix}Epoch {self.epoch + 1}/{self.epochs} - {self.seen} steps "
                          f"- {elapsed:.2f}s - {values}{pad}\n")
        self.stream.flush()

