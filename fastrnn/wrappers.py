"""Wrappers that give a recurrent layer another framework's behaviour without
new arithmetic: ``Reversed`` (ONNX ``direction="reverse"``, Keras
``go_backwards=True``) and ``Stateful`` (Keras ``stateful=True``).

A wrapper owns no parameters of its own: its parameters, gradients,
``state_dict`` and configuration are the wrapped layer's (attribute access
falls through to it), so optimizers and ``Sequential`` train it as the layer
itself. It works in a ``Sequential`` (with masks and ragged batches), and a
model file (``fastrnn.save``) holds it: the wrapped layer's weights under the
layer's own names, the wrapper's options in the JSON description (a
``Stateful``'s, not the state it carries).
"""
from __future__ import annotations

import contextlib

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _validation as v
from fastrnn._locks import CallLock, ForkSafeLock
from fastrnn._own_values import own_values
from fastrnn.masking import check_mask, flip_index, take_steps


def _check_inner(owner, layer):
    from fastrnn.layers import _RNNBase
    if not isinstance(layer, (_RNNBase, _Wrapper)):
        raise TypeError(f"{owner}: layer must be a fastrnn RNN, GRU or LSTM (or a wrapper of "
                        f"one), got {type(layer).__name__}")
    inner = layer
    while isinstance(inner, _Wrapper):
        if isinstance(inner, Stateful):   # it takes no hx: it must be the outermost wrapper
            raise TypeError(f"{owner}: layer must not hold a Stateful (a Stateful carries its "
                            f"own state and takes no hx, so it goes outermost: "
                            f"Stateful(Reversed(layer))), got {layer!r}")
        inner = inner.layer
    return layer


def _wrappers(layer):
    """The wrappers around a layer, outermost first (none for a bare one)."""
    while isinstance(layer, _Wrapper):
        yield layer
        layer = layer.layer


@contextlib.contextmanager
def states_kept(layers, stepped=None):
    """Each ``Stateful`` among ``layers`` (or within their wrappers) as it
    was if the block raises: a model call, train step or predict that fails
    after one carried its state on (a later layer, the loss, a batch of
    another size) leaves none of them moved, as a Stateful's own failed
    call does. Unless ``stepped()`` says the block's optimizer step took
    effect (an interrupt after it): the states stay with the weights they
    came with."""
    held = [w for layer in layers for w in _wrappers(layer) if isinstance(w, Stateful)]
    if not held:
        yield
        return
    saved = [(w, w._state, w._carried, w._batch_size) for w in held]
    try:
        yield
    except BaseException:
        if stepped is None or not stepped():
            for w, state, carried, size in saved:
                w._state, w._carried, w._batch_size = state, carried, size
        raise


def _recurrent(layer):
    """The RNN/GRU/LSTM inside any wrappers."""
    for wrapper in _wrappers(layer):
        layer = wrapper.layer
    return layer


