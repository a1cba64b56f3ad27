"""Stateful streaming: feed a sequence a frame or a chunk at a time.

A ``Stream`` wraps a unidirectional recurrent layer or a ``Sequential`` model
and keeps the recurrent state between calls, so that feeding a sequence in
pieces gives the outputs of one call on the whole of it. The state can be
read (for a checkpoint), set, and reset; a Stream pickles with its model and
state. A ``Stateful`` layer streams as the layer it wraps; a ``Reversed`` one
cannot stream, nor can a ``ZeroMasked(reverse=True)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _validation as v
from fastrnn._locks import CallLock, ForkSafeLock
from fastrnn._module import on_one_set
from fastrnn._own_values import own_inputs, own_values
from fastrnn.layers import GRU, LSTM, RNN, _RNNBase
from fastrnn.masking import carries_steps, mask_for
from fastrnn.model import Sequential
from fastrnn.nn import Embedding, LastStep, ZeroMasked
from fastrnn.wrappers import Reversed, Stateful, _recurrent, _Wrapper, _wrappers


def _refuse_bidirectional(recurrent):
    for layer in recurrent:
        if layer.bidirectional:
            raise ValueError(f"Stream: {layer!r} is bidirectional; its reverse direction "
                             f"needs the whole sequence, so it cannot stream")


class Stream(CallLock):
    """Stateful inference over a stream.

    Parameters
    ----------
    model : RNN, GRU, LSTM, Stateful or Sequential
        Its recurrent layers must be unidirectional and not ``Reversed``, and
        it holds no ``ZeroMasked(reverse=True)`` (a reverse direction, a
        reversed layer or a reversed mask needs the whole sequence).
        A Sequential's masks (``Masking``, ``Embedding(mask_zero=True)``)
        apply as in a call on the whole sequence: a masked step carries the
        state and its output repeats the last read step's, across chunks.

    Notes
    -----
    A ``Stateful`` layer (Keras' ``stateful=True``) streams as the layer it
    wraps: the Stream's own state is the one carried from call to call
    (``reset``, ``state`` and its setter act on it), while the Stateful's
    carried state is neither read nor changed and its fixed batch size does
    not apply (a Stream takes one stream or any batch). To go on from where
    the Stateful stopped, ``stream.state = [stateful.state]`` (one entry per
    recurrent layer).

    Examples
    --------
    >>> stream = fastrnn.Stream(lstm)          # lstm(input_size=16, ...)
    >>> for frame in frames:                   # frames: (T, 16)
    ...     h = stream.step(frame)             # (hidden_size,) per frame
    >>> saved = stream.state; stream.reset(); stream.state = saved

    A fresh (or reset) stream starts from each layer's initial state: zeros,
    or the learned one of a layer built with ``learn_initial_state=True``.
    With masks, the steps masked before a row's first read step since the
    stream started, was reset or had its state set output zeros (Keras'
    previous output starts at zero), as in one call on the whole sequence.

    Threads sharing a stream: its calls run one at a time, each continuing
    the state the one before left (in whatever order the threads reach
    it), and each computes with its layers' parameters of one moment.
    """

    def __init__(self, model: RNN | GRU | LSTM | Stateful | Sequential) -> None:
        if isinstance(model, (_RNNBase, _Wrapper)):
            recurrent = [_streamed(model)]
            _refuse_bidirectional(recurrent)
        elif isinstance(model, Sequential):
            recurrent = [_streamed(layer) for layer in model.layers
                         if isinstance(layer, (_RNNBase, _Wrapper))]
            last = max((i for i, layer in enumerate(model.layers)
                        if isinstance(layer, (_RNNBase, _Wrapper))), default=-1)
            if any(isinstance(layer, LastStep) for layer in model.layers[:last]):
                raise ValueError("Stream: a LastStep before a recurrent layer cannot stream "
                                 "(the layer after it would need the whole sequence)")
            # per layer: whether a mask's steps are carried at its input
            # (masking.carries_steps), the same at every frame
            steps_carried, carried, masked = [], False, False
            _refuse_bidirectional(recurrent)   # (before the masks' reasons)
            for layer in model.layers:
                if isinstance(layer, ZeroMasked) and layer._config["reverse"]:
                    raise ValueError(
                        f"Stream: {layer!r} zeroes the steps of the time-reversed mask, whose "
                        f"first step is the last one fed: it needs the whole sequence, so it "
                        f"cannot stream")
                if isinstance(layer, LastStep) and masked and not carried:
                    raise ValueError(
                        "Stream: a LastStep under a mask with no recurrent layer since the "
                        "mask was made cannot stream (it takes each row's last unmasked "
                        "step, which a frame alone does not know)")
                steps_carried.append(carried)
                masked = masked or getattr(layer, "_makes_mask", False)
                carried = carries_steps(layer, carried)
        else:
            raise TypeError(f"Stream: expected an RNN, GRU, LSTM, Stateful or Sequential, "
                            f"got {type(model).__name__}")
        self.model = model
        # a Sequential's layers as made, and each wrapper's layer (``stateful.layer =
        # other`` is allowed): a model changed since is refused at a call
        self._layers = list(model.layers) if isinstance(model, Sequential) else None
        self._wrapped = _wrapped_layers(model)
        self._steps_carried = steps_carried if isinstance(model, Sequential) else None
        self._recurrent = recurrent
        self._state = [None] * len(recurrent)
        self._carried = False   # _state is the last call's, not one the caller set
        # under masks: per recurrent layer the output of each row's last read
        # step (B, out), what its masked steps repeat; None: zeros
        self._last = [None] * len(recurrent)
        # one call at a time: each reads the state and leaves the next (threads
        # feeding one stream would otherwise lose each other's frames)
        self._lock = ForkSafeLock()

    # --- state ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget the state: the next call starts from the layers' initial
        states (zeros, or the learned ones of ``learn_initial_state=True``)."""
        with self._lock:
            self._state = [None] * len(self._recurrent)
            self._carried = False
            self._last = [None] * len(self._recurrent)

    @property
    def state(self) -> list[Any]:
        """Copies of the state after the last call, one entry per recurrent
        layer: its h_n (or (h_n, c_n) for LSTM) of shape (num_layers, B, H)
        however the stream was fed (frames or chunks, one stream or a batch);
        before the first call and after ``reset()`` each entry is None (the
        list itself is not)."""
        return [None if s is None else
                (tuple(None if a is None else a.copy() for a in s) if isinstance(s, tuple)
                 else s.copy())
                for s in self._state]   # (a call replaces the list, never changes it)

    @state.setter
    def state(self, value: list[Any]) -> None:
        n = len(self._recurrent)
        if not isinstance(value, (list, tuple)) or len(value) != n:
            got = f"a {type(value).__name__} of {len(value)}" \
                if isinstance(value, (list, tuple)) else type(value).__name__
            raise TypeError(f"Stream: state must be a list of {n} entr{'y' if n == 1 else 'ies'} "
                            f"(one per recurrent layer; an LSTM's is a tuple (h, c)), got {got}")
        # checked by the layers on the next call; keep copies so that later
        # changes to the caller's arrays do not reach the stream. (num_layers, H),
        # one stream's state, is stored as (num_layers, 1, H); an LSTM's part
        # may be None (zeros), as in the layer's hx.
        # (a list entry of an RNN or GRU is its array as nested lists, not
        # parts: split, a GRU's state failed only at the next call)
        new = [None if s is None else
               (tuple(_given_state(a) for a in s)
                if isinstance(s, tuple) or (isinstance(s, list) and isinstance(layer, LSTM))
                else _given_state(s)) for s, layer in zip(value, self._recurrent)]
        with self._lock:
            self._state, self._carried = new, False
            self._last = [None] * len(self._recurrent)

    # --- feeding --------------------------------------------------------------
    def _run_layer(self, k, layer, x, mask=None, one_stream=False):
        """Recurrent layer k on x from the stream's state: (out, new state).
        The state is kept batched, (num_layers, B, H); an unbatched x (one
        stream) takes it as (num_layers, H), which needs B = 1."""
        state = self._state[k]
        x = v.to_numpy(type(layer).__name__, "input", x)   # (as the layer names it)
        # a chunk the layer does not take is the layer's to name (it checks its input
        # before the state), not blamed on the state's batch
        # (_config: the input_size attribute goes through Module.__getattr__, ~0.5 us)
        takes = x.ndim in (2, 3) and x.shape[-1] == layer._config["input_size"]
        batched = x.ndim == 3 and not one_stream
        held = [a.shape[1] for a in (state if isinstance(state, tuple) else (state,))
                if a is not None and a.ndim == 3] if takes else []
        if held and not batched and held[0] != 1:
            raise ValueError(f"Stream: the state holds {held[0]} streams; an unbatched chunk "
                             f"or frame feeds one (pass a batch of {held[0]}, or reset the "
                             f"stream)")
        if held and batched:
            B = np.shape(x)[0 if layer.batch_first else 1]
            if B != held[0]:
                raise ValueError(f"Stream: the state holds {held[0]} streams, the chunk feeds "
                                 f"{B} (pass a batch of {held[0]}, or reset the stream or set "
                                 f"its state to start {B})")
        if state is not None and not x.ndim == 3:
            state = tuple(_one_stream(a) for a in state) if isinstance(state, tuple) \
                else _one_stream(state)
        with own_values(layer, state=getattr(self, "_carried", False)):   # (older pickles)
            out, new = layer(x, state) if mask is None else layer(x, state, mask=mask)
        new = tuple(_batched_state(a) for a in new) if isinstance(new, tuple) \
            else _batched_state(new)
        return out, new

    def __call__(self, chunk: ArrayLike) -> np.ndarray:
        """Feed a chunk of steps: for a layer, laid out as the layer takes a
        sequence ((T, B, D), (B, T, D) with batch_first, or (T, D)); for a
        Sequential, (B, T, features), or (T, features) for one stream ((B, T)
        or (T,) ids when it starts with an Embedding). Returns the chunk's
        outputs. Chunks and frames (``step``) mix in any order; calls from
        several threads run one at a time, each continuing the state the
        one before left."""
        with self._lock:
            self._check_unchanged()
            if not isinstance(self.model, Sequential):
                out, state = self._run_layer(0, self._recurrent[0], chunk)
                self._state = [state]   # a new list, as the Sequential path: a copy's own
                self._carried = True
                return out
            # its layers' parameter sets of one moment (see Sequential._run)
            out, self._state, self._last = on_one_set(
                self.model._owners(), lambda: self._feed_model(chunk), repeatable=True)
            self._carried = True
            return out

    def _check_unchanged(self):
        if self._layers is not None and (len(self.model.layers) != len(self._layers) or any(
                a is not b for a, b in zip(self.model.layers, self._layers))):
            raise ValueError("Stream: the model's layers changed since the Stream was made; "
                             "make a new Stream of it")
        for wrapper, layer in getattr(self, "_wrapped", ()):   # (older pickles: not kept)
            if wrapper.layer is not layer:
                raise ValueError(f"Stream: the layer inside {type(wrapper).__name__} was "
                                 f"replaced since the Stream was made (it would run the old "
                                 f"one); make a new Stream of it")

    def _feed_model(self, chunk):
        x = v.to_numpy("Stream", "chunk", chunk)
        ids = bool(self.model.layers) and isinstance(self.model.layers[0], Embedding)
        if x.ndim not in ((1, 2) if ids else (2, 3)):
            expected = "(B, T) or (T,) ids" if ids else "(B, T, features) or (T, features)"
            raise ValueError(f"Stream: expected a chunk of shape {expected}, got "
                             f"{v.shape_str(x.shape)}")
        one_stream = x.ndim == (1 if ids else 2)
        if one_stream:
            x = x[None]
        new_state, new_last = list(self._state), list(self._last)
        k, mask = 0, None
        owns = own_inputs(self.model.layers)
        for i, layer in enumerate(self.model.layers):
            if getattr(layer, "_makes_mask", False):   # as masking.seq_call does
                mask = layer._seq_mask(x)
            with own_values(layer, input=True if owns[i] else None):   # as Sequential's call
                if isinstance(layer, (_RNNBase, _Wrapper)):
                    layer = self._recurrent[k]   # a Stateful's layer, from the stream's state
                    batch_first = layer._config["batch_first"]
                    if not batch_first:
                        x = np.swapaxes(x, 0, 1)
                    out, new_state[k] = self._run_layer(k, layer, x, mask, one_stream)
                    x = out if batch_first else np.swapaxes(out, 0, 1)
                    if mask is not None:
                        x, new_last[k] = _repeat_last(x, mask, self._last[k])
                    k += 1
                else:
                    x = layer._seq_infer(x, **mask_for(layer, mask, self._steps_carried[i]))
                    if getattr(x, "ndim", 0) < 3:
                        mask = None
        # kept by the caller once every layer has succeeded
        return (x[0] if one_stream else x), new_state, new_last

    def step(self, frame: ArrayLike) -> np.ndarray:
        """Feed one frame: (D,) for one stream, or (B, D) for a batch of
        streams; returns the output for that frame, (out,) or (B, out)."""
        frame = v.to_numpy("Stream", "frame", frame)
        if isinstance(self.model, Sequential) and self.model.layers \
                and isinstance(self.model.layers[0], Embedding):   # ids: () or (B,)
            if frame.ndim not in (0, 1):
                raise ValueError(f"Stream: expected a frame of one id or (B,) ids, got "
                                 f"{v.shape_str(frame.shape)}")
            out = self(frame.reshape(-1, 1))
            out = out[:, 0] if out.ndim == 3 else out
            return out[0] if frame.ndim == 0 else out
        if frame.ndim not in (1, 2):
            self._refuse_frame(frame)
        try:
            return self._step_frame(frame)
        except ValueError:
            # named as the caller gave it, not as the (B, 1, D) chunk made of it
            # (checked only here: a step takes a few microseconds)
            D = self._frame_features()
            if D is not None and frame.shape[-1] != D:
                self._refuse_frame(frame)
            raise

    def _frame_features(self):
        """The features of a frame, or None where the model does not fix them."""
        if isinstance(self.model, Sequential):
            return self.model._input_features()
        return self._recurrent[0].input_size

    def _refuse_frame(self, frame):
        D = self._frame_features()
        D = "D" if D is None else D
        raise ValueError(f"Stream: expected a frame of shape ({D},) or (B, {D}), got "
                         f"{v.shape_str(frame.shape)}") from None

    def _step_frame(self, frame):
        """step of a (D,) or (B, D) frame of features."""
        if not isinstance(self.model, Sequential):
            if frame.ndim == 1:
                return self(frame[None])[0]
            batch_first = self._recurrent[0].batch_first
            out = self(frame[:, None] if batch_first else frame[None])
            return out[:, 0] if batch_first else out[0]
        batch = frame[None] if frame.ndim == 1 else frame
        out = self(batch[:, None])             # (B, 1, features): one step
        out = out[:, 0] if out.ndim == 3 else out   # a LastStep dropped the time axis
        return out[0] if frame.ndim == 1 else out

    def __repr__(self):
        started = any(s is not None for s in self._state)
        return f"Stream({self.model!r}, {'started' if started else 'fresh'})"


def _repeat_last(out, mask, last):
    """A masked chunk's outputs (B, T, out), batch-first: the steps masked
    before a row's first read step in the chunk repeat its last read step
    from earlier chunks (``last``, None: zeros; the layer gave zeros, not
    knowing it). Returns them and each row's last read output after it."""
    read = mask.any(axis=1)
    first = np.where(read, mask.argmax(axis=1), mask.shape[1])
    if last is not None and last.shape[0] == out.shape[0]:
        out = out.copy()
        for b in np.flatnonzero(first):
            out[b, :first[b]] = last[b]
    final = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    rows = np.arange(out.shape[0])
    now = out[rows, final]
    if last is not None and last.shape[0] == out.shape[0]:
        now = np.where(read[:, None], now, last)
    else:
        now = np.where(read[:, None], now, 0)
    return out, now


def _wrapped_layers(model):
    """(wrapper, the layer it wraps) for every wrapper in the model, at any depth."""
    return [(wrapper, wrapper.layer)
            for layer in (model.layers if isinstance(model, Sequential) else [model])
            for wrapper in _wrappers(layer)]


def _streamed(layer):
    """The recurrent layer the stream runs for `layer`: itself, or the layer
    inside a Stateful; a Reversed is refused."""
    if any(isinstance(wrapper, Reversed) for wrapper in _wrappers(layer)):
        raise ValueError(f"Stream: {layer!r} runs its layer over the time-reversed "
                         f"sequence, whose first step is the last one fed: it needs the "
                         f"whole sequence, so it cannot stream")
    return _recurrent(layer)


def _batched_state(a):
    """A state array as the stream keeps it: a copy, (num_layers, B, H)
    (None, an LSTM's missing part, stays None)."""
    if a is None:
        return None
    a = np.array(a)
    return a[:, None] if a.ndim == 2 else a


def _given_state(a):
    """A state array the caller set, as the stream keeps it (its shape is
    checked by the next call)."""
    return None if a is None else _batched_state(v.to_numpy("Stream", "state", a))


def _one_stream(a):
    """(num_layers, 1, H) -> (num_layers, H), for an unbatched call."""
    return a[:, 0] if a is not None and a.ndim == 3 else a
