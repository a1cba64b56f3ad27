"""The drivers of the layer-normalised LSTM and GRU (``layer_norm=True``):
how ``_engine.RecurrentEngine._run_layers`` and ``_bptt`` run a layer whose
gate pre-activations and (LSTM) cell state are layer-normalised.

The equations are in ``_layernorm.pyx.tp`` (and in the README and the
docstrings). A call goes through the same plan as the plain layers
(``_plan.forward_plan`` / ``backward_plan``: its ``parts``, the directions
and batch ranges run at once; its hidden-unit split does not apply); per
layer:

forward
    ``_forward.project`` (W_ih x of every step, without bias; float32 on the
    micro-kernel over the packed W_ih), ``_layernorm.normalise_rows`` (the
    input side's LN of every row, the biases added), ``_layernorm.recur``
    (per step the recurrent product, its LN and the gates);
BPTT
    ``_layernorm.backward`` (per step the elementwise and LN backward and
    dh += da_h . W_hh), the LN parameters' and biases' gradients as sums over
    rows, ``_layernorm.normalise_rows_backward`` (the input side's LN
    backward), then the plain layers' ``_backward.weight_grads`` and
    ``input_grad``.

float64 products run through BLAS, held at one thread for every call (the
plan says so: the per-step products are whole BLAS calls).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from fastrnn import _parallel, _plan
from fastrnn import _validation as v
from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward
from fastrnn._kernels import layernorm as _ln
from fastrnn._module import dropout_mask

EPS = _ln.LN_EPS

# the option's entry in the GRU's and LSTM's (and their cells') docstrings
LAYER_NORM_DOC = """
    layer_norm : bool, default False
        Keyword only: layer normalisation (Ba, Kiros and Hinton 2016, eq.
        20-22) of the gate pre-activations, each side on its own, and (LSTM)
        of the cell, with LN(v) = a * (v - mean(v)) / sqrt(var(v) + 1e-5) + b
        over the G * H values of a row (H for the cell). LSTM: i, f, g, o
        from LN(W_ih x; a_ih, b_ih) + LN(W_hh h; a_hh, b_hh) + b_ih + b_hh,
        c' = f * c + i * g, h' = o * tanh(LN(c'; a_c, b_c)). GRU (reset
        after): gx = LN(W_ih x) + b_ih, gh = LN(W_hh h) + b_hh, then the GRU's
        gates from gx and gh. Adds ``ln_ih_weight``, ``ln_ih_bias``,
        ``ln_hh_weight``, ``ln_hh_bias`` (G * H,) and, LSTM, ``ln_cell_weight``,
        ``ln_cell_bias`` (H,), suffixed as W_ih (``_l{k}[_reverse]``); gains
        start at 1, biases at 0. Runs the default gates only (no other gate
        option, zoneout, input or recurrent dropout; GRU ``reset_after=True``);
        a learned initial state and the layers' DropConnect combine with it."""


@dataclass(slots=True)
class LNLayerTape:
    """What BPTT needs of one layer-normalised layer's training forward: its
    input x (R, D_in); the input side's normalised W_ih x (R, dirs * G * H)
    and 1 / std (R, dirs); the recurrent side's saves (hhat, acts, rstd: see
    _layernorm.pyx.tp); the states before each step; the dropout mask applied
    to its output (None: no dropout)."""
    x: np.ndarray
    ahat: np.ndarray
    rstd_x: np.ndarray
    hhat: np.ndarray
    acts: np.ndarray
    rstd: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray | None
    mask: np.ndarray | None = None


def check(owner, layer_norm, kind, gate_options):
    """The checked ``layer_norm`` flag of a GRU or LSTM (layer or cell) of
    cell kind ``kind``; gate_options: None when its gate options run the
    plain gates and it has no zoneout nor Keras dropout, else (name, value)
    of the options that differ from their defaults. Layer norm runs the plain gates of the
    reset-after GRU and the LSTM."""
    flag = v.check_bool(owner, "layer_norm", layer_norm)
    if flag and kind == "gru_reset_before":
        raise ValueError(f"{owner}: layer_norm=True needs reset_after=True (the recurrent "
                         f"side's LN normalises W_hh h, which reset_after=False splits), got "
                         f"reset_after=False")
    if flag and gate_options is not None:
        got = ", ".join(f"{key}={value!r}" for key, value in gate_options)
        raise ValueError(f"{owner}: layer_norm=True runs the default gates (sigmoid, tanh; "
                         f"no clip, input_forget, peepholes, zoneout, input_dropout or "
                         f"recurrent_dropout), got {got}")
    return flag


def _sizes(module):
    """(kernel kind, G * H, P: LN parameters per direction, A: acts per row
    and direction)."""
    H = module._config["hidden_size"]
    lstm = module._gates == 4
    kind = _ln.LSTM if lstm else _ln.GRU
    GH = module._gates * H
    return kind, GH, 4 * GH + (2 * H if lstm else 0), _ln.SAVED[kind] * H


def _ln_params(module, params):
    """Per layer the LN parameters (dirs * P,) of a parameter set."""
    return [params.storages[i] for i in module._ln_index]


def _biases(module, params):
    """Per layer (bias_x, bias_h): the biases added to the input side's LN
    (LSTM: b_ih + b_hh; GRU: b_ih) and the GRU's recurrent side's (b_hh), or
    None without bias. Kept with the parameter set."""
    terms = params.cache.get("ln_biases")
    if terms is None:
        _, _, b_ih_all, b_hh_all = module._weights(params)
        lstm = module._gates == 4
        terms = params.cache["ln_biases"] = [
            (None, None) if b_ih is None else ((b_ih + b_hh, None) if lstm else (b_ih, b_hh))
            for b_ih, b_hh in zip(b_ih_all, b_hh_all)]
    return terms


def run_layers(module, params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train, gx,
               parts, tape):
    """Every layer of a forward (see ``_engine.RecurrentEngine._run``):
    layer_in (R, D) in the call's row order, h_n, c_n (layers * dirs, B, H)
    the initial state in and the final out, out (R, dirs * H) the top
    layer's output; gx an (R, dirs * G * H) buffer; in training the layers'
    saves go to ``tape``."""
    cfg = module._config
    dtype, H = cfg["dtype"], cfg["hidden_size"]
    L, dirs = module._layers, module._dirs
    kind, GH, P, A = _sizes(module)
    rows = T * B
    w_ih_all, w_hh_all = module._weights(params)[:2]
    ln_all = _ln_params(module, params)
    packed_hh = module._packed_recurrent(params)
    packed_ih = module._packed_projection(params)
    work = np.empty((dirs * B, GH), dtype)
    scratch = None if train else (np.empty((B, dirs * GH), dtype), np.empty((B, dirs * A), dtype),
                                  np.empty((B, dirs * 2), dtype), np.empty((rows, dirs), dtype))
    # (the caller, _engine._run, holds BLAS as the plan says)
    for k, (bias_x, bias_h) in enumerate(_biases(module, params)):
        last = k == L - 1
        layer_out = out.reshape(rows, -1) if last else np.empty((rows, dirs * H), dtype)
        if train:
            ahat, rstd_x = np.empty((rows, dirs * GH), dtype), np.empty((rows, dirs), dtype)
            hhat, acts = np.empty((rows, dirs * GH), dtype), np.empty((rows, dirs * A), dtype)
            rstd = np.empty((rows, dirs * 2), dtype)
            h_prev = np.empty((rows, dirs * H), dtype)
            c_prev = np.empty((rows, dirs * H), dtype) if kind == _ln.LSTM else None
        else:   # the input side normalised in place; the rest a (B, .) scratch
            ahat, (hhat, acts, rstd, rstd_x) = gx, scratch
            h_prev = c_prev = None
        _forward.project(x=layer_in, w_ih=w_ih_all[k], bias_x=None, gx=ahat,
                         max_rows=v.BLAS_INT_MAX, parts=_plan.halves(rows, parts),
                         packed=None if packed_ih is None else packed_ih[k], hidden_size=H)
        _ln.normalise_rows(a=ahat, ln=ln_all[k], bias=bias_x, rstd=rstd_x, out=gx, P=P,
                           parts=_plan.halves(rows, parts))
        _ln.recur(kind=kind, T=T, batch_first=batch_first, parts=parts, w_hh=w_hh_all[k],
                  ln=ln_all[k], bias_h=bias_h, h=h_n[k * dirs:(k + 1) * dirs],
                  c=None if c_n is None else c_n[k * dirs:(k + 1) * dirs], gx=gx,
                  out=layer_out, lengths=lengths, train=train, hhat=hhat, acts=acts,
                  rstd=rstd, h_prev=h_prev, c_prev=c_prev, work=work,
                  packed=None if packed_hh is None else packed_hh[k])
        if train:
            saves = LNLayerTape(layer_in, ahat, rstd_x, hhat, acts, rstd, h_prev, c_prev)
            if not last and module._dropout > 0:
                saves.mask = dropout_mask(module._rng, layer_out.shape, module._dropout,
                                          dtype)
                layer_out = layer_out * saves.mask
            tape.layers.append(saves)
        layer_in = layer_out


def bptt(module, tape, T, B, dout, dh, dc, input_grad=True):
    """BPTT through a tape of ``run_layers`` (see ``_engine._bptt``): dout
    (R, dirs * H) in the tape's row order; dh, dc (layers * dirs, B, H) the
    final states' gradients, updated in place into the initial states'. Adds
    the parameter gradients into the module's and returns dx (R, D)."""
    cfg = module._config
    dtype, H = cfg["dtype"], cfg["hidden_size"]
    dirs = module._dirs
    kind, GH, P, A = _sizes(module)
    lstm = kind == _ln.LSTM
    rows = T * B
    plan = _plan.backward_plan(module, T, B)
    parts = plan.parts
    w_ih_all, w_hh_all = module._weights(tape.params)[:2]
    ln_all = _ln_params(module, tape.params)
    packed = module._packed_backward(tape.params)
    # this backprop's gradients, added to the module's only when every layer
    # is done: an interrupted backprop (Ctrl-C) adds nothing
    grads = (module._dw_ih, module._dw_hh, module._db_ih, module._db_hh, module._dln)
    sums = [[None if g is None else np.zeros_like(g) for g in kind_] for kind_ in grads]
    dpre_x = np.empty((rows, dirs * GH), dtype)
    dpre_h = None if lstm else np.empty((rows, dirs * GH), dtype)
    da_h = np.empty((rows, dirs * GH), dtype)
    dlnc = np.empty((rows, dirs * H), dtype) if lstm else None
    work = np.empty((dirs * B, GH + H), dtype)
    with _parallel.blas_at_one_thread if plan.hold_blas else contextlib.nullcontext():
        for k in reversed(range(module._layers)):
            saves = tape.layers[k]
            if saves.mask is not None:
                dout = dout * saves.mask
            _ln.backward(kind=kind, T=T, batch_first=tape.batch_first, parts=parts,
                         w_hh=w_hh_all[k], ln=ln_all[k], hhat=saves.hhat, acts=saves.acts,
                         rstd=saves.rstd, h_prev=saves.h_prev, c_prev=saves.c_prev,
                         dout=np.ascontiguousarray(dout), dh=dh[k * dirs:(k + 1) * dirs],
                         dc=None if dc is None else dc[k * dirs:(k + 1) * dirs],
                         dpre_x=dpre_x, dpre_h=dpre_h, da_h=da_h, dlnc=dlnc,
                         lengths=tape.lengths, work=work,
                         packed=None if packed is None else packed[k][0])
            # the sums over rows: each side's output gradient is that of its LN
            # bias and of its bias (LSTM: both sides have the same one)
            sum_x = _parallel.column_sums(dpre_x)
            sum_h = sum_x if lstm else _parallel.column_sums(dpre_h)
            dpre_hh = dpre_x if lstm else dpre_h
            dln = sums[4][k]
            for d in range(dirs):
                block = slice(d * GH, (d + 1) * GH)
                base = d * P
                dln[base:base + GH] += _parallel.column_sums(dpre_x[:, block],
                                                             saves.ahat[:, block])
                dln[base + GH:base + 2 * GH] += sum_x[block]
                dln[base + 2 * GH:base + 3 * GH] += _parallel.column_sums(
                    dpre_hh[:, block], saves.hhat[:, block])
                dln[base + 3 * GH:base + 4 * GH] += sum_h[block]
                if lstm:
                    cells = dlnc[:, d * H:(d + 1) * H]
                    chat = saves.acts[:, d * A + 5 * H:d * A + 6 * H]
                    dln[base + 4 * GH:base + 4 * GH + H] += _parallel.column_sums(cells, chat)
                    dln[base + 4 * GH + H:base + P] += _parallel.column_sums(cells)
            if sums[2][k] is not None:
                sums[2][k] += sum_x
                sums[3][k] += sum_h
            # dpre_x becomes the gradient of W_ih x
            _ln.normalise_rows_backward(dy=dpre_x, ahat=saves.ahat, rstd=saves.rstd_x,
                                        ln=ln_all[k], P=P, parts=_plan.halves(rows, parts))
            activations = None
            if packed is not None:   # the sums over rows on the micro-kernel
                activations = module._packed_activations(saves, rows, H)
            _backward.weight_grads(parts=_plan.halves(dirs * GH, parts), x=saves.x,
                                   h_prev=saves.h_prev, reset_acts=None, dgx=dpre_x, dgh=da_h,
                                   dw_ih=sums[0][k], dw_hh=sums[1][k], db_ih=None, db_hh=None,
                                   max_rows=v.BLAS_INT_MAX, packed=activations)
            if k == 0 and not input_grad:   # (see _engine.input_grads)
                dout = None
                continue
            dx = np.empty((rows, w_ih_all[k].shape[1]), dtype)
            _backward.input_grad(dgx=dpre_x, w_ih=w_ih_all[k], dx=dx, max_rows=v.BLAS_INT_MAX,
                                 parts=_plan.halves(rows, parts),
                                 packed=None if packed is None else packed[k][1])
            dout = dx
    module._commit_grads(tape, sums, grads, dh, dc)
    return dout
