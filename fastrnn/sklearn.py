"""scikit-learn estimators: sequence regression and classification with a
recurrent network (``pip install "fastrnn[sklearn]"``).

``SequenceRegressor`` and ``SequenceClassifier`` build an RNN, GRU or LSTM
stack and a linear head from their hyper-parameters and train it on
``fit(X, y)``; they work in a ``Pipeline``, ``GridSearchCV`` and
``cross_val_score``, clone, pickle, and pass scikit-learn's estimator checks
that apply to sequence input.

Shapes: N samples, T steps, D features per step. ``X`` is one of

- an array (N, T, D): sequences of one length;
- an array (N, T): N sequences of T steps of one feature each (the columns
  are time steps, as in the time-series libraries);
- a list of N arrays (T_i, D), or (T_i,) for one feature: sequences of their
  own lengths. Each training batch is padded to its longest sequence and
  run with ``lengths``, so the padding never reaches a state, an output or
  the loss: every sequence gives exactly what it gives alone.

The network reads each sequence to its own last step; the head maps the final
state of the last layer (both directions' final states when bidirectional) to
the outputs: the regression targets, or one logit per class.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.model_selection import train_test_split
    from sklearn.utils import assert_all_finite, check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, column_or_1d
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError('fastrnn.sklearn needs scikit-learn: pip install "fastrnn[sklearn]" '
                      '(or pip install scikit-learn)') from None

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Self
    else:
        from typing_extensions import Self

from fastrnn import _parallel
from fastrnn import _validation as v
from fastrnn._engine import input_grads
from fastrnn._locks import ForkSafeLock
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.losses import CrossEntropyLoss, MSELoss
from fastrnn.model import Sequential, _release_training_buffers
from fastrnn.nn import Dropout, LastStep, Linear
from fastrnn.optim import OPTIMIZERS, clip_grad_norm

__all__ = ["SequenceRegressor", "SequenceClassifier"]

_CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
# Inference runs over chunks of at most this many samples, fewer for long
# sequences: a layer call allocates its whole output sequence.
_PREDICT_ROWS = 1024
_PREDICT_BYTES = 64 << 20


# --- threads ---------------------------------------------------------------------------------
class _ThreadHold:
    """fastrnn's thread count (``fastrnn.set_num_threads``, one setting per
    process) held while estimators fit or predict: ``with _threads(n):``.

    The first hold saves the process's setting and the last one to end
    restores it; while several run at once (threads of one process) the
    smallest count any of them asked for holds. A setting the user makes
    meanwhile (the count is no longer the one the holds set) becomes the
    one restored, instead of being undone. A forked child starts with no
    hold: the threads that held are the parent's.
    """

    def __init__(self):
        self._lock = ForkSafeLock()
        self._counts = []
        self._saved = None
        self._applied = None   # the count the holds last set
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self):
        if self._counts:
            self._counts = []
            if _parallel.get_num_threads() == self._applied:
                _parallel.set_num_threads(self._saved)

    def _apply(self):
        """Set the smallest count held, or the saved setting once none is;
        under the lock."""
        if _parallel.get_num_threads() != self._applied:
            self._saved = _parallel.get_num_threads()   # the user's (or a first hold's)
        _parallel.set_num_threads(min(self._counts) if self._counts else self._saved)
        self._applied = _parallel.get_num_threads() if self._counts else None

    def base(self):
        """The process's own setting (not one an estimator holds)."""
        with self._lock:
            current = _parallel.get_num_threads()
            return self._saved if self._counts and current == self._applied else current

    @contextlib.contextmanager
    def __call__(self, count):
        with self._lock:
            self._counts.append(count)
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._counts.remove(count)
                self._apply()


_threads = _ThreadHold()


_controller = None   # (len(sys.modules), threadpoolctl's controllers) of _library_thread_limit


def _library_thread_limit():
    """The smallest thread limit of the BLAS and OpenMP libraries loaded
    (threadpoolctl), or None: how joblib's workers and
    ``threadpoolctl.threadpool_limits`` tell libraries to use fewer threads.

    scipy's own BLAS is left out: fastrnn holds it at one thread itself.
    """
    try:
        import scipy
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - both are dependencies of scikit-learn
        return None
    global _controller
    # the libraries found once per set of imported modules (scanning them
    # takes ~1 ms: a one-row predict took 1.1-1.9 ms, 0.05 with n_threads
    # set); a native library comes with an import, which makes a new scan
    if _controller is None or _controller[0] != len(sys.modules):
        scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))   # as _parallel finds it
        own = (scipy_dir + ".libs" + os.sep, scipy_dir + os.sep)
        _controller = (len(sys.modules), [
            lib for lib in ThreadpoolController().lib_controllers
            if lib.user_api in ("blas", "openmp") and not lib.filepath.startswith(own)])
    limits = [lib.num_threads for lib in _controller[1]]
    limits = [n for n in limits if isinstance(n, int) and n >= 1]
    return min(limits) if limits else None


