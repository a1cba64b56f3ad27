"""What layers and cells share: read-only configuration, named parameters
under PyTorch's names, state_dict / load_state_dict, and the weight storage
the kernels read.

Parameters live in flat storage arrays (for a recurrent layer one per layer
and kind, both directions stacked: the layout the kernels want); the public
arrays are read-only views of them. A module's parameters form one
``ParamSet`` that is never written once made: ``load_state_dict``, attribute
assignment and optimizer steps build a new set from copies and swap it in
whole, and every call takes the current set once and computes with it alone.
So a call never sees a half-loaded or half-updated set, whatever other
threads do meanwhile, no caller's array is ever aliased, and a failed load
leaves the module unchanged.
"""
from __future__ import annotations

import contextlib
import os
from collections import namedtuple
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike

from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward
from fastrnn import _parallel, _plan
from fastrnn import _validation as v
from fastrnn._locks import ForkSafeLock
from fastrnn._validation import shape_str, to_numpy

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])

# kernel code, gate blocks G, and activations saved per step (in units of H;
# must match _gates.num_saved) of each cell kind
CELL_KINDS = {
    "rnn_tanh": (_forward.CELL_RNN_TANH, 1, 1),
    "rnn_relu": (_forward.CELL_RNN_RELU, 1, 1),
    "gru": (_forward.CELL_GRU, 3, 4),
    "gru_reset_before": (_forward.CELL_GRU_RESET_BEFORE, 3, 4),
    "lstm": (_forward.CELL_LSTM, 4, 4),
}


RESET_AFTER_DOC = """
    reset_after : bool, default True
        Where the reset gate acts. True: on W_hn h + b_hn, as PyTorch, Keras'
        default and ONNX ``linear_before_reset=1``. False: on h before the
        product, n = tanh(W_in x + b_in + W_hn (r * h) + b_hn), as Keras'
        ``reset_after=False`` and ONNX's default ``linear_before_reset=0``
        (no PyTorch equivalent). Keyword only, after PyTorch's arguments."""


def gru_kind(owner, reset_after):
    """The checked reset_after flag of a GRU and its CELL_KINDS key."""
    flag = v.check_bool(owner, "reset_after", reset_after)
    return flag, ("gru" if flag else "gru_reset_before")


class ParamSet:
    """One set of a module's parameters, read-only for good.

    ``storages`` the flat storage arrays, ``views`` name -> read-only view of
    its part of a storage, ``version`` counts the sets the module has had,
    ``cache`` holds what the kernels derive from this set (transposed
    weights, folded biases, runners): it can never go stale, since the set
    never changes.
    """
    __slots__ = ("version", "storages", "views", "cache")

    def __init__(self, version, storages, names):
        for storage in storages:
            storage.flags.writeable = False
        self.version = version
        self.storages = tuple(storages)
        self.views = {name: (self.storages[i] if rows is None else self.storages[i][rows])
                      for name, (i, rows) in names.items()}
        self.cache = {}


