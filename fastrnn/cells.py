"""Single-step cells: RNNCell, GRUCell and LSTMCell (PyTorch semantics).

A cell call is the streaming path: one step for a batch (B, D) or one
unbatched frame (D,). It runs the same kernel as the layers with T = 1.
"""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from fastrnn._kernels import forward as _forward
from fastrnn import _gate_options, _layernorm_engine, _parallel, _training_options
from fastrnn import _validation as v
from fastrnn._engine import Backprop, RecurrentEngine
from fastrnn._module import RESET_AFTER_DOC, call_parameters, gru_kind
from fastrnn._validation import shape_str


class _CellBase(RecurrentEngine):
    _has_cell_state = False

    def __init__(self, kind, input_size, hidden_size, bias, dtype, seed, gate_options,
                 learn_initial_state, layer_norm=None):
        super().__init__()
        owner = type(self).__name__
        cfg = self._config
        cfg["input_size"] = v.check_int(owner, "input_size", input_size)
        cfg["hidden_size"] = v.check_int(owner, "hidden_size", hidden_size)
        cfg["bias"] = v.check_bool(owner, "bias", bias)
        cfg["dtype"] = v.check_dtype(owner, dtype)
        rng = v.check_seed(owner, seed)
        learned = v.check_bool(owner, "learn_initial_state", learn_initial_state)
        # gate options (_gate_options.py): the kind runs them, or the plain kind
        opts = _gate_options.configure(
            owner, kind, 1, is_lstm=kind == "lstm", **gate_options)
        kind, activation, options, rows = opts.kind, opts.activation, opts.config, opts.rows
        # layer_norm (GRUCell, LSTMCell; an RNNCell has no such option): the
        # default gates only, no zoneout, no Keras dropout
        ln = None if kind.startswith("rnn") else _layernorm_engine.check(
            owner, layer_norm, kind,
            None if rows is None and opts.zoneout is None and opts.dropouts is None
            else _gate_options.repr_options({"activation": activation, **options}))
        self._build(kind, cfg["input_size"], cfg["hidden_size"], 1, 1, cfg["bias"],
                    cfg["dtype"], rng, lambda k, d: ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                    peepholes=options.get("peepholes", False), initial_state=learned,
                    layer_norm=bool(ln))
        self._option_rows, self._zoneout, self._dropouts = rows, opts.zoneout, opts.dropouts
        # gate options, zoneout and layer norm run on the general path only
        # (the dropouts act in training, which always does)
        self._general_only = rows is not None or opts.zoneout is not None or bool(ln)
        # the plain cell from zeros or hx: the streaming kernel straight away
        self._plain_step = not self._general_only and not self._init_index
        cfg["nonlinearity" if kind.startswith("rnn") else "activation"] = activation
        cfg.update(options)
        cfg["learn_initial_state"] = learned
        if ln is not None:
            cfg["layer_norm"] = ln

    def _repr_options(self):
        cfg = self._config
        gate = _gate_options.repr_options(cfg)
        # PyTorch's order: bias, then nonlinearity
        return (([("bias", False)] if not cfg["bias"] else [])
                + [o for o in gate if o[0] == "nonlinearity"]
                + ([("dtype", cfg["dtype"].name)] if cfg["dtype"] != np.float32 else [])
                + [o for o in gate if o[0] != "nonlinearity"] + _training_options.repr_options(cfg)
                + ([("layer_norm", True)] if cfg.get("layer_norm") else []))

    def __call__(self, x: ArrayLike,
                 hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        # the streaming path: one frame, plain arrays (see _forward.CellStep)
        params = call_parameters(self)   # one parameter set for the whole call
        # (the streaming kernel runs the plain cells only, and starts from
        # zeros when hx is None, so it is given the learned states)
        if not self._general_only:
            x = v.plain_numbers(x, self._config["dtype"])
        if self._plain_step:
            result = self._stepper(params).step(x, hx, _parallel.get_num_threads())
            if result is not None:
                return result
        elif not self._general_only:
            state = self._learned_hx(params, x) if hx is None else hx
            if state is not None:
                result = self._stepper(params).step(x, state, _parallel.get_num_threads())
                if result is not None:
                    return result
        x, B, batched, h, c = self._prepare(params, x, hx)
        if B > 0:   # the layers' driver with T = 1; h, c become the new state
            self._run(params, x[None], 1, B, False, h[None], None if c is None else c[None],
                      np.empty((1, B, self._config["hidden_size"]), self._config["dtype"]),
                      None)
        return self._results(h, c, batched)

    def _learned_hx(self, params, x):
        """The learned initial states as the hx of a call on x, for the
        streaming path; None unless x is an ndarray of 1 or 2 dimensions (the
        general path then checks it)."""
        if type(x) is not np.ndarray or x.ndim not in (1, 2):
            return None
        B = None if x.ndim == 1 else x.shape[0]
        # kept with the parameter set for the last batch size (read only: the
        # step copies its states)
        cached = params.cache.get("learned_hx")
        if cached is None or cached[0] != B:
            states = [s[0] if B is None else np.repeat(s, B, axis=0)
                      for s in self._learned_state(params)]   # each (1, H)
            for state in states:
                state.flags.writeable = False
            cached = params.cache["learned_hx"] = (
                B, tuple(states) if self._has_cell_state else states[0])
        return cached[1]

    def _stepper(self, params):
        """The streaming path's kernel state for a parameter set (kept with it)."""
        stepper = params.cache.get("stepper")
        if stepper is None:
            bias_x, bias_h, _ = self._kernel_weights(params)[0]
            w_ih, w_hh = self._weights(params)[:2]
            packed_ih, packed_hh = self._packed_projection(params), self._packed_recurrent(params)
            stepper = params.cache["stepper"] = _forward.CellStep(
                self._kernel_code, w_ih[0], w_hh[0], bias_x, bias_h,
                None if packed_ih is None else packed_ih[0],
                None if packed_hh is None else packed_hh[0])
        return stepper

    def forward_train(self, x: ArrayLike,
                      hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None
                      ) -> tuple[np.ndarray | tuple[np.ndarray, np.ndarray],
                                 Callable[..., Any]]:
        """One step in training mode: the result of a call, and a ``backprop``.

        Returns
        -------
        h, backprop (RNNCell, GRUCell) or (h, c), backprop (LSTMCell)
            ``dx, dhx = backprop(dh)`` (LSTMCell: ``backprop((dh, dc))``, either
            part may be None) takes the gradient of the new state, adds the
            parameter gradients into ``self.grads`` and returns the gradients of
            ``x`` and of the previous state, in the structure of the state.
            It may be called once.
        """
        params = call_parameters(self)   # one parameter set for the whole call
        x, B, batched, h, c = self._prepare(params, x, hx, own_copy=True)
        H = self._config["hidden_size"]
        h_n, c_n = h[None], (None if c is None else c[None])
        out = np.empty((1, B, H), self._config["dtype"])
        tape = None
        if B > 0:
            tape = self._run(params, x[None], 1, B, False, h_n, c_n, out, None, train=True)
            tape.learned_state = hx is None and bool(self._init_index)
        call = SimpleNamespace(T=1, B=B, batched=True, batch_first=False, x=x[None], out=out,
                               h_n=h_n, c_n=c_n)
        return self._results(h, c, batched), _CellBackprop(self, Backprop(self, call, tape),
                                                            batched, B)

    def _check_input_shape(self, shape):
        """Refuse a call's input shape (before any conversion or copy: a
        broadcast view of 2**31 rows is 4 bytes until copied)."""
        owner, D = type(self).__name__, self._config["input_size"]
        if len(shape) not in (1, 2) or shape[-1] != D:
            raise ValueError(f"{owner}: expected input of shape (B, {D}) or ({D},), "
                             f"got {shape_str(shape)}")
        if len(shape) == 2 and shape[0] > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: batch size {shape[0]} does not fit a 32-bit BLAS int")

    def _prepare(self, params, x, hx, own_copy=False):
        owner = type(self).__name__
        cfg = self._config
        dtype, D = cfg["dtype"], cfg["input_size"]
        x = v.as_float_array(owner, "input", x, dtype, own_copy, self._check_input_shape)
        batched = x.ndim == 2
        x = x.reshape(-1, D)
        B = x.shape[0]
        h, c = self._state(params, hx, B, batched)
        return x, B, batched, h, c

    def _results(self, h, c, batched):
        if not batched:
            h = h[0]
            c = None if c is None else c[0]
        return (h, c) if self._has_cell_state else h

    def _state(self, params, hx, B, batched):
        """Fresh (B, H) state arrays holding hx, or when hx is None the
        learned initial state of ``params`` (or zeros)."""
        H = self._config["hidden_size"]
        names = ("h", "c") if self._has_cell_state else ("hx",)
        states = v.state_arrays(type(self).__name__, "hx", hx, names,
                                (B, H) if batched else (H,), self._config["dtype"],
                                full_shape=(B, H), optional_parts=True)
        learned = self._learned_state(params) if hx is None else None
        for state, value in zip(states, learned or ()):
            state[...] = value   # (1, H) over the batch
        return states[0], (states[1] if self._has_cell_state else None)


class _CellBackprop:
    """A cell's backprop: the gradient of the new state in, those of the input
    and of the previous state out (the layer backward with T = 1)."""

    def __init__(self, cell, layer_backprop, batched, B):
        self._cell, self._inner, self._batched, self._B = cell, layer_backprop, batched, B

    def __call__(self, dstate):
        cell = self._cell
        owner = f"{type(cell).__name__}.backprop"
        H, dtype = cell._config["hidden_size"], cell._config["dtype"]
        shape = (self._B, H) if self._batched else (H,)
        names = ("dh", "dc") if cell._has_cell_state else ("dh",)
        grads = dict(zip(names, v.state_arrays(owner, "the state gradient", dstate, names,
                                               shape, dtype, full_shape=(1, self._B, H),
                                               optional_parts=True)))
        dstate_inner = (None, grads["dc"]) if cell._has_cell_state else None
        dx, dhx = self._inner(grads["dh"], dstate_inner)
        dx = dx[0] if self._batched else dx[0, 0]
        dhx = dhx if cell._has_cell_state else (dhx,)
        dhx = tuple(d[0] if self._batched else d[0, 0] for d in dhx)
        return dx, (dhx if cell._has_cell_state else dhx[0])


_CELL_DOC = """{summary}

    Called as ``{call}``: the call's arguments are listed under Other
    Parameters, its results under Returns.

    Parameters
    ----------
    input_size : int
        Number of input features, D.
    hidden_size : int
        Number of features of the hidden state, H.
    bias : bool, default True
        If False, there are no ``bias_ih`` / ``bias_hh`` parameters.{extra_params}
    dtype : {{'float32', 'float64'}}, default 'float32'
    seed : None, int or numpy.random.Generator
        Source of the initial weights, ~ U(-1/sqrt(H), 1/sqrt(H)).

    Other Parameters
    ----------------
    x : array-like of shape (B, D) or (D,)
        Converted to the cell's dtype.
    hx : {hx_doc}, optional
        The previous state; zeros if omitted (the learned one with
        ``learn_initial_state=True``).

    Returns
    -------
    {returns_doc}

    Notes
    -----
    Parameters ``weight_ih`` (G * H, D), ``weight_hh`` (G * H, H), ``bias_ih``,
    ``bias_hh`` (G * H,), as PyTorch's; the equations are those of
    :class:`fastrnn.{layer}`.
"""


class RNNCell(_CellBase):
    __doc__ = _CELL_DOC.format(
        summary="One step of an Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh).",
        extra_params=(_gate_options.CELL_NONLINEARITY_DOC
                      + _training_options.CELL_INITIAL_STATE_DOC),
        call="h = cell(x, hx=None)", hx_doc="array of shape (B, H) or (H,)",
        returns_doc="h : ndarray of shape (B, H) or (H,)", layer="RNN")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: Any = "tanh", dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None, *,
                 clip: float | None = None, zoneout: float = 0.0,
                 input_dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 learn_initial_state: bool = False) -> None:
        super().__init__("rnn", input_size, hidden_size, bias, dtype, seed,
                         {"activation": nonlinearity, "clip": clip, "zoneout": zoneout,
                          "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout},
                         learn_initial_state)


class GRUCell(_CellBase):
    __doc__ = _CELL_DOC.format(
        summary="One step of a GRU (gate blocks r, z, n).",
        extra_params=(RESET_AFTER_DOC + _gate_options.CELL_GRU_DOC
                      + _training_options.CELL_INITIAL_STATE_DOC
                      + _layernorm_engine.LAYER_NORM_DOC),
        call="h = cell(x, hx=None)", hx_doc="array of shape (B, H) or (H,)",
        returns_doc="h : ndarray of shape (B, H) or (H,)", layer="GRU")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: DTypeLike = "float32", seed: int | np.random.Generator | None = None, *,
                 reset_after: bool = True, activation: Any = "tanh",
                 recurrent_activation: Any = "sigmoid", clip: float | None = None,
                 zoneout: float = 0.0, input_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, learn_initial_state: bool = False,
                 layer_norm: bool = False) -> None:
        reset_after, kind = gru_kind("GRUCell", reset_after)
        super().__init__(kind, input_size, hidden_size, bias, dtype, seed,
                         {"activation": activation,
                          "recurrent_activation": recurrent_activation, "clip": clip,
                          "zoneout": zoneout, "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout}, learn_initial_state,
                         layer_norm)
        self._config["reset_after"] = reset_after


class LSTMCell(_CellBase):
    __doc__ = _CELL_DOC.format(
        summary="One step of an LSTM (gate blocks i, f, g, o).",
        extra_params=(_gate_options.CELL_LSTM_DOC + _training_options.CELL_INITIAL_STATE_DOC
                      + _layernorm_engine.LAYER_NORM_DOC),
        call="h, c = cell(x, hx=None)", hx_doc="tuple (h, c) of arrays of shape (B, H) or (H,)",
        returns_doc="h, c : ndarrays of shape (B, H) or (H,)", layer="LSTM")
    _has_cell_state = True

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None, *,
                 activation: Any = "tanh", recurrent_activation: Any = "sigmoid",
                 cell_activation: Any = None, clip: float | None = None,
                 input_forget: bool = False, peepholes: bool = False,
                 zoneout: float | tuple[float, float] = 0.0, input_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, learn_initial_state: bool = False,
                 layer_norm: bool = False) -> None:
        super().__init__("lstm", input_size, hidden_size, bias, dtype, seed,
                         {"activation": activation,
                          "recurrent_activation": recurrent_activation,
                          "cell_activation": cell_activation, "clip": clip,
                          "input_forget": input_forget, "peepholes": peepholes,
                          "zoneout": zoneout, "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout}, learn_initial_state,
                         layer_norm)