# --- sequences -------------------------------------------------------------------------------
class _Sequences:
    """Validated X: one array (N, T, D), or N arrays (T_i, D) of their own
    lengths. ``batch(rows)`` gives the padded batch and its lengths."""

    def __init__(self, array=None, items=None):
        self.array, self.items = array, items
        if items is not None:
            self.lengths = np.array([len(item) for item in items], dtype=np.int64)

    def __len__(self):
        return len(self.array) if self.array is not None else len(self.items)

    @property
    def n_features(self):
        return self.array.shape[2] if self.array is not None else self.items[0].shape[1]

    def subset(self, rows):
        if self.array is not None:
            return _Sequences(array=self.array[rows])
        return _Sequences(items=[self.items[i] for i in rows])

    def batch(self, rows):
        """(x of shape (B, T_max, D), lengths or None)."""
        if self.array is not None:
            return self.array[rows], None
        lengths = self.lengths[rows]
        x = np.zeros((len(rows), int(lengths.max()), self.n_features), self.items[0].dtype)
        for row, i in enumerate(rows):
            x[row, :lengths[row]] = self.items[i]
        return x, lengths

    @property
    def max_length(self):
        return self.array.shape[1] if self.array is not None else int(self.lengths.max())

    def chunks(self, size):
        """(rows, x, lengths) covering every sample once; ragged sequences in
        order of length, so that a chunk pads little."""
        n = len(self)
        order = np.arange(n) if self.items is None else np.argsort(self.lengths, kind="stable")
        for start in range(0, n, size):
            rows = order[start:start + size]
            x, lengths = self.batch(rows)
            yield rows, x, lengths


def _is_sparse(X):
    return hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse")


def _numeric(owner, name, value, dtype):
    """value as a finite array of `dtype`, with scikit-learn's messages."""
    try:
        arr = _plain(owner, name, value)
    except ValueError as exc:
        raise TypeError(f"{owner}: {name} must be array-like: {exc}") from None
    if arr.dtype.kind == "c":
        raise ValueError(f"{owner}: Complex data not supported in {name}")
    if arr.dtype.kind in "SUV":
        # (astype parsed '1.5' as 1.5: scikit-learn refuses text)
        raise ValueError(f"{owner}: {name} must hold numbers, got dtype {arr.dtype} "
                         f"(text or structured values): convert it first")
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{owner}: {name} must hold numbers ({exc})") from None
    arr = np.asarray(arr, dtype=dtype)
    assert_all_finite(arr, input_name=name, estimator_name=owner)
    return arr


def _all_sequences(items):
    """Whether every item is array-like (a sequence of X's list form)."""
    return all(isinstance(item, (np.ndarray, list, tuple)) or hasattr(item, "__array__")
               for item in items)


def _check_X(owner, X, dtype, n_features=None):
    """_Sequences of X (see the module's docstring for the forms accepted)."""
    if X is None:
        raise ValueError(f"{owner}: X is None; expected sequences: an array (N, T, D) or "
                         f"(N, T), or a list of arrays (T_i, D)")
    if _is_sparse(X):
        raise TypeError(f"{owner}: sparse input is not supported (X is a "
                        f"{type(X).__name__}); pass a dense array of sequences")
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):
        # a DataFrame: its missing values (pandas.NA of nullable columns too)
        # as NaN, which the finiteness check then names
        try:
            X = X.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            X = X.to_numpy()
    if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype == object
                                        and X.ndim == 1):
        items = list(X)
        if not items:
            raise ValueError(f"{owner}: Found array with 0 sample(s) (shape=(0,)) while a "
                             f"minimum of 1 is required")
        if _all_sequences(items):
            try:
                arrays = [_plain(owner, f"X[{i}]", item) for i, item in enumerate(items)]
            except ValueError as exc:
                raise TypeError(f"{owner}: X must be a list of arrays (T_i, D) or (T_i,): "
                                f"{exc}") from None
            ndims = {arr.ndim for arr in arrays}
            if ndims == {1, 2}:
                raise ValueError(f"{owner}: X mixes sequences of one feature, (T_i,), and of "
                                 f"several, (T_i, D); give every sequence as (T_i, D)")
            if ndims <= {1, 2} and len({arr.shape for arr in arrays}) > 1:
                return _ragged(owner, arrays, dtype, n_features)
        # sequences of one shape: an array like any other
    if not isinstance(X, np.ndarray) or isinstance(X, np.ma.MaskedArray):
        try:
            X = _plain(owner, "X", X)
        except ValueError as exc:
            raise TypeError(f"{owner}: X must be an array of sequences or a list of them: "
                            f"{exc}") from None
    if X.dtype == object and X.ndim == 1:
        if _all_sequences(X):
            return _check_X(owner, list(X), dtype, n_features)
        # (numbers and None, dicts, ...: asarray gives them back as they came)
        raise TypeError(f"{owner}: X must be an array of sequences or a list of them, got "
                        f"items of types {sorted({type(item).__name__ for item in X})}")
    if X.ndim not in (2, 3):
        hint = ("; a 1-D X is ambiguous. Reshape your data: X.reshape(1, -1) for one "
                "sequence, X.reshape(-1, 1) for N sequences of one step") if X.ndim == 1 else ""
        raise ValueError(f"{owner}: expected X of shape (N, T, D) or (N, T), or a list of "
                         f"arrays (T_i, D), got an array of shape {v.shape_str(X.shape)}{hint}")
    if X.shape[0] == 0:
        raise ValueError(f"{owner}: Found array with 0 sample(s) (shape="
                         f"{v.shape_str(X.shape)}) while a minimum of 1 is required")
    if X.shape[1] == 0:
        what = "feature(s)" if X.ndim == 2 else "step(s)"
        raise ValueError(f"{owner}: X has 0 {what} (shape={v.shape_str(X.shape)}) while a "
                         f"minimum of 1 is required: every sequence needs at least one step")
    if X.ndim == 3 and X.shape[2] == 0:
        raise ValueError(f"{owner}: X has 0 feature(s) (shape={v.shape_str(X.shape)}) while "
                         f"a minimum of 1 is required")
    X = _numeric(owner, "X", X, dtype)
    if X.ndim == 2:
        X = X[:, :, None]
    _check_features(owner, X.shape[2], n_features)
    return _Sequences(array=np.ascontiguousarray(X))


