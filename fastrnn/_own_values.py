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

The callers say so by context (``own_values``), which the quantized layers
read (``state_is_own``, ``input_is_own``); float layers check neither.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_own_state = contextvars.ContextVar("fastrnn_own_state", default=False)
_own_input = contextvars.ContextVar("fastrnn_own_input", default=False)


def state_is_own() -> bool:
    """Whether the running layer call's hx is a carried state."""
    return _own_state.get()


def input_is_own() -> bool:
    """Whether the running layer call's input is a lower layer's output."""
    return _own_input.get()


@contextlib.contextmanager
def own_values(*, state: bool | None = None, input: bool | None = None) -> Iterator[None]:
    """Within: state_is_own() is ``state`` and input_is_own() ``input``
    (None: as outside)."""
    tokens = [(var, var.set(value)) for var, value in ((_own_state, state), (_own_input, input))
              if value is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