class _Wrapper:
    """Base: everything not defined here is the wrapped layer's."""
    _takes_mask = True
    _takes_lengths = True

    _own = ("layer",)   # the wrapper's own public attributes (and any _private one)

    def __getattr__(self, name):
        if name.startswith("__") or name == "layer":
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __setattr__(self, name, value):
        # what reads fall through to is set there too (the layer checks it), not
        # shadowed on the wrapper while the layer computes with the old value;
        # the wrapper's own settings checked as its constructor checks them, and
        # a read-only one (Stateful.batch_size) refused, not set on the layer
        if name == "layer":
            value = _check_inner(type(self).__name__, value)
            if "layer" in self.__dict__ and isinstance(self, Stateful):
                # (the carried state was the old layer's: the next call starts afresh)
                self._state, self._carried = None, False
        elif name == "keep_order" and name in type(self)._own:
            value = v.check_bool(type(self).__name__, name, value)
        if name.startswith("_") or name in type(self)._own \
                or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            setattr(self.layer, name, value)

    def __repr__(self):
        return f"{type(self).__name__}({self.layer!r}{self._repr_extra()})"

    def _repr_extra(self):
        return ""

    def _wrapper_config(self):
        """The wrapper's own constructor arguments (the layer aside), for a
        model file."""
        raise NotImplementedError

    def save(self, path: Any) -> None:
        """Write the wrapper to one file, the wrapped layer within (see
        ``fastrnn.save``); not the wrapped layer's ``save``, which would
        leave the wrapper out."""
        from fastrnn.model import save   # fastrnn.model imports _saving, which imports this
        save(self, v.check_path(f"{type(self).__name__}.save", "path", path))

    # the Sequential protocol: batch-first sequences in and out
    def _swap(self):
        return not _recurrent(self).batch_first

    def _seq_infer(self, x, mask=None, lengths=None):
        swap = self._swap()
        out, _ = self(np.swapaxes(x, 0, 1) if swap else x, lengths=lengths, mask=mask)
        return np.ascontiguousarray(np.swapaxes(out, 0, 1)) if swap else out

    def _seq_train(self, x, mask=None, lengths=None):
        swap = self._swap()
        (out, _), backprop = self.forward_train(np.swapaxes(x, 0, 1) if swap else x,
                                                lengths=lengths, mask=mask)

        def backprop_seq(dy):
            dx, _ = backprop(np.swapaxes(dy, 0, 1) if swap else dy)
            return np.swapaxes(dx, 0, 1) if swap else dx

        return (np.swapaxes(out, 0, 1) if swap else out), backprop_seq


class Reversed(_Wrapper):
    """A layer run over the time-reversed sequence.

    Parameters
    ----------
    layer : RNN, GRU or LSTM (unidirectional, usually)
    keep_order : bool, default True
        True: the output is put back in the input's time order (ONNX
        ``direction="reverse"``: the output at step t is the state after
        reading steps T-1 .. t). False: the output stays in the order it was
        computed, first the step that read the last input (Keras
        ``go_backwards=True``, whose ``return_sequences`` output is
        reversed).

    Notes
    -----
    Called as the layer, ``out, state = rev(x, hx=None, lengths=None,
    mask=None, zero_output_for_mask=False)``, with ``forward_train`` alike.
    With ``lengths`` each sequence is reversed within its own length (ONNX
    Runtime's and cuDNN's rule: the padding stays at the end, and with
    ``keep_order=False`` the output too is reversed within the length). With
    a ``mask`` the whole time axis is reversed and the mask with it (Keras'
    rule for ``go_backwards``); the masked steps then follow the mask
    semantics of the layers (see ``fastrnn.masking``). With both, each
    sequence is reversed within its length and its mask with it, the steps
    past a length masked (a ragged batch in a ``Sequential`` with a mask:
    each sequence as if alone; with the whole axis reversed, a
    ``keep_order=False`` output of a short sequence began with its
    padding, where the model reads its first steps). In a ``Sequential``
    the mask passed on after a ``keep_order=False`` layer is its input's,
    not reversed with the output, as Keras passes it on (a ``go_backwards``
    layer's ``compute_mask`` returns its input mask).

    Examples
    --------
    >>> rev = fastrnn.Reversed(fastrnn.GRU(3, 4))   # ONNX direction="reverse"
    >>> out, h_n = rev(x)        # out[0] has read the whole sequence
    """

    _own = ("layer", "keep_order")

    def __init__(self, layer: Any, keep_order: bool = True) -> None:
        self.layer = layer                     # (checked by __setattr__)
        self.keep_order = keep_order

    def _repr_extra(self):
        return "" if self.keep_order else ", keep_order=False"

    def _wrapper_config(self):
        return {"keep_order": self.keep_order}

    def _flipper(self, x, lengths, mask):
        """A function flipping arrays laid out as x, and the flipped mask."""
        owner = "Reversed"
        x = v.to_numpy(owner, "input", x)
        # the layer's refusals first: the flips below copy x (a broadcast
        # view of 2**31 rows, refused for its batch size, was copied whole)
        _recurrent(self)._check_input_shape(x.shape)
        batched = x.ndim == 3
        time_axis = 1 if batched and _recurrent(self).batch_first else 0
        T = x.shape[time_axis]
        B = x.shape[1 - time_axis] if batched else 1
        if lengths is not None:
            if not batched:
                raise ValueError(f"{owner}: lengths needs batched input; for one unbatched "
                                 f"sequence pass input[:length] instead")
            lengths = v.check_lengths(owner, lengths, B, T)
        index = flip_index(T, lengths, B)

        def flip(a):
            if not batched:
                return np.ascontiguousarray(a[::-1])
            a_bf = a if time_axis == 1 else a.swapaxes(0, 1)
            out = take_steps(a_bf, index)
            return np.ascontiguousarray(out if time_axis == 1 else out.swapaxes(0, 1))

        if mask is not None:
            mask = check_mask(owner, mask, (B, T) if batched else (T,))
            if lengths is None:    # Keras' rule: the whole axis
                mask = np.ascontiguousarray(mask[..., ::-1])
            else:                  # within each length, past it masked
                mask = np.take_along_axis(mask, index, axis=1) & (
                    np.arange(T)[None, :] < lengths[:, None])
                lengths = None     # (the inner layer takes the mask alone)
        return flip, x, lengths, mask

    def __call__(self, x: ArrayLike, hx: Any = None, lengths: ArrayLike | None = None, *,
                 mask: ArrayLike | None = None, zero_output_for_mask: bool = False) -> Any:
        flip, x, lengths, mask = self._flipper(x, lengths, mask)
        extra = {"mask": mask, "zero_output_for_mask": zero_output_for_mask}
        out, state = self.layer(flip(x), hx, lengths, **extra)
        return (flip(out) if self.keep_order else out), state

    def forward_train(self, x: ArrayLike, hx: Any = None, lengths: ArrayLike | None = None,
                      *, mask: ArrayLike | None = None, zero_output_for_mask: bool = False
                      ) -> tuple[Any, Callable[..., Any]]:
        flip, x, lengths, mask = self._flipper(x, lengths, mask)
        extra = {"mask": mask, "zero_output_for_mask": zero_output_for_mask}
        (out, state), inner = self.layer.forward_train(flip(x), hx, lengths, **extra)
        keep = self.keep_order

        def backprop(dout: ArrayLike, dstate: Any = None) -> tuple[np.ndarray, Any]:
            dout = v.to_numpy("Reversed.backprop", "dout", dout)
            if dout.shape != out.shape:
                raise ValueError(f"Reversed.backprop: expected dout of the output's shape "
                                 f"{v.shape_str(out.shape)}, got {v.shape_str(dout.shape)}")
            dx, dhx = inner(flip(dout) if keep else dout, dstate)
            return flip(dx), dhx

        return ((flip(out) if keep else out), state), backprop


