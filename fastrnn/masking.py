"""Boolean step masks with Keras' semantics, on the existing kernels.

A mask (B, T) marks the steps a recurrent layer reads (True) and the steps it
skips (False), in any pattern: right or left padding, holes. Keras defines a
skipped step so: the state is carried unchanged, and the output repeats the
previous output of the direction (zeros before the first read step), or is
zero with ``zero_output_for_mask=True``.

Since a skipped step leaves the state unchanged, running each row's read
steps packed to the front with ``lengths`` = their number gives exactly the
same states; this module packs, runs the layer with ``lengths`` and scatters
the outputs back. The reverse direction of a bidirectional layer is exact
the same way: Keras runs it over the reversed sequence with the reversed
mask, which reads the same steps in the same order. Gradients are gathered
and scattered back the same way, so training is exact too. No kernel knows
about masks.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _validation as v
from fastrnn._module import add_at_once, call_parameters, run_pinned
from fastrnn._validation import shape_str


def check_mask(owner: str, mask: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask of the given shape (bool, or integers 0/1)."""
    arr = v.as_array(owner, "mask", mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or (arr.size and not np.isin(arr, (0, 1)).all()):
            raise TypeError(f"{owner}: mask must be boolean (or integers 0 and 1), got "
                            f"dtype {arr.dtype}" + ("" if arr.dtype.kind not in "iu"
                                                    else " with values other than 0 and 1"))
        arr = arr.astype(bool)
    if arr.shape != tuple(shape):
        raise ValueError(f"{owner}: expected mask of shape {shape_str(shape)} (batch, steps), "
                         f"got {shape_str(arr.shape)}")
    return arr


def flip_index(T: int, lengths: np.ndarray | None, B: int) -> np.ndarray:
    """(B, T) time indices reversing each row: within its length when
    ``lengths`` is given (ONNX's ReverseSequence; the padding stays at the
    end), else the whole axis. The map is its own inverse."""
    steps = np.arange(T)[None, :]
    if lengths is None:
        return np.broadcast_to(T - 1 - steps, (B, T))
    lengths = np.asarray(lengths)[:, None]
    return np.where(steps < lengths, lengths - 1 - steps, steps)


def take_steps(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x (B, T, F) with x[b, t] taken from x[b, index[b, t]]."""
    return np.take_along_axis(x, index[:, :, None], axis=1)


class _Plan:
    """Where each step of a masked call goes: the packed order and, for the
    outputs, the packed step each step of each direction shows."""

    RIGHT_PADDING = True   # right padding's rows as they are (the tests compare both ways)

    def __init__(self, mask: np.ndarray, zero_output: bool) -> None:
        B, T = mask.shape
        self.B, self.T = B, T
        self.counts = mask.sum(axis=1)
        self.zero_output = zero_output
        # right padding (each row reads its first steps, at least one): the
        # rows as they are, with lengths (the packing, a copy of the input
        # and a scatter-add of dout, cost 1.35-1.57x an unmasked training
        # step of LSTM 64->128 B=32 T=100, with every step read)
        self.prefix = bool(self.RIGHT_PADDING and B > 0 and self.counts.min() > 0 and (
            mask.all() or np.array_equal(mask, np.arange(T)[None, :] < self.counts[:, None])))
        if self.prefix:
            self.rows = np.arange(B)
            self.full = bool(self.counts.min() == T)       # every step read
            return
        self.rows = np.flatnonzero(self.counts)           # rows reading any step
        # the read steps first, in time order, then the skipped ones
        self.order = np.argsort(~mask, axis=1, kind="stable")[self.rows]
        before = np.cumsum(mask, axis=1)[self.rows]        # read steps up to t
        m = mask[self.rows]
        counts = self.counts[self.rows][:, None]
        pad = T                                            # index of a zero step
        # forward: a skipped step repeats the last read step before it
        self.src_fwd = np.where(before > 0, before - 1, pad)
        # reverse (run on the reversed sequence): the next read step after it
        after = before - m
        self.src_rev = np.where(after < counts, after, pad)
        if zero_output:
            self.src_fwd = np.where(m, self.src_fwd, pad)
            self.src_rev = np.where(m, self.src_rev, pad)

    def gather_x(self, x: np.ndarray) -> np.ndarray:
        """(B, T, D) -> the packed rows (B', T, D); the steps past each
        count are skipped steps the layer does not read."""
        if self.prefix:
            return x
        return take_steps(x[self.rows], self.order)

    def _past(self) -> np.ndarray:
        """(B, T): the steps past each row's count (right padding)."""
        return np.arange(self.T)[None, :] >= self.counts[:, None]

    def scatter_out(self, out: np.ndarray, hidden: int, dirs: int) -> np.ndarray:
        """Packed output (B', T, dirs * H) -> (B, T, dirs * H)."""
        if self.prefix:   # (out: the layer's own, zero past each count)
            if not (self.full or self.zero_output):   # the forward direction's last output
                last = np.minimum(np.arange(self.T)[None, :], self.counts[:, None] - 1)
                out[:, :, :hidden] = take_steps(out[:, :, :hidden], last)
            return out
        full = np.zeros((self.B, self.T, out.shape[2]), out.dtype)
        ext = np.concatenate([out, np.zeros((out.shape[0], 1, out.shape[2]), out.dtype)],
                             axis=1)
        rows = np.arange(len(self.rows))[:, None]
        if len(self.rows) == self.B:
            target = full
        else:
            target = np.empty((len(self.rows), self.T, out.shape[2]), out.dtype)
        for d, src in enumerate([self.src_fwd, self.src_rev][:dirs]):
            part = slice(d * hidden, (d + 1) * hidden)
            target[:, :, part] = ext[rows, src, part]
        if target is not full:
            full[self.rows] = target
        return full

    def gather_dout(self, dout: np.ndarray, hidden: int, dirs: int) -> np.ndarray:
        """The transpose of scatter_out: (B, T, F) -> packed (B', T, F)."""
        if self.prefix:
            return self._prefix_dout(dout, hidden)
        n = len(self.rows)
        ext = np.zeros((n, self.T + 1, dout.shape[2]), dout.dtype)
        rows = np.arange(n)[:, None]
        for d, src in enumerate([self.src_fwd, self.src_rev][:dirs]):
            part = slice(d * hidden, (d + 1) * hidden)
            view = ext[:, :, part]
            np.add.at(view, (rows, src), dout[self.rows, :, part])
        ext = ext[:, :self.T]
        ext[np.arange(self.T)[None, :] >= self.counts[self.rows][:, None]] = 0
        return ext

    def _prefix_dout(self, dout, hidden):
        """gather_dout of right padding, the same bits as its scatter-add
        (each element a sum in time order from 0.0): a step read its dout, the
        forward direction's last read step also every later step's (it showed
        that output), the steps past each count 0."""
        if self.full:
            return dout
        past = self._past()
        packed = dout + dout.dtype.type(0)            # (-0.0 as the sum from 0.0 gives it)
        if not self.zero_output:
            steps = np.arange(self.T)[None, :]
            tail = np.where((steps >= self.counts[:, None] - 1)[:, :, None],
                            dout[:, :, :hidden], 0)
            rows = np.arange(self.B)
            packed[rows, self.counts - 1, :hidden] = (np.cumsum(tail, axis=1)[:, -1]
                                                      + dout.dtype.type(0))
        packed[past] = 0
        return packed

    def scatter_dx(self, dx: np.ndarray) -> np.ndarray:
        """Packed dx (B', T, D) -> (B, T, D), zero at the skipped steps."""
        if self.prefix:
            if not self.full:
                dx[self._past()] = 0   # (the layer's own dx)
            return dx
        dx = dx.copy()
        dx[np.arange(self.T)[None, :] >= self.counts[self.rows][:, None]] = 0
        full = np.zeros((self.B, self.T, dx.shape[2]), dx.dtype)
        part = np.zeros_like(dx)
        np.put_along_axis(part, self.order[:, :, None], dx, axis=1)
        full[self.rows] = part
        return full


def _pack_state(parts, lstm):
    return tuple(parts) if lstm else parts[0]


def masked_call(layer: Any, x: ArrayLike, hx: Any, mask: ArrayLike, zero_output: bool,
                train: bool) -> Any:
    """A recurrent layer's call (``train``: its ``forward_train``) under a mask.

    Returns what the layer's call returns, ``(out, state)``; with ``train``,
    ``((out, state), backprop)``. See the layers' ``mask`` argument.
    """
    # the learned initial states and the call: one set
    return run_pinned([layer], lambda: _masked_call(layer, x, hx, mask, zero_output, train))


def _masked_call(layer, x, hx, mask, zero_output, train):
    from fastrnn.layers import LSTM
    owner = type(layer).__name__
    zero_output = v.check_bool(owner, "zero_output_for_mask", zero_output)
    dtype = layer.dtype
    x = v.as_float_array(owner, "input", x, dtype)
    D = layer.input_size
    layout = "(B, T, {0}) or (T, {0})" if layer.batch_first else "(T, B, {0}) or (T, {0})"
    if x.ndim not in (2, 3) or x.shape[-1] != D:
        raise ValueError(f"{owner}: expected input of shape {layout.format(D)}, got "
                         f"{shape_str(x.shape)}")
    batched = x.ndim == 3
    if not batched:                      # one sequence (T, D): a batch of one
        xb = x[None]
        mask = check_mask(owner, mask, (x.shape[0],))[None]
    else:
        xb = x if layer.batch_first else x.swapaxes(0, 1)
        mask = check_mask(owner, mask, xb.shape[:2])
    B, T = mask.shape
    if T == 0:
        raise ValueError(f"{owner}: expected at least one time step, got input of shape "
                         f"{shape_str(x.shape)}")
    lstm = isinstance(layer, LSTM)
    dirs, H = 2 if layer.bidirectional else 1, layer._out_size   # H: the output's width
    params = call_parameters(layer)   # its learned initial states, if any and hx is None
    learned = hx is None and layer._learned_state(params) is not None
    h, c = layer._initial_state(params, hx, B, batched)
    states = [h] if c is None else [h, c]
    plan = _Plan(mask, zero_output)
    rows = plan.rows

    def to_layer(a):   # batch-first (B', T, F) <-> the layer's layout (its own inverse)
        return a if layer.batch_first else a.swapaxes(0, 1)

    def results(out_full, parts):
        out = to_layer(out_full) if batched else out_full[0]
        if not batched:
            parts = [p[:, 0] for p in parts]
        return np.ascontiguousarray(out), _pack_state(parts, lstm)

    packed_state = _pack_state([s[:, rows] for s in states], lstm)
    inner_backprop = None
    if len(rows):
        xc = np.ascontiguousarray(to_layer(plan.gather_x(xb)))
        lengths = plan.counts[rows]
        if train:
            (out_c, state_c), inner_backprop = layer.forward_train(xc, packed_state, lengths)
        else:
            out_c, state_c = layer(xc, packed_state, lengths)
        out_full = plan.scatter_out(to_layer(out_c), H, dirs)
        parts_c = list(state_c) if lstm else [state_c]
    else:
        out_full = np.zeros((B, T, dirs * H), dtype)
        parts_c = []
    parts = []
    for i, s in enumerate(states):        # skipped rows keep their initial state
        full = s.copy()
        if len(rows):
            full[:, rows] = parts_c[i]
        parts.append(full)
    result = results(out_full, parts)
    if not train:
        return result
    out_shape = result[0].shape
    # per state (h, and c for an LSTM; with proj_size h is the narrower)
    state_shapes = [p.shape for p in (result[1] if lstm else [result[1]])]
    added = []   # the learned states' gradients were added (the backprop ran)

    def backprop(dout: ArrayLike, dstate: Any = None) -> tuple[np.ndarray, Any]:
        bowner = f"{owner}.backprop"
        dout = v.as_float_array(bowner, "dout", dout, dtype)
        if dout.shape != out_shape:
            raise ValueError(f"{bowner}: expected dout of the output's shape "
                             f"{shape_str(out_shape)}, got {shape_str(dout.shape)}")
        names = ("dh_n", "dc_n") if lstm else ("dh_n",)
        full_shapes = [(shape[0], B, shape[-1]) for shape in state_shapes]
        grads = list(v.state_arrays(bowner, "dstate", dstate, names, state_shapes, dtype,
                                    full_shape=full_shapes, optional_parts=True))
        doutb = dout[None] if not batched else to_layer(dout)
        dx_full = np.zeros((B, T, D), dtype)
        dh0 = [g.copy() for g in grads]      # skipped rows: the state passes through
        if inner_backprop is not None:
            dout_c = to_layer(plan.gather_dout(doutb, H, dirs))
            dstate_c = _pack_state([np.ascontiguousarray(g[:, rows]) for g in grads], lstm)
            dx_c, dhx_c = inner_backprop(np.ascontiguousarray(dout_c), dstate_c)
            dx_full = plan.scatter_dx(to_layer(dx_c))
            for i, part in enumerate(list(dhx_c) if lstm else [dhx_c]):
                dh0[i][:, rows] = part
        if learned:
            # the layer ran from the states given to it: the learned states'
            # gradients (every row's, skipped rows' too) are added here, once
            with layer._grad_lock:
                if added:
                    raise RuntimeError(f"{bowner}: this backprop has already run; call "
                                       f"forward_train again for another backward pass")
                if layer._version != params.version:
                    raise RuntimeError(f"{bowner}: the parameters changed after "
                                       f"forward_train (load_state_dict or an optimizer "
                                       f"step); the saved activations no longer match them")
                add_at_once(layer._initial_grads(*dh0))
                layer._grads_zeroed = False
                added.append(True)
        if not batched:
            return dx_full[0], _pack_state([g[:, 0] for g in dh0], lstm)
        return np.ascontiguousarray(to_layer(dx_full)), _pack_state(dh0, lstm)

    return result, backprop


# --- Sequential: layers run on batch-first sequences with a mask ---------------------
# carries_steps' third state: after a bidirectional layer
BIDIRECTIONAL = "bidirectional"


def carries_steps(layer: Any, carried: bool | str) -> bool | str:
    """Whether, after ``layer``, the masked steps of a sequence hold the
    values of the step kept before them, or Keras' zeros there
    (``carried``: they did before it): a recurrent layer repeats its last
    output there (ZeroMasked zeros it, as Keras' zero_output_for_mask,
    whose last output is then the zeroed step T - 1), and the layers after
    it work step by step, so a LastStep takes step T - 1; a layer that makes
    a mask starts a sequence whose masked steps hold their own values, so a
    LastStep takes each row's last kept step. So does a layer reversed in
    the input's order (``Reversed(keep_order=True)``), whose masked steps
    after the last kept one hold what it computed before reading any (it
    read them first): its step T - 1 of a padded row was zeros. After a
    bidirectional layer (BIDIRECTIONAL) a LastStep takes each row's last
    kept step too, the step ``lengths[b] - 1`` a ragged batch takes: the
    reverse half of a padded row's step T - 1 holds that direction's state
    before it read anything, where a row as long as the batch holds its
    state after one step (a sequence's result depended on the padding the
    batch gave it); a ZeroMasked after it zeroes both halves, and Keras'
    rule (step T - 1) holds again."""
    from fastrnn.nn import ZeroMasked   # (imports this module)
    if getattr(layer, "_makes_mask", False) or _reverses(layer, in_order=True):
        return False
    if isinstance(layer, ZeroMasked) and not layer._config["reverse"]:
        return True if carried == BIDIRECTIONAL else carried
    rnn_base, wrapper = _recurrent_kinds()
    if isinstance(layer, (rnn_base, wrapper)):
        from fastrnn.wrappers import _recurrent
        inner = _recurrent(layer) if isinstance(layer, wrapper) else layer
        if inner._config["bidirectional"] and not _reverses(layer):
            return BIDIRECTIONAL
        return True
    return carried


def _reverses(layer: Any, in_order: bool = False) -> bool:
    """Whether ``layer`` is (or wraps) a ``Reversed`` (``in_order``: one
    with keep_order=True)."""
    if not isinstance(layer, _recurrent_kinds()[1]):
        return False
    from fastrnn.wrappers import Reversed, _wrappers
    return any(isinstance(w, Reversed) and (w.keep_order or not in_order)
               for w in _wrappers(layer))


def mask_for(layer: Any, mask: np.ndarray | None, carried: bool | str) -> dict:
    """The keyword arguments that give ``layer`` (not recurrent) the mask:
    to a layer that takes one, but a LastStep only where the masked steps
    are not carried (``carries_steps``: True)."""
    if mask is None or not getattr(layer, "_takes_mask", False):
        return {}
    if carried is True:
        from fastrnn.nn import LastStep   # (not at every streamed frame: only here)
        if isinstance(layer, LastStep):
            return {}
    return {"mask": mask}


_KINDS: tuple = ()


def _recurrent_kinds():
    """The recurrent layers' and the wrappers' classes, imported once (they
    import this module; a streamed frame asks per layer)."""
    global _KINDS
    if not _KINDS:
        from fastrnn.layers import _RNNBase
        from fastrnn.wrappers import _Wrapper
        _KINDS = (_RNNBase, _Wrapper)
    return _KINDS


def seq_call(layer: Any, x: np.ndarray, mask: np.ndarray | None, train: bool,
             carried: bool | str = False, given: np.ndarray | None = None,
             lengths: np.ndarray | None = None
             ) -> tuple[np.ndarray, Callable[..., Any] | None, np.ndarray | None]:
    """Run one layer of a Sequential on batch-first x with an optional mask.

    Returns (y, backprop or None, the mask of y): a recurrent layer (or a
    wrapper of one) reads the mask; a layer that makes a mask (``Masking``,
    ``Embedding(mask_zero=True)``) makes it; a layer without a step axis in
    its output (``LastStep``) ends it; every other layer passes it on.
    ``carried``: x's masked steps carry the kept ones' values
    (``carries_steps``), where a LastStep takes step T - 1 (after a
    go_backwards layer the mask passed on is not in its output's order).
    A layer's mask replaces the one of the layers before it (Keras' rule:
    ``Masking.compute_mask`` ignores its input's), kept within ``given``,
    the call's own (the caller's ``mask``, a ragged batch's lengths).
    ``lengths``: a ragged batch's, which a ``Reversed`` (and a
    ``ZeroMasked(reverse=True)`` after it) takes beside the mask, to reverse
    each sequence within its length (as if alone), and a LastStep taking
    "step T - 1" takes as each row's (its step ``lengths[b] - 1``).
    """
    from fastrnn.layers import _RNNBase
    if getattr(layer, "_makes_mask", False):
        new_mask = layer._seq_mask(x)
        mask = new_mask if given is None else given & new_mask
    if isinstance(layer, _RNNBase):
        if mask is None:
            y, backprop = layer._seq_train(x) if train else (layer._seq_infer(x), None)
            return y, backprop, None
        swap = not layer.batch_first
        xl = np.swapaxes(x, 0, 1) if swap else x
        if train:
            (out, _), inner = layer.forward_train(xl, mask=mask)

            def backprop(dy):
                dx, _ = inner(np.swapaxes(dy, 0, 1) if swap else dy)
                return np.swapaxes(dx, 0, 1) if swap else dx
        else:
            out, _ = layer(xl, mask=mask)
            backprop = None
        y = np.ascontiguousarray(np.swapaxes(out, 0, 1)) if swap else out
        return y, backprop, mask
    kwargs = mask_for(layer, mask, carried)
    if lengths is not None and "mask" in kwargs and (
            _reverses(layer) or getattr(layer, "_flips_steps", False)):
        kwargs["lengths"] = lengths
    elif lengths is not None and carried is True and mask is not None \
            and getattr(layer, "_takes_mask", False) and "mask" not in kwargs:
        # a LastStep where Keras' rule takes step T - 1: of a ragged batch's
        # row, its own last step (lengths[b] - 1), not the padding after it,
        # as if the sequence were alone
        kwargs["lengths"] = lengths
    if train:
        y, backprop = layer._seq_train(x, **kwargs)
    else:
        y, backprop = layer._seq_infer(x, **kwargs), None
    if getattr(y, "ndim", 0) < 3:
        mask = None
    return y, backprop, mask
