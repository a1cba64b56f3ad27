"""Whole-sequence layers: RNN, GRU and LSTM, stacked, bidirectional and of
variable length, with PyTorch's names, shapes, gate orders and results."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from fastrnn import (_gate_options, _layernorm_engine, _projection_engine,
                     _training_options)
from fastrnn import _validation as v
from fastrnn._engine import Backprop, RecurrentEngine, _training_buffers
from fastrnn._module import RESET_AFTER_DOC, call_parameters, gru_kind
from fastrnn._validation import shape_str


class _Call:
    """A validated call: converted input, sizes, fresh output and state arrays."""
    __slots__ = ("x", "T", "B", "batched", "batch_first", "lengths", "h_n", "c_n", "out")

    def __init__(self, x, T, B, batched, batch_first, lengths, h_n, c_n, out):
        self.x, self.T, self.B, self.batched, self.batch_first = x, T, B, batched, batch_first
        self.lengths, self.h_n, self.c_n, self.out = lengths, h_n, c_n, out


class _RNNBase(RecurrentEngine):
    _has_cell_state = False

    def __init__(self, kind, input_size, hidden_size, num_layers, bias, batch_first,
                 dropout, bidirectional, dtype, seed, gate_options, learn_initial_state,
                 weight_dropout, layer_norm=None, proj_size=0):
        super().__init__()
        owner = type(self).__name__
        cfg = self._config
        cfg["input_size"] = v.check_int(owner, "input_size", input_size)
        cfg["hidden_size"] = v.check_int(owner, "hidden_size", hidden_size)
        cfg["num_layers"] = v.check_int(owner, "num_layers", num_layers)
        cfg["bias"] = v.check_bool(owner, "bias", bias)
        cfg["batch_first"] = v.check_bool(owner, "batch_first", batch_first)
        cfg["dropout"] = v.check_dropout(owner, dropout)
        cfg["bidirectional"] = v.check_bool(owner, "bidirectional", bidirectional)
        cfg["dtype"] = v.check_dtype(owner, dtype)
        rng = v.check_seed(owner, seed)
        learned = v.check_bool(owner, "learn_initial_state", learn_initial_state)
        weight_dropout = v.check_dropout(owner, weight_dropout, "weight_dropout")
        dirs = 2 if cfg["bidirectional"] else 1
        # gate options (_gate_options.py): the kind runs them, or the plain kind
        opts = _gate_options.configure(
            owner, kind, dirs, is_lstm=kind == "lstm", **gate_options)
        kind, activation, options, rows = opts.kind, opts.activation, opts.config, opts.rows
        # layer_norm (GRU, LSTM and their cells; an RNN has no such option):
        # the default gates only, no zoneout, no Keras dropout
        ln = None if kind.startswith("rnn") else _layernorm_engine.check(
            owner, layer_norm, kind,
            None if rows is None and opts.zoneout is None and opts.dropouts is None
            else _gate_options.repr_options({"activation": activation, **options}))
        # proj_size (LSTM only): the default gates only, no zoneout, Keras
        # dropout or layer norm
        proj = None if not self._has_cell_state else _projection_engine.check(
            owner, proj_size, cfg["hidden_size"],
            ([] if rows is None and opts.zoneout is None and opts.dropouts is None
             else _gate_options.repr_options({"activation": activation, **options}))
            + ([("layer_norm", True)] if ln else []))
        if cfg["dropout"] > 0 and cfg["num_layers"] == 1:
            warnings.warn(f"{owner}: dropout acts between stacked layers, so dropout="
                          f"{cfg['dropout']} has no effect with num_layers=1", stacklevel=3)

        def names(k, d):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            return (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}")

        # rng also draws the dropout and DropConnect masks in training
        self._build(kind, cfg["input_size"], cfg["hidden_size"], cfg["num_layers"], dirs,
                    cfg["bias"], cfg["dtype"], rng, names, dropout=cfg["dropout"],
                    peepholes=options.get("peepholes", False), initial_state=learned,
                    layer_norm=bool(ln), proj_size=proj or 0)
        self._option_rows, self._zoneout, self._dropouts = rows, opts.zoneout, opts.dropouts
        # gate options, zoneout, layer norm and projections run on the general
        # path only (the dropouts act in training, which always does)
        self._general_only = (rows is not None or opts.zoneout is not None or bool(ln)
                              or bool(proj))
        cfg["nonlinearity" if kind.startswith("rnn") else "activation"] = activation
        cfg.update(options)
        cfg["learn_initial_state"] = learned
        cfg["weight_dropout"] = weight_dropout
        if ln is not None:
            cfg["layer_norm"] = ln
        if proj is not None:
            cfg["proj_size"] = proj

    def _repr_options(self):
        cfg, opts = self._config, []
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False}
        for key, default in defaults.items():
            if cfg[key] != default:
                opts.append((key, cfg[key]))
        if cfg["dtype"] != np.float32:
            opts.append(("dtype", cfg["dtype"].name))
        # PyTorch's order: proj_size right after the sizes, then nonlinearity
        proj = [("proj_size", cfg["proj_size"])] if cfg.get("proj_size") else []
        gate = _gate_options.repr_options(cfg)
        return (proj + [o for o in gate if o[0] == "nonlinearity"] + opts
                + [o for o in gate if o[0] != "nonlinearity"]
                + _training_options.repr_options(cfg)
                + ([("layer_norm", True)] if cfg.get("layer_norm") else []))

    # --- forward ------------------------------------------------------------
    def __call__(self, x: ArrayLike,
                 hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None,
                 lengths: ArrayLike | None = None, *, mask: ArrayLike | None = None,
                 zero_output_for_mask: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        if mask is not None:   # Keras' step masks: fastrnn.masking packs and scatters
            return self._masked(x, hx, lengths, mask, zero_output_for_mask, train=False)
        if zero_output_for_mask is not False:   # (no mask: nothing to zero, but checked)
            v.check_bool(type(self).__name__, "zero_output_for_mask", zero_output_for_mask)
        params = call_parameters(self)   # one parameter set for the whole call
        if self._lends_buffers:   # training's buffers go once the layer is used outside it
            _training_buffers.release(self)
        if lengths is None and not self._general_only:
            # the lean path of small calls (_forward.SequenceRunner; it starts
            # from zeros when hx is None, so it is given the learned states)
            x = v.plain_numbers(x, self._config["dtype"])
            state = hx if hx is not None or not self._init_index else self._learned_hx(params, x)
            if state is not None or not self._init_index:
                result = self._sequence_runner(params).run(x, state)
                if result is not None:
                    return result
        call = self._prepare(params, x, hx, lengths)
        if call.B > 0:
            self._run(params, call.x, call.T, call.B, call.batch_first, call.h_n, call.c_n,
                      call.out, call.lengths)
        return self._results(call)

    def _learned_hx(self, params, x):
        """The learned initial states as the hx of a call on x, for the lean
        path; None unless x is an ndarray of 2 or 3 dimensions (the general
        path then checks it)."""
        if type(x) is not np.ndarray or x.ndim not in (2, 3):
            return None
        B = None if x.ndim == 2 else x.shape[0 if self._config["batch_first"] else 1]
        # kept with the parameter set for the last batch size (read only: the
        # runner copies its states)
        cached = params.cache.get("learned_hx")
        if cached is None or cached[0] != B:
            states = self._learned_state(params)   # each (layers * dirs, H)
            if B is not None:
                states = [np.repeat(s[:, None, :], B, axis=1) for s in states]
            for state in states:
                state.flags.writeable = False
            cached = params.cache["learned_hx"] = (
                B, tuple(states) if self._has_cell_state else states[0])
        return cached[1]

    def forward_train(self, x: ArrayLike,
                      hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None,
                      lengths: ArrayLike | None = None, *, mask: ArrayLike | None = None,
                      zero_output_for_mask: bool = False
                      ) -> tuple[tuple[np.ndarray, np.ndarray | tuple[np.ndarray, np.ndarray]],
                                 Callable[..., Any]]:
        """Forward in training mode: the results of a call, and a ``backprop``.

        Returns
        -------
        (out, state), backprop
            ``out`` and ``state`` as from calling the layer (dropout applied
            between layers). ``dx, dhx = backprop(dout, dstate=None)`` runs
            BPTT: ``dout`` is the gradient of ``out`` (same shape), ``dstate``
            that of ``state`` (``h_n``, or ``(h_n, c_n)`` for LSTM, either part
            may be None) or None. It adds the parameter gradients into
            ``self.grads`` and returns ``dx`` (shaped like ``x``) and ``dhx``,
            the gradient of the initial state in the structure of ``state``
            (the zero or learned initial state's when ``hx`` was None; the
            learned state's parameters then get its sum over the batch added
            to their gradients). With ``weight_dropout``, the forward draws
            its DropConnect masks of W_hh, which its backprop uses. Each backprop
            holds its own saved tensors and may be called once. ``mask``
            and ``zero_output_for_mask`` as for a call.
        """
        if mask is not None:
            return self._masked(x, hx, lengths, mask, zero_output_for_mask, train=True)
        if zero_output_for_mask is not False:   # (no mask: nothing to zero, but checked)
            v.check_bool(type(self).__name__, "zero_output_for_mask", zero_output_for_mask)
        params = call_parameters(self)   # one parameter set for the whole call
        call = self._prepare(params, x, hx, lengths, own_copy=True)
        tape = None
        if call.B > 0:
            masks = None
            if self._config["weight_dropout"] > 0:   # this forward's masked W_hh
                params, masks = self._dropconnect(params)
            tape = self._run(params, call.x, call.T, call.B, call.batch_first, call.h_n,
                             call.c_n, call.out, call.lengths, train=True)
            tape.learned_state = hx is None and bool(self._init_index)
            tape.hh_masks = masks
        return self._results(call), Backprop(self, call, tape)

    def _masked(self, x, hx, lengths, mask, zero_output_for_mask, train):
        # [masks] the mask= argument: fastrnn.masking runs the layer with lengths
        from fastrnn.masking import masked_call
        if lengths is not None:
            raise ValueError(f"{type(self).__name__}: pass lengths or mask, not both (a "
                             f"mask of the first lengths[b] steps is the same as lengths)")
        return masked_call(self, x, hx, mask, zero_output_for_mask, train)

    # Sequential protocol (see fastrnn.nn): batch-first sequences in and out
    def _seq_infer(self, x):
        if self._config["batch_first"]:
            return self(x)[0]
        return np.ascontiguousarray(self(np.swapaxes(x, 0, 1))[0].swapaxes(0, 1))

    def _seq_train(self, x):
        swap = not self._config["batch_first"]
        (out, _), backprop = self.forward_train(np.swapaxes(x, 0, 1) if swap else x)

        def backprop_seq(dy):
            dx, _ = backprop(np.swapaxes(dy, 0, 1) if swap else dy)
            return np.swapaxes(dx, 0, 1) if swap else dx

        return (np.swapaxes(out, 0, 1) if swap else out), backprop_seq

    def _check_input_shape(self, shape):
        """Refuse a call's input shape (before any conversion or copy: a
        broadcast view of 2**31 rows is 4 bytes until copied)."""
        owner = type(self).__name__
        cfg = self._config
        layout = "(B, T, {0}) or (T, {0})" if cfg["batch_first"] else "(T, B, {0}) or (T, {0})"
        if len(shape) not in (2, 3) or shape[-1] != cfg["input_size"]:
            raise ValueError(f"{owner}: expected input of shape "
                             f"{layout.format(cfg['input_size'])}, got {shape_str(shape)}")
        steps, batch = (shape[:2][::-1] if cfg["batch_first"] else shape[:2]) \
            if len(shape) == 3 else (shape[0], 1)
        if steps == 0:
            raise ValueError(f"{owner}: expected at least one time step, got input of "
                             f"shape {shape_str(shape)}")
        if batch > v.BLAS_INT_MAX:
            raise ValueError(f"{owner}: batch size {batch} does not fit a 32-bit BLAS int")

    def _prepare(self, params, x, hx, lengths, own_copy=False):
        """Validate and convert a call's arguments; allocate its outputs and
        its state arrays (from the parameter set ``params`` when the initial
        state is learned and hx is None).
        own_copy: x must not share memory with the caller's (training keeps it)."""
        owner = type(self).__name__
        cfg = self._config
        dtype = cfg["dtype"]
        dirs = self._dirs

        x = v.as_float_array(owner, "input", x, dtype, own_copy, self._check_input_shape)
        batched = x.ndim == 3
        batch_first = cfg["batch_first"] and batched
        if not batched:
            x = x[:, None, :]
        T, B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        if lengths is not None:
            if not batched:
                raise ValueError(f"{owner}: lengths needs batched input; for one unbatched "
                                 f"sequence pass input[:length] instead")
            lengths = v.check_lengths(owner, lengths, B, T)
        h_n, c_n = self._initial_state(params, hx, B, batched)
        width = dirs * self._out_size
        out = np.empty((B, T, width) if batch_first else (T, B, width), dtype)
        return _Call(x, T, B, batched, batch_first, lengths, h_n, c_n, out)

    def _results(self, call):
        out, h_n, c_n = call.out, call.h_n, call.c_n
        if not call.batched:
            out, h_n = out[:, 0], h_n[:, 0]
            c_n = None if c_n is None else c_n[:, 0]
        return (out, (h_n, c_n)) if self._has_cell_state else (out, h_n)

    def _initial_state(self, params, hx, B, batched):
        """Fresh (layers * dirs, B, H) state arrays holding hx (h is P wide
        with proj_size), or when hx is None the learned initial states of
        ``params`` (or zeros)."""
        cfg = self._config
        rows = cfg["num_layers"] * self._dirs
        names = ("h_0", "c_0") if self._has_cell_state else ("hx",)
        shapes = [(rows, B, self._out_size), (rows, B, cfg["hidden_size"])][:len(names)]
        states = v.state_arrays(type(self).__name__, "hx", hx, names,
                                [s if batched else (s[0], s[2]) for s in shapes],
                                cfg["dtype"], full_shape=shapes, optional_parts=True)
        learned = self._learned_state(params) if hx is None else None
        for state, value in zip(states, learned or ()):
            state[...] = value[:, None, :]
        return states[0], (states[1] if self._has_cell_state else None)


