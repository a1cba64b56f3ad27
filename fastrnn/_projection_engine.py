"""The drivers of the LSTM with a projection (PyTorch's ``proj_size``): how
``_engine.RecurrentEngine._run_layers`` and ``_bptt`` run a layer whose
state h is W_hr (o * tanh(c)), P < H values wide.

The equations are in ``_projection.pyx.tp``. A call goes through the same
plan as the plain layers (``_plan.forward_plan`` / ``backward_plan``: its
``parts``, the directions and batch ranges run at once; no hidden-unit
split, BLAS always held at one thread, since both per-step products are
whole BLAS calls); per layer:

forward
    ``_forward.project`` (W_ih x of every step plus b_ih + b_hh; float32 on
    the micro-kernel over the packed W_ih), then ``_projection.recur`` (per
    step h @ W_hh^T, the gates, m @ W_hr^T);
BPTT
    ``_projection.backward`` (per step, in reverse, the gates' gradients
    and those of every h_t), then ``_backward.weight_grads`` (dW_ih, dW_hh,
    the biases) and ``input_grad`` as for the plain layers, and dW_hr, the
    sums over rows of dh_t^T m_t per direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastrnn import _parallel, _plan
from fastrnn import _validation as v
from fastrnn._kernels import backward as _backward
from fastrnn._kernels import forward as _forward
from fastrnn._kernels import projection as _proj
from fastrnn._module import dropout_mask

# the option's entry in the LSTM's docstring
PROJ_SIZE_DOC = """
    proj_size : int, default 0
        Keyword only: PyTorch's ``proj_size`` (LSTM with projections, Sak et
        al. 2014). P > 0 projects the state: h_t = W_hr (o_t * tanh(c_t)), so
        h, the output and the next layer's input are P wide (P < H), while
        the cell c stays H wide. Adds ``weight_hr_l{k}`` (P, H) (with
        ``_reverse``); ``weight_hh_l{k}`` is then (4H, P) and ``weight_ih_l{k}``
        of layer k > 0 (4H, dirs * P); hx is (h_0 of (layers * dirs, B, P),
        c_0 of (layers * dirs, B, H)). Combines with the layer's own options,
        lengths, masks, ``learn_initial_state`` and ``weight_dropout``, not
        with the gate options, zoneout, Keras' dropouts or ``layer_norm``."""


@dataclass(slots=True)
class ProjLayerTape:
    """What BPTT needs of one projected layer's training forward: its
    input x (R, D_in), the saved gate activations and m (see
    _projection.pyx.tp), the states before each step, the dropout mask
    applied to its output (None: no dropout)."""
    x: np.ndarray
    acts: np.ndarray
    m: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    mask: np.ndarray | None = None


def check(owner, proj_size, hidden_size, options):
    """The checked ``proj_size`` of an LSTM of ``hidden_size`` units;
    options: (name, value) of the options set that it does not combine
    with (empty when none is)."""
    proj_size = v.check_int(owner, "proj_size", proj_size, minimum=0)
    if proj_size >= hidden_size:
        raise ValueError(f"{owner}: proj_size must be smaller than hidden_size "
                         f"({hidden_size}), got {proj_size}")
    if proj_size and options:
        got = ", ".join(f"{key}={value!r}" for key, value in options)
        raise ValueError(f"{owner}: proj_size={proj_size} runs the default LSTM gates (no "
                         f"gate options, zoneout, input_dropout, recurrent_dropout or "
                         f"layer_norm), got {got}")
    return proj_size


def _biases(module, params):
    """Per layer b_ih + b_hh (None without bias), kept with the parameter set."""
    terms = params.cache.get("proj_biases")
    if terms is None:
        _, _, b_ih_all, b_hh_all = module._weights(params)
        terms = params.cache["proj_biases"] = [
            None if b_ih is None else b_ih + b_hh for b_ih, b_hh in zip(b_ih_all, b_hh_all)]
    return terms


def _packed(module, params, backward):
    """float32: per layer W_hh and W_hr (and for BPTT W_ih) packed for the
    kernels' products (``_projection.pack_forward`` / ``pack_backward``),
    once per parameter set (the engine's cache); float64 (BLAS): None per layer."""
    w_hr_all, dirs = module._projections(params), module._dirs
    if backward:
        packs = module._packed(params, "proj_packed_backward", lambda w_ih, w_hh, k:
                               _proj.pack_backward(w_ih, w_hh, w_hr_all[k], dirs))
    else:
        packs = module._packed(params, "proj_packed", lambda w_ih, w_hh, k:
                               _proj.pack_forward(w_hh, w_hr_all[k], dirs))
    return [None] * module._layers if packs is None else packs