class Module:
    """Base of every public class: configuration and named parameters.

    A subclass's constructor adds its storage arrays (``_add_storage``),
    names the parameters in them (``_register``), initialises them, then
    calls ``_seal_parameters`` to make them the first ParamSet.
    """

    def __init__(self):
        # set through object: our __setattr__ reads these
        object.__setattr__(self, "_config", {})
        object.__setattr__(self, "_names", {})    # name -> (storage index, rows or None)
        self._draft = []                          # storages under construction
        self._params = None                       # the current ParamSet
        self._trainable = ()                      # the gradient of each storage
        self._grads = MappingProxyType({})
        # guards the gradients (backprop adds, clipping scales, zero_grad)
        # and the swap of parameter sets (loads and optimizer steps)
        self._grad_lock = ForkSafeLock()

    # --- configuration and parameters as attributes -------------------------
    def __getattr__(self, name):
        # only reached when ordinary lookup fails
        d = self.__dict__
        if name in d.get("_names", ()) and d.get("_params") is not None:
            return d["_params"].views[name]
        if name in d.get("_config", ()):
            return d["_config"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in self._config:
            raise AttributeError(f"{type(self).__name__}: {name} is fixed at construction; "
                                 f"create a new {type(self).__name__} to change it")
        if name in self._names:
            self.load_state_dict({name: value}, strict=False)
            return
        object.__setattr__(self, name, value)

    def _add_storage(self, storage, grad):
        """A storage array being built, with its gradient; returns its index."""
        self._draft.append(storage)
        self._trainable = self._trainable + (grad,)
        return len(self._draft) - 1

    def _register(self, name, index, rows=None):
        """Name rows ``rows`` (a slice, or None for all) of storage ``index``."""
        self._names[name] = (index, rows)

    def _seal_parameters(self):
        """The initialised storages become the first parameter set."""
        self._params = ParamSet(0, self._draft, self._names)
        del self._draft

    @property
    def _version(self):
        return self._params.version

    def _swap_parameters(self, update):
        """Build the next parameter set: ``update(storages)`` writes into
        fresh copies of the current storages, which then replace them whole.
        The caller holds ``_grad_lock`` (one update at a time)."""
        current = self._params
        storages = [s.copy() for s in current.storages]
        update(storages)
        self._params = ParamSet(current.version + 1, storages, self._names)

    @property
    def grads(self) -> Mapping[str, np.ndarray]:
        """Accumulated gradients: same names and shapes as ``state_dict()``.

        A read-only mapping of writeable arrays: backprop adds into them,
        ``zero_grad()`` clears them, and gradient clipping may scale them.
        """
        return self._grads

    def zero_grad(self) -> None:
        """Set every accumulated gradient to zero."""
        with self._grad_lock:
            for grad in self._trainable:
                grad[...] = 0

    # --- state dict ---------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter, under PyTorch's names, in PyTorch's order.

        Returns
        -------
        dict of str to ndarray
            Independent copies: changing them does not change the module.
        """
        return {name: view.copy() for name, view in self._params.views.items()}

    def load_state_dict(self, state_dict: Mapping[str, ArrayLike],
                        strict: bool = True) -> LoadResult:
        """Copy parameters in from a mapping of name to array.

        Accepts numpy arrays, torch tensors (a PyTorch module's ``state_dict()``
        loads directly) or anything array-like of a real dtype; values are
        converted to the module's dtype. Every name, shape and value is checked
        before anything is copied, so on error the module is unchanged. The
        new values replace the old as one set: a call running in another
        thread meanwhile computes with the old set or the new, never a mix.

        Parameters
        ----------
        state_dict : mapping of str to array-like
        strict : bool, default True
            If True, the names must match exactly. If False, missing names keep
            their current values and unexpected names are ignored.

        Returns
        -------
        LoadResult
            Named tuple ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        TypeError
            If ``state_dict`` is not a mapping or a value is not a real array.
        ValueError
            On a missing or unexpected name (strict), a wrong shape, or a
            non-finite value.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: load_state_dict expects a mapping of name to array, "
                            f"got {type(state_dict).__name__}")
        names = self._names
        missing = [name for name in names if name not in state_dict]
        unexpected = [key for key in state_dict if key not in names]
        if strict and (missing or unexpected):
            raise ValueError(f"{owner}: load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected exactly "
                             f"{list(names)}")
        converted = {}
        views = self._params.views
        for name in names:
            if name not in state_dict:
                continue
            value = to_numpy(owner, f"state_dict[{name!r}]", state_dict[name])
            expected = views[name].shape
            if value.shape != expected:
                raise ValueError(f"{owner}: expected {name} of shape {shape_str(expected)}, "
                                 f"got {shape_str(value.shape)}")
            with np.errstate(over="ignore"):  # overflow is reported just below
                value = value.astype(self.dtype)
            if not np.isfinite(value).all():
                raise ValueError(f"{owner}: {name} has non-finite values (NaN or inf) "
                                 f"after conversion to {self.dtype}")
            converted[name] = value

        def write(storages):
            for name, value in converted.items():
                index, rows = names[name]
                storages[index][slice(None) if rows is None else rows] = value

        with self._grad_lock:
            self._swap_parameters(write)
        return LoadResult(missing, unexpected)

    def save(self, path: str | os.PathLike) -> None:
        """Write this layer or cell to one file (``.safetensors`` for a path
        ending so, else ``.npz``): its configuration, weights and random
        state (no pickle); ``fastrnn.load`` rebuilds it. See ``fastrnn.save``."""
        from fastrnn.model import save   # fastrnn.model imports this module
        save(self, path)

    def __reduce__(self):
        """Pickle as constructor arguments, parameters and random state, so
        that the copy rebuilds its storage and behaves identically
        (accumulated gradients are not kept)."""
        config = {k: (val.name if isinstance(val, np.dtype) else val)
                  for k, val in self._config.items()}
        return _rebuild, (type(self), config, self.state_dict(), getattr(self, "_rng", None))

    def __repr__(self):
        cfg = self._config
        args = [str(cfg["input_size"]), str(cfg["hidden_size"])]
        options = self._repr_options()
        if cfg.get("reset_after") is False:   # the GRUs' non-default form
            options.append(("reset_after", False))
        args += [f"{k}={v!r}" for k, v in options]
        return f"{type(self).__name__}({', '.join(args)})"

    def _repr_options(self):
        return []