def tbptt(layer: RNN | GRU | LSTM, x: ArrayLike, steps: int,
          hx: ArrayLike | tuple[ArrayLike | None, ArrayLike | None] | None = None
          ) -> Iterator[tuple[Any, np.ndarray, Callable[..., Any]]]:
    """Truncated BPTT over a long stream, one line per chunk.

    Splits ``x`` along time into chunks of ``steps`` steps and runs
    ``layer.forward_train`` on each, starting from the state the previous
    chunk ended with. The state is carried forward, the gradient is not (a
    chunk's backprop stops at its first step).

    Parameters
    ----------
    layer : RNN, GRU or LSTM, unidirectional
        (a reverse direction would need the steps after a chunk).
    x : array-like, the whole stream, laid out as ``layer`` expects
    steps : int, the chunk length (the last chunk may be shorter)
    hx : the initial state, or None for the layer's (zeros, or the learned one)

    Returns
    -------
    iterator of (index, out, backprop)
        One per chunk, computed as it is asked for (the arguments are
        checked at the call). ``index`` selects the chunk's steps from any array laid out like
        ``x``, e.g. the targets: ``x[index]`` is the chunk (a slice of the
        time axis, or ``(slice(None), steps)`` for batch-first ``x``);
        ``out`` the chunk's output, and its ``backprop(dout, dstate=None)``.

    Examples
    --------
    >>> for index, out, backprop in fastrnn.tbptt(lstm, x, steps=50):
    ...     loss, dout = mse.value_and_grad(out, y[index])
    ...     backprop(dout); opt.step(); opt.zero_grad()
    """
    # (checked here, at the call: the chunks come from a generator, which
    # would run none of this before the first chunk is asked for)
    if not isinstance(layer, _RNNBase):
        raise TypeError(f"tbptt: layer must be an RNN, GRU or LSTM, got {type(layer).__name__}")
    refuse_training = getattr(layer, "_refuse_training", None)   # a quantized layer's
    if refuse_training is not None:
        refuse_training("tbptt")
    if layer.bidirectional:
        raise ValueError(f"tbptt: {layer!r} is bidirectional; its reverse direction needs "
                         f"the steps after each chunk, so it cannot be truncated in time")
    steps = v.check_int("tbptt", "steps", steps)
    x = v.to_numpy("tbptt", "x", x)
    if x.ndim not in (2, 3):
        raise ValueError(f"tbptt: expected x with 2 or 3 dimensions, got {shape_str(x.shape)}")
    batch_first = layer.batch_first and x.ndim == 3
    T = x.shape[1] if batch_first else x.shape[0]
    if T == 0:   # as the layers refuse it (the loop would yield nothing)
        raise ValueError(f"tbptt: x has no steps (T = 0), shape {shape_str(x.shape)}")
    if x.shape[-1] != layer.input_size:   # here, where the chunks' shapes would be named
        raise ValueError(f"tbptt: expected x with {layer.input_size} features (the last axis), "
                         f"got {shape_str(x.shape)}")
    if hx is not None:   # its shape, dtype and values (the first chunk reads it)
        batched = x.ndim == 3
        layer._initial_state(layer._params, hx, (x.shape[0] if batch_first else x.shape[1])
                             if batched else 1, batched)
    return _tbptt_chunks(layer, x, steps, hx, T, batch_first)


