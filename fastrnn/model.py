"""Sequential models: compose layers, compile, fit, evaluate, predict, save.

Arrays are batch-first: sequences (N, T, features), as Keras'. Layers follow
the protocol of fastrnn.nn (recurrent layers adapt to it whatever their
``batch_first``).
"""
import inspect
import json
import math
import numbers
import os
import reprlib
import stat
import struct
import sys
import time
import uuid
import zipfile
import zlib
from collections import namedtuple
from collections.abc import Mapping

import numpy as np

from fastrnn import _validation as v
from fastrnn._validation import shape_str
from fastrnn._version import __version__
from fastrnn.layers import GRU, LSTM, RNN, _RNNBase
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

    Indexing works as for PyTorch's ``nn.Sequential``: ``model[i]`` is a
    layer, ``model[i:j]`` a new (uncompiled) Sequential holding the same layer
    objects, so that training it trains them; ``len(model)`` and
    ``for layer in model`` see the layers; ``model.add(layer)`` appends one
    (Keras' style).

    Parameters
    ----------
    layers : list
        fastrnn layers: RNN, GRU, LSTM (their output sequence is passed on),
        LastStep, Dropout, Linear, ReLU, Tanh, Sigmoid. The layers with
        parameters must all have the same dtype (float32 or float64): a model
        mixing them is refused, since every boundary between them would round
        activations and gradients to float32 while the float64 layers claimed
        float64 precision. Inputs of another dtype are converted by the layers.
    seed : None, int or numpy.random.Generator
        Source of the shuffling in ``fit``.

    Raises
    ------
    TypeError
        If ``layers`` is not a non-empty list of fastrnn layers.
    ValueError
        If the layers with parameters do not share one dtype.

    Examples
    --------
    >>> model = fastrnn.Sequential([fastrnn.RNN(1, 50, batch_first=True, seed=0),
    ...                             fastrnn.LastStep(), fastrnn.Linear(50, 1, seed=0)])
    >>> model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3))
    >>> history = model.fit(x, y, epochs=10, batch_size=32, validation_split=0.2)
    >>> features = model[:2].predict(x)       # the LastStep's output, (N, 50)
    """

    def __init__(self, layers, seed=None):
        if not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError("Sequential: layers must be a non-empty list of fastrnn layers")
        for i, layer in enumerate(layers):
            _check_layer("Sequential", f"layers[{i}]", layer)
        _check_one_dtype("Sequential", layers)
        self.layers = list(layers)
        self._rng = v.check_seed("Sequential", seed)
        self.loss = self.optimizer = None
        self.clip_grad_norm = self.clip_grad_value = None
        self.stop_training = False

    # --- the layers as a sequence -------------------------------------------
    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, index):
        """``model[i]``: the layer (negative indices count from the end);
        ``model[i:j:k]``: a new, uncompiled Sequential of the same layer
        objects (not copies), as PyTorch's ``nn.Sequential``."""
        n = len(self.layers)
        if isinstance(index, slice):
            layers = self.layers[index]
            if not layers:
                parts = [("" if part is None else str(part))
                         for part in (index.start, index.stop, index.step)]
                text = ":".join(parts if index.step is not None else parts[:2])
                raise ValueError(f"Sequential: the slice [{text}] of {n} layers selects none; "
                                 f"a Sequential needs at least one layer")
            return Sequential(layers)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, numbers.Integral):
            raise TypeError(f"Sequential: indices must be integers or slices, got "
                            f"{type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"Sequential: index {index} is out of range for {n} layers")
        return self.layers[int(index)]

    def add(self, layer):
        """Append a layer (Keras' ``Sequential.add``).

        The layer is checked as the constructor checks its layers. A compiled
        model is compiled no longer: its optimizer was bound to the old
        parameters and would not train the new layer, so call ``compile``
        again before training.

        Raises
        ------
        TypeError
            If ``layer`` is not a fastrnn layer.
        ValueError
            If its dtype differs from that of the model's other layers.
        """
        _check_layer("Sequential.add", "layer", layer)
        _check_one_dtype("Sequential.add", self.layers + [layer])
        self.layers.append(layer)
        self.loss = self.optimizer = None

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
        """Inference on one batch (dropout off); x as for ``predict``."""
        return self._infer(self._check_x("Sequential", x))

    def _infer(self, x):
        for layer in self.layers:
            x = layer._seq_infer(x)
        return x

    def predict(self, x, batch_size=None):
        """Inference over x in batches (all at once if batch_size is None).

        x has the samples on its first axis: batch-first sequences
        (N, T, features) if the model has a recurrent layer or a LastStep,
        else (N, features) or (N, T, features). Pass one sample as ``x[None]``.
        """
        x = self._check_x("Sequential.predict", x)
        if batch_size is not None:
            batch_size = v.check_int("Sequential.predict", "batch_size", batch_size)
        if batch_size is None or len(x) <= batch_size:
            return self._infer(x)
        return np.concatenate([self._infer(x[i:i + batch_size])
                               for i in range(0, len(x), batch_size)])

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
        x = self._check_x("Sequential.train_step", x)
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
        x, y = self._check_x("Sequential.evaluate", x), np.asarray(y)
        self._check_pair(x, y)
        if batch_size is None or len(x) <= batch_size:
            return self.loss(self._infer(x), y)
        total = 0.0
        for i in range(0, len(x), batch_size):
            total += (self.loss(self._infer(x[i:i + batch_size]), y[i:i + batch_size])
                      * len(x[i:i + batch_size]))
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
        x, y = self._check_x("Sequential.fit", x), np.asarray(y)
        self._check_pair(x, y)
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("Sequential.fit: validation_data must be a pair (x_val, y_val)")
            x_val = self._check_x("Sequential.fit", validation_data[0], "validation x")
            y_val = np.asarray(validation_data[1])
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

    def _check_x(self, owner, x, name="x"):
        """x as an array with the samples first, in the layout the layers
        take: batch-first sequences (N, T, features) if any layer is recurrent
        or a LastStep (the layers before those keep the number of axes), else
        (N, ..., features). Checked here so that the error names the user's x,
        not what a layer made of it."""
        x = v.to_numpy(owner, name, x)
        features = None
        for layer in self.layers:   # the first layer with an input size fixes it
            if isinstance(layer, Linear):
                features = layer.in_features
                break
            if isinstance(layer, _RNNBase):
                features = layer.input_size
                break
        sequences = any(isinstance(layer, (_RNNBase, LastStep)) for layer in self.layers)
        f = "features" if features is None else features
        right_features = features is None or (x.ndim > 0 and x.shape[-1] == features)
        if sequences and (x.ndim != 3 or not right_features):
            hint = "; for one sequence pass x[None]" if x.ndim == 2 and right_features else ""
            raise ValueError(f"{owner}: expected {name} of shape (N, T, {f}) (batch-first "
                             f"sequences: samples, steps, features), got "
                             f"{shape_str(x.shape)}{hint}")
        if not sequences and (x.ndim < 2 or not right_features):
            hint = "; for one sample pass x[None]" if x.ndim == 1 and right_features else ""
            raise ValueError(f"{owner}: expected {name} of shape (N, {f}) or (N, T, {f}) "
                             f"(samples first), got {shape_str(x.shape)}{hint}")
        return x

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

        No pickle: loading it cannot run code. Written to a temporary file of
        a short random name beside the target (so any name the target may
        have fits) and renamed over it, so an existing file is replaced whole
        or not at all.
        """
        config = {"format": _FORMAT, "fastrnn_version": __version__,
                  "layers": [{"class": type(layer).__name__, "config": _jsonable(layer._config)}
                             for layer in self.layers]}
        arrays = {f"weights/{k}": val for k, val in self.state_dict().items()}
        arrays["config"] = np.array(json.dumps(config))
        path = os.fspath(path)
        # default permissions, unlike mkstemp's 0600
        tmp = os.path.join(os.path.dirname(path), f".{uuid.uuid4().hex[:16]}.tmp")
        created = False
        try:
            with open(tmp, "xb") as f:
                created = True
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if created and os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Rebuild a model saved with ``save`` (weights exact; not compiled).

        Safe on untrusted files: nothing in a file can run code, and no file
        can make loading allocate or read more than what it really holds.
        Before anything is allocated, the loader reads the zip directory
        (at most 10,000 members and 2 MiB of directory; only stored or
        deflated members, none inflating more than 100 times its compressed
        size), the header of every array (its shape and dtype must account for
        its member's bytes exactly), and the JSON configuration (at most
        1,048,576 characters), and checks every layer's configuration against
        the arrays: their number, names, shapes and total count of values must
        be what the layer would create. Only then are the layers built and the
        arrays read, a bounded chunk at a time.

        Loading takes time linear in the file's size, and memory at most
        about four times the size of the model's parameters (which the file
        must hold, no more than 100 times compressed) plus about 30 MiB.

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        Sequential

        Raises
        ------
        FileNotFoundError, PermissionError
            If the file cannot be opened.
        ValueError
            For anything that is not a complete, consistent fastrnn model
            file, with a message naming what is wrong.
        """
        path = os.fspath(path)
        refused = f"fastrnn.load: {path!r} is not a valid fastrnn model file: "
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO could block, a device never end
            raise ValueError(refused + "it is not a regular file")
        with open(path, "rb") as f:
            try:
                return _read_model(cls, f, os.fstat(f.fileno()).st_size)
            except _BadFile as exc:
                raise ValueError(refused + str(exc)) from None
            except _FILE_ERRORS as exc:   # raised by zipfile, zlib or numpy on damaged data
                raise ValueError(f"{refused}{type(exc).__name__}: {_clip(str(exc))}") from exc


def _check_layer(owner, name, layer):
    if not (hasattr(layer, "_seq_train") and hasattr(layer, "_seq_infer")):
        raise TypeError(f"{owner}: {name} is a {type(layer).__name__}, not a fastrnn layer")


def _check_one_dtype(owner, layers):
    """The layers with parameters share one dtype (see Sequential)."""
    typed = [(i, layer, layer._config["dtype"]) for i, layer in enumerate(layers)
             if "dtype" in getattr(layer, "_config", {})]
    if len({dtype for _, _, dtype in typed}) > 1:
        listed = ", ".join(f"layers[{i}] ({type(layer).__name__}) {dtype.name}"
                           for i, layer, dtype in typed)
        raise ValueError(f"{owner}: the layers mix dtypes: {listed}; build every layer with "
                         f"the same dtype")


def _jsonable(config):
    return {k: (val.name if isinstance(val, np.dtype) else val) for k, val in config.items()}


def load(path):
    """Load a model written by ``Sequential.save``; safe on untrusted files
    (see ``Sequential.load`` for the checks and the bounds on time and memory)."""
    return Sequential.load(path)


# --- reading a model file --------------------------------------------------------------------
# What `load` accepts; anything beyond is refused before it is read.
_MAX_MEMBERS = 10_000              # arrays in a file (a deep bidirectional model has ~100)
_MAX_DIRECTORY_BYTES = 2 << 20     # the zip's central directory, ~200 bytes per member
_MAX_CONFIG_CHARS = 1 << 20        # the JSON configuration (a layer takes ~200)
_MAX_CONFIG_DEPTH = 8              # nesting of the JSON (a saved model's is 4)
_MAX_RATIO = 100                   # uncompressed / compressed size of a member (float
_RATIO_SLACK = 4096                # weights deflate to ~1:1), beyond this many bytes
_READ_CHUNK = 1 << 20              # bytes read from a member at a time
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}

