"""What layers and cells share: read-only configuration, named parameters
under PyTorch's names, state_dict / load_state_dict, and the weight storage
the kernels read.

Parameters live in one flat buffer per layer and kind (both directions
stacked, the layout the kernels want); the public arrays are read-only views
of it. They change only through load_state_dict or attribute assignment,
which validate and copy, so a layer can never hold a wrong-shaped or
half-loaded parameter, and no caller's array is ever aliased.
"""
from collections import namedtuple
from collections.abc import Mapping

import numpy as np

from fastrnn import _forward
from fastrnn._validation import shape_str, to_numpy

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])

# kernel code and number of gates of each cell kind
CELL_KINDS = {
    "rnn_tanh": (_forward.RNN_TANH, 1),
    "rnn_relu": (_forward.RNN_RELU, 1),
    "gru": (_forward.GRU, 3),
    "lstm": (_forward.LSTM, 4),
}


class Module:
    """Base of every public class: configuration and named parameters."""

    def __init__(self):
        # set through object: our __setattr__ reads these
        object.__setattr__(self, "_config", {})
        object.__setattr__(self, "_slots", {})    # name -> writeable view of our storage
        object.__setattr__(self, "_public", {})   # name -> read-only view of the same
        self._version = 0                         # bumped whenever parameters change

    # --- configuration and parameters as attributes -------------------------
    def __getattr__(self, name):
        # only reached when ordinary lookup fails
        d = self.__dict__
        if name in d.get("_public", ()):
            return d["_public"][name]
        if name in d.get("_config", ()):
            return d["_config"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in self._config:
            raise AttributeError(f"{type(self).__name__}: {name} is fixed at construction; "
                                 f"create a new {type(self).__name__} to change it")
        if name in self._slots:
            self.load_state_dict({name: value}, strict=False)
            return
        object.__setattr__(self, name, value)

    def _register(self, name, storage_view):
        self._slots[name] = storage_view
        public = storage_view.view()
        public.flags.writeable = False
        self._public[name] = public

    # --- state dict ---------------------------------------------------------
    def state_dict(self):
        """Copies of every parameter, under PyTorch's names, in PyTorch's order.

        Returns
        -------
        dict of str to ndarray
            Independent copies: changing them does not change the module.
        """
        return {name: slot.copy() for name, slot in self._slots.items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy parameters in from a mapping of name to array.

        Accepts numpy arrays, torch tensors (a PyTorch module's ``state_dict()``
        loads directly) or anything array-like of a real dtype; values are
        converted to the module's dtype. Every name, shape and value is checked
        before anything is copied, so on error the module is unchanged.

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
        missing = [name for name in self._slots if name not in state_dict]
        unexpected = [key for key in state_dict if key not in self._slots]
        if strict and (missing or unexpected):
            raise ValueError(f"{owner}: load_state_dict: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected exactly "
                             f"{list(self._slots)}")
        converted = {}
        for name, slot in self._slots.items():
            if name not in state_dict:
                continue
            value = to_numpy(owner, f"state_dict[{name!r}]", state_dict[name])
            if value.shape != slot.shape:
                raise ValueError(f"{owner}: expected {name} of shape {shape_str(slot.shape)}, "
                                 f"got {shape_str(value.shape)}")
            value = value.astype(self.dtype)
            if not np.isfinite(value).all():
                raise ValueError(f"{owner}: {name} has non-finite values (NaN or inf) "
                                 f"after conversion to {self.dtype}")
            converted[name] = value
        for name, value in converted.items():
            np.copyto(self._slots[name], value)
        self._version += 1
        return LoadResult(missing, unexpected)

    def __repr__(self):
        cfg = self._config
        args = [str(cfg["input_size"]), str(cfg["hidden_size"])]
        args += [f"{k}={v!r}" for k, v in self._repr_options()]
        return f"{type(self).__name__}({', '.join(args)})"

    def _repr_options(self):
        return []


class RecurrentWeights(Module):
    """Weight storage and kernel call of a stack of recurrent layers.

    ``layers`` x ``dirs`` blocks of (W_ih, W_hh, b_ih, b_hh), each kind stacked
    over directions in one (dirs * G * H, ...) array per layer: the input
    projection of both directions is then one GEMM.
    """

    def _build(self, kind, input_size, hidden_size, layers, dirs, bias, dtype, rng, names):
        """Allocate, register under ``names(layer, direction)`` and initialise."""
        code, gates = CELL_KINDS[kind]
        self._kernel_code = code
        self._gates = gates
        GH = gates * hidden_size
        w_ih, w_hh, b_ih, b_hh = [], [], [], []
        for k in range(layers):
            in_size = input_size if k == 0 else dirs * hidden_size
            w_ih.append(np.empty((dirs * GH, in_size), dtype))
            w_hh.append(np.empty((dirs * GH, hidden_size), dtype))
            b_ih.append(np.empty(dirs * GH, dtype) if bias else None)
            b_hh.append(np.empty(dirs * GH, dtype) if bias else None)
            for d in range(dirs):
                rows = slice(d * GH, (d + 1) * GH)
                w_name, h_name, bi_name, bh_name = names(k, d)
                self._register(w_name, w_ih[k][rows])
                self._register(h_name, w_hh[k][rows])
                if bias:
                    self._register(bi_name, b_ih[k][rows])
                    self._register(bh_name, b_hh[k][rows])
        self._w_ih, self._w_hh, self._b_ih, self._b_hh = w_ih, w_hh, b_ih, b_hh
        self._bias_cache = (-1, None)
        # PyTorch's reset_parameters: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))
        bound = 1.0 / np.sqrt(hidden_size)
        for slot in self._slots.values():
            slot[...] = rng.uniform(-bound, bound, size=slot.shape)

    def _kernel_biases(self):
        """Per layer (bias_x, bias_h): the bias added to the input projection and
        the GRU's recurrent bias (other cells fold b_hh into bias_x)."""
        version, terms = self._bias_cache
        if version != self._version:
            terms = []
            for b_ih, b_hh in zip(self._b_ih, self._b_hh):
                if b_ih is None:
                    terms.append((None, None))
                elif self._kernel_code == _forward.GRU:
                    terms.append((b_ih, b_hh))
                else:
                    terms.append((b_ih + b_hh, None))
            self._bias_cache = (self._version, terms)
        return terms
