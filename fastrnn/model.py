"""Sequential models: compose layers, compile, fit, evaluate, predict, save.

Arrays are batch-first: sequences (N, T, features), as Keras'. Layers follow
the protocol of fastrnn.nn (recurrent layers adapt to it whatever their
``batch_first``).
"""
import json
import math
import numbers
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Mapping

import numpy as np

from fastrnn import _validation as v
from fastrnn._version import __version__
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.losses import get_loss
from fastrnn.nn import Dropout, LastStep, Linear, ReLU, Sigmoid, Tanh
from fastrnn.optim import clip_grad_norm, clip_grad_value, get_optimizer

# the classes a saved model may name: loading builds nothing else
_LAYER_CLASSES = {cls.__name__: cls for cls in (RNN, GRU, LSTM, Linear, Dropout, LastStep,
                                                ReLU, Tanh, Sigmoid)}
_FORMAT = "fastrnn.Sequential/1"


class History:
    """What ``fit`` returns: ``history.history['loss']`` (and ``'val_loss'``),
    one value per epoch; ``history.epoch`` the epoch indices."""

    def __init__(self):
        self.history = {}
        self.epoch = []

    def _append(self, epoch, logs):
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


class Callback:
    """Hooks ``fit`` calls; set ``model.stop_training = True`` to stop."""

    def on_train_begin(self, model):
        pass

    def on_epoch_end(self, model, epoch, logs):
        pass

    def on_train_end(self, model):
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience``
    epochs; with ``restore_best_weights``, end with the best epoch's weights.

    Parameters
    ----------
    monitor : str, default 'val_loss'
    min_delta : float, default 0
    patience : int, default 0
    mode : {'auto', 'min', 'max'}, default 'auto' (min for losses)
    restore_best_weights : bool, default False
    """

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, mode="auto",
                 restore_best_weights=False):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real):
            raise TypeError(f"EarlyStopping: min_delta must be a number, got {min_delta!r}")
        self.monitor = monitor
        self.min_delta = abs(float(min_delta))
        self.patience = v.check_int("EarlyStopping", "patience", patience, minimum=0)
        self.sign = -1.0 if mode == "max" else 1.0  # compare sign * value, smaller is better
        self.restore_best_weights = bool(restore_best_weights)

    def on_train_begin(self, model):
        self.best, self.best_epoch, self.best_weights, self.wait = math.inf, None, None, 0
        self.stopped_epoch = None

    def on_epoch_end(self, model, epoch, logs):
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping: monitor {self.monitor!r} is not among the logged "
                             f"values {sorted(logs)} (val_loss needs validation data)")
        value = self.sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = model.state_dict()
            return
        self.wait += 1
        if self.wait >= max(self.patience, 1):  # Keras: `patience` epochs without improvement
            self.stopped_epoch = epoch
            model.stop_training = True

    def on_train_end(self, model):
        if self.restore_best_weights and self.best_weights is not None:
            model.load_state_dict(self.best_weights)


class _ProgressBar:
    """Keras-like progress: a bar with loss and time left on a terminal, one
    line per epoch otherwise (logs, CI)."""

    def __init__(self, verbose, epochs, steps, stream=None):
        self.verbose, self.epochs, self.steps = verbose, epochs, steps
        self.stream = stream or sys.stdout
        self.live = verbose == 1 and hasattr(self.stream, "isatty") and self.stream.isatty()

    def start_epoch(self, epoch):
        self.t0 = time.perf_counter()
        self.epoch = epoch

    def update(self, step, loss):
        if not self.live:
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / step * (self.steps - step)
        done = int(30 * step / self.steps)
        bar = "=" * max(done - 1, 0) + (">" if done < 30 else "=") + "." * (30 - done)
        self.stream.write(f"\rEpoch {self.epoch + 1}/{self.epochs} [{bar}] {step}/{self.steps}"
                          f" - loss: {loss:.4g} - ETA: {left:.1f}s ")
        self.stream.flush()

    def end_epoch(self, logs):
        if self.verbose == 0:
            return
        elapsed = time.perf_counter() - self.t0
        values = " - ".join(f"{k}: {val:.4g}" for k, val in logs.items())
        prefix, pad = ("\r", " " * 10) if self.live else ("", "")
        self.stream.write(f"{prefix}Epoch {self.epoch + 1}/{self.epochs} - {self.steps} steps "
                          f"- {elapsed:.2f}s - {values}{pad}\n")
        self.stream.flush()


class Sequential:
    """A stack of layers applied in order, with a Keras-like training loop.

    Parameters
    ----------
    layers : list
        fastrnn layers: RNN, GRU, LSTM (their output sequence is passed on),
        LastStep, Dropout, Linear, ReLU, Tanh, Sigmoid.
    seed : None, int or numpy.random.Generator
        Source of the shuffling in ``fit``.

    Examples
    --------
    >>> model = fastrnn.Sequential([fastrnn.RNN(1, 50, batch_first=True, seed=0),
    ...                             fastrnn.LastStep(), fastrnn.Linear(50, 1, seed=0)])
    >>> model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3))
    >>> history = model.fit(x, y, epochs=10, batch_size=32, validation_split=0.2)
    """

    def __init__(self, layers, seed=None):
        if not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError("Sequential: layers must be a non-empty list of fastrnn layers")
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "_seq_train") and hasattr(layer, "_seq_infer")):
                raise TypeError(f"Sequential: layers[{i}] is a {type(layer).__name__}, not a "
                                f"fastrnn layer")
        self.layers = list(layers)
        self._rng = v.check_seed("Sequential", seed)
        self.loss = self.optimizer = None
        self.clip_grad_norm = self.clip_grad_value = None
        self.stop_training = False

    def __getstate__(self):
        # The optimizer holds views of the layers' parameter storage, which a
        # copy does not share: pickle the model uncompiled (compile again).
        state = self.__dict__.copy()
        state["optimizer"] = None
        return state

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def _modules_with_parameters(self):
        return [layer for layer in self.layers if layer._trainable]

    # --- parameters ---------------------------------------------------------
    def state_dict(self):
        """Copies of every parameter, named '{layer index}.{name}' as PyTorch's
        ``nn.Sequential``."""
        return {f"{i}.{name}": value for i, layer in enumerate(self.layers)
                for name, value in layer.state_dict().items()}

    def load_state_dict(self, state_dict, strict=True):
        """Load '{index}.{name}' parameters; checks everything before copying."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Sequential: load_state_dict expects a mapping of name to array, "
                            f"got {type(state_dict).__name__}")
        expected = self.state_dict()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"Sequential: load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        per_layer = [{} for _ in self.layers]
        for key, value in state_dict.items():
            if key in expected:
                index, name = key.split(".", 1)
                per_layer[int(index)][name] = value
        # validate every layer's part before changing any
        snapshots = [layer.state_dict() for layer in self.layers]
        try:
            for layer, part in zip(self.layers, per_layer):
                if part:
                    layer.load_state_dict(part, strict=False)
        except (TypeError, ValueError):
            for layer, snapshot in zip(self.layers, snapshots):
                if snapshot:
                    layer.load_state_dict(snapshot)
            raise

    def zero_grad(self):
        for layer in self._modules_with_parameters():
            layer.zero_grad()

    # --- inference ----------------------------------------------------------
    def __call__(self, x):
        """Inference on one batch (dropout off)."""
        for layer in self.layers:
            x = layer._seq_infer(x)
        return x

    def predict(self, x, batch_size=None):
        """Inference over x in batches (all at once if batch_size is None)."""
        x = self._as_input(x)
        if batch_size is not None:
            batch_size = v.check_int("Sequential.predict", "batch_size", batch_size)
        if batch_size is None or len(x) <= batch_size:
            return self(x)
        return np.concatenate([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    # --- training -----------------------------------------------------------
    def compile(self, loss="mse", optimizer="adam", clip_grad_norm=None, clip_grad_value=None):
        """Set the loss (a fastrnn loss or a name: 'mse', 'mae', 'huber',
        'cross_entropy', 'bce_with_logits') and the optimizer (a fastrnn
        optimizer, bound to this model's parameters if it has none, or a name:
        'sgd', 'adam', 'adamw', 'rmsprop'); optionally clip the gradients by
        global norm and/or by value before each step."""
        self.loss = get_loss(loss)
        opt = get_optimizer(optimizer)
        if not opt.bound:
            opt.add(self)
        else:
            missing = [m for m in self._modules_with_parameters()
                       if not any(m is o for o in opt._modules)]
            if missing:
                raise ValueError(f"Sequential.compile: the optimizer was built for other "
                                 f"parameters and would not train {missing}; pass an "
                                 f"optimizer built without params (it is bound here), or "
                                 f"one built with this model")
        self.optimizer = opt
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        return self

    def _require_compiled(self, what):
        if self.loss is None or self.optimizer is None:
            raise RuntimeError(f"Sequential.{what}: call compile(loss, optimizer) first")

    def train_step(self, x, y):
        """Forward, loss, backward and one optimizer step on one batch; returns the loss."""
        self._require_compiled("train_step")
        backprops = []
        out = x
        for layer in self.layers:
            out, backprop = layer._seq_train(out)
            backprops.append(backprop)
        value, grad = self.loss.value_and_grad(out, y)
        self.zero_grad()
        for backprop in reversed(backprops):
            grad = backprop(grad)
        if self.clip_grad_norm is not None:
            clip_grad_norm(self, self.clip_grad_norm)
        if self.clip_grad_value is not None:
            clip_grad_value(self, self.clip_grad_value)
        self.optimizer.step()
        return value

    def evaluate(self, x, y, batch_size=None):
        """Mean loss over (x, y) with the inference path (dropout off)."""
        self._require_compiled("evaluate")
        if batch_size is not None:
            batch_size = v.check_int("Sequential.evaluate", "batch_size", batch_size)
        x, y = self._as_input(x), np.asarray(y)
        self._check_pair(x, y)
        if batch_size is None or len(x) <= batch_size:
            return self.loss(self(x), y)
        total = 0.0
        for i in range(0, len(x), batch_size):
            total += self.loss(self(x[i:i + batch_size]), y[i:i + batch_size]) * len(x[i:i + batch_size])
        return total / len(x)

    def fit(self, x, y, epochs=1, batch_size=32, validation_split=0.0, validation_data=None,
            shuffle=True, callbacks=None, verbose=1):
        """Train; returns a History.

        Parameters
        ----------
        x, y : arrays with the same first (sample) axis
        epochs : int
        batch_size : int
        validation_split : float in [0, 1)
            Fraction of the samples, taken from the end before any shuffling
            (Keras' rule), held out to compute ``val_loss`` each epoch.
        validation_data : (x_val, y_val), optional; overrides validation_split
        shuffle : bool
            Shuffle the training samples every epoch (with the model's seed).
        callbacks : list, optional
            EarlyStopping, learning-rate schedules, or any object with
            ``on_train_begin / on_epoch_end / on_train_end``.
        verbose : {0, 1, 2}
            0 silent, 1 progress bar (one line per epoch when not a terminal),
            2 one line per epoch.
        """
        self._require_compiled("fit")
        epochs = v.check_int("Sequential.fit", "epochs", epochs)
        batch_size = v.check_int("Sequential.fit", "batch_size", batch_size)
        if verbose not in (0, 1, 2):
            raise ValueError(f"Sequential.fit: verbose must be 0, 1 or 2, got {verbose!r}")
        x, y = self._as_input(x), np.asarray(y)
        self._check_pair(x, y)
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("Sequential.fit: validation_data must be a pair (x_val, y_val)")
            x_val, y_val = self._as_input(validation_data[0]), np.asarray(validation_data[1])
            self._check_pair(x_val, y_val)
        elif validation_split:
            split = validation_split
            if isinstance(split, bool) or not isinstance(split, numbers.Real) \
                    or not 0 <= split < 1:
                raise ValueError(f"Sequential.fit: validation_split must be a float in [0, 1), "
                                 f"got {split!r}")
            n_val = len(x) - int(math.floor(len(x) * (1.0 - split)))  # Keras' rounding
            if n_val == 0 or n_val == len(x):
                raise ValueError(f"Sequential.fit: validation_split={split} leaves "
                                 f"{len(x) - n_val} training and {n_val} validation samples")
            x, x_val, y, y_val = x[:-n_val], x[-n_val:], y[:-n_val], y[-n_val:]
        else:
            x_val = y_val = None
        callbacks = list(callbacks or [])
        history = History()
        n = len(x)
        steps = math.ceil(n / batch_size)
        bar = _ProgressBar(verbose, epochs, steps)
        self.stop_training = False
        for cb in callbacks:
            if hasattr(cb, "on_train_begin"):
                cb.on_train_begin(self)
        for epoch in range(epochs):
            bar.start_epoch(epoch)
            order = self._rng.permutation(n) if shuffle else np.arange(n)
            total = 0.0
            for step in range(steps):
                idx = order[step * batch_size:(step + 1) * batch_size]
                total += self.train_step(x[idx], y[idx]) * len(idx)
                bar.update(step + 1, total / min((step + 1) * batch_size, n))
            logs = {"loss": total / n}
            if x_val is not None:
                logs["val_loss"] = self.evaluate(x_val, y_val, batch_size=max(batch_size, 256))
            history._append(epoch, logs)
            bar.end_epoch(logs)
            for cb in callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(self, epoch, logs)
            if self.stop_training:
                break
        for cb in callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self)
        return history

    @staticmethod
    def _as_input(x):
        return v.to_numpy("Sequential", "x", x)

    @staticmethod
    def _check_pair(x, y):
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise ValueError(f"Sequential: x and y must have the same number of samples "
                             f"(first axis), got shapes {x.shape} and {y.shape}")
        if len(x) == 0:
            raise ValueError("Sequential: got no samples")

    # --- files --------------------------------------------------------------
    def save(self, path):
        """Write the layers' configuration (JSON) and weights to one ``.npz`` file.

        No pickle: loading it cannot run code. Written to a temporary file and
        renamed, so an existing file is replaced whole or not at all.
        """
        config = {"format": _FORMAT, "fastrnn_version": __version__,
                  "layers": [{"class": type(layer).__name__, "config": _jsonable(layer._config)}
                             for layer in self.layers]}
        arrays = {f"weights/{k}": val for k, val in self.state_dict().items()}
        arrays["config"] = np.array(json.dumps(config))
        path = os.fspath(path)
        # a fresh name beside the target (default permissions, unlike mkstemp's 0600)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Rebuild a model saved with ``save`` (weights exact; not compiled).

        Raises FileNotFoundError for a missing file and ValueError for anything
        that is not a complete, consistent fastrnn model file.
        """
        path = os.fspath(path)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"fastrnn.load: {path!r} is not a readable fastrnn model file "
                             f"({type(exc).__name__}: {exc})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"fastrnn.load: {path!r} holds a single array, not a fastrnn "
                             f"model file")
        try:
            with data:
                config = json.loads(str(data["config"][()]))
                weights = {k[len("weights/"):]: data[k] for k in data.files
                           if k.startswith("weights/")}
            return cls._from_config(config, weights)
        except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile,
                json.JSONDecodeError) as exc:
            message = str(exc)
            if not message.startswith("fastrnn.load"):
                message = (f"fastrnn.load: {path!r} is not a valid fastrnn model file "
                           f"({type(exc).__name__}: {message})")
            raise ValueError(message) from None

    @classmethod
    def _from_config(cls, config, weights):
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError("fastrnn.load: not a fastrnn Sequential file (format field)")
        entries = config.get("layers")
        if not isinstance(entries, list) or not entries:
            raise ValueError("fastrnn.load: the file lists no layers")
        layers = []
        for i, entry in enumerate(entries):
            name = entry.get("class") if isinstance(entry, dict) else None
            if name not in _LAYER_CLASSES or not isinstance(entry.get("config"), dict):
                raise ValueError(f"fastrnn.load: layer {i} names an unknown class {name!r}")
            try:
                layers.append(_LAYER_CLASSES[name](**entry["config"]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"fastrnn.load: layer {i} ({name}) has a bad configuration: "
                                 f"{exc}") from None
        model = cls(layers)
        try:
            model.load_state_dict(weights)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fastrnn.load: the weights do not fit the layers: {exc}") from None
        return model


def _jsonable(config):
    return {k: (val.name if isinstance(val, np.dtype) else val) for k, val in config.items()}


def load(path):
    """Load a model written by ``Sequential.save``."""
    return Sequential.load(path)
