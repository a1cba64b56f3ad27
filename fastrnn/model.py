"""Sequential models: compose layers, compile, fit, evaluate, predict, save.

Arrays are batch-first: sequences (N, T, features), as Keras'. Layers follow
the protocol of fastrnn.nn (recurrent layers adapt to it whatever their
``batch_first``). ``fit``, ``evaluate`` and ``predict`` also take lists of
sequences of different lengths and iterables of batches (see fastrnn.batching).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from fastrnn.losses import Loss
    from fastrnn.optim import Optimizer

from fastrnn import _saving
from fastrnn import _validation as v
from fastrnn import batching
from fastrnn import metrics as metrics_module
from fastrnn import optim as optim_module
from fastrnn import _engine
from fastrnn._engine import _training_buffers, input_grads
from fastrnn._module import (LoadResult, Module, _refuse_quantized_entry, changing_together,
                             holding, on_one_set, restoring_copy, run_pinned)
from fastrnn._own_values import own_inputs, own_values
from fastrnn._validation import shape_str
from fastrnn.callbacks import (Callback, CallbackList, EarlyStopping, History,  # noqa: F401
                               ProgressBar)
from fastrnn.layers import _RNNBase
from fastrnn.losses import BCEWithLogitsLoss, CrossEntropyLoss, get_loss
from fastrnn.nn import Embedding, LastStep, Linear, MergeDirections
from fastrnn.optim import _check_number, clip_grad_norm, clip_grad_value, get_optimizer
from fastrnn.wrappers import Stateful, _recurrent, states_kept

__all__ = ["Sequential", "History", "Callback", "EarlyStopping", "load", "save",
           "load_state_dict_file"]


def _own_metric(metric):
    """A pass's own Metric, reset: a copy of an object given to compile
    (each pass had reset and fed that one object, so two at once mixed)."""
    metric = copy.deepcopy(metric)
    metric.reset_state()
    return metric


def _states_kept_on_error(method):
    """A Sequential method that leaves every Stateful's carried state as it
    was when it raises (``wrappers.states_kept``)."""
    @functools.wraps(method)
    def kept(self, *args, **kwargs):
        with states_kept(self.layers):
            return method(self, *args, **kwargs)
    return kept


def _states_kept_until_the_step(method):
    """A training step that leaves every Stateful's carried state as it was
    when it raises before its optimizer step took effect (its step count
    moves with the weights, in one commit): after it, the states stay with
    the weights they came with."""
    @functools.wraps(method)
    def kept(self, *args, **kwargs):
        optimizer = self.optimizer   # (not yet checked: _bind refuses a wrong one)
        count = getattr(optimizer, "step_count", None)
        with states_kept(self.layers, lambda: getattr(optimizer, "step_count", None) != count):
            return method(self, *args, **kwargs)
    return kept


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
        Source of the shuffling in ``fit``. Its state is saved with the model
        (see ``save``).

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
    >>> model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3), metrics=["mae"])
    >>> history = model.fit(x, y, epochs=10, batch_size=32, validation_split=0.2)
    >>> history.history["val_mae"][-1]
    >>> features = model[:2].predict(x)       # the LastStep's output, (N, 50)
    """

    def __init__(self, layers: list[Any] | tuple[Any, ...],
                 seed: int | np.random.Generator | None = None) -> None:
        if not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError("Sequential: layers must be a non-empty list of fastrnn layers")
        for i, layer in enumerate(layers):
            _check_layer("Sequential", f"layers[{i}]", layer)
        _check_one_dtype("Sequential", layers)
        self.layers = list(layers)
        self._rng = v.check_seed("Sequential", seed)
        self.loss = self.optimizer = None
        self.clip_grad_norm = self.clip_grad_value = None
        self._metric_specs = []        # (what compile got, weighted), in order
        self._metrics = None           # the Metric objects, built at the first batch
        self.stop_training = False
        self.history = None
        self._fit_pass = None          # batching.FitPass: a pass fit left unfinished

    # --- the layers as a sequence -------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.layers)

    def __getitem__(self, index: int | slice) -> Any:
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

    def add(self, layer: Any) -> None:
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
        self._metric_specs, self._metrics = [], None

    def __getstate__(self):
        # The optimizer holds views of the layers' parameter storage, which a
        # copy does not share: pickle the model uncompiled (compile again).
        # Metrics may be user functions (lambdas do not pickle): dropped too.
        # The layers pickle one by one after this, each its parameters of that
        # moment: a load or an optimizer step of the model meanwhile would
        # leave some from before it and some from after. So their parameters
        # taken together here go too (twice the weights' bytes), and are
        # loaded back over theirs.
        state = self.__dict__.copy()
        state.pop("_owners_of", None)   # remade on use
        owners = self._owners()
        if len(owners) > 1:
            with holding(owners):
                state["_pickled_parameters"] = [(owner, owner.state_dict()) for owner in owners]
        state["optimizer"] = None
        state["_metric_specs"], state["_metrics"], state["history"] = [], None, None
        return state

    def __setstate__(self, state):
        parameters = state.pop("_pickled_parameters", ())
        self.__dict__.update(state)
        for owner, state_dict in parameters:
            # only where they differ: a shallow copy's owners are the model's
            # own, whose set a load would renew (and a backprop pending on it
            # then refuse)
            current = owner.state_dict()
            if any(not np.array_equal(current[name], value, equal_nan=True)
                   for name, value in state_dict.items()):
                with restoring_copy():
                    owner.load_state_dict(state_dict)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    def _modules_with_parameters(self):
        """The modules holding the layers' parameters, each once: a wrapper's
        layer within (its parameters are that layer's), a layer used twice
        once (an optimizer stepped it twice, gradient clipping counted it
        twice)."""
        owners = {}
        for layer in map(_recurrent, self.layers):
            if layer._trainable:
                owners.setdefault(id(layer), layer)
        return list(owners.values())

    def _first_trained(self):
        """The index of the first layer holding parameters (a wrapper's layer
        within): the input gradient of it and of the layers before it is
        thrown away in training (len(layers) if no layer holds any)."""
        for k, layer in enumerate(map(_recurrent, self.layers)):
            if isinstance(layer, Module):
                return k
        return len(self.layers)

    def _owners(self):
        """The modules holding the layers' parameters (a wrapper's layer
        within), each once; kept while ``layers`` holds the same objects
        (it is a public list: it may be changed in place) and the wrappers
        the same layers (``Stateful.layer`` may be replaced)."""
        layers = tuple(self.layers)
        key = layers + tuple(map(_recurrent, layers))
        cached = self.__dict__.get("_owners_of")
        if cached is not None and cached[0] == key:
            return cached[1]
        owners = {id(layer): layer for layer in key[len(layers):] if isinstance(layer, Module)}
        self._owners_of = (key, list(owners.values()))
        return self._owners_of[1]

    # --- parameters ---------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, named '{layer index}.{name}' as PyTorch's
        ``nn.Sequential``."""
        with holding(self._owners()):   # every layer's of one moment
            return {f"{i}.{name}": value for i, layer in enumerate(self.layers)
                    for name, value in layer.state_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike],
                        strict: bool = True) -> LoadResult:
        """Load '{index}.{name}' parameters; checks everything before copying.
        Returns (missing_keys, unexpected_keys), as a layer's does (both empty
        when ``strict``)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Sequential: load_state_dict expects a mapping of name to array, "
                            f"got {type(state_dict).__name__}")
        strict = v.check_bool("Sequential.load_state_dict", "strict", strict)
        parts = [{} for _ in self.layers]
        for key, value in state_dict.items():
            if not isinstance(key, str):   # (unexpected, as a layer reports it)
                continue
            index, dot, name = key.partition(".")
            if dot and index.isascii() and index.isdigit() and str(int(index)) == index \
                    and int(index) < len(self.layers):
                parts[int(index)][name] = value
        # a float layer refuses a quantized layer's weights (int8 beside its
        # scales, which the layer's own part would no longer show it)
        for i, (layer, part) in enumerate(zip(self.layers, parts)):
            if not hasattr(layer, "_refuse_training"):   # not fastrnn.quantized's
                for name in getattr(layer, "_names", ()):
                    if name in part:
                        _refuse_quantized_entry(f"Sequential: layer {i} "
                                                f"({type(layer).__name__})", part, name)
        # a quantized layer expects an int8 weight's scales only with an int8 weight
        expected = {f"{i}.{name}": None
                    for i, (layer, part) in enumerate(zip(self.layers, parts))
                    for name in (layer._expected_keys(part) if hasattr(layer, "_expected_keys")
                                 else layer.state_dict())}
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
        # the layers' new sets become current together, once every layer's
        # part has loaded; after an error, none does
        with changing_together(self._owners()):
            for i, (layer, part) in enumerate(zip(self.layers, per_layer)):
                if not part:
                    continue
                try:
                    layer.load_state_dict(part, strict=False)
                except (TypeError, ValueError) as exc:
                    # (the layer names its keys without the index: say whose they are)
                    raise type(exc)(f"Sequential: layer {i} ({type(layer).__name__}, keys "
                                    f"'{i}.*'): {exc}") from None
        return LoadResult(missing, unexpected)

    def zero_grad(self) -> None:
        for layer in self._modules_with_parameters():
            layer.zero_grad()

    # --- what the layers take -----------------------------------------------
    def _dtype(self):
        """The layers' dtype, or None if no layer has parameters."""
        for layer in self.layers:
            dtype = getattr(layer, "_config", {}).get("dtype")
            if dtype is not None:
                return dtype
        return None

    def _input_features(self):
        """The feature size of x, fixed by the first layer with an input size."""
        for layer in self.layers:
            if isinstance(layer, Linear):
                return layer.in_features
            if isinstance(layer, _RNNBase) or hasattr(layer, "_takes_lengths"):
                return layer.input_size     # a layer, or a fastrnn.wrappers wrapper of one
            if getattr(layer, "_takes_ids", False):
                return None                 # an Embedding: x holds ids
        return None

    def _takes_sequences(self):
        return any(isinstance(layer, (_RNNBase, LastStep)) or hasattr(layer, "_takes_lengths")
                   for layer in self.layers)

    def _keeps_steps(self):
        """Whether the output of sequences has a step axis (no LastStep
        takes one step of them): targets then have one per step."""
        return self._takes_sequences() and not any(isinstance(layer, LastStep)
                                                   for layer in self.layers)

    # --- inference ----------------------------------------------------------
    @_states_kept_on_error
    def __call__(self, x: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
        """Inference on one batch (dropout off); x as for ``predict``.
        ``mask`` (N, T) of bool: Keras' mask for the recurrent layers (see
        ``fastrnn.masking``), combined with any a Masking or Embedding layer
        makes."""
        x = self._check_x("Sequential", x)
        if mask is not None:
            from fastrnn.masking import check_mask
            mask = check_mask("Sequential", mask, x.shape[:2])
        return self._infer(x, mask=mask)

    def _infer(self, x, lengths=None, mask=None):
        return self._run(x, lengths, mask, train=False)[0]

    def _forward_train(self, x, lengths=None, mask=None):
        out, backprops, _ = self._run(x, lengths, mask, train=True)
        return out, backprops

    def _run(self, x, lengths, mask, train):
        """(output, the layers' backprops (None in inference), the output's
        mask). [masks] Once a mask is in play (given, or made by a Masking or
        Embedding(mask_zero=True) layer) every layer runs through
        fastrnn.masking.seq_call, and the lengths of a ragged batch become
        part of the mask."""
        # the layers' parameter sets of one moment (never some from before a
        # load or an optimizer step of the model and some from after); an
        # inference call without a Stateful (which carries its state on) may
        # run again
        repeatable = not train and Stateful not in map(type, self.layers)
        out, backprops, out_mask = on_one_set(
            self._owners(), lambda: self._run_layers(x, lengths, mask, train), repeatable)
        # no layer computed (Dropout in inference, a LastStep, ...): a new
        # array all the same, never the caller's or a view of it
        if out is x or (out.base is not None and np.may_share_memory(out, x)):
            out = out.copy()
        return out, backprops, out_mask

    def _run_layers(self, x, lengths, mask, train):
        masked = mask is not None or any(getattr(layer, "_makes_mask", False)
                                         for layer in self.layers)
        ragged = None   # (a Reversed reverses each sequence within its length)
        if masked and lengths is not None:
            valid = np.arange(x.shape[1])[None, :] < np.asarray(lengths)[:, None]
            mask, lengths, ragged = (valid if mask is None else mask & valid), None, lengths
        backprops = []
        given, carried = mask, False   # (masking.seq_call, masking.carries_steps)
        # past the first layer that computes, the input is the model's own (a
        # quantized layer lets an overflow in it propagate, as float32 does)
        owns = own_inputs(self.layers)
        for k, layer in enumerate(self.layers):
            with own_values(layer, input=True if owns[k] else None):
                if masked:
                    from fastrnn.masking import carries_steps, seq_call
                    x, backprop, mask = seq_call(layer, x, mask, train, carried, given,
                                                 ragged if x.ndim == 3 else None)
                    carried = carries_steps(layer, carried)
                elif lengths is None:
                    x, backprop = layer._seq_train(x) if train else (layer._seq_infer(x), None)
                else:
                    x, backprop = _train_with_lengths(layer, x, lengths) if train else \
                        (_infer_with_lengths(layer, x, lengths), None)
                    if x.ndim < 3:      # past a LastStep: no steps left
                        lengths = None
            backprops.append(backprop)
        return x, backprops, (mask if masked else None)

    @staticmethod
    def _with_output_mask(batch, out, mask):
        """[masks] The batch whose loss and metrics skip the steps the
        output's mask masks (Keras' rule), for per-step targets."""
        if mask is None or batch.y is None or out.ndim < 3 or batch.y.ndim < 2 \
                or batch.y.shape[:2] != mask.shape:
            return batch
        return batch._replace(mask=mask if batch.mask is None else batch.mask & mask)

    def reset_state(self) -> None:
        """Reset every ``Stateful`` layer (Keras' ``model.reset_state()``)."""
        for layer in self.layers:
            if hasattr(layer, "reset_state"):
                layer.reset_state()

    @_states_kept_on_error
    def predict(self, x: Any, batch_size: int | None = None,
                steps: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Inference (dropout off) over x, in batches.

        Parameters
        ----------
        x : ndarray, list of sequences, or iterable of batches
            Samples first: batch-first sequences (N, T, features) if the
            model has a recurrent layer or a LastStep, else (N, features) or
            (N, T, features); pass one sample as ``x[None]``. A list of
            sequences (T_i, features) of different lengths runs each batch
            padded, with ``lengths``. An iterable yields batches: arrays,
            lists of sequences, or tuples whose first item is x (so does a
            list of 2 or 3 items whose first has 3 or more dimensions, or
            whose items differ in dimensions: a PyTorch DataLoader's
            ``[x, y]``).
        batch_size : int, optional
            Samples per call (all at once if None); not for iterables.
        steps : int, optional
            Batches to take from an iterable (all if None).

        Returns
        -------
        ndarray of shape (N, ...), or a list of N arrays (T_i, ...)
            A list when the sequences have different lengths and the output
            has a step axis: each sequence's output without the padding.

        Raises
        ------
        TypeError, ValueError
            If x does not fit the model.
        """
        owner = "Sequential.predict"
        if batch_size is not None:
            batch_size = v.check_int(owner, "batch_size", batch_size)
        if steps is not None:
            steps = v.check_int(owner, "steps", steps)
        source = batching.make(owner, self, x, targets=False)
        if isinstance(source, batching.IterableData):
            if batch_size is not None:
                raise ValueError(f"{owner}: batch_size does not apply to x as an iterable of "
                                 f"batches (each batch is as the iterable gives it)")
            batches = source.batches(steps)
        else:
            if steps is not None:
                raise ValueError(f"{owner}: steps applies only to x as an iterable of batches")
            if not source.ragged and (batch_size is None or len(source) <= batch_size):
                return self._infer(source.x)
            batches = source.batches(batch_size or len(source))
        # every batch with the weights of one moment (a training thread's
        # steps meanwhile had given rows of several versions in one result)
        outputs = run_pinned(self._owners(), lambda: [
            (self._infer(batch.x, batch.lengths), batch.lengths) for batch in batches])
        if not outputs:
            raise ValueError(f"{owner}: x gave no batches")
        if all(lengths is None or out.ndim < 3 for out, lengths in outputs) \
                and len({out.shape[1:] for out, _ in outputs}) == 1:
            return np.concatenate([out for out, _ in outputs])
        sequences = []          # per-step outputs of different lengths: one array each
        for out, lengths in outputs:
            if lengths is None or out.ndim < 3:
                sequences.extend(out)
            else:
                sequences.extend(row[:length] for row, length in zip(out, lengths))
        return sequences

    # --- training -----------------------------------------------------------
    def compile(self, loss: str | Loss = "mse", optimizer: str | Optimizer = "adam",
                clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                metrics: list[Any] | None = None,
                weighted_metrics: list[Any] | None = None) -> Sequential:
        """Set the loss, the optimizer and the metrics.

        Parameters
        ----------
        loss : Loss or str, default 'mse'
            A fastrnn loss, or a name: 'mse', 'mae', 'huber', 'cross_entropy',
            'bce_with_logits'. Its reduction must be 'mean' or 'sum'.
        optimizer : Optimizer or str, default 'adam'
            A fastrnn optimizer (bound to this model's parameters if it has
            none; one bound already must cover them, e.g. a loaded model's
            ``model.optimizer``, whose state is then kept), or a name: 'sgd',
            'adam', 'adamw', 'rmsprop'. This model's training steps update its
            own layers only: other layers the optimizer also holds keep their
            weights and moments (as PyTorch skips parameters without a
            gradient).
        clip_grad_norm, clip_grad_value : float >= 0, optional
            Clip the gradients by global norm and/or by value before each step
            (inf: never clips): those of the layers the optimizer trains.
        metrics : list, optional
            Computed per batch and epoch, shown by the progress bar and kept
            in ``History`` (``val_`` ones on validation data) and returned by
            ``evaluate``: names ('accuracy', 'mae', 'rmse', ... see
            fastrnn.metrics), ``fastrnn.metrics.Metric`` objects or functions
            ``fn(y_true, y_pred)``. Not weighted by ``sample_weight`` or
            ``class_weight`` (Keras' rule). Each pass (an epoch, a
            validation, an ``evaluate``) computes with its own reset copy of
            a Metric object given, which itself stays as it was.
        weighted_metrics : list, optional
            Metrics that are weighted by them.

        Returns
        -------
        Sequential
            The model itself.

        Raises
        ------
        TypeError, ValueError
            For an unknown loss, optimizer or metric, a loss with
            reduction='none', two metrics of the same name, or an optimizer
            bound to other parameters.
        """
        owner = "Sequential.compile"
        # checked here, not at the first batch; inf (measure, never clip) is allowed
        clip_grad_norm, clip_grad_value = (
            None if value is None else _check_number(owner, name, value, allow_inf=True)
            for name, value in (("clip_grad_norm", clip_grad_norm),
                                ("clip_grad_value", clip_grad_value)))
        loss = get_loss(loss)
        if loss.reduction == "none":
            raise ValueError(f"{owner}: the loss's reduction must be 'mean' or 'sum' (training "
                             f"needs one number per batch), got 'none'")
        specs = []
        for weighted, given in ((False, metrics), (True, weighted_metrics)):
            if given is None:
                continue
            if isinstance(given, (str, metrics_module.Metric)) or callable(given):
                given = [given]
            if not isinstance(given, (list, tuple)):
                name = "weighted_metrics" if weighted else "metrics"
                raise TypeError(f"{owner}: {name} must be a list, got {type(given).__name__}")
            specs.extend((identifier, weighted) for identifier in given)
        seen = {"loss"}
        for identifier, _ in specs:
            name = metrics_module.check(owner, identifier)
            if name in seen:
                raise ValueError(f"{owner}: two metrics (or a metric and the loss) are named "
                                 f"{name!r}; give one a name of its own")
            seen.add(name)
        opt = get_optimizer(optimizer)
        self._bind(opt, "Sequential.compile", refuse_partial=True)
        self.loss = loss
        self.optimizer = opt
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self._metric_specs, self._metrics = specs, None
        return self

    def _bind(self, opt, owner, refuse_partial=False):
        """Bind ``opt``, built without params, to this model's layers (an
        unbound optimizer set as ``model.optimizer`` had trained nothing,
        silently); one that lacks some layers is refused
        (``refuse_partial``: compile's) or, in training, trains the layers it holds with a warning naming the
        others (set as ``model.optimizer`` to freeze them, or a layer put in
        after ``compile``, which a step skipped silently)."""
        if not isinstance(opt, optim_module.Optimizer):
            raise TypeError(f"{owner}: the optimizer must be a fastrnn optimizer, got "
                            f"{type(opt).__name__}; set it with compile(optimizer=...)")
        if not opt.bound:
            opt.add(self)
            return
        missing = [m for m in self._modules_with_parameters()
                   if not any(m is o for o in opt._modules)]
        if missing and refuse_partial:
            raise ValueError(f"{owner}: the optimizer was built for other parameters and "
                             f"would not train {missing}; pass an optimizer built without "
                             f"params (it is bound here), or one built with this model")
        if missing:
            warnings.warn(f"{owner}: the optimizer does not hold {missing}, which training "
                          f"leaves as they are (frozen); to train them, compile again or "
                          f"optimizer.add(layer)", UserWarning, stacklevel=4)

    def _require_compiled(self, what):
        if self.loss is None or self.optimizer is None:
            raise RuntimeError(f"Sequential.{what}: call compile(loss, optimizer) first")

    def _metric_directions(self):
        """Metric name -> 'up' / 'down' / None (for callbacks' mode='auto')."""
        if self._metrics is not None:
            return {m.name: m.direction for m, _ in self._metrics}
        return {metrics_module.check("Sequential", identifier):
                metrics_module.direction_of(identifier)
                for identifier, _ in self._metric_specs}

    @property
    def metrics_names(self) -> list[str]:
        """'loss', then the names of the compiled metrics (what ``evaluate``
        returns, in order)."""
        return ["loss"] + [metrics_module.check("Sequential", identifier)
                           for identifier, _ in self._metric_specs]

    def train_step(self, x: ArrayLike, y: ArrayLike,
                   sample_weight: ArrayLike | None = None) -> Any:
        """Forward, loss, backward and one optimizer step on one batch.

        Parameters
        ----------
        x, y : ndarray
            One batch (as for ``fit``).
        sample_weight : ndarray of shape (B,), optional

        Returns
        -------
        float
            The batch's loss (before the step). Metrics are not updated.
        """
        self._require_compiled("train_step")
        batch = batching.ArrayData("Sequential.train_step", self, x, y,
                                      sample_weight).take(slice(None))
        value, _, _, _, _ = self._train_batch(batch, batch.sample_weight)
        return value

    @_states_kept_until_the_step
    def _train_batch(self, batch, sample_weight):
        """One step; returns (value, total, count, output, the batch with the
        output's mask)."""
        # (the layers or the optimizer may have changed since compile)
        self._bind(self.optimizer, "Sequential")
        out, backprops, out_mask = self._run(batch.x, batch.lengths, None, train=True)
        batch = self._with_output_mask(batch, out, out_mask)
        total, count, grad = self.loss._terms(out, batch.y, sample_weight, batch.mask)
        value, grad = _reduce(self.loss.reduction, total, count, grad)
        self.zero_grad()
        first = self._first_trained()
        for k in reversed(range(len(backprops))):
            # the gradient of the data, which nothing reads: not computed
            with input_grads(k > first):
                grad = backprops[k](grad)
        if self.clip_grad_norm is not None or self.clip_grad_value is not None:
            # the layers the optimizer trains: a frozen layer's gradients
            # (computed all the same) counted in the norm and shrank the
            # others' steps (PyTorch and Keras clip the trained ones only)
            held = [m for m in self._modules_with_parameters()
                    if any(m is o for o in self.optimizer._modules)]
            if held and self.clip_grad_norm is not None:
                clip_grad_norm(held, self.clip_grad_norm)
            if held and self.clip_grad_value is not None:
                clip_grad_value(held, self.clip_grad_value)
        if type(self.optimizer).step is optim_module.Optimizer.step:
            self.optimizer._step(self._modules_with_parameters())
        else:   # a subclass's own step, called as it is
            self.optimizer.step()
        return value, total, count, out, batch

    # --- metrics ------------------------------------------------------------
    # Each pass that reports metrics (a fit epoch, an evaluate, a validation)
    # keeps its own Metric objects in ``tracked`` ([None] until its first
    # batch builds them): an evaluate from another thread, or from a callback,
    # had reset and fed the epoch's shared ones.
    def _update_metrics(self, batch, out, sample_weight, tracked):
        """Update every metric with the batch's counted steps only."""
        if not self._metric_specs:
            return
        y = batch.y
        if tracked[0] is None:
            logits = isinstance(self.loss, BCEWithLogitsLoss)
            tracked[0] = [(_own_metric(metrics_module.get(identifier, y, out, logits)), weighted)
                          for identifier, weighted in self._metric_specs]
            self._metrics = tracked[0]   # (their names and directions, for the callbacks)
        keep = batch.mask
        if isinstance(self.loss, CrossEntropyLoss) and y.dtype.kind in "iu":
            ignored = y != self.loss.ignore_index
            keep = ignored if keep is None else keep & ignored
        # a masked model's metrics count its kept steps in every batch, those with
        # nothing masked too: a weight then counts per step alike, whatever the batching
        if keep is not None:
            if sample_weight is not None:
                sample_weight = np.broadcast_to(
                    sample_weight.reshape(sample_weight.shape + (1,) * (keep.ndim
                                                                        - sample_weight.ndim)),
                    keep.shape)[keep]
            y, out = y[keep], out[keep]
            if not len(y):
                return
        for metric, weighted in tracked[0]:
            metric.update_state(y, out, sample_weight if weighted else None)

    @staticmethod
    def _metric_results(tracked):
        if tracked[0] is None:
            return {}
        return {metric.name: float(metric.result()) for metric, _ in tracked[0]}

    # --- evaluate -----------------------------------------------------------
    @staticmethod
    def _stateful_batch(owner, stateful, batch_size, source, val, steps_per_epoch,
                        validation_steps, epochs):
        """The batch size a Stateful layer takes in this fit (its fixed one,
        else the first batch's; None: not known before the first batch of an
        iterable), after refusing, before any step, arrays that would give
        it a batch of another size: a partial last batch (of x, or of the
        validation data, then validated in batches of that size) failed
        after the epoch's steps had changed the weights."""
        size = stateful.batch_size
        checks = [(val, "the validation data", validation_steps, 1)]
        if isinstance(source, batching.ArrayData):
            size = size or min(batch_size, len(source))
            checks.insert(0, (source, "x", steps_per_epoch, epochs))
        for data, what, steps, passes in checks:
            if size is None or not isinstance(data, batching.ArrayData):
                continue
            got = _batch_sizes(len(data), size if data is val else batch_size, steps, passes)
            if got != {size}:
                other = sorted(got - {size})
                raise ValueError(f"{owner}: a Stateful layer takes batches of exactly {size} "
                                 f"sequences, but {what} ({len(data)} samples) would give "
                                 f"batches of {other}; use a batch_size dividing it, or drop "
                                 f"the samples past a multiple of it")
        return size

    def _check_validation_targets(self, owner, source, val):
        """Validation targets the loss would refuse only after a whole epoch
        of training (the weights already changed, the message the loss's):
        refused before it, by name. They must have y's shape past the
        samples axis (and the steps axis, where both are per-step targets:
        validation sequences may be longer or shorter), and a dtype the loss
        takes (CrossEntropyLoss: integer class indices)."""
        y, y_val = source.y, val.y
        if y is None or y_val is None or source.y_ragged or val.y_ragged:
            return

        def per_step(data):   # (where it cannot tell, it takes the laxer check)
            return (not data.ragged and data.x.ndim >= 2 and data.y.ndim >= 2
                    and data.y.shape[1] == data.x.shape[1])
        past = 2 if per_step(source) and per_step(val) else 1
        if y_val.ndim != y.ndim or y_val.shape[past:] != y.shape[past:]:
            axes = "samples axis" if past == 1 else "samples and steps axes"
            raise ValueError(f"{owner}: validation y has shape {shape_str(y_val.shape)}, y "
                             f"{shape_str(y.shape)}: expected the same shape past the {axes}")
        self.loss._check_target_dtype(owner, "validation y", y_val)

    @_states_kept_on_error
    def evaluate(self, x: Any, y: Any = None, batch_size: int | None = None,
                 sample_weight: ArrayLike | None = None, steps: int | None = None,
                 callbacks: list[Any] | None = None,
                 return_dict: bool = False) -> float | list[float] | dict[str, float]:
        """The loss (and metrics) over (x, y) with the inference path (dropout off).

        The loss is the mean over everything the loss averages (each batch
        weighs what it holds: its samples, or its targets not ignored and
        steps not padded), as if computed on all the data at once.

        Parameters
        ----------
        x, y
            As for ``fit`` (x may be a list of sequences of different lengths
            or, with y None, an iterable of batches).
        batch_size : int, optional
            Samples per call (all at once if None).
        sample_weight : array_like, optional
            As for ``fit``.
        steps : int, optional
            Batches to take (all if None): from an iterable, or the first
            ones of the arrays (Keras' rule).
        callbacks : list, optional
            Their ``on_test_*`` hooks are called.
        return_dict : bool, default False

        Returns
        -------
        float, list or dict
            The loss alone if the model has no metrics; else
            ``[loss, metric, ...]`` in the order of ``metrics_names``; or a
            dict of name to value with ``return_dict``.
        """
        owner = "Sequential.evaluate"
        self._require_compiled("evaluate")
        if batch_size is not None:
            batch_size = v.check_int(owner, "batch_size", batch_size)
        if steps is not None:
            steps = v.check_int(owner, "steps", steps)
        return_dict = v.check_bool(owner, "return_dict", return_dict)
        source = batching.make(owner, self, x, y, sample_weight)
        if isinstance(source, batching.IterableData) and batch_size is not None:
            raise ValueError(f"{owner}: batch_size does not apply to x as an iterable of "
                             f"batches (each batch is as the iterable gives it)")
        callbacks = CallbackList(owner, callbacks, self)
        callbacks.set_model()
        logs = run_pinned(self._owners(), lambda: self._evaluate_source(
            owner, source, batch_size, steps, callbacks))   # (one moment's weights, as predict)
        if isinstance(source, batching.IterableData) and steps is not None \
                and source.taken < steps:
            warnings.warn(f"{owner}: x ran out of batches after {source.taken} of "
                          f"steps={steps}; the result is over those", stacklevel=2)
        if return_dict:
            return logs
        if not self._metric_specs:
            return logs["loss"]
        return list(logs.values())

    def _evaluate_source(self, owner, source, batch_size, steps, callbacks, look_ahead=False):
        iterable = isinstance(source, batching.IterableData)
        if iterable:
            # (each validation from the first batch; ``look_ahead``: fit's, with
            # another epoch to come, so that a generator that ran out is
            # known before that epoch trains)
            batches = source.batches(steps, from_start=True, look_ahead=look_ahead)
        else:
            batches = source.batches(batch_size or len(source), steps=steps)
        tracked = [None]
        callbacks.call("on_test_begin", {})
        running = callbacks.wants("on_test_batch_end")
        mean = _LossMean(self.loss.reduction)
        for step, batch in enumerate(batches):
            callbacks.call("on_test_batch_begin", step, {})
            with _naming_batch(owner, iterable, source.name if iterable else "x", step):
                out, _, out_mask = self._run(batch.x, batch.lengths, None, train=False)
                batch = self._with_output_mask(batch, out, out_mask)
                total, count, _ = self.loss._terms(out, batch.y, batch.sample_weight,
                                                   batch.mask)
            mean.add(total, count, len(batch.x))
            self._update_metrics(batch, out, batch.sample_weight, tracked)
            if running:
                callbacks.call("on_test_batch_end", step,
                               {"loss": mean.result(), **self._metric_results(tracked)})
        if not mean.batches:
            raise ValueError(f"{owner}: the data gave no batches to evaluate (a generator "
                             f"already consumed?)")
        logs = {"loss": mean.result(), **self._metric_results(tracked)}
        callbacks.call("on_test_end", logs)
        return logs

    # --- fit ----------------------------------------------------------------
    def fit(self, x: Any, y: Any = None, epochs: int = 1, batch_size: int | None = None,
            validation_split: float = 0.0, validation_data: Any = None, shuffle: bool = True,
            callbacks: list[Any] | None = None, verbose: int = 1,
            class_weight: Mapping[int, float] | None = None,
            sample_weight: ArrayLike | None = None, initial_epoch: int = 0,
            steps_per_epoch: int | None = None,
            validation_steps: int | None = None) -> History:
        """Train; returns a History (also kept as ``model.history``).

        Keras' loop: per epoch, shuffle, step through the batches, update the
        metrics, validate, call the callbacks (see fastrnn.callbacks for their
        order); stop when a callback sets ``model.stop_training``.

        Parameters
        ----------
        x : ndarray, list of sequences, or iterable of batches
            Arrays with the samples first; a list of N sequences (T_i,
            features) of different lengths (each batch padded and run with
            ``lengths``: padding reaches neither the state, the loss nor the
            metrics); or, with y None, an iterable of ``(x, y)`` or
            ``(x, y, sample_weight)`` batches (a generator for data larger
            than memory). See fastrnn.batching.
        y : ndarray or list of sequences
            The targets: (N, ...), or per step a list of N arrays (T_i, ...)
            matching ragged x.
        epochs : int, default 1
            The epoch to stop at: epochs ``initial_epoch`` to ``epochs - 1`` run.
        batch_size : int, default 32
            For arrays and lists of sequences.
        validation_split : float in [0, 1)
            Fraction of the samples, taken from the end before any shuffling
            (Keras' rule), held out to compute ``val_loss`` (and ``val_``
            metrics) each epoch.
        validation_data : tuple or iterable, optional
            ``(x_val, y_val)``, ``(x_val, y_val, sample_weight_val)`` or an
            iterable of batches; overrides validation_split. Arrays are
            validated in batches of ``batch_size`` when the loss's reduction
            is 'sum' (Keras' rule: the value depends on them, and val_loss then
            compares with loss) or ``validation_steps`` is given (which counts
            them, as Keras'), else of at least 256 (the same value); a
            model with a ``Stateful`` layer in the batch size it takes (fit
            refuses, before its first step, training or validation arrays that
            would give a batch of another size). An iterable that starts
            over is validated from its first batch each epoch (Keras' rule);
            a generator runs once, so with more than one epoch to run it
            needs ``validation_steps`` (refused before training without),
            and one that runs out stops training after that epoch, with a
            warning.
        shuffle : bool, default True
            Shuffle the training samples every epoch (with the model's seed).
        callbacks : list, optional
            fastrnn.callbacks objects, learning-rate schedules, or any object
            with some of the hooks.
        verbose : {0, 1, 2}
            0 silent, 1 progress bar (one line per epoch when not a terminal),
            2 one line per epoch.
        class_weight : dict of int to float, optional
            Weights each training sample by the weight of its class (Keras'
            rule: the class is an integer target, or the argmax of a one-hot
            target; classes not listed weigh 1). With a cross-entropy loss,
            each step of per-step integer targets is weighted by its class.
            The mean still divides by the unweighted count. Not with sample
            weights (``sample_weight``, or an iterable's ``(x, y, weight)``
            batches: refused at the first such batch).
        sample_weight : ndarray of shape (N,) or (N, T), optional
            Weights each training sample (or step): its loss is multiplied by
            it, and the mean divides by the unweighted count (Keras' rule).
            Not with class_weight.
        initial_epoch : int, default 0
            The epoch to start at, to resume a run (see ``save``). A run whose
            last epoch stopped inside a pass over arrays (steps_per_epoch)
            goes on with that pass, its order and its next batch (kept by the
            model and saved with it); if this fit's samples, batch_size or
            shuffle differ from that run's, a warning says it starts a new one.
        steps_per_epoch : int, optional
            Batches per epoch; the batches continue across epochs (Keras'
            rule). From arrays, an epoch takes the next batches of the
            current pass over the samples (shuffled once a pass); one that
            reaches the pass's end stops there, with a warning if it had
            fewer batches than ``steps_per_epoch``, and the next epoch starts
            a new pass. From an iterable, one that starts over is started
            again when it runs out; a generator that runs out stops training
            with a warning.
        validation_steps : int, optional
            Batches per validation: of an iterable ``validation_data``, or
            the first ones of validation arrays (in batches as said under
            ``validation_data``).

        Returns
        -------
        History

        Raises
        ------
        RuntimeError
            If the model is not compiled.
        TypeError, ValueError
            For arguments of the wrong type or value, naming the argument.
        """
        owner = "Sequential.fit"
        self._require_compiled("fit")
        epochs = v.check_int(owner, "epochs", epochs)
        shuffle = v.check_bool(owner, "shuffle", shuffle)
        initial_epoch = v.check_int(owner, "initial_epoch", initial_epoch, minimum=0)
        if batch_size is not None:
            batch_size = v.check_int(owner, "batch_size", batch_size)
        if not isinstance(verbose, numbers.Integral):
            raise TypeError(f"{owner}: verbose must be 0, 1 or 2, got {type(verbose).__name__} "
                            f"{verbose!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"{owner}: verbose must be 0, 1 or 2, got {verbose!r}")
        if steps_per_epoch is not None:
            steps_per_epoch = v.check_int(owner, "steps_per_epoch", steps_per_epoch)
        if validation_steps is not None:
            validation_steps = v.check_int(owner, "validation_steps", validation_steps)
        if class_weight is not None and sample_weight is not None:
            raise ValueError(f"{owner}: pass class_weight or sample_weight, not both")
        table = None if class_weight is None else _class_weight_table(
            owner, class_weight, np.dtype(self._dtype() or np.float32))
        source = batching.make(owner, self, x, y, sample_weight)
        iterable = isinstance(source, batching.IterableData)
        if iterable and batch_size is not None:
            raise ValueError(f"{owner}: batch_size does not apply to x as an iterable of "
                             f"batches (each batch is as the iterable gives it)")
        batch_size = batch_size or 32
        if validation_data is not None:
            val = batching.validation(owner, self, validation_data)
        elif validation_split:
            split = validation_split
            if isinstance(split, bool) or not isinstance(split, numbers.Real):
                raise TypeError(f"{owner}: validation_split must be a float in [0, 1), got "
                                f"{type(split).__name__} {split!r}")
            if not 0 <= split < 1:
                raise ValueError(f"{owner}: validation_split must be a float in [0, 1), "
                                 f"got {split!r}")
            if iterable:
                raise ValueError(f"{owner}: validation_split needs arrays; with an iterable "
                                 f"of batches pass validation_data")
            n = len(source)
            n_val = batching.held_out(n, split)
            if n_val == 0 or n_val == n:
                raise ValueError(f"{owner}: validation_split={split} leaves "
                                 f"{n - n_val} training and {n_val} validation samples")
            source, val = source.split(n_val)
        else:
            val = None
        if isinstance(val, batching.ArrayData) and not iterable:
            self._check_validation_targets(owner, source, val)
        if (isinstance(val, batching.IterableData) and val.one_shot and validation_steps is None
                and epochs - initial_epoch > 1):
            # (its first validation takes it to its end: the second found
            # nothing, after that epoch had trained)
            raise ValueError(f"{owner}: validation_data is a generator (it runs once) and "
                             f"validation_steps is None, so only the first of the "
                             f"{epochs - initial_epoch} epochs could validate; pass a list of "
                             f"batches or an iterable that starts over, or validation_steps "
                             f"with a generator that yields that many batches every epoch")
        stateful = [layer for layer in self.layers if isinstance(layer, Stateful)]
        stateful_size = None if not stateful else self._stateful_batch(
            owner, stateful[0], batch_size, source, val, steps_per_epoch, validation_steps,
            epochs - initial_epoch)
        if iterable:
            steps = steps_per_epoch if steps_per_epoch is not None else source.length
        else:
            steps = -(-len(source) // batch_size)
            if steps_per_epoch is not None:
                steps = min(steps, steps_per_epoch)
        callbacks = CallbackList(owner, callbacks, self)
        history = self.history = History()
        bar = ProgressBar(verbose, epochs, steps)
        running = callbacks.wants("on_train_batch_end") or bar.live
        reduction = self.loss.reduction
        # Keras validates in batches of batch_size; a 'sum' loss's value (the
        # batches' sums averaged) depends on them, so it does too (then val_loss
        # and loss compare); a 'mean' one does not, and larger batches run
        # faster (a Stateful layer takes its own size: set at validation);
        # validation_steps counts batches of batch_size (Keras' rule)
        val_batch_size = (batch_size if reduction == "sum" or validation_steps is not None
                          else max(batch_size, 256))
        self.stop_training = False
        callbacks.set_model()
        callbacks.train_begin()
        logs = {}
        pass_start = [None]   # the model's generator before it drew this pass's order

        def new_order():
            if not shuffle:
                return None
            pass_start[0] = copy.deepcopy(self._rng)
            return _permutation(self._rng, len(source))

        if iterable or initial_epoch == 0:   # a new run, or other data: no pass goes on
            self._fit_pass = None
        else:
            self._resume_pass(owner, source, initial_epoch, batch_size, steps_per_epoch,
                              shuffle, pass_start)

        try:
            for epoch in range(initial_epoch, epochs):
                tracked = [None]
                callbacks.call("on_epoch_begin", epoch, {})
                bar.start_epoch(epoch)
                batches = (source.batches(steps_per_epoch) if iterable else
                           source.epoch(batch_size, steps_per_epoch, new_order))
                mean = _LossMean(reduction)
                for step, batch in enumerate(batches):
                    callbacks.call("on_train_batch_begin", step, {})
                    if table is None:
                        weight = batch.sample_weight
                    elif batch.sample_weight is not None:   # an iterable's (x, y, weight)
                        raise ValueError(f"{owner}: pass class_weight or sample_weight, not both "
                                         f"(x's batch {step} holds sample weights)")
                    else:
                        weight = _class_weights(table, batch.y, self.loss)
                    with _naming_batch(owner, iterable, "x", step):
                        _, total, count, out, batch = self._train_batch(batch, weight)
                    mean.add(total, count, len(batch.x))
                    self._update_metrics(batch, out, weight, tracked)
                    if running:
                        batch_logs = {"loss": mean.result(), **self._metric_results(tracked)}
                        callbacks.call("on_train_batch_end", step, batch_logs)
                        bar.update(step + 1, batch_logs)
                    bar.seen = step + 1
                    if self.stop_training:
                        break
                if iterable and source.ran_out:
                    batching.warn_ran_out(owner, "x")
                    self.stop_training = True
                    if not mean.batches:
                        break
                if not iterable and source.ended_short and not self.stop_training:
                    batching.warn_pass_ended(owner, steps_per_epoch,
                                             -(-len(source) // batch_size))
                if not iterable:   # (before on_epoch_end: a checkpoint saves it)
                    next_batch = source.unfinished(batch_size)
                    self._fit_pass = None if next_batch is None else batching.FitPass(
                        len(source), batch_size, next_batch, pass_start[0])
                logs = {"loss": mean.result(), **self._metric_results(tracked)}
                if val is not None:
                    if stateful:   # (fixed by the first batch, an iterable's too)
                        val_batch_size = stateful_size or stateful[0].batch_size or batch_size
                    with states_kept(self.layers):   # (as evaluate, if it raises)
                        val_logs = self._evaluate_source(owner, val, val_batch_size,
                                                         validation_steps, callbacks,
                                                         look_ahead=epoch + 1 < epochs)
                    logs.update({f"val_{key}": value for key, value in val_logs.items()})
                    if isinstance(val, batching.IterableData) and val.ran_out \
                            and epoch + 1 < epochs and not self.stop_training:
                        batching.warn_validation_ran_out(owner, val.taken, validation_steps)
                        self.stop_training = True
                callbacks.call("on_epoch_end", epoch, logs)
                history._append(epoch, logs)
                bar.end_epoch(logs)
                if self.stop_training:
                    break
        finally:
            # the large training buffers the layers keep between steps go with
            # the fit (kept, a model fitted and then only served through a
            # quantized copy held them for good: 785 MB after an LSTM's fit)
            _release_training_buffers(self.layers)
        callbacks.train_end(logs)
        return history

    def _resume_pass(self, owner, source, initial_epoch, batch_size, steps_per_epoch,
                     shuffle, pass_start):
        """A resumed run (initial_epoch > 0) goes on with the pass over the
        arrays its last epoch left unfinished (steps_per_epoch), as the
        uninterrupted run would."""
        kept = getattr(self, "_fit_pass", None)   # (a model pickled before it had one)
        if kept is None:
            return
        # (kept until this fit's first epoch ends: a resume that fails first,
        # or has no epoch to run, can be retried)
        if (steps_per_epoch is None or kept.samples != len(source)
                or kept.batch_size != batch_size or (kept.start is not None) != shuffle):
            warnings.warn(
                f"{owner}: the run resumed at epoch {initial_epoch} stopped inside a pass "
                f"over {kept.samples} samples in batches of {kept.batch_size} "
                f"({'shuffled' if kept.start is not None else 'in order'}, steps_per_epoch); "
                f"this fit has {len(source)} samples in batches of {batch_size} "
                f"({'shuffled' if shuffle else 'in order'}"
                f"{', no steps_per_epoch' if steps_per_epoch is None else ''}), so it starts "
                f"a new pass and does not continue that run exactly", stacklevel=3)
            return
        order = None
        if kept.start is not None:   # the same draw as then, from the generator of then
            order = _permutation(copy.deepcopy(kept.start), kept.samples)
        pass_start[0] = kept.start
        source.resume(kept.next, order)

    def _check_x(self, owner, x, name="x"):
        """x as an array with the samples first, in the layout the layers
        take: batch-first sequences (N, T, features) if any layer is recurrent
        or a LastStep (the layers before those keep the number of axes), else
        (N, ..., features). Checked here so that the error names the user's x,
        not what a layer made of it."""
        x = v.to_numpy(owner, name, x)
        if getattr(self.layers[0], "_takes_ids", False):   # an Embedding: ids (N, T)
            return self.layers[0]._check_ids(owner, x, name)
        features = self._input_features()
        sequences = self._takes_sequences()
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

    # --- summary ------------------------------------------------------------
    def summary(self, print_fn: Callable[[str], Any] | None = None) -> None:
        """Print the layers, their output shapes and parameter counts, and
        the totals in values and bytes (Keras' ``model.summary()``).

        Output shapes are symbolic: ``None`` for the samples and the steps,
        which the layers do not fix.

        Parameters
        ----------
        print_fn : callable, optional
            Called with each line (default ``print``).
        """
        print_fn = print if print_fn is None else print_fn
        rows = [("#", "Layer", "Output shape", "Param #")]
        features = self._input_features()
        shape = ["None", "None"] if self._takes_sequences() else ["None"]
        total = nbytes = 0
        counted = set()   # a layer used twice holds one set of parameters
        for i, layer in enumerate(self.layers):
            recurrent = _recurrent(layer)   # the layer inside any wrappers
            if isinstance(recurrent, _RNNBase):
                features = recurrent._dirs * recurrent._out_size
            elif isinstance(layer, Linear):
                features = layer.out_features
            elif isinstance(layer, Embedding):
                features = layer.embedding_dim
            elif isinstance(layer, LastStep):
                shape = shape[:1]
            elif isinstance(layer, MergeDirections) and features is not None:
                mode = layer._config["mode"]
                if mode is None:
                    shape = shape + ["2"]
                if mode != "concat":
                    features //= 2
            views = _parameter_views(layer)
            count = sum(view.size for view in views)
            if id(recurrent) not in counted:
                counted.add(id(recurrent))
                total += count
                nbytes += sum(view.nbytes for view in views)
            out = "(" + ", ".join(shape + ["?" if features is None else str(features)]) + ")"
            rows.append((str(i), repr(layer), out, f"{count:,}"))
        widths = [max(len(row[k]) for row in rows) for k in range(4)]
        line = "  ".join("-" * w for w in widths)
        print_fn("Sequential")
        print_fn(line)
        for j, row in enumerate(rows):
            print_fn("  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]),
                                row[2].ljust(widths[2]), row[3].rjust(widths[3])]).rstrip())
            if j == 0:
                print_fn(line.replace("-", "="))
        print_fn(line)
        # each layer's weights: its dtype, or a quantized layer's (fastrnn.quantize:
        # int8 with float32 scales, or bfloat16; its biases and arithmetic float32)
        kinds = []
        for layer in self.layers:
            config = getattr(layer, "_config", {})
            if "weight_dtype" in config:
                kind = f"{config['weight_dtype']} weights"
            elif config.get("dtype") is not None and _parameter_views(layer):
                kind = config["dtype"].name
            else:
                continue
            if kind not in kinds:
                kinds.append(kind)
        kind = "".join(", " + k for k in kinds[:1]) + "".join(" and " + k for k in kinds[1:])
        print_fn(f"Total params: {total:,} ({v.bytes_text(nbytes)}{kind})")
        if self.optimizer is not None:
            state = [value for entry in self.optimizer._state for value in entry.values()
                     if isinstance(value, np.ndarray)]
            if state:
                print_fn(f"Optimizer state: {sum(a.size for a in state):,} values "
                         f"({v.bytes_text(sum(a.nbytes for a in state))}, "
                         f"{type(self.optimizer).__name__})")

    # --- files --------------------------------------------------------------
    def save(self, path: str | os.PathLike, include_optimizer: bool = True) -> None:
        """Write the model to one file: the layers' configuration (JSON),
        their weights and the random states; a ``.safetensors`` file if the
        path ends so, else a ``.npz`` (see ``fastrnn.save``).

        With ``include_optimizer`` (and a compiled model) the file also holds
        the training state: the loss, the metrics given by name or as
        fastrnn metric objects, the gradient clipping, and the optimizer's
        hyper-parameters, moments, step counts and attached schedules. The
        random states (each layer's dropout generator and the model's
        shuffling generator) are saved either way. ``fastrnn.load`` then
        gives a compiled model, and ``fit(..., initial_epoch=k)`` goes on
        exactly as an uninterrupted run would (same kernel build and thread
        count). Metric functions and loss subclasses of your own are code,
        which a file never holds: compile the loaded model again with them
        and ``optimizer=model.optimizer`` to keep its state.

        In a ``.safetensors`` file the optimizer's arrays are tensors named
        ``optimizer/...``, which PyTorch's strict ``load_state_dict`` would
        refuse as unexpected keys: save with ``include_optimizer=False`` for
        a file that loads straight into an ``nn.Sequential``.

        No pickle: loading cannot run code. Written to a temporary file of
        a short random name beside the target (so any name the target may
        have fits) and renamed over it, so an existing file is replaced whole
        or not at all.

        Parameters
        ----------
        path : str or os.PathLike
        include_optimizer : bool, default True

        Raises
        ------
        TypeError
            If a layer is of a class the file cannot rebuild (your own).
        ValueError
            If the optimizer also trains modules outside this model (its
            state could not be restored): save with include_optimizer=False.

        Notes
        -----
        A ``Reversed`` or ``Stateful`` wrapper is saved as its options and
        the wrapped layer (whose weights keep the layer's names,
        ``0.weight_ih_l0``); a ``Stateful``'s carried state is not saved, so
        the loaded one starts from zeros.
        """
        v.check_path("Sequential.save", "path", path)
        include_optimizer = v.check_bool("Sequential.save", "include_optimizer",
                                         include_optimizer)
        holders = {}   # id of a layer with parameters (inside any wrappers) -> index
        for i, layer in enumerate(self.layers):
            reason = _saving.unsavable(layer)
            if reason is not None:
                raise TypeError(f"Sequential.save: layers[{i}] is {reason}; save its "
                                f"state_dict() instead")
            inner = _recurrent(layer)
            first = holders.setdefault(id(inner), i) if inner._trainable else i
            if first < i:
                # the file would load two layers, trained apart from then on
                raise TypeError(f"Sequential.save: layers[{i}] holds the "
                                f"{type(inner).__name__} of layers[{first}] (one layer used "
                                f"twice), which a model file cannot tie; save the "
                                f"state_dict() instead")
        _saving.save_model(self, path, include_optimizer=include_optimizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sequential:
        """Rebuild a model saved with ``save`` (see ``fastrnn.load``).

        Raises
        ------
        ValueError
            If the file is not a valid fastrnn model file, or holds a single
            layer rather than a Sequential.
        """
        model = _saving.load(v.check_path("Sequential.load", "path", path), cls)
        if not isinstance(model, cls):
            raise ValueError(f"Sequential.load: {os.fspath(path)!r} holds a single "
                             f"{type(model).__name__}, not a Sequential; use fastrnn.load")
        return model


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


# --- layers run with lengths ----------------------------------------------------------
def _train_with_lengths(layer, x, lengths):
    """A layer's training forward on padded batch-first sequences."""
    if isinstance(layer, _RNNBase):
        swap = not layer.batch_first
        (out, _), backprop = layer.forward_train(np.swapaxes(x, 0, 1) if swap else x,
                                                 lengths=lengths)

        def backprop_seq(dy):
            dx, _ = backprop(np.swapaxes(dy, 0, 1) if swap else dy)
            return np.swapaxes(dx, 0, 1) if swap else dx

        return (np.swapaxes(out, 0, 1) if swap else out), backprop_seq
    if isinstance(layer, LastStep):
        return layer._seq_train(x, lengths)
    if getattr(layer, "_takes_lengths", False):    # fastrnn.wrappers
        return layer._seq_train(x, lengths=lengths)
    return layer._seq_train(x)


def _infer_with_lengths(layer, x, lengths):
    if isinstance(layer, _RNNBase):
        if layer.batch_first:
            return layer(x, lengths=lengths)[0]
        return np.ascontiguousarray(layer(np.swapaxes(x, 0, 1), lengths=lengths)[0]
                                    .swapaxes(0, 1))
    if isinstance(layer, LastStep):
        return layer._seq_infer(x, lengths)
    if getattr(layer, "_takes_lengths", False):    # fastrnn.wrappers
        return layer._seq_infer(x, lengths=lengths)
    return layer._seq_infer(x)


def _release_training_buffers(layers):
    released = 0
    for layer in map(_recurrent, layers):      # (the layer inside any wrappers)
        if getattr(layer, "_lends_buffers", False):
            released += _training_buffers.release(layer)
    if released >= _engine.TRIM_AFTER_BYTES:
        _engine.trim_heap()


@contextlib.contextmanager
def _naming_batch(owner, iterable, name, step):
    """A ValueError of an iterable's batch (its targets' shape against the
    output, say) says which batch it was: the loss's own message named
    none, and the first batches had passed (a subclass of ValueError keeps
    its type, the batch in a note; a message that names it is left)."""
    try:
        yield
    except ValueError as error:
        where = f"batch {step} of {name}"
        if not iterable or where in str(error) or f"{name} batch {step}" in str(error):
            raise
        if type(error) is not ValueError:   # (its own type kept, for an except of it)
            error.add_note(f"{owner}: in {where}")
            raise
        raise ValueError(f"{owner}: in {where}: {error}") from error


def _permutation(rng, n):
    """rng.permutation(n), the same order, in int32 where n allows (half the
    memory: 400 MB a pass at 1e8 samples, not 800)."""
    if n >= 2**31:
        return rng.permutation(n)
    order = np.arange(n, dtype=np.int32)
    rng.shuffle(order)
    return order


def _parameter_views(layer):
    params = getattr(layer, "_params", None)
    return [] if params is None else list(params.views.values())


def _batch_sizes(n, batch_size, steps, passes):
    """The sizes of the batches of ``batch_size`` drawn from n samples,
    ``steps`` a pass (None: all) over ``passes`` passes that go on from one
    to the next (fit's epochs of steps_per_epoch)."""
    sizes = {min(batch_size, n)}
    if n > batch_size and n % batch_size and (
            steps is None or steps * passes >= -(-n // batch_size)):
        sizes.add(n % batch_size)
    return sizes


# --- losses over batches -----------------------------------------------------------------
def _reduce(reduction, total, count, grad):
    """The batch's value and the gradient of it."""
    if reduction == "sum":
        return total, grad
    if count == 0:
        return 0.0, np.zeros_like(grad)
    return total / count, grad * grad.dtype.type(1.0 / count)


class _LossMean:
    """An epoch's (or evaluation's) loss from its batches: for 'mean', the
    sum of the values over the sum of the counts (what one batch of all the
    data would give); for 'sum', the batches' sums averaged by their samples
    (Keras' rule)."""

    def __init__(self, reduction):
        self.reduction = reduction
        self.total = self.count = 0.0
        self.batches = 0

    def add(self, total, count, samples):
        self.batches += 1
        if self.reduction == "sum":
            self.total += total * samples
            self.count += samples
        else:
            self.total += total
            self.count += count

    def result(self):
        return self.total / self.count if self.count else 0.0


# --- class weights -------------------------------------------------------------------------
def _class_weight_table(owner, class_weight, dtype):
    if not isinstance(class_weight, Mapping):
        raise TypeError(f"{owner}: class_weight must be a dict of class index to weight, got "
                        f"{type(class_weight).__name__}")
    if not class_weight:
        raise ValueError(f"{owner}: class_weight is empty")
    for key, weight in class_weight.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral):
            raise TypeError(f"{owner}: class_weight's keys must be int class indices, got "
                            f"{key!r}")
        if not 0 <= key < 2**63:
            raise ValueError(f"{owner}: class_weight's keys must be class indices in "
                             f"[0, 2**63), got {key}")
        if isinstance(weight, (bool, np.bool_)) or not isinstance(weight, numbers.Real):
            raise TypeError(f"{owner}: class_weight[{key}] must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"{owner}: class_weight[{key}] must be finite, got {weight}")
        if abs(weight) > float(np.finfo(dtype).max):   # (the loss casts the weights to it)
            raise ValueError(f"{owner}: class_weight[{key}] is {weight:g}, beyond "
                             f"{dtype.name}'s range (the model's dtype: at most "
                             f"{np.finfo(dtype).max:g})")
    # (classes, their weights), the classes sorted: a dense table of
    # max(class) + 1 weights took 76 MB for a class 10**7
    classes = np.array(sorted(int(key) for key in class_weight), np.int64)
    return classes, np.array([float(class_weight[key]) for key in classes.tolist()])


def _class_weights(table, y, loss):
    """Per-sample (or, for integer per-step targets of a cross-entropy, per
    step) weights: Keras' class_weight_to_sample_weights."""
    if isinstance(loss, CrossEntropyLoss) and y.dtype.kind in "iu":
        labels = y.astype(np.int64)
    else:
        if y.ndim > 2:
            raise ValueError(f"Sequential.fit: class_weight needs targets of shape (N,), (N, 1) "
                             f"or one-hot (N, C) (or integer per-step targets with a "
                             f"cross-entropy loss), got {shape_str(y.shape)}")
        if y.ndim == 2:
            y = y.argmax(axis=-1) if y.shape[1] != 1 else y[:, 0]
        labels = np.round(y).astype(np.int64)
    classes, weights = table
    at = np.minimum(np.searchsorted(classes, labels), len(classes) - 1)
    return np.where(classes[at] == labels, weights[at], 1.0)   # (other classes: 1)


def save(obj: Any, path: str | os.PathLike, include_optimizer: bool = True) -> None:
    """Save a Sequential, or a single layer or cell, to one file.

    The path's extension chooses the format. A path ending in
    ``.safetensors`` (any case) gets a safetensors file: the weights as
    tensors under PyTorch's names (a single layer's exactly as its
    ``state_dict``, ``weight_ih_l0``...; a Sequential's as ``nn.Sequential``'s,
    ``0.weight_ih_l0``...), the optimizer's arrays as tensors under
    ``optimizer/``, and in the header's ``__metadata__`` the model's JSON
    description (key ``'fastrnn'``) and ``'format': 'pt'``. So
    ``safetensors.torch.load_file(path)`` of a single layer's file is a
    ``state_dict`` the PyTorch module loads with ``strict=True``. Any other
    path, whatever its extension, gets the ``.npz`` format (a zip of
    ``.npy`` arrays and the JSON), under exactly the name given. Both hold
    the same content and ``fastrnn.load`` reads either, whatever the name.

    Parameters
    ----------
    obj : Sequential, layer or cell
        Any fastrnn layer (RNN, GRU, LSTM, Linear, Dropout, LastStep, the
        activations, Embedding, Masking, ZeroMasked, MergeDirections), a
        ``Reversed`` or ``Stateful`` of a recurrent layer (its options, not
        a Stateful's carried state), or cell (RNNCell, GRUCell, LSTMCell).
    path : str or os.PathLike
    include_optimizer : bool, default True
        For a Sequential: see ``Sequential.save``.

    Raises
    ------
    TypeError
        If obj is neither a Sequential nor a fastrnn layer or cell.
    """
    v.check_path("fastrnn.save", "path", path)
    if isinstance(obj, Sequential):
        obj.save(path, include_optimizer=include_optimizer)
    else:
        _saving.save_layer(obj, path)


def load(path: str | os.PathLike) -> Any:
    """Load what ``save`` wrote: a Sequential (compiled if saved with its
    optimizer), or a single layer or cell.

    The content chooses the format, not the name: a zip is read as
    ``.npz``; any other file as safetensors if its name ends in
    ``.safetensors`` or it starts as one (a header length, then JSON). A safetensors file
    without fastrnn's description (as PyTorch's ``save_file`` writes) is
    refused with a pointer to ``load_state_dict_file``.

    Safe on untrusted files: nothing in a file can run code, and no file can
    make loading allocate or read more than what it really holds. A
    safetensors file's header (at most 8 MiB, JSON nested at most 3 deep,
    ``__metadata__`` values strings) is checked first: each tensor's dtype
    is one safetensors defines (F32 or F64 here), its shape's bytes are
    exactly its byte span, and the spans cover the data without overlap or
    gap. The file is then memory-mapped and each tensor copied once into
    the parameters. An ``.npz``'s checks: the loader reads the zip directory (at most
    10,000 members and 2 MiB of directory; only stored or deflated members,
    none inflating more than 100 times its compressed size), the header of
    every array (its shape and dtype must account for its member's bytes
    exactly), and the JSON configuration (at most 1,048,576 characters), and
    checks every layer's configuration against the arrays: their number,
    names, shapes and total count of values must be what the layer would
    create; the optimizer's arrays must be those its configuration keeps, of
    their parameters' shapes and dtype. Only then are the layers built and
    the arrays read, a bounded chunk at a time.

    Loading takes time linear in the file's size, and memory at most about
    four times the size of the arrays the file holds (no more than 100 times
    compressed) plus about 30 MiB.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    Sequential, layer or cell

    Raises
    ------
    FileNotFoundError, PermissionError
        If the file cannot be opened.
    ValueError
        For anything that is not a complete, consistent fastrnn model file,
        with a message naming what is wrong.
    """
    return _saving.load(v.check_path("fastrnn.load", "path", path), Sequential)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file as a state dict, for
    ``load_state_dict``: how a file PyTorch wrote loads here.

    ``safetensors.torch.save_file(torch_lstm.state_dict(), path)`` then
    ``fastrnn.LSTM(...).load_state_dict(fastrnn.load_state_dict_file(path))``
    (the layer's configuration must match the module's: the file holds
    only tensors). Needs no ``safetensors`` package, and checks the file as
    ``load`` does (header, dtypes, shapes against byte spans) before
    mapping it.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict of str to ndarray
        In the file's order. Arrays of their own, copied from the
        memory-mapped file (a file written over it later changes none of
        them), BF16 tensors converted to float32. Of a
        fastrnn model file, the weights only (its ``optimizer/`` tensors and
        ``pytorch_cannot_compute`` notes are left out), so a Sequential's
        file loads into a Sequential.

    Raises
    ------
    FileNotFoundError, PermissionError
        If the file cannot be opened.
    ValueError
        If it is not a valid safetensors file, or holds a dtype numpy does
        not represent (the float8 types), with a message naming the problem.
    """
    return _saving.read_state_dict(v.check_path("fastrnn.load_state_dict_file", "path", path))