class Stateful(CallLock, _Wrapper):
    """A layer that carries its state from one call to the next (Keras'
    ``stateful=True``).

    Each call starts from the state the previous call (inference or
    training) ended with, row by row: sample i of a batch continues sample i
    of the previous batch. Training does not backpropagate into earlier
    calls (the carried state is a constant, as in Keras). ``reset_state()``
    starts again from the layer's initial state (zeros, or the learned one).

    Parameters
    ----------
    layer : RNN, GRU or LSTM, or a Reversed of one (a Stateful goes
        outermost: no wrapper takes one)
    batch_size : int, optional
        The fixed batch size. If None, the first call (after construction)
        that succeeds fixes it. Every call must have exactly this batch size (Keras builds
        a stateful layer for one batch size); a call with another raises a
        ValueError. So feed ``Sequential.fit`` with ``shuffle=False`` and a
        ``batch_size`` dividing the number of samples.

    Notes
    -----
    Called as the layer, without ``hx`` (the other arguments keyword only):
    ``out, state = s(x, lengths=None, mask=None, zero_output_for_mask=False)``;
    ``forward_train`` alike. With
    ``lengths`` or a ``mask`` the carried state is each row's state after
    its own last valid step. ``state`` (a property) holds copies of the
    carried state (None after a reset).

    Calls from several threads run one at a time, each continuing the
    state the one before left.

    A model file (``fastrnn.save``) holds the batch size (as fixed by then)
    but not the carried state: a loaded Stateful starts from the initial
    state (set it with ``reset_state(states)``). A ``fastrnn.Stream`` runs the wrapped
    layer from the Stream's own state (see ``Stream``).
    """

    def __init__(self, layer: Any, batch_size: int | None = None) -> None:
        self.layer = layer                     # (checked by __setattr__)
        self._batch_size = None if batch_size is None else \
            v.check_int("Stateful", "batch_size", batch_size)
        self._state = None
        self._carried = False   # _state is the last call's, not one the caller gave
        # one call at a time: each reads the carried state and leaves the next
        # (threads sharing a Stateful would otherwise lose each other's steps)
        self._lock = ForkSafeLock()

    def _repr_extra(self):
        return "" if self._batch_size is None else f", batch_size={self._batch_size}"

    def _wrapper_config(self):
        return {"batch_size": self._batch_size}

    @property
    def batch_size(self) -> int | None:
        return self._batch_size

    @property
    def state(self) -> Any:
        s = self._state   # (a call replaces it, never changes it)
        if s is None:
            return None
        return tuple(None if a is None else a.copy() for a in s) if isinstance(s, tuple) \
            else s.copy()

    def reset_state(self, states: Any = None) -> None:
        """Start the next call from ``states`` (arrays shaped as the layer's
        ``hx`` for the fixed batch size; checked by that call), or from
        the layer's initial state if None (zeros, or the learned one; Keras'
        ``reset_state``)."""
        pair = _recurrent(self)._has_cell_state   # its state is (h, c)
        if states is None:
            new = None
        elif isinstance(states, tuple) or pair and isinstance(states, list):
            # an LSTM's part may be None (zeros); a GRU's or RNN's nested list is one array
            new = tuple(None if s is None else np.array(v.to_numpy("Stateful", "states", s))
                        for s in states)
        else:
            new = np.array(v.to_numpy("Stateful", "states", states))
        with self._lock:
            self._state, self._carried = new, False

    def _batch(self, x):
        x = v.to_numpy("Stateful", "input", x)
        if x.ndim != 3:
            raise ValueError(f"Stateful: expected batched input (3 dimensions; a stateful "
                             f"layer carries one state per batch row), got "
                             f"{v.shape_str(x.shape)}")
        B = x.shape[0] if _recurrent(self).batch_first else x.shape[1]
        if B == 0:
            raise ValueError("Stateful: expected a batch of at least one sequence (a stateful "
                             "layer carries one state per batch row), got 0")
        if self._batch_size is not None and B != self._batch_size:
            raise ValueError(f"Stateful: expected a batch of {self._batch_size} sequences (the "
                             f"batch size is fixed: sample i continues sample i of the last "
                             f"batch), got {B}; use batch_size dividing the data, or "
                             f"shuffle=False and drop the remainder")
        return x

    def _keep(self, state):
        """After a call that succeeded: carry its state; its batch fixes the
        batch size if none was (a call that raised leaves both as they were)."""
        self._state = tuple(a.copy() for a in state) if isinstance(state, tuple) \
            else state.copy()
        self._carried = True
        if self._batch_size is None:
            self._batch_size = (state[0] if isinstance(state, tuple) else state).shape[1]

    def __call__(self, x: ArrayLike, *, lengths: ArrayLike | None = None,
                 mask: ArrayLike | None = None, zero_output_for_mask: bool = False) -> Any:
        x = self._batch(x)
        extra = {"mask": mask, "zero_output_for_mask": zero_output_for_mask}
        with self._lock, own_values(self, state=getattr(self, "_carried", False)):
            out, state = self.layer(x, self._state, lengths, **extra)
            self._keep(state)
        return out, state

    def forward_train(self, x: ArrayLike, *, lengths: ArrayLike | None = None,
                      mask: ArrayLike | None = None, zero_output_for_mask: bool = False
                      ) -> tuple[Any, Callable[..., Any]]:
        x = self._batch(x)
        extra = {"mask": mask, "zero_output_for_mask": zero_output_for_mask}
        with self._lock:
            (out, state), backprop = self.layer.forward_train(x, self._state, lengths, **extra)
            self._keep(state)
        return (out, state), backprop