def _rebuild(cls, config, state_dict, rng):
    module = cls(**config)
    module.load_state_dict(state_dict)
    if rng is not None:
        module._rng = rng
    return module


class RecurrentWeights(Module):
    """Weights, gradients and the kernel drivers of a stack of recurrent layers.

    ``layers`` x ``dirs`` blocks of (W_ih, W_hh, b_ih, b_hh), each kind stacked
    over directions in one (dirs * G * H, ...) array per layer: the input
    projection of both directions is then one GEMM. Gradients have the same
    layout and names.
    """

    def _build(self, kind, input_size, hidden_size, layers, dirs, bias, dtype, rng, names,
               dropout=0.0):
        """Allocate, register under ``names(layer, direction)`` and initialise."""
        self._kernel_code, self._gates, self._saved = CELL_KINDS[kind]
        gates = self._gates
        owner = type(self).__name__
        if dirs * gates * hidden_size > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: hidden_size {hidden_size} is too large: "
                             f"{dirs} x {gates} x hidden_size must fit a 32-bit BLAS int")
        if input_size > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: input_size {input_size} is too large for a 32-bit BLAS int")
        self._layers, self._dirs, self._dropout, self._rng = layers, dirs, dropout, rng
        GH = gates * hidden_size
        kinds = ("w_ih", "w_hh", "b_ih", "b_hh")
        # storage index of each kind and layer (None: no bias)
        index = {key: [None] * layers for key in kinds}
        grads = {key: [None] * layers for key in kinds}
        for key in kinds:
            if key.startswith("b") and not bias:
                continue
            for k in range(layers):
                in_size = input_size if k == 0 else dirs * hidden_size
                shape = {"w_ih": (dirs * GH, in_size), "w_hh": (dirs * GH, hidden_size),
                         "b_ih": (dirs * GH,), "b_hh": (dirs * GH,)}[key]
                grads[key][k] = np.zeros(shape, dtype)
                index[key][k] = self._add_storage(np.empty(shape, dtype), grads[key][k])
        grad_views = {}
        for k in range(layers):
            for d in range(dirs):
                rows = slice(d * GH, (d + 1) * GH)
                for key, name in zip(kinds, names(k, d)):
                    if index[key][k] is not None:
                        self._register(name, index[key][k], rows)
                        grad_views[name] = grads[key][k][rows]
        self._storage_index = tuple(index[key] for key in kinds)
        self._dw_ih, self._dw_hh, self._db_ih, self._db_hh = (grads[key] for key in kinds)
        self._grads = MappingProxyType(grad_views)
        # PyTorch's reset_parameters: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))
        bound = 1.0 / np.sqrt(hidden_size)
        for i, rows in self._names.values():
            part = self._draft[i][rows]
            part[...] = rng.uniform(-bound, bound, size=part.shape)
        self._seal_parameters()

    def _weights(self, params):
        """(w_ih, w_hh, b_ih, b_hh) of a parameter set: per kind a list over
        layers of its storage arrays, (dirs * G * H, ...) each (None: no bias)."""
        cached = params.cache.get("weights")
        if cached is None:
            cached = params.cache["weights"] = tuple(
                [None if i is None else params.storages[i] for i in per_layer]
                for per_layer in self._storage_index)
        return cached

    def _kernel_weights(self, params):
        """Per layer (bias_x, bias_h, w_hh_t) as the forward kernel takes them:
        the bias added to the input projection, the GRU's recurrent bias (other
        cells, the reset-before GRU too, fold b_hh into bias_x), and W_hh
        transposed to (H, dirs * G * H). Derived from a parameter set, kept
        with it."""
        terms = params.cache.get("kernel")
        if terms is None:
            terms = []
            _, w_hh_all, b_ih_all, b_hh_all = self._weights(params)
            for b_ih, b_hh, w_hh in zip(b_ih_all, b_hh_all, w_hh_all):
                w_hh_t = np.ascontiguousarray(w_hh.T)
                if b_ih is None:
                    terms.append((None, None, w_hh_t))
                elif self._kernel_code == _forward.CELL_GRU:
                    terms.append((b_ih, b_hh, w_hh_t))
                else:
                    terms.append((b_ih + b_hh, None, w_hh_t))
            params.cache["kernel"] = terms
        return terms

    def _recur_units(self, params, k, T, units, h_k, c_k, gx, layer_out):
        """Layer k at batch 1 with its hidden units split at units[1] between
        this thread and the worker; False if the worker was busy."""
        dtype = self._config["dtype"]
        per_unit = 2 * self._gates + self._saved
        # one buffer, the parts' work areas a cache line apart (no false sharing)
        gap = 64 // np.dtype(dtype).itemsize
        work = np.empty(per_unit * units[2] + gap, dtype)
        args = {}
        for part in (0, 1):
            lo, hi = units[part], units[part + 1]
            w_part, w_part_t, bias_part = self._unit_weights(params, k, lo, hi)
            start = per_unit * lo + part * gap
            args.update({f"w_part{part}": w_part, f"w_part_t{part}": w_part_t,
                         f"bias_part{part}": bias_part,
                         f"work{part}": work[start:start + per_unit * (hi - lo)]})
        packed = self._packed_recurrent(params)
        outcome = _forward.recur_units(cell=self._kernel_code, T=T, mid=units[1], h=h_k,
                                       c=c_k, gx=gx, out=layer_out,
                                       wait_ns=_plan.UNIT_SPLIT_WAIT_NS,
                                       packed=None if packed is None else packed[k], **args)
        if outcome == 2:
            _plan.unit_split_contended()
        return outcome != 0

    def _packed(self, params, key, pack):
        """float32: ``pack(w_ih, w_hh)`` for every layer, packed for the
        micro-kernel once and kept with the parameter set under ``key``;
        float64 (whose products BLAS runs): None."""
        if self._config["dtype"] != np.float32:
            return None
        packs = params.cache.get(key)
        if packs is None:
            w_ih_all, w_hh_all = self._weights(params)[:2]
            packs = params.cache[key] = [pack(w_ih, w_hh) for w_ih, w_hh in zip(w_ih_all,
                                                                                 w_hh_all)]
        return packs

    def _packed_recurrent(self, params):
        """Per layer, W_hh packed for the per-step products (_forward.pack_recurrent)."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_hh", lambda w_ih, w_hh: _forward.pack_recurrent(
            w_hh, self._kernel_code, H, self._dirs))

    def _packed_projection(self, params):
        """Per layer, W_ih packed per direction for the input projection
        (_forward.pack_projection)."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_ih", lambda w_ih, w_hh: _forward.pack_projection(
            w_ih, self._kernel_code, H, self._dirs))

    def _packed_backward(self, params):
        """Per layer, (W_hh packed for dG . W_hh (_backward.pack_backward),
        W_ih packed for dx = dG . W_ih (_backward.pack_rows))."""
        H = self._config["hidden_size"]
        return self._packed(params, "packed_backward", lambda w_ih, w_hh: (
            _backward.pack_backward(w_hh, self._kernel_code, H, self._dirs),
            _backward.pack_rows(w_ih, 0, w_ih.shape[0])))

    def _unit_weights(self, params, k, lo, hi):
        """Layer k's recurrent weights for hidden units [lo, hi) of a
        unit-split call (_forward.recur_units): the rows of every gate block,
        packed (G * u, H), their transpose, and the GRU's recurrent bias
        likewise (else None). Kept with the parameter set."""
        key = ("units", k, lo, hi)
        if key not in params.cache:
            H = self._config["hidden_size"]
            rows = np.concatenate([np.arange(g * H + lo, g * H + hi) for g in range(self._gates)])
            w_part = np.ascontiguousarray(self._weights(params)[1][k][rows])
            bias_h = self._kernel_weights(params)[k][1]
            params.cache[key] = (w_part, np.ascontiguousarray(w_part.T),
                                 None if bias_h is None else np.ascontiguousarray(bias_h[rows]))
        return params.cache[key]

    def _run(self, params, x, T, B, batch_first, h_n, c_n, out, lengths, train=False):
        """Run every layer with the parameter set ``params`` (the caller took
        it once: ``self._params``); x is (T, B, D) or (B, T, D) C-contiguous.

        Returns None, or in training the tape backward needs: the row order and,
        per layer, its input, the saved activations and states, the dropout mask
        applied to its output. Long unidirectional inference runs in time
        windows (_run_windows).
        """
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        dirs = self._dirs
        plan = _plan.forward_plan(self, T, B, batch_first=batch_first, train=train,
                                  has_lengths=lengths is not None)
        if plan.time_major:
            # the per-step GEMM would need a leading dimension T * N beyond the
            # BLAS int range: run time-major and lay the output out at the end
            out_tm = np.empty((T, B, dirs * H), dtype)
            tape = self._run(params, np.ascontiguousarray(x.transpose(1, 0, 2)), T, B, False,
                             h_n, c_n, out_tm, lengths, train)
            out[...] = out_tm.transpose(1, 0, 2)
            return tape
        if plan.window is not None:
            self._run_windows(params, x, T, B, batch_first, h_n, c_n, out, lengths, plan.window)
            return None
        rows = T * B
        gx = np.empty((rows, dirs * self._gates * H), dtype)
        gh = (np.empty((dirs, B * self._gates * H), dtype)
              if self._kernel_code == _forward.CELL_GRU else None)
        units = plan.units if plan.units is not None and _plan.unit_split_allowed() else None
        layer_in = x.reshape(rows, -1)
        if train and lengths is not None:
            # padding never reaches results; zero it so that it cannot reach the
            # weight gradients either (0 * NaN is NaN)
            layer_in = layer_in.copy()
            layer_in.reshape(x.shape)[_padding_mask(T, B, batch_first, lengths)] = 0
        tape = ({"params": params, "batch_first": batch_first, "lengths": lengths, "layers": []}
                if train else None)
        with _parallel.blas_at_one_thread if plan.hold_blas else contextlib.nullcontext():
            held = plan.hold_blas and _parallel.blas_at_one_thread.held
            if plan.hold_blas and not held:   # the parts' per-step gemv must not be threaded
                units = None
            self._run_layers(params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train,
                             gx, gh, plan.parts, held, tape, units)
        return tape

    def _run_windows(self, params, x, T, B, batch_first, h_n, c_n, out, lengths, window):
        """Inference of a unidirectional stack over time windows, the state
        carried from one to the next (h_n, c_n are updated in place): the
        same numbers, and memory for the input projections and the layers
        between bounded by the window, not the sequence."""
        for t0 in range(0, T, window):
            t1 = min(T, t0 + window)
            if batch_first:
                x_w = np.ascontiguousarray(x[:, t0:t1])
                out_w = np.empty((B, t1 - t0, out.shape[2]), out.dtype)
            else:
                x_w, out_w = x[t0:t1], out[t0:t1]
            # a sequence already ended is inactive for the whole window
            len_w = None if lengths is None else np.clip(lengths - t0, 0, t1 - t0)
            self._run(params, x_w, t1 - t0, B, batch_first, h_n, c_n, out_w, len_w)
            if batch_first:
                out[:, t0:t1] = out_w

    def _run_layers(self, params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train,
                    gx, gh, parts, held, tape, units=None):
        """The layers of ``_run``, in the plan's parts, or with the hidden
        units split between two threads (``units``: the plan's bounds)."""
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        L, dirs = self._layers, self._dirs
        rows = T * B
        is_lstm = self._kernel_code == _forward.CELL_LSTM
        saved_cols = dirs * self._saved * H
        scratch = None if train else np.empty((B, saved_cols), dtype)  # inference activations
        spare = None
        w_ih_all, w_hh_all = self._weights(params)[:2]
        packed = self._packed_recurrent(params)
        packed_ih = self._packed_projection(params)
        for k, (bias_x, bias_h, w_hh_t) in enumerate(self._kernel_weights(params)):
            last = k == L - 1
            if last:
                layer_out = out.reshape(rows, -1)
            elif spare is not None:
                layer_out = spare
            else:
                layer_out = np.empty((rows, dirs * H), dtype)
            saves = {"acts": np.empty((rows, saved_cols), dtype) if train else scratch}
            if train:
                saves["h_prev"] = np.empty((rows, dirs * H), dtype)
                saves["c_prev"] = np.empty((rows, dirs * H), dtype) if is_lstm else None
            _forward.project(x=layer_in, w_ih=w_ih_all[k], bias_x=bias_x, gx=gx,
                             max_rows=v.BLAS_INT_MAX, parts=_plan.halves(rows, parts),
                             packed=None if packed_ih is None else packed_ih[k], hidden_size=H)
            h_k = h_n[k * dirs:(k + 1) * dirs]
            c_k = None if c_n is None else c_n[k * dirs:(k + 1) * dirs]

            if units is None or not self._recur_units(params, k, T, units, h_k, c_k, gx,
                                                      layer_out):
                _forward.recur(
                    cell=self._kernel_code, T=T, batch_first=batch_first, parts=parts,
                    w_hh=w_hh_all[k], w_hh_t=w_hh_t, bias_h=bias_h, h=h_k, c=c_k,
                    gx=gx, gh=gh, out=layer_out, lengths=lengths, acts=saves["acts"],
                    train=train, h_prev=saves.get("h_prev"), c_prev=saves.get("c_prev"),
                    blas_held=held, packed=None if packed is None else packed[k])
            if train:
                saves["x"] = layer_in
                saves["mask"] = None
                if not last and self._dropout > 0:
                    saves["mask"] = dropout_mask(self._rng, layer_out.shape, self._dropout, dtype)
                    layer_out = layer_out * saves["mask"]
                tape["layers"].append(saves)
                spare = None   # every layer input is kept for backward
            else:
                # the buffer this layer read becomes the next one's output
                spare = layer_in if k > 0 else None
            layer_in = layer_out

    def _bptt(self, tape, T, B, dout, dh, dc):
        """BPTT through every layer of a tape from ``_run(train=True)``.

        dout (R, dirs * H) the gradient of the top layer's output in the tape's
        row order; dh, dc (layers * dirs, B, H) the gradients of the final
        states, updated in place into those of the initial states. Adds the
        parameter gradients into ``grads`` and returns dx (R, D).
        """
        dtype, H = self._config["dtype"], self._config["hidden_size"]
        rows, N = T * B, self._dirs * self._gates * H
        dgx = np.empty((rows, N), dtype)
        dgh = np.empty((rows, N), dtype) if self._kernel_code == _forward.CELL_GRU else None
        reset_before = self._kernel_code == _forward.CELL_GRU_RESET_BEFORE
        plan = _plan.backward_plan(self, T, B)
        parts, hold = plan.parts, plan.hold_blas
        w_ih_all, w_hh_all = self._weights(tape["params"])[:2]
        packed = self._packed_backward(tape["params"])
        # the weight gradients of this backprop, added to ``grads`` only when
        # every layer is done: an interrupted backprop (Ctrl-C) adds nothing
        sums = [[None if g is None else np.zeros_like(g) for g in kind]
                for kind in (self._dw_ih, self._dw_hh, self._db_ih, self._db_hh)]
        with _parallel.blas_at_one_thread if hold else contextlib.nullcontext():
            held = hold and _parallel.blas_at_one_thread.held
            for k in reversed(range(self._layers)):
                dout = self._bptt_layer(k, tape, T, B, dout, dh, dc, dgx, dgh, parts, held,
                                        reset_before, w_ih_all[k], w_hh_all[k],
                                        [kind[k] for kind in sums],
                                        None if packed is None else packed[k])
        with self._grad_lock:
            for kind, grads in zip(sums, (self._dw_ih, self._dw_hh, self._db_ih, self._db_hh)):
                for total, grad in zip(kind, grads):
                    if grad is not None:
                        grad += total
        return dout

    def _bptt_layer(self, k, tape, T, B, dout, dh, dc, dgx, dgh, parts, held, reset_before,
                    w_ih, w_hh, sums, packed=None):
        """Layer k of ``_bptt`` (its weights of the tape's parameter set
        w_ih, w_hh): the backward time loops, then the weight gradients
        (into ``sums``: dw_ih, dw_hh, db_ih, db_hh) and the input gradient,
        each in the plan's parts."""
        dirs, rows = self._dirs, T * B
        saves = tape["layers"][k]
        if k < self._layers - 1 and saves["mask"] is not None:
            dout = dout * saves["mask"]

        _backward.backward_layer(
            cell=self._kernel_code, T=T, batch_first=tape["batch_first"], parts=parts,
            acts=saves["acts"], h_prev=saves["h_prev"], c_prev=saves["c_prev"],
            w_hh=w_hh, dout=dout,
            dh=dh[k * dirs:(k + 1) * dirs],
            dc=None if dc is None else dc[k * dirs:(k + 1) * dirs],
            dgx=dgx, dgh=dgh, lengths=tape["lengths"], blas_held=held,
            packed=None if packed is None else packed[0])
        activations = None
        if packed is not None:
            # the sums over rows run on the micro-kernel, the activations packed
            H = self._config["hidden_size"]
            S = self._saved * H
            activations = (
                _backward.pack_rows(saves["x"], 0, rows),
                [_backward.pack_rows(saves["h_prev"], 0, rows, d * H, H) for d in range(dirs)],
                [_backward.pack_rows(saves["acts"], 0, rows, d * S + 3 * H, H)
                 for d in range(dirs)] if reset_before else None)
        _backward.weight_grads(
            parts=_plan.halves(dgx.shape[1], parts), x=saves["x"],
            h_prev=saves["h_prev"], reset_acts=saves["acts"] if reset_before else None,
            dgx=dgx, dgh=dgh, dw_ih=sums[0], dw_hh=sums[1], db_ih=sums[2], db_hh=sums[3],
            max_rows=v.BLAS_INT_MAX, packed=activations)
        dx = np.empty((rows, w_ih.shape[1]), self._config["dtype"])
        _backward.input_grad(dgx=dgx, w_ih=w_ih, dx=dx, max_rows=v.BLAS_INT_MAX,
                             parts=_plan.halves(rows, parts),
                             packed=None if packed is None else packed[1])
        return dx


