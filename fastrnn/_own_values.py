"""Whether a layer call's hx or input is the model's own values rather than
the caller's.

A quantized layer refuses a non-finite input or hx the caller gives (an
int8 row cannot hold inf) but lets a value that overflowed within the model
propagate, as it does within one call of a multi-layer stack. Two kinds of
values reach a layer's call from the model itself:

- the state a ``Stateful`` or a ``Stream`` carried over from its last call,
  so that a sequence fed in chunks gives what one call gives;
- the output of the layer before it in a ``Sequential`` (or a Stream of
  one), so that a model gives what its float32 twin gives.

The callers say so around the layer's call (``own_values``), which the
quantized layers read (``state_is_own``, ``input_is_own``). Only a layer
that reads them (``_reads_own_values``, a class attribute of the
quantized ones, which wrappers pass on) gets the context: a float layer's call, such
as a streaming step of a few microseconds, pays nothing for it.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

_own_state = contextvars.ContextVar("fastrnn_own_state", default=False)
_own_input = contextvars.ContextVar("fastrnn_own_input", default=False)
_NOTHING = contextlib.nullcontext()


def own_inputs(layers) -> list:
    """Per layer of a Sequential, whether its input is the model's own
    values: once a layer before it computed values. A layer that passes its
    input on (Masking, Dropout at inference, LastStep, ZeroMasked:
    ``_passes_values``) leaves the caller's (a quantized model starting with
    Masking had let an inf the caller gave through as NaN)."""
    owns, own = [], False
    for layer in layers:
        owns.append(own)
        own = own or not getattr(layer, "_passes_values", False)
    return owns


def state_is_own() -> bool:
    """Whether the running layer call's hx is a carried state."""
    return _own_state.get()


def input_is_own() -> bool:
    """Whether the running layer call's input is a lower layer's output."""
    return _own_input.get()


class _OwnValues:
    """The context of own_values: sets the flags given, restores them after."""

    __slots__ = ("flags", "tokens")

    def __init__(self, flags):
        self.flags = flags

    def __enter__(self):
        self.tokens = [(var, var.set(value)) for var, value in self.flags]

    def __exit__(self, *exc):
        for var, token in reversed(self.tokens):
            var.reset(token)


def own_values(layer: Any, *, state: bool | None = None,
               input: bool | None = None) -> contextlib.AbstractContextManager[None]:
    """A context for ``layer``'s call: within, state_is_own() is ``state``
    and input_is_own() ``input`` (None: as outside); nothing for a layer that
    does not read them."""
    if not getattr(layer, "_reads_own_values", False):
        return _NOTHING
    flags = tuple((var, value) for var, value in ((_own_state, state), (_own_input, input))
                  if value is not None)
    return _OwnValues(flags) if flags else _NOTHING