def _plain(owner, name, value):
    """value as an ndarray: a torch tensor as the layers convert it (one that
    requires grad too), a masked array refused by name (its mask would be
    dropped: the values under it used), the rest through np.asarray."""
    if isinstance(value, np.ma.MaskedArray) or v.is_torch_tensor(value):
        return v.as_array(owner, name, value)
    if isinstance(value, (list, tuple)) and any(v.is_torch_tensor(item) for item in value):
        # (a list of tensors that require grad: np.asarray raised torch's error)
        return np.asarray([_plain(owner, f"{name}[{i}]", item) for i, item in enumerate(value)])
    try:
        return np.asarray(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _ragged(owner, arrays, dtype, n_features):
    items = []
    for i, arr in enumerate(arrays):
        arr = _numeric(owner, f"X[{i}]", arr, dtype)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.shape[0] == 0:
            raise ValueError(f"{owner}: X[{i}] has no steps (shape "
                             f"{v.shape_str(arr.shape)}); every sequence needs at least one")
        if arr.shape[1] == 0:
            raise ValueError(f"{owner}: X[{i}] has 0 feature(s) (shape="
                             f"{v.shape_str(arr.shape)}) while a minimum of 1 is required")
        if items and arr.shape[1] != items[0].shape[1]:
            raise ValueError(f"{owner}: the sequences of X must have one number of features; "
                             f"X[0] has {items[0].shape[1]}, X[{i}] has {arr.shape[1]}")
        items.append(np.ascontiguousarray(arr))
    _check_features(owner, items[0].shape[1], n_features)
    return _Sequences(items=items)


def _describe_labels(value):
    """What a malformed ``classes`` is, without converting it (a tensor that
    requires grad would raise torch's error)."""
    shape = getattr(value, "shape", None)
    if shape is None:
        try:
            shape = np.shape(value)
        except ValueError:   # (nested lists of different lengths)
            return f"a ragged {type(value).__name__}"
    return f"a {type(value).__name__} of shape {v.shape_str(tuple(shape))}"


@contextlib.contextmanager
def _releasing_buffers(net):
    try:
        yield
    finally:
        _release_training_buffers(net.model.layers)


def _check_features(owner, got, expected):
    if expected is not None and got != expected:
        raise ValueError(f"X has {got} features, but {owner} is expecting {expected} features "
                         f"as input (features per step; a 2-D X has one)")


# --- the network -----------------------------------------------------------------------------
class _Network:
    """The trained model (a fastrnn Sequential: recurrent layer, LastStep,
    Dropout, Linear head), its optimizer and loss, and the forward and
    backward with ``lengths`` that Sequential does not take."""

    def __init__(self, config, n_features, n_outputs, loss, seeds):
        layer_cls = _CELLS[config["cell"]]
        dirs = 2 if config["bidirectional"] else 1
        stack_dropout = config["dropout"] if config["num_layers"] > 1 else 0.0
        rnn = layer_cls(n_features, config["hidden_size"], num_layers=config["num_layers"],
                        batch_first=True, dropout=stack_dropout,
                        bidirectional=config["bidirectional"], dtype=config["dtype"],
                        seed=int(seeds[0]))
        head = Linear(dirs * config["hidden_size"], n_outputs, dtype=config["dtype"],
                      seed=int(seeds[1]))
        self.model = Sequential([rnn, LastStep(bidirectional=config["bidirectional"]),
                                 Dropout(config["dropout"], seed=int(seeds[2])), head],
                                seed=int(seeds[3]))
        self.optimizer = OPTIMIZERS[config["optimizer"]]([rnn, head], lr=config["lr"])
        self.loss = loss
        self.dirs = dirs

    def _final_state(self, state):
        """The last layer's final state(s), (B, dirs * H): forward then reverse,
        as LastStep(bidirectional) takes them from the output sequence."""
        h_n = state[0] if isinstance(state, tuple) else state
        B, H = h_n.shape[1], h_n.shape[2]
        return np.ascontiguousarray(h_n[-self.dirs:].transpose(1, 0, 2)).reshape(B, -1), H

    def outputs(self, data):
        """Head outputs (N, outputs) of every sample, with the inference path."""
        rnn, head = self.model[0], self.model[3]
        step_bytes = self.dirs * rnn.hidden_size * rnn.dtype.itemsize * data.max_length
        result = None
        for rows, x, lengths in data.chunks(max(1, min(_PREDICT_ROWS,
                                                       _PREDICT_BYTES // step_bytes))):
            _, state = rnn(x, lengths=lengths)
            out = head(self._final_state(state)[0])
            if result is None:
                result = np.empty((len(data), out.shape[1]), out.dtype)
            result[rows] = out
        return result

    def train_step(self, x, lengths, target, max_norm):
        """Forward, loss, BPTT and one optimizer step on one batch; the loss."""
        rnn, dropout, head = self.model[0], self.model[2], self.model[3]
        (out, state), rnn_backprop = rnn.forward_train(x, lengths=lengths)
        features, H = self._final_state(state)
        dropped, dropout_backprop = dropout._seq_train(features)
        pred, head_backprop = head._seq_train(dropped)
        value, dpred = self.loss.value_and_grad(pred, target)
        rnn.zero_grad()
        head.zero_grad()
        dfeatures = dropout_backprop(head_backprop(dpred))
        h_n = state[0] if isinstance(state, tuple) else state
        dh = np.zeros_like(h_n)
        dh[-self.dirs:] = dfeatures.reshape(len(x), self.dirs, H).transpose(1, 0, 2)
        with input_grads(False):   # (the data's gradient: nothing reads it)
            rnn_backprop(np.zeros_like(out), (dh, None) if isinstance(state, tuple) else dh)
        if max_norm is not None:
            clip_grad_norm([rnn, head], max_norm)
        self.optimizer.step()
        return value


# --- the estimators --------------------------------------------------------------------------
_PARAMS_DOC = """
    Parameters
    ----------
    cell : {'lstm', 'gru', 'rnn'}, default 'lstm'
        The recurrent layer: ``fastrnn.LSTM``, ``fastrnn.GRU`` (PyTorch's form)
        or ``fastrnn.RNN`` (tanh).
    hidden_size : int, default 32
        Features of the hidden state, H.
    num_layers : int, default 1
        Stacked recurrent layers.
    bidirectional : bool, default False
        Also read every sequence backwards; the head then sees both
        directions' final states.
    dropout : float in [0, 1), default 0
        In training only: the probability of zeroing a feature between
        stacked layers and of the final state before the head.
    epochs : int, default 100
        Passes over the training data in ``fit``.
    batch_size : int, default 32
        Sequences per training step.
    lr : float, default 1e-3
        Learning rate.
    optimizer : {'adam', 'adamw', 'sgd', 'rmsprop'}, default 'adam'
        fastrnn's optimizers (PyTorch's update rules and defaults but ``lr``).
    clip_grad_norm : float or None, default None
        If set, scale the gradients so that their global norm is at most this
        before each step (guards recurrent networks against exploding
        gradients).
    validation_split : float in [0, 1) or None, default None
        Fraction of the samples held out, drawn at random with
        ``random_state``{stratified}, to compute ``history_['val_loss']`` after
        every epoch. None: 0.1 with ``early_stopping``, else 0 (no hold-out).
    early_stopping : bool, default False
        Stop when the validation loss has not improved for ``patience``
        epochs, and keep the weights of its best epoch.
    patience : int, default 10
        Epochs without improvement before stopping (Keras' count: 0 and 1
        both stop at the first).
    random_state : None, int or numpy.random.RandomState, default None
        Seeds the initial weights, the shuffling, the dropout masks and the
        validation split. The same int gives the same predictions, bit for
        bit, with the same fastrnn kernel build and thread count.
    dtype : {'float32', 'float64'}, default 'float32'
        The network's dtype. X (any real dtype) is converted to it.
    n_threads : int or None, default None
        Threads fastrnn's kernels may use while this estimator fits or
        predicts (``fastrnn.set_num_threads``). None: fastrnn's setting
        (``fastrnn.get_num_threads()``), lowered to the smallest thread limit
        of the loaded BLAS and OpenMP libraries, which is how joblib's worker
        processes (``n_jobs``) and ``threadpoolctl.threadpool_limits`` ask
        for fewer threads. See Notes.
    verbose : int, default 0
        0 silent; 1 or more, one line per epoch on standard output.
"""

_NOTES_DOC = """
    Notes
    -----
    Padding: the sequences of a ragged X are padded per batch to the batch's
    longest and run with ``lengths``; each sequence's final state is read at
    its own last step, so padding never reaches a state, an output or the
    loss. ``X`` as a list of equal-length arrays is the same as one array.

    2-D X: N sequences of T steps of one feature, as the time-series libraries
    read it (its columns are time steps), so ``n_features_in_`` is 1 and a
    2-D X of another number of columns is valid: sequences of another length.
    scikit-learn's checks that take the columns of a 2-D X for features
    (``check_n_features_in``, ``check_n_features_in_after_fitting``,
    ``check_estimators_partial_fit_n_features``, and for the classifier
    ``check_classifiers_train``, which expects ``predict(X.T)`` to fail) do
    not apply; the others pass with settings that learn their small data in
    a few dozen epochs (``hidden_size=8, lr=1e-2, epochs=50``; with the
    defaults the regressor's R^2 there is 0.4-0.6, where
    ``check_regressors_train`` asks for 0.5). A DataFrame's column names
    (all strings: its steps') are kept as ``feature_names_in_``; ``predict``
    and a further ``partial_fit`` refuse other names or another order on the
    steps both have (a longer or shorter X is valid), and warn when X has
    names and fit's had none or the other way round.

    Threads and joblib: ``fastrnn.set_num_threads`` is one setting per
    process. An estimator holds it at its count while it fits, trains
    (``partial_fit``) or predicts, and restores the process's setting
    afterwards (while several estimators run in threads of one process, the
    smallest count asked for holds). With ``n_jobs`` and joblib's default
    process backend (loky) every worker is a process of its own: the
    estimator is pickled to it, and joblib limits the worker's BLAS and
    OpenMP to ``cpu_count // n_jobs`` threads, which ``n_threads=None``
    follows, so ``n_jobs`` workers do not oversubscribe the cores. With the
    threading backend the fits share one process; the kernels release the
    GIL, so they run in parallel, and no estimator shares state with
    another. Predictions from several threads on one fitted estimator are
    safe; fitting one estimator from two threads at once is not (as with
    any scikit-learn estimator). Two thread counts may round a few sums
    differently (the last bits), so fix ``n_threads`` (or
    ``FASTRNN_NUM_THREADS``) when results must be bit-identical across
    machines and ``n_jobs`` settings.
"""


class _SequenceEstimator(BaseEstimator):
    """The hyper-parameters, validation and training loop both estimators share."""

    _stratify = False

    def __init__(self, cell: str = "lstm", hidden_size: int = 32, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0, epochs: int = 100,
                 batch_size: int = 32, lr: float = 1e-3, optimizer: str = "adam",
                 clip_grad_norm: float | None = None, validation_split: float | None = None,
                 early_stopping: bool = False, patience: int = 10,
                 random_state: int | np.random.RandomState | None = None,
                 dtype: DTypeLike = "float32", n_threads: int | None = None,
                 verbose: int = 0) -> None:
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.validation_split = validation_split
        self.early_stopping = early_stopping
        self.patience = patience
        self.random_state = random_state
        self.dtype = dtype
        self.n_threads = n_threads
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags

    def _more_tags(self):   # the same tags for scikit-learn < 1.6
        return {"X_types": ["2darray", "3darray"]}

    # --- parameters -------------------------------------------------------------------------
    def _checked_params(self):
        """The hyper-parameters, checked (in fit, not in __init__, as
        scikit-learn asks), as a dict."""
        owner = type(self).__name__
        config = {}
        cell = self.cell
        if not isinstance(cell, str):
            raise TypeError(f"{owner}: cell must be 'lstm', 'gru' or 'rnn', got "
                            f"{type(cell).__name__}")
        if cell not in _CELLS:
            raise ValueError(f"{owner}: cell must be 'lstm', 'gru' or 'rnn', got {cell!r}")
        config["cell"] = cell
        for name in ("hidden_size", "num_layers", "epochs", "batch_size"):
            config[name] = v.check_int(owner, name, getattr(self, name))
        config["patience"] = v.check_int(owner, "patience", self.patience, minimum=0)
        config["bidirectional"] = v.check_bool(owner, "bidirectional", self.bidirectional)
        config["early_stopping"] = v.check_bool(owner, "early_stopping", self.early_stopping)
        config["dropout"] = v.check_dropout(owner, self.dropout)
        config["lr"] = _check_real(owner, "lr", self.lr, "a float > 0", lambda x: x > 0)
        optimizer = self.optimizer
        if not isinstance(optimizer, str):
            raise TypeError(f"{owner}: optimizer must be one of {sorted(OPTIMIZERS)} (a name; "
                            f"the learning rate is lr), got {optimizer!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{owner}: optimizer must be one of {sorted(OPTIMIZERS)}, got "
                             f"{optimizer!r}")
        config["optimizer"] = optimizer
        config["clip_grad_norm"] = None if self.clip_grad_norm is None else _check_real(
            owner, "clip_grad_norm", self.clip_grad_norm, "None or a float > 0",
            lambda x: x > 0)
        split = self.validation_split
        if split is None:
            split = 0.1 if config["early_stopping"] else 0.0
        else:
            split = _check_real(owner, "validation_split", split, "None or a float in [0, 1)",
                                lambda x: 0 <= x < 1)
        if config["early_stopping"] and split == 0:
            raise ValueError(f"{owner}: early_stopping needs held-out samples; "
                             f"validation_split=0 holds out none (leave it None for 0.1)")
        config["validation_split"] = split
        config["dtype"] = v.check_dtype(owner, self.dtype)
        if self.n_threads is not None:
            v.check_int(owner, "n_threads", self.n_threads)
        verbose = self.verbose
        if not isinstance(verbose, (numbers.Integral, bool, np.bool_)) or verbose < 0:
            raise (ValueError if isinstance(verbose, numbers.Integral) else TypeError)(
                f"{owner}: verbose must be an int >= 0, got {verbose!r}")
        config["verbose"] = int(verbose)
        try:
            config["random_state"] = check_random_state(self.random_state)
        except ValueError:
            if isinstance(self.random_state, numbers.Integral) \
                    and not isinstance(self.random_state, (bool, np.bool_)):
                raise ValueError(f"{owner}: random_state must be an int in [0, 2**32 - 1], "
                                 f"got {self.random_state!r}") from None
            raise TypeError(f"{owner}: random_state must be None, an int or a "
                            f"numpy.random.RandomState, got {self.random_state!r}") from None
        return config

    def _thread_count(self):
        if self.n_threads is not None:
            return v.check_int(type(self).__name__, "n_threads", self.n_threads)
        count = _threads.base()
        limit = _library_thread_limit()
        return count if limit is None else max(1, min(count, limit))

    # --- training -----------------------------------------------------------------------------
    def fit(self, X: ArrayLike | list[ArrayLike], y: ArrayLike) -> Self:
        """Train a new network on (X, y), from freshly drawn initial weights.

        Parameters
        ----------
        X : array-like of shape (N, T, D) or (N, T), or list of N arrays (T_i, D)
        y : array-like of shape (N,) (classifier: labels of any type;
            regressor: or (N, outputs))

        Returns
        -------
        self
        """
        config = self._checked_params()
        with _threads(self._thread_count()):
            data, target, n_outputs, loss, fitted = self._first_call(X, y, config)
            seeds = config["random_state"].randint(0, 2**31 - 1, size=6)
            train_rows = val_rows = None
            if config["validation_split"] > 0:
                train_rows, val_rows = self._split(len(data), target, config, int(seeds[4]))
            net = _Network(config, data.n_features, n_outputs, loss, seeds)
            shuffle = np.random.default_rng(int(seeds[5]))
            history = {"loss": []}
            if val_rows is not None:
                history["val_loss"] = []
                train, val = data.subset(train_rows), data.subset(val_rows)
                train_target, val_target = target[train_rows], target[val_rows]
            else:
                train, train_target, val, val_target = data, target, None, None
            best, best_weights, wait = math.inf, None, 0
            epochs_run = 0
            # (the layers' training buffers go with the fit, as Sequential.fit's:
            # kept, each fitted estimator held ~70 MB until its first predict)
            with _releasing_buffers(net):
                for epoch in range(config["epochs"]):
                    start = time.perf_counter()
                    logs = {"loss": self._epoch(net, train, train_target, shuffle, config, epoch)}
                    if val is not None:
                        logs["val_loss"] = net.loss(net.outputs(val), val_target)
                    for key, value in logs.items():
                        history[key].append(value)
                    epochs_run = epoch + 1
                    if config["verbose"]:
                        self._report(epoch, config["epochs"], logs, time.perf_counter() - start)
                    if config["early_stopping"]:   # Keras' count: max(patience, 1) epochs
                        if logs["val_loss"] < best:
                            best, best_weights, wait = logs["val_loss"], net.model.state_dict(), 0
                        else:
                            wait += 1
                            if wait >= max(config["patience"], 1):
                                break
            if best_weights is not None:
                net.model.load_state_dict(best_weights)
        return self._commit(fitted, net, shuffle, data, history, epochs_run)

    def _partial_fit(self, X, y, classes):
        config = self._checked_params()
        with _threads(self._thread_count()):
            if not hasattr(self, "_network"):
                data, target, n_outputs, loss, fitted = self._first_call(X, y, config, classes)
                seeds = config["random_state"].randint(0, 2**31 - 1, size=6)
                net = _Network(config, data.n_features, n_outputs, loss, seeds)
                shuffle = np.random.default_rng(int(seeds[5]))
                history, done = {"loss": []}, 0
            else:
                owner = type(self).__name__
                net, shuffle = self._network, self._shuffle
                _check_feature_names(self, X)
                data = _check_X(owner, X, net.model[0].dtype, self.n_features_in_)
                if y is None:
                    raise ValueError(f"{owner} requires y to be passed, but the target y is "
                                     f"None")
                target = self._next_target(y, len(data), classes)
                fitted, history = {}, {key: list(values) for key, values in self.history_.items()}
                done = self.n_iter_
            net.optimizer.lr = config["lr"]
            start = time.perf_counter()
            # a fitted network trains in place: an epoch that fails (its loss
            # not finite, an interrupt) puts back its weights, the optimizer's
            # state and the shuffle (the weights had become NaN while n_iter_
            # and history_ told of the model before: predict gave NaN)
            before = None if fitted else (net.model.state_dict(), net.optimizer.state_dict(),
                                          shuffle.bit_generator.state)
            try:
                with _releasing_buffers(net):
                    loss = self._epoch(net, data, target, shuffle, config, done)
            except BaseException:
                if before is not None:
                    net.model.load_state_dict(before[0])
                    net.optimizer.load_state_dict(before[1])
                    shuffle.bit_generator.state = before[2]
                raise
            if config["verbose"]:
                self._report(done, None, {"loss": loss}, time.perf_counter() - start)
        history["loss"].append(loss)
        if "val_loss" in history:   # (no validation here: the lists stay one per epoch)
            history["val_loss"].append(math.nan)
        return self._commit(fitted, net, shuffle, data, history, done + 1)

    def _first_call(self, X, y, config, classes=None):
        """Validated (data, target, outputs, loss, fitted attributes) of a
        new network's first training data."""
        owner = type(self).__name__
        if y is None:
            raise ValueError(f"{owner} requires y to be passed, but the target y is None")
        names = _feature_names(owner, X)
        data = _check_X(owner, X, config["dtype"])
        target, n_outputs, loss, fitted = self._first_target(y, classes, config["dtype"])
        fitted["feature_names_in_"] = names
        _check_samples(owner, len(data), len(target))
        return data, target, n_outputs, loss, fitted

    def _commit(self, fitted, net, shuffle, data, history, epochs):
        """Set the fitted attributes, all at once after training succeeded
        (feature_names_in_ None: X had none, the attribute is removed)."""
        for key, value in fitted.items():
            if value is None and key == "feature_names_in_":
                self.__dict__.pop(key, None)
            else:
                setattr(self, key, value)
        self._network, self._shuffle = net, shuffle
        self.model_, self.optimizer_ = net.model, net.optimizer
        self.n_features_in_ = data.n_features
        self.history_ = history
        self.n_iter_ = epochs
        return self

    def _split(self, n, target, config, seed):
        owner = type(self).__name__
        split = config["validation_split"]
        stratify = target if self._stratify else None
        try:
            return train_test_split(np.arange(n), test_size=split, random_state=seed,
                                    stratify=stratify)
        except ValueError as exc:
            raise ValueError(f"{owner}: validation_split={split} cannot hold out samples from "
                             f"{n}: {exc}") from None

    def _epoch(self, net, data, target, shuffle, config, epoch):
        """One pass over the data in shuffled batches; the mean loss."""
        n, size = len(data), config["batch_size"]
        order = shuffle.permutation(n)
        total = 0.0
        for start in range(0, n, size):
            rows = order[start:start + size]
            x, lengths = data.batch(rows)
            total += net.train_step(x, lengths, target[rows], config["clip_grad_norm"]) \
                * len(rows)
        loss = total / n
        if not math.isfinite(loss):
            raise ValueError(f"{type(self).__name__}: the training loss became {loss} in epoch "
                             f"{epoch + 1}; lower lr, set clip_grad_norm, or scale X and y")
        return loss

    def _report(self, epoch, epochs, logs, seconds):
        values = " - ".join(f"{key}: {value:.4g}" for key, value in logs.items())
        of = f"/{epochs}" if epochs else ""
        sys.stdout.write(f"{type(self).__name__}: epoch {epoch + 1}{of} - {seconds:.2f}s - "
                         f"{values}\n")
        sys.stdout.flush()

    # --- inference ----------------------------------------------------------------------------
    def _outputs(self, X):
        """The head's outputs (N, outputs) for X."""
        check_is_fitted(self)
        net = self._network
        _check_feature_names(self, X)
        data = _check_X(type(self).__name__, X, net.model[0].dtype, self.n_features_in_)
        with _threads(self._thread_count()):
            return net.outputs(data)


def _feature_names(owner, X):
    """scikit-learn's feature names of X: a DataFrame's column names (here
    its steps) if all are strings, else None."""
    columns = getattr(X, "columns", None)
    if columns is None or isinstance(X, np.ndarray):
        return None
    names = np.asarray(list(columns), dtype=object)
    kinds = {isinstance(name, str) for name in names}
    if kinds == {True, False}:
        raise TypeError(f"{owner}: Feature names are only supported if all input features "
                        f"have string names, got column names of types "
                        f"{sorted({type(name).__name__ for name in names})}; convert them "
                        f"all to str (X.columns = X.columns.astype(str))")
    return names if kinds == {True} else None


def _check_feature_names(estimator, X):
    """scikit-learn's rule at predict (and a further partial_fit), for names
    of steps: X's feature names must be those fit saw on the steps both have
    (a DataFrame with its columns, the steps, in another order gave other
    predictions, silently; longer or shorter sequences are valid input)."""
    owner = type(estimator).__name__
    names = _feature_names(owner, X)
    fitted = getattr(estimator, "feature_names_in_", None)
    if names is None and fitted is None:
        return
    if fitted is None:
        warnings.warn(f"X has feature names, but {owner} was fitted without feature names",
                      UserWarning, stacklevel=3)
    elif names is None:
        warnings.warn(f"X does not have valid feature names, but {owner} was fitted with "
                      f"feature names", UserWarning, stacklevel=3)
    else:
        both = min(len(names), len(fitted))
        if (names[:both] != fitted[:both]).any():
            wrong = int(np.argmax(names[:both] != fitted[:both]))
            raise ValueError(f"{owner}: The feature names should match those that were "
                             f"passed during fit (here the steps', on the {both} steps both "
                             f"have): step {wrong} is {names[wrong]!r} in X, "
                             f"{fitted[wrong]!r} at fit")


def _check_samples(owner, n_x, n_y):
    if n_x != n_y:
        raise ValueError(f"{owner}: X and y must have the same number of samples, got {n_x} "
                         f"sequences and {n_y} targets (Found input variables with "
                         f"inconsistent numbers of samples: [{n_x}, {n_y}])")


def _check_real(owner, name, value, expected, valid):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be {expected}, got {type(value).__name__}")
    if not (math.isfinite(value) and valid(value)):
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")
    return float(value)


class SequenceRegressor(RegressorMixin, _SequenceEstimator):
    __doc__ = f"""Regression of sequences with a recurrent network: one target (or one
    vector of targets) per sequence, trained with the mean squared error.

    The network: ``cell`` layers (``num_layers`` stacked, optionally
    bidirectional) read each sequence to its own last step; a ``Linear`` head
    maps the final state to the outputs. Scale the targets to about unit
    variance (``sklearn.compose.TransformedTargetRegressor`` with a
    ``StandardScaler``) and the inputs likewise: the initial weights and
    learning rate suit values of order 1.
{_PARAMS_DOC.replace("{stratified}", "")}
    Attributes
    ----------
    model_ : fastrnn.Sequential
        The trained network ``[RNN/GRU/LSTM, LastStep, Dropout, Linear]``. On
        sequences of one length ``model_.predict(X)`` gives ``predict``'s
        values as (N, outputs); ``model_.save(path)`` writes it (without the
        estimator), and its layers convert with ``fastrnn.to_torch`` or
        ``fastrnn.to_onnx``.
    optimizer_ : fastrnn.optim.Optimizer
        The optimizer bound to ``model_`` (its state carries on in
        ``partial_fit``).
    n_features_in_ : int
        D, the features of each step (1 for a 2-D X).
    n_outputs_ : int
        Targets per sequence.
    history_ : dict
        ``'loss'`` (and ``'val_loss'``): one value per epoch (``val_loss``
        NaN for an epoch of ``partial_fit``, which does not validate).
    n_iter_ : int
        Epochs run (``fit`` counts from 0; ``partial_fit`` adds one).
{_NOTES_DOC}
    Examples
    --------
    >>> import numpy as np
    >>> from fastrnn.sklearn import SequenceRegressor
    >>> X = np.random.default_rng(0).standard_normal((200, 12, 3))
    >>> y = X[:, -3:, 0].sum(axis=1)            # the sum of the last three steps
    >>> model = SequenceRegressor(hidden_size=16, epochs=40, lr=1e-2, random_state=0)
    >>> model.fit(X, y).score(X, y) > 0.9
    True
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self):
        return {"X_types": ["2darray", "3darray"], "multioutput": True}

    def _first_target(self, y, classes, dtype):
        y = _numeric(type(self).__name__, "y", y, dtype)
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
            raise ValueError(f"{type(self).__name__}: expected y of shape (N,) or (N, outputs), "
                             f"got {v.shape_str(y.shape)}")
        target = y.reshape(len(y), -1)
        return target, target.shape[1], MSELoss(), {"n_outputs_": target.shape[1],
                                                    "_y_1d": y.ndim == 1}

    def _next_target(self, y, n, classes):
        owner = type(self).__name__
        y = _numeric(owner, "y", y, self._network.model[0].dtype)
        expected = "(N,)" if self._y_1d else f"(N, {self.n_outputs_})"
        if y.ndim != (1 if self._y_1d else 2) or (y.ndim == 2 and y.shape[1] != self.n_outputs_):
            raise ValueError(f"{owner}: expected y of shape {expected}, as in the first call, "
                             f"got {v.shape_str(y.shape)}")
        _check_samples(owner, n, len(y))
        return y.reshape(n, -1)

    def partial_fit(self, X: ArrayLike | list[ArrayLike], y: ArrayLike) -> Self:
        """One epoch over (X, y): on the first call, a new network; then
        training goes on from where it stopped (weights and optimizer
        state). The structural hyper-parameters are read at the first call;
        ``lr`` at every call. No validation or early stopping.

        Returns
        -------
        self
        """
        return self._partial_fit(X, y, None)

    def predict(self, X: ArrayLike | list[ArrayLike]) -> np.ndarray:
        """Predicted targets: (N,) if ``fit`` had a 1-D y, else (N, outputs);
        float64 (scikit-learn's convention), computed in the estimator's dtype.

        Parameters
        ----------
        X : array-like of shape (N, T, D) or (N, T), or list of N arrays (T_i, D)
        """
        out = self._outputs(X).astype(np.float64)
        return out[:, 0] if self._y_1d else out


class SequenceClassifier(ClassifierMixin, _SequenceEstimator):
    __doc__ = f"""Classification of sequences with a recurrent network: one label per
    sequence, trained with the softmax cross-entropy.

    The network: ``cell`` layers (``num_layers`` stacked, optionally
    bidirectional) read each sequence to its own last step; a ``Linear`` head
    maps the final state to one logit per class, and ``predict_proba`` is
    their softmax. Labels may be of any type (ints, strings, ...); two or
    more classes.
{_PARAMS_DOC.replace("{stratified}", ", stratified by class")}
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels, sorted; column k of ``predict_proba`` is ``classes_[k]``.
    model_ : fastrnn.Sequential
        The trained network ``[RNN/GRU/LSTM, LastStep, Dropout, Linear]``. On
        sequences of one length ``model_.predict(X)`` gives the class logits;
        ``model_.save(path)`` writes it (without the estimator), and its
        layers convert with ``fastrnn.to_torch`` or ``fastrnn.to_onnx``.
    optimizer_ : fastrnn.optim.Optimizer
        The optimizer bound to ``model_`` (its state carries on in
        ``partial_fit``).
    n_features_in_ : int
        D, the features of each step (1 for a 2-D X).
    history_ : dict
        ``'loss'`` (and ``'val_loss'``): one value per epoch (``val_loss``
        NaN for an epoch of ``partial_fit``, which does not validate).
    n_iter_ : int
        Epochs run (``fit`` counts from 0; ``partial_fit`` adds one).
{_NOTES_DOC}
    Examples
    --------
    >>> import numpy as np
    >>> from fastrnn.sklearn import SequenceClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = [rng.standard_normal((n, 2)) for n in rng.integers(5, 15, size=200)]
    >>> y = np.array(["up" if x[:, 0].sum() > 0 else "down" for x in X])
    >>> model = SequenceClassifier(cell="gru", hidden_size=16, epochs=30, lr=1e-2,
    ...                            random_state=0).fit(X, y)
    >>> model.classes_
    array(['down', 'up'], dtype='<U4')
    """

    _stratify = True

    def _first_target(self, y, classes, dtype):
        owner = type(self).__name__
        y = self._labels(y)
        if classes is None:
            found = np.unique(y)
        else:
            found = np.unique(self._labels(classes, "classes"))
            unknown = np.setdiff1d(y, found)
            if unknown.size:
                raise ValueError(f"{owner}: y holds labels {unknown[:5].tolist()} that are not "
                                 f"in classes {found.tolist()}")
        if len(found) < 2:
            raise ValueError(f"{owner}: needs samples of at least 2 classes to learn from; got "
                             f"1 class ({found.tolist()[0]!r})")
        target = np.searchsorted(found, y).astype(np.int64)
        return target, len(found), CrossEntropyLoss(), {"classes_": found}

    def _labels(self, y, name="y"):
        owner = type(self).__name__
        try:
            y = column_or_1d(_plain(owner, name, y), warn=True)
        except ValueError as exc:
            if name == "classes":
                raise ValueError(f"{owner}: classes must be a 1-D array-like of the labels, "
                                 f"got {_describe_labels(y)}") from None
            raise ValueError(f"{owner}: {name} must be one label per sequence "
                             f"(multi-output classification is not supported): {exc}") from None
        check_classification_targets(y)
        return y

    def _next_target(self, y, n, classes):
        owner = type(self).__name__
        if classes is not None and not np.array_equal(
                np.unique(self._labels(classes, "classes")), self.classes_):
            raise ValueError(f"{owner}: classes {np.unique(classes).tolist()} differ from "
                             f"those of the first call, {self.classes_.tolist()}")
        y = self._labels(y)
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(f"{owner}: y holds labels {unknown[:5].tolist()} that are not in "
                             f"classes_ {self.classes_.tolist()}")
        _check_samples(owner, n, len(y))
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def partial_fit(self, X: ArrayLike | list[ArrayLike], y: ArrayLike,
                    classes: ArrayLike | None = None) -> Self:
        """One epoch over (X, y): on the first call, a new network (pass
        ``classes``, every label the calls will see); then training goes on
        from where it stopped (weights and optimizer state). The structural
        hyper-parameters are read at the first call; ``lr`` at every call. No
        validation or early stopping.

        Returns
        -------
        self
        """
        if classes is None and not hasattr(self, "_network"):
            raise ValueError(f"{type(self).__name__}: classes must be passed on the first call "
                             f"to partial_fit (every label the calls will see)")
        return self._partial_fit(X, y, classes)

    def predict_proba(self, X: ArrayLike | list[ArrayLike]) -> np.ndarray:
        """Class probabilities, (N, n_classes) float64, columns in the order of
        ``classes_``: the softmax of the network's logits.

        Parameters
        ----------
        X : array-like of shape (N, T, D) or (N, T), or list of N arrays (T_i, D)
        """
        return np.exp(self.predict_log_proba(X))

    def predict_log_proba(self, X: ArrayLike | list[ArrayLike]) -> np.ndarray:
        """Log of ``predict_proba``, computed stably from the logits."""
        logits = self._outputs(X).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def predict(self, X: ArrayLike | list[ArrayLike]) -> np.ndarray:
        """The most probable label of each sequence, (N,), from ``classes_``.

        Parameters
        ----------
        X : array-like of shape (N, T, D) or (N, T), or list of N arrays (T_i, D)
        """
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_log_proba(X), axis=1)]