def _tbptt_chunks(layer, x, steps, hx, T, batch_first):
    """tbptt's chunks, after its checks."""
    state = hx
    for start in range(0, T, steps):
        time = slice(start, min(start + steps, T))
        index = (slice(None), time) if batch_first else time
        (out, state), backprop = layer.forward_train(x[index], state)
        yield index, out, backprop


_LAYER_DOC = """{summary}

    Called as ``{call}``: the call's arguments are listed under Other
    Parameters, its results under Returns.

    Parameters
    ----------
    input_size : int
        Number of features of each step of the input, D.
    hidden_size : int
        Number of features of the hidden state, H.
    num_layers : int, default 1
        Number of stacked layers; layer k > 0 reads the output of layer k - 1.{extra_params}
    bias : bool, default True
        If False, the layer has no ``bias_ih_l*`` / ``bias_hh_l*`` parameters.
    batch_first : bool, default False
        If True, batched input and output are (B, T, ·) instead of (T, B, ·).
        States are always (num_layers * dirs, B, H).
    dropout : float in [0, 1), default 0
        Dropout on the outputs of every layer but the last, in training only;
        inference (calling the layer) never drops.
    bidirectional : bool, default False
        If True, a second direction runs over the reversed sequence; outputs
        are concatenated on the feature axis, forward first.
    dtype : {{'float32', 'float64'}}, default 'float32'
    seed : None, int or numpy.random.Generator
        Source of the initial weights (and of dropout masks in training).

    Other Parameters
    ----------------
    x : array-like of shape (T, B, D), (B, T, D) if batch_first, or (T, D)
        Converted to the layer's dtype (any real dtype, any memory order).
    hx : {hx_doc}, optional
        Initial state, zeros if omitted (the learned one with
        ``learn_initial_state=True``); (num_layers * dirs, H) for unbatched x.
    lengths : array-like of B ints in [1, T], optional
        Valid steps of each sequence, in any order. Each sequence's results
        come from its valid steps only (the reverse direction too), padded
        output steps are zero, and the final state is each sequence's own last
        state: PyTorch's packed-sequence results, without packing. The steps
        past the longest sequence do not run; up to it every row does (sort
        or bucket sequences by length).
    mask : array-like of shape (B, T) (or (T,) for unbatched x) of bool, optional
        Keyword only, not with ``lengths``; Keras' mask: the steps the layer
        reads (True) and skips (False), in any pattern (left padding,
        holes). At a skipped step the state is carried unchanged and the
        output repeats the direction's previous output (zeros before its
        first read step); the reverse direction runs over the read steps
        from the last back (Keras' ``Bidirectional``); the final state is
        each row's state after its last read step (the initial state for a
        row that reads none). Exact in training too. See fastrnn.masking.
    zero_output_for_mask : bool, default False
        Keyword only: zero outputs at the skipped steps instead (Keras'
        option of the same name).

    Returns
    -------
    out : ndarray of shape (T, B, dirs * H) (or (B, T, ·), or (T, dirs * H))
        Hidden state of the last layer at every step.
    {returns_doc}

    Notes
    -----
    {math}

    Parameters are named as PyTorch's: ``weight_ih_l{{k}}`` (G * H, in),
    ``weight_hh_l{{k}}`` (G * H, H), ``bias_ih_l{{k}}``, ``bias_hh_l{{k}}``
    (G * H,), with ``_reverse`` for the second direction; {gates}. All start
    ~ U(-1/sqrt(H), 1/sqrt(H)). A PyTorch module's ``state_dict()`` loads with
    ``load_state_dict``.
"""