class Backprop:
    """The backward of one ``forward_train`` call of a layer.

    ``dx, dhx = backprop(dout, dstate=None)``; see ``forward_train``. It keeps
    its own saved tensors (never the arrays returned to the caller, who may
    change those), so several can be alive at once, and it can run once.
    """

    def __init__(self, module, call, tape):
        self._module = module
        self._tape = tape
        self._T, self._B, self._batched = call.T, call.B, call.batched
        self._batch_first = call.batch_first
        self._x_shape = call.x.shape if call.batched else (call.T, call.x.shape[-1])
        self._out_shape = call.out.shape if call.batched else (call.T, call.out.shape[-1])
        self._state_shape = call.h_n.shape if call.batched else (call.h_n.shape[0],
                                                                 call.h_n.shape[2])
        # the parameter set of the forward; None for an empty batch (no tape)
        self._params = None if tape is None else tape["params"]
        self._version = module._version if tape is None else self._params.version
        self._used = False
        self._lock = ForkSafeLock()

    def __call__(self, dout, dstate=None):
        module = self._module
        owner = f"{type(module).__name__}.backprop"
        cfg = module._config
        dtype, has_c = cfg["dtype"], module._kernel_code == _forward.CELL_LSTM
        dout = v.as_float_array(owner, "dout", dout, dtype)
        if dout.shape != self._out_shape:
            raise ValueError(f"{owner}: expected dout of the output's shape "
                             f"{shape_str(self._out_shape)}, got {shape_str(dout.shape)}")
        names = ("dh_n", "dc_n") if has_c else ("dh_n",)
        T, B = self._T, self._B
        full = (self._state_shape[0], B, self._state_shape[-1])
        grads = v.state_arrays(owner, "dstate", dstate, names, self._state_shape, dtype,
                               full_shape=full, optional_parts=True)
        dh, dc = grads[0], (grads[1] if has_c else None)
        with self._lock:
            if self._used:
                raise RuntimeError(f"{owner}: this backprop has already run; call "
                                   f"forward_train again for another backward pass")
            if module._version != self._version:
                raise RuntimeError(f"{owner}: the parameters changed after forward_train "
                                   f"(load_state_dict or an optimizer step); the saved "
                                   f"activations no longer match them")
            self._used = True
            tape, self._tape = self._tape, None  # free the saves when done
        if B == 0:
            dx = np.zeros(self._x_shape, dtype)
        else:
            if not self._batched:
                dout = dout[:, None, :]
            # to the tape's row order (it differs only on the huge batch-first route)
            tape_bf = tape["batch_first"]
            if tape_bf != self._batch_first:
                dout = dout.transpose(1, 0, 2)
            dx = module._bptt(tape, T, B, np.ascontiguousarray(dout).reshape(T * B, -1),
                                  dh, dc)
            dx = dx.reshape((B, T, -1) if tape_bf else (T, B, -1))
            if tape_bf != self._batch_first:
                dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
            dx = dx.reshape(self._x_shape)
        dh, dc = dh.reshape(self._state_shape), (None if dc is None
                                                 else dc.reshape(self._state_shape))
        return dx, ((dh, dc) if has_c else dh)


def dropout_mask(rng, shape, p, dtype):
    """Inverted dropout: 0 with probability p, else 1 / (1 - p)."""
    return (rng.random(shape) >= p).astype(dtype) / np.asarray(1 - p, dtype)


def _padding_mask(T, B, batch_first, lengths):
    """Boolean (T, B) (or (B, T)) mask of the padded steps."""
    mask = np.arange(T)[:, None] >= lengths[None, :]
    return mask.T if batch_first else mask