def run_layers(module, params, layer_in, T, B, batch_first, h_n, c_n, out, lengths, train, gx,
               parts, tape):
    """Every layer of a forward (see ``_engine.RecurrentEngine._run``):
    layer_in (R, D) in the call's row order, h_n (layers * dirs, B, P) and
    c_n (layers * dirs, B, H) the initial state in and the final out, out
    (R, dirs * P) the top layer's output; gx an (R, dirs * 4H) buffer; in
    training the layers' saves go to ``tape``."""
    cfg = module._config
    dtype, H, P = cfg["dtype"], cfg["hidden_size"], module._out_size
    L, dirs = module._layers, module._dirs
    rows = T * B
    w_ih_all, w_hh_all = module._weights(params)[:2]
    w_hr_all = module._projections(params)
    packed_ih = module._packed_projection(params)
    packed = _packed(module, params, backward=False)
    work = np.empty((dirs * B, 5 * H + P), dtype)
    # inference: the saves of one step, a (B, .) scratch
    acts = None if train else np.empty((B, dirs * _proj.SAVED * H), dtype)
    m = None if train else np.empty((B, dirs * H), dtype)
    for k, bias in enumerate(_biases(module, params)):
        last = k == L - 1
        layer_out = out.reshape(rows, -1) if last else np.empty((rows, dirs * P), dtype)
        if train:
            acts = np.empty((rows, dirs * _proj.SAVED * H), dtype)
            m = np.empty((rows, dirs * H), dtype)
            h_prev = np.empty((rows, dirs * P), dtype)
            c_prev = np.empty((rows, dirs * H), dtype)
        else:
            h_prev = c_prev = None
        _forward.project(x=layer_in, w_ih=w_ih_all[k], bias_x=bias, gx=gx,
                         max_rows=v.BLAS_INT_MAX, parts=_plan.halves(rows, parts),
                         packed=None if packed_ih is None else packed_ih[k], hidden_size=H)
        _proj.recur(T=T, batch_first=batch_first, parts=parts, w_hh=w_hh_all[k],
                    w_hr=w_hr_all[k], h=h_n[k * dirs:(k + 1) * dirs],
                    c=c_n[k * dirs:(k + 1) * dirs], gx=gx, out=layer_out, lengths=lengths,
                    train=train, acts=acts, m=m, h_prev=h_prev, c_prev=c_prev, work=work,
                    packed=packed[k])
        if train:
            saves = ProjLayerTape(layer_in, acts, m, h_prev, c_prev)
            if not last and module._dropout > 0:
                saves.mask = dropout_mask(module._rng, layer_out.shape, module._dropout, dtype)
                layer_out = layer_out * saves.mask
            tape.layers.append(saves)
        layer_in = layer_out


def bptt(module, tape, T, B, dout, dh, dc, input_grad=True):
    """BPTT through a tape of ``run_layers`` (see ``_engine._bptt``): dout
    (R, dirs * P) in the tape's row order; dh (layers * dirs, B, P), dc
    (layers * dirs, B, H) the final states' gradients, updated in place
    into the initial states'. Adds the parameter gradients into the
    module's and returns dx (R, D)."""
    cfg = module._config
    dtype, H, P = cfg["dtype"], cfg["hidden_size"], module._out_size
    dirs = module._dirs
    rows = T * B
    parts = _plan.backward_plan(module, T, B).parts
    w_ih_all, w_hh_all = module._weights(tape.params)[:2]
    w_hr_all = module._projections(tape.params)
    packed = _packed(module, tape.params, backward=True)
    # this backprop's gradients, added to the module's only when every layer
    # is done: an interrupted backprop (Ctrl-C) adds nothing
    grads = (module._dw_ih, module._dw_hh, module._db_ih, module._db_hh, module._dw_hr)
    sums = [[None if g is None else np.zeros_like(g) for g in kind] for kind in grads]
    dgx = np.empty((rows, dirs * 4 * H), dtype)
    dhr = np.empty((rows, dirs * P), dtype)
    work = np.empty((dirs * B, H + P), dtype)
    with _parallel.blas_at_one_thread:   # the kernels' products are whole BLAS calls
        for k in reversed(range(module._layers)):
            saves = tape.layers[k]
            if saves.mask is not None:
                dout = dout * saves.mask
            _proj.backward(T=T, batch_first=tape.batch_first, parts=parts, w_hh=w_hh_all[k],
                           w_hr=w_hr_all[k], acts=saves.acts, c_prev=saves.c_prev,
                           dout=np.ascontiguousarray(dout), dh=dh[k * dirs:(k + 1) * dirs],
                           dc=dc[k * dirs:(k + 1) * dirs], dgx=dgx, dhr=dhr,
                           lengths=tape.lengths, work=work, packed=packed[k])
            activations = None
            if packed[k] is not None:
                # float32: the sums over rows on the micro-kernel, each element
                # one chain whatever the split of the gate columns between threads
                activations = module._packed_activations(saves, rows, P)
            _backward.weight_grads(parts=_plan.halves(dgx.shape[1], parts), x=saves.x,
                                   h_prev=saves.h_prev, reset_acts=None, dgx=dgx, dgh=None,
                                   dw_ih=sums[0][k], dw_hh=sums[1][k], db_ih=sums[2][k],
                                   db_hh=sums[3][k], max_rows=v.BLAS_INT_MAX,
                                   packed=activations)
            for d in range(dirs):   # dW_hr: the sums over rows of dh_t^T m_t
                sums[4][k][d * P:(d + 1) * P] += _parallel.row_products(
                    dhr[:, d * P:(d + 1) * P], saves.m[:, d * H:(d + 1) * H])
            if k == 0 and not input_grad:   # (see _engine.input_grads)
                dout = None
                continue
            dx = np.empty((rows, w_ih_all[k].shape[1]), dtype)
            _backward.input_grad(dgx=dgx, w_ih=w_ih_all[k], dx=dx, max_rows=v.BLAS_INT_MAX,
                                 parts=_plan.halves(rows, parts),
                                 packed=None if packed[k] is None else packed[k][2])
            dout = dx
    module._commit_grads(tape, sums, grads, dh, dc)
    return dout