class RNN(_RNNBase):
    __doc__ = _LAYER_DOC.format(
        summary="Elman RNN over whole sequences, with tanh or ReLU.",
        extra_params=_gate_options.NONLINEARITY_DOC + _training_options.LAYER_DOC,
        call="out, h_n = rnn(x, hx=None, lengths=None)",
        hx_doc="array of shape (num_layers * dirs, B, H)",
        returns_doc="h_n : ndarray of shape (num_layers * dirs, B, H)",
        math=".. math:: h_t = \\mathrm{act}(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})",
        gates="G = 1")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: Any = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False,
                 dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None, *,
                 clip: float | None = None, zoneout: float = 0.0,
                 input_dropout: float = 0.0, recurrent_dropout: float = 0.0,
                 learn_initial_state: bool = False, weight_dropout: float = 0.0) -> None:
        super().__init__("rnn", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, dtype, seed,
                         {"activation": nonlinearity, "clip": clip, "zoneout": zoneout,
                          "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout},
                         learn_initial_state, weight_dropout)


class GRU(_RNNBase):
    __doc__ = _LAYER_DOC.format(
        summary="Gated recurrent unit over whole sequences (by default PyTorch's "
                "'reset after' form).",
        extra_params=(RESET_AFTER_DOC + _gate_options.GRU_DOC + _training_options.LAYER_DOC
                      + _layernorm_engine.LAYER_NORM_DOC),
        call="out, h_n = gru(x, hx=None, lengths=None)",
        hx_doc="array of shape (num_layers * dirs, B, H)",
        returns_doc="h_n : ndarray of shape (num_layers * dirs, B, H)",
        math=(".. math::\n\n"
              "        r_t = \\sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr})\\\\\n"
              "        z_t = \\sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})\\\\\n"
              "        n_t = \\tanh(W_{in} x_t + b_{in} + r_t \\odot (W_{hn} h_{t-1} + b_{hn}))\\\\\n"
              "        h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}\n\n"
              "    With ``reset_after=False``, :math:`n_t = \\tanh(W_{in} x_t + b_{in} + "
              "W_{hn} (r_t \\odot h_{t-1}) + b_{hn})`."),
        gates="G = 3, gate blocks in the order r, z, n")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None, *,
                 reset_after: bool = True, activation: Any = "tanh",
                 recurrent_activation: Any = "sigmoid", clip: float | None = None,
                 zoneout: float = 0.0, input_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, learn_initial_state: bool = False,
                 weight_dropout: float = 0.0, layer_norm: bool = False) -> None:
        reset_after, kind = gru_kind("GRU", reset_after)
        super().__init__(kind, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, dtype, seed,
                         {"activation": activation,
                          "recurrent_activation": recurrent_activation, "clip": clip,
                          "zoneout": zoneout, "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout},
                         learn_initial_state, weight_dropout, layer_norm)
        self._config["reset_after"] = reset_after


class LSTM(_RNNBase):
    __doc__ = _LAYER_DOC.format(
        summary="Long short-term memory over whole sequences.",
        extra_params=(_gate_options.LSTM_DOC + _training_options.LAYER_DOC
                      + _layernorm_engine.LAYER_NORM_DOC + _projection_engine.PROJ_SIZE_DOC),
        call="out, (h_n, c_n) = lstm(x, hx=None, lengths=None)",
        hx_doc=("tuple (h_0, c_0) of arrays of shape (num_layers * dirs, B, H) (h_0 "
                "(num_layers * dirs, B, P) with proj_size)"),
        returns_doc=("(h_n, c_n) : tuple of ndarrays of shape (num_layers * dirs, B, H) "
                     "(h_n P wide with proj_size; out too)"),
        math=(".. math::\n\n"
              "        i_t = \\sigma(W_{ii} x_t + b_{ii} + W_{hi} h_{t-1} + b_{hi})\\\\\n"
              "        f_t = \\sigma(W_{if} x_t + b_{if} + W_{hf} h_{t-1} + b_{hf})\\\\\n"
              "        g_t = \\tanh(W_{ig} x_t + b_{ig} + W_{hg} h_{t-1} + b_{hg})\\\\\n"
              "        o_t = \\sigma(W_{io} x_t + b_{io} + W_{ho} h_{t-1} + b_{ho})\\\\\n"
              "        c_t = f_t \\odot c_{t-1} + i_t \\odot g_t,\\quad h_t = o_t \\odot \\tanh(c_t)"),
        gates="G = 4, gate blocks in the order i, f, g, o")
    _has_cell_state = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: DTypeLike = "float32",
                 seed: int | np.random.Generator | None = None, *,
                 activation: Any = "tanh", recurrent_activation: Any = "sigmoid",
                 cell_activation: Any = None, clip: float | None = None,
                 input_forget: bool = False, peepholes: bool = False,
                 zoneout: float | tuple[float, float] = 0.0, input_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, learn_initial_state: bool = False,
                 weight_dropout: float = 0.0, layer_norm: bool = False,
                 proj_size: int = 0) -> None:
        super().__init__("lstm", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, dtype, seed,
                         {"activation": activation,
                          "recurrent_activation": recurrent_activation,
                          "cell_activation": cell_activation, "clip": clip,
                          "input_forget": input_forget, "peepholes": peepholes,
                          "zoneout": zoneout, "input_dropout": input_dropout,
                          "recurrent_dropout": recurrent_dropout},
                         learn_initial_state, weight_dropout, layer_norm, proj_size)