# what damaged zip or .npy data raises in zipfile, zlib and numpy (not MemoryError:
# the checks leave only the memory a consistent file's arrays need)
_FILE_ERRORS = (OSError, EOFError, ValueError, OverflowError, NotImplementedError,
                struct.error, zipfile.BadZipFile, zlib.error)

_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 60
_brief.maxlevel = 3


class _BadFile(ValueError):
    """What is wrong with a model file; `load` puts the path before it."""


def _clip(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."


def _some(names, limit=5):
    shown = _brief.repr(list(names[:limit]))
    return shown if len(names) <= limit else f"{shown[:-1]}, and {len(names) - limit:,} more]"


def _int_text(n, sep=""):
    """An integer from a file for a message: exact unless absurdly long."""
    if abs(n) < 10**30:
        return f"{n:{sep}}"
    return f"about {'-' if n < 0 else ''}10^{int(abs(n).bit_length() * math.log10(2))}"


def _counted(n, word):
    return f"{_int_text(n, ',')} {word}" + ("" if n == 1 else "s")


def _read_model(cls, f, size):
    """The checks and reads of `Sequential.load`, in that order, on an open file."""
    if size == 0:
        raise _BadFile("the file is empty")
    head = f.read(6)
    if head == b"\x93NUMPY":
        raise _BadFile("it holds a single .npy array, not a fastrnn model (.npz) file")
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise _BadFile("it is not a zip (.npz) archive")
    entries, directory_bytes = _zip_directory(f, size)
    if entries > _MAX_MEMBERS:
        raise _BadFile(f"it has {entries:,} members, more than {_MAX_MEMBERS:,}")
    if directory_bytes > _MAX_DIRECTORY_BYTES:
        raise _BadFile(f"its zip directory takes {directory_bytes:,} bytes, more than "
                       f"{_MAX_DIRECTORY_BYTES:,}")
    f.seek(0)
    with zipfile.ZipFile(f) as zf:
        members = _check_members(zf, size)
        if "config.npy" not in members:
            raise _BadFile("it has no configuration (member 'config.npy')")
        headers = {name: _array_header(zf, info) for name, info in members.items()}
        config = _read_config(zf, members["config.npy"], headers["config.npy"])
        specs = _check_config(config)
        weights = {name[len("weights/"):-len(".npy")]: (members[name], header)
                   for name, header in headers.items() if name != "config.npy"}
        per_layer = _match_weights(specs, weights)
        layers = []
        for i, (name, kwargs, _) in enumerate(specs):
            try:
                layers.append(_LAYER_CLASSES[name](**kwargs))
            except (TypeError, ValueError) as exc:
                raise _BadFile(f"layer {i} ({name}) has a bad configuration: "
                               f"{_clip(str(exc))}") from None
        try:
            model = cls(layers)
        except (TypeError, ValueError) as exc:
            raise _BadFile(str(exc)) from None
        # layer by layer: at most one layer's arrays are held besides the model
        for i, (layer, held) in enumerate(zip(layers, per_layer)):
            if held:
                part = {key: _read_array(zf, info, header) for key, (info, header) in held.items()}
                try:
                    layer.load_state_dict(part)
                except (TypeError, ValueError) as exc:
                    raise _BadFile(f"layer {i} ({type(layer).__name__}): {exc}") from None
        return model


def _zip_directory(f, size):
    """(number of members, bytes of the central directory) from the zip's end
    records, found as zipfile finds them, before zipfile reads the directory."""
    end_size, locator_size, end64_size = 22, 20, 56
    tail_start = max(size - end_size - 0xFFFF, 0)   # the record, then a comment < 64 KiB
    f.seek(tail_start)
    tail = f.read()
    if len(tail) >= end_size and tail[-end_size:-end_size + 4] == b"PK\x05\x06" \
            and tail[-2:] == b"\0\0":
        at = len(tail) - end_size
    else:
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < end_size:
            raise _BadFile("it is not a complete zip archive (no end-of-central-directory "
                           "record: truncated?)")
    _, _, _, _, entries, directory_bytes, _, _ = struct.unpack("<4s4H2LH",
                                                               tail[at:at + end_size])
    record = tail_start + at
    if record >= locator_size + end64_size:          # a zip64 record overrides the counts
        f.seek(record - locator_size)
        locator = f.read(locator_size)
        if locator[:4] == b"PK\x06\x07":
            f.seek(record - locator_size - end64_size)
            end64 = f.read(end64_size)
            if end64[:4] == b"PK\x06\x06":
                entries, directory_bytes = struct.unpack("<QQ", end64[32:48])
    return entries, directory_bytes


def _check_members(zf, size):
    """Member name -> ZipInfo, once every member is one `save` could write,
    with sizes the file can hold and no bomb-like compression."""
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise _BadFile(f"it has {len(infos):,} members, more than {_MAX_MEMBERS:,}")
    members = {}
    compressed = 0
    for info in infos:
        name = info.filename
        shown = _brief.repr(name)
        if name in members:
            raise _BadFile(f"it holds the member {shown} twice")
        if name != "config.npy" and not (name.startswith("weights/") and name.endswith(".npy")):
            raise _BadFile(f"it holds a member {shown} that is neither the configuration nor "
                           f"a weight array")
        if info.flag_bits & 0x1:
            raise _BadFile(f"member {shown} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _BadFile(f"member {shown} uses compression method {info.compress_type}; only "
                           f"stored (0) and deflated (8) members are read")
        if info.compress_size > size - info.header_offset:
            raise _BadFile(f"member {shown} declares {info.compress_size:,} compressed bytes, "
                           f"more than the file's {size:,}")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _BadFile(f"member {shown} is stored uncompressed but declares "
                           f"{info.file_size:,} bytes for {info.compress_size:,}")
        if info.file_size > _MAX_RATIO * info.compress_size + _RATIO_SLACK:
            raise _BadFile(f"member {shown} would inflate from {info.compress_size:,} to "
                           f"{info.file_size:,} bytes (ratio "
                           f"{info.file_size // max(info.compress_size, 1):,}:1, more than "
                           f"{_MAX_RATIO}:1): a zip bomb?")
        compressed += info.compress_size
        members[name] = info
    if compressed > size:
        raise _BadFile(f"its members declare {compressed:,} compressed bytes in all, more than "
                       f"the file's {size:,} (overlapping members?)")
    return members


def _dtype_text(dtype):
    return dtype.str if dtype.kind in "SUV" else dtype.name


def _array_header(zf, info):
    """(shape, fortran_order, dtype, data offset) of a .npy member, read from
    its header alone; its shape and dtype must account for its bytes exactly."""
    shown = _brief.repr(info.filename)
    try:
        with zf.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} is not read")
            offset = member.tell()
    except (ValueError, TypeError, SyntaxError, RecursionError, EOFError, struct.error,
            UnicodeError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]   # not numpy's advice to trust it
        raise _BadFile(f"member {shown} has a damaged .npy header ({type(exc).__name__}: "
                       f"{_clip(first_line)})") from None
    if dtype.hasobject:
        raise _BadFile(f"member {shown} holds object data (pickle), which is never loaded")
    if info.filename == "config.npy":
        if dtype.kind != "U":
            raise _BadFile(f"member {shown} holds {_dtype_text(dtype)} data, not the "
                           f"configuration's JSON text")
    elif dtype.kind != "f" or dtype.itemsize not in (4, 8) or dtype.fields or dtype.subdtype:
        raise _BadFile(f"member {shown} holds {_dtype_text(dtype)} data; weights must be "
                       f"float32 or float64")
    if any(n < 0 for n in shape):
        raise _BadFile(f"member {shown}: its header declares the negative shape "
                       f"{shape_str(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != info.file_size - offset:
        raise _BadFile(f"member {shown}: its header declares shape {shape_str(shape)} of "
                       f"{_dtype_text(dtype)} ({nbytes:,} bytes), but the member holds "
                       f"{max(info.file_size - offset, 0):,} bytes of data")
    return shape, fortran, dtype, offset


def _read_array(zf, info, header):
    """The array of a checked member, read into its own buffer a chunk at a time."""
    shape, fortran, dtype, offset = header
    array = np.empty(shape[::-1] if fortran else shape, dtype)
    flat = array.reshape(-1).view(np.uint8)
    with zf.open(info) as member:
        member.read(offset)
        done = 0
        while done < flat.size:
            chunk = member.read(min(flat.size - done, _READ_CHUNK))
            if not chunk:
                raise _BadFile(f"member {_brief.repr(info.filename)} ends after {done:,} of its "
                               f"{flat.size:,} bytes of data")
            flat[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
            done += len(chunk)
        member.read(1)   # reaches the end of the member: zipfile checks its CRC-32
    return array.T if fortran else array


def _read_config(zf, info, header):
    """The parsed JSON configuration, of bounded length and nesting."""
    shape, _, dtype, _ = header
    if shape != ():
        raise _BadFile(f"member 'config.npy' holds an array of shape {shape_str(shape)}, not "
                       f"the configuration's JSON text")
    chars = dtype.itemsize // 4
    if chars > _MAX_CONFIG_CHARS:
        raise _BadFile(f"its configuration has {chars:,} characters, more than "
                       f"{_MAX_CONFIG_CHARS:,}")
    text = str(_read_array(zf, info, header)[()])
    too_deep = _BadFile(f"its configuration (JSON) is nested too deeply (more than "
                        f"{_MAX_CONFIG_DEPTH} levels)")
    try:
        config = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise _BadFile(f"its configuration is not valid JSON ({_clip(str(exc))})") from None
    # no deeper values reach the checks and messages below (repr recurses)
    level = [config]
    for _ in range(_MAX_CONFIG_DEPTH):
        level = [child for value in level if isinstance(value, (list, dict))
                 for child in (value.values() if isinstance(value, dict) else value)]
    if any(isinstance(value, (list, dict)) for value in level):
        raise too_deep
    return config


def _check_config(config):
    """[(class name, constructor arguments, parameter layout)] of the layers
    the configuration lists, checked without building anything."""
    if not isinstance(config, dict):
        raise _BadFile(f"its configuration should be a JSON object, got "
                       f"{type(config).__name__}")
    if config.get("format") != _FORMAT:
        got = _brief.repr(config["format"]) if "format" in config else "nothing"
        raise _BadFile(f"it is not a fastrnn Sequential file (its 'format' should be "
                       f"{_FORMAT!r}, got {got})")
    entries = config.get("layers")
    if not isinstance(entries, list) or not entries:
        got = _brief.repr(entries) if "layers" in config else "nothing"
        raise _BadFile(f"its 'layers' should be a non-empty list, got {got}")
    specs = []
    for i, entry in enumerate(entries):
        name = entry.get("class") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in _LAYER_CLASSES:
            raise _BadFile(f"layer {i} names an unknown class {_brief.repr(name)}")
        kwargs = entry.get("config")
        if not isinstance(kwargs, dict):
            got = "nothing" if "config" not in entry else type(kwargs).__name__
            raise _BadFile(f"layer {i} ({name}) has a bad configuration: 'config' must be a "
                           f"JSON object of constructor arguments, got {got}")
        try:
            layout = _parameter_layout(name, kwargs)
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"layer {i} ({name}) has a bad configuration: "
                           f"{_clip(str(exc))}") from None
        specs.append((name, kwargs, layout))
    return specs


def _parameter_layout(name, kwargs):
    """(number of arrays, number of values, iterator of (name, shape)) of the
    parameters a layer of class `name` built with `kwargs` would hold, found
    without building it: the counts are exact integers even for absurd sizes,
    and the shapes are generated only when asked for. The arguments they
    depend on are checked as the constructor checks them."""
    params = inspect.signature(_LAYER_CLASSES[name]).bind(**kwargs)
    params.apply_defaults()
    args = params.arguments
    if name in _GATES:
        D = v.check_int(name, "input_size", args["input_size"])
        H = v.check_int(name, "hidden_size", args["hidden_size"])
        L = v.check_int(name, "num_layers", args["num_layers"])
        bias = v.check_bool(name, "bias", args["bias"])
        dirs = 2 if v.check_bool(name, "bidirectional", args["bidirectional"]) else 1
        GH = _GATES[name] * H

        def per_direction(in_size):
            return GH * in_size + GH * H + (2 * GH if bias else 0)

        arrays = L * dirs * (4 if bias else 2)
        values = dirs * per_direction(D) + (L - 1) * dirs * per_direction(dirs * H)

        def shapes():
            for k in range(L):
                in_size = D if k == 0 else dirs * H
                for d in range(dirs):
                    sfx = f"_l{k}" + ("_reverse" if d else "")
                    yield f"weight_ih{sfx}", (GH, in_size)
                    yield f"weight_hh{sfx}", (GH, H)
                    if bias:
                        yield f"bias_ih{sfx}", (GH,)
                        yield f"bias_hh{sfx}", (GH,)
        summary = (f"input_size={_int_text(D)}, hidden_size={_int_text(H)}, "
                   f"num_layers={_int_text(L)}, bias={bias}, bidirectional={dirs == 2}")
    elif name == "Linear":
        n_in = v.check_int(name, "in_features", args["in_features"])
        n_out = v.check_int(name, "out_features", args["out_features"])
        bias = v.check_bool(name, "bias", args["bias"])
        arrays, values = 1 + bias, n_out * n_in + (n_out if bias else 0)

        def shapes():
            yield "weight", (n_out, n_in)
            if bias:
                yield "bias", (n_out,)
        summary = (f"in_features={_int_text(n_in)}, out_features={_int_text(n_out)}, "
                   f"bias={bias}")
    else:
        arrays, values, summary = 0, 0, ""

        def shapes():
            return iter(())
    return _Layout(arrays, values, shapes(), summary)


# a layer's parameters as the loader predicts them (see _parameter_layout)
_Layout = namedtuple("_Layout", ["arrays", "values", "shapes", "summary"])


def _match_weights(specs, weights):
    """Per layer, parameter name -> (ZipInfo, header), once the file holds
    exactly the arrays the configuration calls for: counted first (cheap for
    any size), then by name and shape."""
    per_layer = [{} for _ in specs]
    stray = []
    for key, item in weights.items():
        index, dot, name = key.partition(".")
        if dot and index.isascii() and index.isdigit() and str(int(index)) == index \
                and int(index) < len(specs):
            per_layer[int(index)][name] = item
        else:
            stray.append(key)
    if stray:
        raise _BadFile(f"it holds weights {_some(stray)} that belong to none of its "
                       f"{len(specs)} layers")
    for i, ((name, _, layout), held) in enumerate(zip(specs, per_layer)):
        arrays, values, shapes, summary = layout
        held_values = sum(math.prod(header[0]) for _, header in held.values())
        if arrays != len(held) or values != held_values:
            described = f"{name}, {summary}" if summary else name
            raise _BadFile(f"layer {i} ({described}) calls for {_counted(arrays, 'array')} of "
                           f"{_counted(values, 'value')}, but the file holds "
                           f"{_counted(len(held), 'array')} of "
                           f"{_counted(held_values, 'value')} for it")
        expected = dict(shapes)   # as many as the file holds, so bounded
        missing = [key for key in expected if key not in held]
        unexpected = [key for key in held if key not in expected]
        if missing or unexpected:
            raise _BadFile(f"layer {i} ({name}): missing weights {_some(missing)}, unexpected "
                           f"weights {_some(unexpected)}")
        for key, shape in expected.items():
            got = held[key][1][0]
            if tuple(got) != shape:
                raise _BadFile(f"layer {i} ({name}): {key} has shape {shape_str(shape)} in the "
                               f"configuration but {shape_str(got)} in the file")
    return per_layer
