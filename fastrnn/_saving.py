"""The model file: writing it, and reading it back safely.

Two containers of the same content, chosen by the path's extension when
writing and by the content when reading:

* ``.npz`` (a zip of ``.npy`` arrays, no pickle; any path not ending in
  ``.safetensors``): ``config.npy`` holds the JSON description,
  ``weights/{layer}.{name}.npy`` the parameters, and
  ``optimizer/{layer}.{name}.{slot}.npy`` the optimizer's per-parameter
  arrays (their shapes are those of the parameters).
* ``.safetensors``: an 8-byte little-endian header length, a JSON header
  (per tensor its dtype, shape and byte span; ``__metadata__`` a mapping of
  strings), then the tensors' raw little-endian bytes, back to back. The
  tensors are named as PyTorch names them: a single layer's as the module's
  ``state_dict`` (``weight_ih_l0``), a Sequential's as ``nn.Sequential``'s
  (``0.weight_ih_l0``); the optimizer's arrays under ``optimizer/`` (a name
  no PyTorch module has). ``__metadata__`` holds ``'format': 'pt'`` (the
  Hugging Face convention: PyTorch tensors) and ``'fastrnn'``: the JSON
  description, as text.

The JSON's ``format`` is ``'fastrnn/2'``; files of ``'fastrnn.Sequential/1'``
(weights only) are still read. A layer's entry is ``{"class", "config"}``
(its constructor arguments); a wrapper's (``Reversed``, ``Stateful``) is
``{"class", "config", "layer"}``, ``layer`` the wrapped layer's entry, and
the weights are the wrapped layer's, under its names (``0.weight_ih_l0``).

Reading trusts nothing: every size the file declares (zip directory, array
headers, safetensors header and byte spans, the layers' and the optimizer's
configuration) is checked against the file itself before anything is
allocated; see ``fastrnn.load``. A safetensors file is memory-mapped and its
tensors copied once, straight into the parameters.
"""
import errno
import inspect
import json
import math
import mmap
import os
import reprlib
import stat
import struct
import uuid
import warnings
import zipfile
import zlib
from collections import namedtuple

import numpy as np

from fastrnn import _validation as v
from fastrnn import losses as losses_module
from fastrnn import metrics as metrics_module
from fastrnn import optim
from fastrnn._validation import shape_str
from fastrnn._module import (Module, holding, ln_names, ln_parameter_sizes,
                             parameters_filled_later)
from fastrnn._version import __version__
from fastrnn.batching import FitPass
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN
from fastrnn.nn import (Dropout, Embedding, LastStep, Linear, Masking, MergeDirections, ReLU,
                        Sigmoid, Tanh, ZeroMasked)
from fastrnn.quantized import (QuantizedGRU, QuantizedGRUCell, QuantizedLinear,
                               QuantizedLSTM, QuantizedLSTMCell, QuantizedRNN,
                               QuantizedRNNCell, QUANTIZED_CLASSES, SCALE)
from fastrnn.wrappers import Reversed, Stateful, _recurrent, _wrappers

FORMAT = "fastrnn/2"
FORMAT_1 = "fastrnn.Sequential/1"     # read, no longer written

# the classes a saved file may name: loading builds nothing else
_SEQUENCE_LAYERS = (RNN, GRU, LSTM, Linear, Dropout, LastStep, ReLU, Tanh, Sigmoid,
                    Embedding, Masking, ZeroMasked, MergeDirections,
                    QuantizedRNN, QuantizedGRU, QuantizedLSTM, QuantizedLinear)
_LAYER_CLASSES = {cls.__name__: cls for cls in _SEQUENCE_LAYERS + (
    RNNCell, GRUCell, LSTMCell, QuantizedRNNCell, QuantizedGRUCell, QuantizedLSTMCell)}
# wrappers of an RNN, GRU or LSTM: an entry of one holds the wrapped layer's entry
_WRAPPERS = {cls.__name__: cls for cls in (Reversed, Stateful)}
_MAX_WRAPPERS = 2                  # around one layer (from_keras makes Stateful(Reversed(...)))
_OPTIMIZERS = {cls.__name__: cls for cls in (optim.SGD, optim.Adam, optim.AdamW,
                                             optim.RMSprop)}
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")

# What `load` accepts; anything beyond is refused before it is read.
_MAX_MEMBERS = 10_000              # arrays in a file (a deep bidirectional model has ~100)
_MAX_DIRECTORY_BYTES = 2 << 20     # the zip's central directory, ~200 bytes per member
_MAX_CONFIG_CHARS = 1 << 20        # the JSON configuration (a layer takes ~200)
_MAX_CONFIG_DEPTH = 8              # nesting of the JSON (a saved model's is at most 6,
                                   # a twice-wrapped layer's arguments included)
_MAX_RATIO = 100                   # uncompressed / compressed size of a member (float
_RATIO_SLACK = 4096                # weights deflate to ~1:1), beyond this many bytes
_READ_CHUNK = 1 << 20              # bytes read from a member at a time
_MAX_HEADER_BYTES = 8 << 20      # a safetensors header: its JSON configuration (escaped)
                                   # and ~100 bytes per tensor
_MAX_NDIM = 64                     # numpy's most dimensions
_SAFETENSORS_DEPTH = 3             # {name: {"shape": [...]}}: a safetensors header's nesting
SAFETENSORS_SUFFIX = ".safetensors"
_OPTIMIZER_PREFIX = "optimizer/"
# a safetensors tensor beside the weights of a layer PyTorch's module of the
# same name cannot compute (its UTF-8 reason): PyTorch's strict
# load_state_dict refuses the file instead of computing something else
_NOT_PYTORCH = "pytorch_cannot_compute"
# safetensors dtypes: numpy's little-endian equivalent (None: none), and bytes per value
_ST_DTYPES = {"F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": (None, 2),
              "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
              "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1),
              "BOOL": ("?", 1), "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
              "F8_E8M0": (None, 1), "C64": (None, 8)}
# what each array's dtype is written as; uint16 arrays are bfloat16 bit patterns (a
# bfloat16 layer's weights), written as BF16 for other readers
_ST_CODES = {"float64": "F64", "float32": "F32", "int8": "I8", "uint16": "BF16", "uint8": "U8"}
# the dtypes a weight may have besides float32 and float64: a quantized layer's int8
# weights, or its bfloat16 ones as uint16 bit patterns (BF16 in safetensors)
_REDUCED_DTYPES = (np.dtype("int8"), np.dtype("uint16"))
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_CELL_GATES = {"RNNCell": 1, "GRUCell": 3, "LSTMCell": 4}
# a quantized layer is saved as its state_dict (int8 weights with their float32
# scales, '<name>_scale', or bfloat16 bits; float32 biases) and its settings
# (weight_dtype, per_channel); files with its float32 weights load too (quantized)
_GATES.update({"Quantized" + name: gates for name, gates in _GATES.items()})
_CELL_GATES.update({"Quantized" + name: gates for name, gates in _CELL_GATES.items()})

# what damaged zip or .npy data raises in zipfile, zlib and numpy (not MemoryError:
# the checks leave only the memory a consistent file's arrays need)
_FILE_ERRORS = (OSError, EOFError, ValueError, OverflowError, NotImplementedError,
                struct.error, zipfile.BadZipFile, zlib.error)
# what numpy raises on a bad random-generator state
_STATE_ERRORS = (TypeError, ValueError, KeyError, IndexError, OverflowError)

_brief = reprlib.Repr()
_brief.maxstring = _brief.maxother = 60
_brief.maxlevel = 3


class _BadFile(ValueError):
    """What is wrong with a model file; `load` puts the path before it."""


def _deeper_than(value, depth):
    """Whether parsed JSON ``value`` nests lists or objects more than
    ``depth`` levels deep (checked level by level, no recursion)."""
    level = [value]
    for _ in range(depth):
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return any(isinstance(item, (list, dict)) for item in level)


def _clip(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."


def _some(names, limit=5):
    shown = _brief.repr(list(names[:limit]))
    return shown if len(names) <= limit else f"{shown[:-1]}, and {len(names) - limit:,} more]"


def _int_text(n, sep=""):
    """An integer from a file for a message: exact unless absurdly long."""
    if abs(n) < 10**30:
        return f"{n:{sep}}"
    return f"about {'-' if n < 0 else ''}10^{int(abs(n).bit_length() * math.log10(2))}"


def _counted(n, word):
    return f"{_int_text(n, ',')} {word}" + ("" if n == 1 else "s")




# --- writing ------------------------------------------------------------------------------
def _jsonable(config):
    return {k: (val.name if isinstance(val, np.dtype) else val) for k, val in config.items()}


def _layer_entry(layer):
    if isinstance(layer, (Reversed, Stateful)):
        return {"class": type(layer).__name__, "config": layer._wrapper_config(),
                "layer": _layer_entry(layer.layer)}
    return {"class": type(layer).__name__, "config": _jsonable(layer._config)}


def unsavable(layer):
    """Why a model file cannot hold `layer` (for the caller's message), or
    None if it can: a layer of the classes loading builds, or such a
    recurrent layer in at most _MAX_WRAPPERS wrappers."""
    wrappers = []
    while _WRAPPERS.get(type(layer).__name__) is type(layer):
        wrappers.append(type(layer).__name__)
        layer = layer.layer
    name = type(layer).__name__
    if _LAYER_CLASSES.get(name) is not type(layer) or (wrappers and name not in _GATES):
        what = f"a {name}" + "".join(f" in a {w}" for w in reversed(wrappers))
        return (f"{what}, which model files cannot hold (they hold "
                f"{', '.join(_LAYER_CLASSES)}, and {' or '.join(_WRAPPERS)} of an RNN, GRU or "
                f"LSTM)")
    if len(wrappers) > _MAX_WRAPPERS:
        return (f"a {name} in {len(wrappers)} wrappers ({', '.join(wrappers)}), more than the "
                f"{_MAX_WRAPPERS} a model file holds around one layer")
    return None


def _plain(value):
    """A random generator's state as JSON values (arrays as lists)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _random_states(model, layers):
    """The generators of the model (shuffling) and of the layers (dropout),
    each saved once however many hold it (so shared ones stay shared)."""
    generators, index = [], {}

    def ref(generator):
        if not isinstance(generator, np.random.Generator):
            return None
        state = generator.bit_generator.state
        if state.get("bit_generator") not in _BIT_GENERATORS:
            return None
        if id(generator) not in index:
            index[id(generator)] = len(generators)
            generators.append(_plain(state))
        return index[id(generator)]

    section = {"generators": generators,
               "model": None if model is None else ref(getattr(model, "_rng", None)),
               "layers": [ref(getattr(layer, "_rng", None)) for layer in layers]}
    kept = None if model is None else getattr(model, "_fit_pass", None)
    if kept is not None:   # a pass fit left unfinished (model.py: _resume_pass)
        start = None if kept.start is None else ref(kept.start)
        if kept.start is None or start is not None:
            section["pass"] = {"samples": int(kept.samples), "batch_size": int(kept.batch_size),
                               "next": int(kept.next), "order": start}
    return section


def _training_state(model):
    """(the JSON training section, the optimizer's arrays) of a compiled model."""
    owner = "Sequential.save"
    opt = model.optimizer
    if _OPTIMIZERS.get(type(opt).__name__) is not type(opt):
        raise ValueError(f"{owner}: the optimizer is a {type(opt).__name__}, which a file cannot "
                         f"rebuild (only {sorted(_OPTIMIZERS)}); save(path, "
                         f"include_optimizer=False)")
    positions = []
    for module in opt._modules:
        # (a wrapper's parameters are its layer's: the optimizer holds the layer)
        found = [i for i, layer in enumerate(model.layers) if _recurrent(layer) is module]
        if not found:
            raise ValueError(f"{owner}: the optimizer also trains a {type(module).__name__} that "
                             f"is not in this model, whose state the file could not restore; "
                             f"save(path, include_optimizer=False)")
        positions.append(found[0])
    loss = model.loss
    loss_entry = None
    if loss is not None:
        if losses_module.LOSS_CLASSES.get(type(loss).__name__) is type(loss):
            loss_entry = {"class": type(loss).__name__, "config": loss.get_config()}
        else:
            warnings.warn(f"{owner}: the loss is a {type(loss).__name__}, which a file cannot "
                          f"rebuild: the loaded model needs compile(loss, "
                          f"optimizer=model.optimizer)", stacklevel=3)
    metric_entries = []
    for identifier, weighted in model._metric_specs:
        if isinstance(identifier, str):
            metric_entries.append({"name": identifier, "weighted": weighted})
        elif metrics_module.METRIC_CLASSES.get(type(identifier).__name__) is type(identifier):
            metric_entries.append({"class": type(identifier).__name__,
                                   "config": identifier.get_config(), "weighted": weighted})
        else:
            warnings.warn(f"{owner}: the metric {metrics_module.check(owner, identifier)!r} is "
                          f"code, which a file does not hold: compile the loaded model again to "
                          f"have it (optimizer=model.optimizer keeps the optimizer)",
                          stacklevel=3)
    arrays, scalars = {}, {}
    states = iter(opt._state)
    for i, module in zip(positions, opt._modules):
        module_states = [next(states) for _ in module._trainable]
        for name, (k, rows) in module._names.items():
            for slot, value in module_states[k].items():
                if isinstance(value, np.ndarray):   # a copy: the next step updates in place
                    value = (value if rows is None else value[rows]).copy()
                    problem = opt._bad_values(slot, value)
                    if problem:   # loading would refuse it: the file at the path stays
                        raise DivergedError(f"{owner}: the optimizer's {slot} of {name} (layer "
                                         f"{i}) {problem}, which a model file cannot hold; "
                                         f"nothing was written")
                    arrays[f"optimizer/{i}.{name}.{slot}"] = value
                else:
                    scalars.setdefault(f"{i}.{name}", {})[slot] = int(value)
    clip = {key: (None if value is None else float(value)) for key, value in
            (("clip_grad_norm", model.clip_grad_norm),
             ("clip_grad_value", model.clip_grad_value))}
    training = {"loss": loss_entry, "metrics": metric_entries, **clip,
                "optimizer": {"class": type(opt).__name__, "config": opt.get_config(),
                              "step_count": opt.step_count, "scalars": scalars,
                              "schedules": [s.state_dict() for s in opt.schedules],
                              # the layers it trains, in its order (the others frozen)
                              "layers": positions}}
    return training, arrays


class DivergedError(ValueError):
    """save's refusal of weights (or optimizer moments) no file can hold:
    NaN or inf, from a run that diverged (ModelCheckpoint skips such an
    epoch)."""


def _refuse_non_finite(owner, arrays):
    """A weight with NaN or inf makes a file that loading refuses: say so
    before writing (an existing file, a checkpoint of a run that diverged
    since, stays as it was)."""
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise DivergedError(f"{owner}: {key.removeprefix('weights/')} has non-finite values "
                             f"(NaN or inf), which a model file cannot hold (loading refuses "
                             f"them); nothing was written (training diverged? lower the "
                             f"learning rate or clip the gradients)")


def save_model(model, path, include_optimizer=True):
    """Write a Sequential (see ``Sequential.save``)."""
    # the weights and the optimizer's state of one moment: an optimizer step
    # holds the same locks from its first moment to its last swap
    with holding(model._owners()):
        config = {"format": FORMAT, "fastrnn_version": __version__, "kind": "Sequential",
                  "layers": [_layer_entry(layer) for layer in model.layers],
                  "random": _random_states(model, model.layers)}
        arrays = {f"weights/{k}": val for k, val in model.state_dict().items()}
        _refuse_non_finite("Sequential.save", arrays)
        if include_optimizer and model.optimizer is not None:
            config["training"], optimizer_arrays = _training_state(model)
            arrays.update(optimizer_arrays)
    _write(path, config, arrays, _torch_refusals(model.layers))


def save_layer(layer, path):
    """Write a single layer or cell (see ``fastrnn.save``)."""
    name = type(layer).__name__
    if _LAYER_CLASSES.get(name) is not type(layer) and name not in _WRAPPERS:
        raise TypeError(f"fastrnn.save: expected a Sequential or a fastrnn layer or cell "
                        f"({', '.join(_LAYER_CLASSES)}, or a {' or '.join(_WRAPPERS)} of a "
                        f"recurrent layer), got {name}")
    reason = unsavable(layer)
    if reason is not None:
        raise TypeError(f"fastrnn.save: the layer is {reason}")
    config = {"format": FORMAT, "fastrnn_version": __version__, "kind": "layer",
              "layers": [_layer_entry(layer)], "random": _random_states(None, [layer])}
    arrays = {f"weights/0.{k}": val for k, val in layer.state_dict().items()}
    _refuse_non_finite("fastrnn.save", arrays)
    _write(path, config, arrays, _torch_refusals([layer]))


def _torch_refusals(layers):
    """{index: why PyTorch cannot compute it} of the recurrent layers whose
    PyTorch namesakes would take their weights and compute otherwise."""
    from fastrnn.convert import torch_refusal    # (convert imports the layers' modules)
    refusals = {}
    for i, layer in enumerate(layers):
        inner = _recurrent(layer)
        if type(inner) in (RNN, GRU, LSTM, RNNCell, GRUCell, LSTMCell):
            reason = torch_refusal(inner)
            if reason is None and any(isinstance(w, Reversed) for w in _wrappers(layer)):
                reason = (f"{type(inner).__name__} runs in a Reversed (reading each sequence "
                          f"from its end); PyTorch's reads it from its start")
            if reason is not None:
                refusals[i] = reason
    return refusals


def is_safetensors_path(path):
    """Whether `save` writes `path` as safetensors: its name ends in
    ``.safetensors`` (any case)."""
    return os.fsdecode(os.fspath(path)).lower().endswith(SAFETENSORS_SUFFIX)


def _write(path, config, arrays, torch_refusals=None):
    """Write `config` and `arrays` (named as in the .npz) to `path`, in the
    container its extension calls for, through a temporary file renamed
    over it (a safetensors file marks the layers of `torch_refusals`)."""
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError("save: the path to write is empty")
    if is_safetensors_path(path):
        def write(f):
            _write_safetensors(f, config, arrays, torch_refusals or {})
    else:
        def write(f):
            np.savez(f, **arrays, config=np.array(json.dumps(config)))
    # a symbolic link is written through (its target replaced, the link
    # kept), and a file replaced keeps its permissions (a private 0600 one
    # had become 0644); a new one gets the default ones, unlike mkstemp's 0600
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = None
    tmp = os.path.join(os.path.dirname(target), f".{uuid.uuid4().hex[:16]}.tmp")
    created = False
    try:
        # created no more readable than the file it replaces (a 0600 model had
        # sat in a 0644 temporary file while written); a new one as open() makes it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666 if mode is None else mode & 0o777)
        created = True
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())   # the data on disk before the rename makes it the file
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        if created and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            # the user's path, not the temporary file's name
            raise type(exc)(exc.errno, exc.strerror, path) from None
        raise


def _write_safetensors(f, config, arrays, torch_refusals):
    """The safetensors file: weights under PyTorch's names (a single layer's
    without the layer index), optimizer arrays under 'optimizer/', and for
    each layer of `torch_refusals` its reason under _NOT_PYTORCH."""
    single = config["kind"] == "layer"
    header = {"__metadata__": {"format": "pt", "fastrnn": json.dumps(config)}}
    tensors = []
    end = 0
    marks = {f"weights/{i}.{_NOT_PYTORCH}":
             np.frombuffer(reason.encode(), np.uint8) for i, reason in torch_refusals.items()}
    for key, value in {**arrays, **marks}.items():
        if key.startswith("weights/"):
            name = key[len("weights/"):]
            if single:
                name = name.partition(".")[2]
        else:
            name = key                         # 'optimizer/{layer}.{name}.{slot}'
        value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        header[name] = {"dtype": _ST_CODES[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [end, end + value.nbytes]}
        end += value.nbytes
        tensors.append(value)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)            # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for value in tensors:
        f.write(value.reshape(-1).view(np.uint8).data)


# --- reading ------------------------------------------------------------------------------
def _out_of_memory(owner, path, exc):
    """A MemoryError for an OSError of the system's ENOMEM (mapping a file
    with too little address space left), which says nothing of the file."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return MemoryError(f"{owner}: not enough memory to read {path!r} ({exc})")
    return None


def load(path, sequential_cls):
    """Read a file written by ``save_model`` or ``save_layer`` (see
    ``fastrnn.load`` for the checks and the bounds on time and memory)."""
    path = os.fspath(path)
    refused = f"fastrnn.load: {path!r} is not a valid fastrnn model file: "
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO could block, a device never end
        raise ValueError(refused + "it is not a regular file")
    with open(path, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if _looks_safetensors(path, f, size):
                return _read_safetensors(sequential_cls, f, size)
            return _read(sequential_cls, f, size)
        except _BadFile as exc:
            raise ValueError(refused + str(exc)) from None
        except _FILE_ERRORS as exc:   # raised by zipfile, zlib or numpy on damaged data
            raise (_out_of_memory("fastrnn.load", path, exc)
                   or ValueError(f"{refused}{type(exc).__name__}: {_clip(str(exc))}")) from exc


def _looks_safetensors(path, f, size):
    """A zip is read as .npz (no safetensors file within the bounds starts as
    one); anything else as safetensors if its name ends in .safetensors or
    its header (after the 8 bytes of its length) starts as JSON does."""
    head = f.read(9)
    f.seek(0)
    if size == 0 or head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return False
    return is_safetensors_path(path) or head[8:9] == b"{"


def _read(sequential_cls, f, size):
    """The checks and reads of `load`, in that order, on an open .npz file."""
    if size == 0:
        raise _BadFile("the file is empty")
    head = f.read(6)
    if head == b"\x93NUMPY":
        raise _BadFile("it holds a single .npy array, not a fastrnn model (.npz) file")
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise _BadFile("it is not a zip (.npz) archive")
    entries, directory_bytes = _zip_directory(f, size)
    if entries > _MAX_MEMBERS:
        raise _BadFile(f"it has {entries:,} members, more than {_MAX_MEMBERS:,}")
    if directory_bytes > _MAX_DIRECTORY_BYTES:
        raise _BadFile(f"its zip directory takes {directory_bytes:,} bytes, more than "
                       f"{_MAX_DIRECTORY_BYTES:,}")
    f.seek(0)
    with zipfile.ZipFile(f) as zf:
        members = _check_members(zf, size)
        if "config.npy" not in members:
            raise _BadFile("it has no configuration (member 'config.npy')")
        headers = {name: _array_header(zf, info) for name, info in members.items()}
        config = _read_config(zf, members["config.npy"], headers["config.npy"])
        weights, slots = {}, {}
        for name, header in headers.items():
            if name.startswith("weights/"):
                weights[name[len("weights/"):-len(".npy")]] = (members[name], header)
            elif name.startswith("optimizer/"):
                slots[name[len("optimizer/"):-len(".npy")]] = (members[name], header)

        def read(info, header):
            return _read_array(zf, info, header)

        def fill(i, layer, held):
            # layer by layer: at most one layer's arrays are held besides the model
            part = {key: read(*item) for key, item in held.items()}
            try:
                layer.load_state_dict(part)
            except (TypeError, ValueError) as exc:
                raise _BadFile(f"layer {i} ({type(layer).__name__}): {exc}") from None

        return _build(sequential_cls, config, weights, slots, fill, read)


def _build(sequential_cls, config, weights, slots, fill, read):
    """The model a file describes, from its parsed configuration and its
    arrays, name -> (reference, header) for `fill(i, layer, held)` (which
    loads layer i's arrays) and `read(reference, header)` (which gives an
    optimizer array); the header's first element is the array's shape, its
    third its dtype."""
    described = _check_config(config)
    specs = described.specs
    per_layer = _match_weights(specs, weights, [_label(name, around) for (name, _, _), around
                                                in zip(specs, described.wrappers)])
    training = described.training
    if slots and (training is None or training.optimizer is None):
        raise _BadFile(f"it holds optimizer arrays ({_some(sorted(slots))}) but no "
                       f"optimizer configuration")
    per_slot = {} if training is None else _match_slots(specs, training.optimizer, slots)
    layers = []
    for i, ((name, kwargs, _), around) in enumerate(zip(specs, described.wrappers)):
        built = name
        try:
            with parameters_filled_later():   # (the file holds every parameter: fill below)
                layer = _LAYER_CLASSES[name](**kwargs)
            for built, options in reversed(around):     # innermost first
                layer = _WRAPPERS[built](layer, **options)
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"layer {i} ({built}) has a bad configuration: "
                           f"{_clip(str(exc))}") from None
        layers.append(layer)
    if described.kind == "layer":
        model = layers[0]
    else:
        try:
            model = sequential_cls(layers)
        except (TypeError, ValueError) as exc:
            raise _BadFile(str(exc)) from None
    for i, (layer, held) in enumerate(zip(layers, per_layer)):
        if held:
            fill(i, layer, held)
    _restore_random(described.random, model if described.kind != "layer" else None, layers)
    if training is not None:
        _restore_training(read, model, layers, training, per_slot)
    return model


# --- safetensors ----------------------------------------------------------------------------
# A checked tensor of a safetensors file: its shape, dtype code, and byte span in the data
_Tensor = namedtuple("_Tensor", ["shape", "code", "begin", "end"])


def _safetensors_header(f, size):
    """(metadata, name -> _Tensor, offset of the data) of a safetensors file,
    every size checked against the file's: the header's length and nesting,
    each tensor's dtype, shape and byte span (inside the data, no overlaps,
    no gaps), the metadata's values strings."""
    if size == 0:
        raise _BadFile("the file is empty")
    if size < 8:
        raise _BadFile(f"it has {_counted(size, 'byte')}, fewer than the 8 of a safetensors "
                       f"header's length")
    f.seek(0)
    start = f.read(8)
    if start[:4] == b"PK\x03\x04":
        raise _BadFile("it is a zip file (an .npz: fastrnn.load reads a model saved so, "
                       "np.load its arrays)")
    (length,) = struct.unpack("<Q", start)
    if length > size - 8:
        raise _BadFile(f"its safetensors header declares {length:,} bytes, more than the "
                       f"{size - 8:,} after its length")
    if length > _MAX_HEADER_BYTES:
        raise _BadFile(f"its safetensors header takes {length:,} bytes, more than "
                       f"{_MAX_HEADER_BYTES:,}")
    raw = f.read(length)
    too_deep = _BadFile(f"its safetensors header (JSON) is nested too deeply (more than "
                        f"{_SAFETENSORS_DEPTH} levels)")

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise _BadFile(f"its safetensors header names {_brief.repr(key)} twice")
            seen[key] = value
        return seen

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except RecursionError:
        raise too_deep from None
    except UnicodeDecodeError as exc:
        raise _BadFile(f"its safetensors header is not UTF-8 text ({_clip(str(exc))})") \
            from None
    except ValueError as exc:
        if isinstance(exc, _BadFile):
            raise
        raise _BadFile(f"its safetensors header is not valid JSON ({_clip(str(exc))})") \
            from None
    if not isinstance(header, dict):
        raise _BadFile(f"its safetensors header should be a JSON object, got "
                       f"{type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _BadFile(f"its __metadata__ should be an object of strings, got "
                       f"{type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _BadFile(f"its __metadata__ should map names to strings, got "
                           f"{type(value).__name__} for {_brief.repr(key)}")
    # no deeper values reach the checks and messages below (repr recurses)
    if _deeper_than(header, _SAFETENSORS_DEPTH):
        raise too_deep
    if len(header) > _MAX_MEMBERS:
        raise _BadFile(f"it has {len(header):,} tensors, more than {_MAX_MEMBERS:,}")
    data = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        shown = _brief.repr(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise _BadFile(f"tensor {shown} should be an object of 'dtype', 'shape' and "
                           f"'data_offsets', got {_brief.repr(got)}")
        code, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise _BadFile(f"tensor {shown} has the unknown dtype {_brief.repr(code)} "
                           f"(safetensors' are {', '.join(_ST_DTYPES)})")
        # (each size bounded before any product: thousands of digits each, JSON
        # allows, multiplied in quadratic time: 198 s for an 8 MB header)
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63
                for n in shape):
            raise _BadFile(f"tensor {shown} should have a shape of at most {_MAX_NDIM} "
                           f"integers in [0, 2**63), got {_brief.repr(shape)}")
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in span)
                and 0 <= span[0] <= span[1]):
            raise _BadFile(f"tensor {shown} should have data_offsets [begin, end] with 0 <= "
                           f"begin <= end, got {_brief.repr(span)}")
        begin, end = span
        if end > data:
            raise _BadFile(f"tensor {shown} spans bytes {_int_text(begin, ',')} to "
                           f"{_int_text(end, ',')} of the data, which has {data:,}")
        nbytes = math.prod(shape) * _ST_DTYPES[code][1]
        if nbytes != end - begin:
            raise _BadFile(f"tensor {shown} is {shape_str(shape)} of {code} "
                           f"({_int_text(nbytes, ',')} bytes), but spans {end - begin:,} bytes")
        tensors[name] = _Tensor(tuple(shape), code, begin, end)
    at = 0
    previous = None
    for name, tensor in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if tensor.begin < at:
            raise _BadFile(f"tensors {_brief.repr(previous)} and {_brief.repr(name)} overlap "
                           f"(bytes {tensor.begin:,} to {min(at, tensor.end):,} of the data)")
        if tensor.begin > at:
            raise _BadFile(f"bytes {at:,} to {tensor.begin:,} of its data belong to no tensor")
        at, previous = tensor.end, name
    if at != data:
        raise _BadFile(f"bytes {at:,} to {data:,} of its data belong to no tensor")
    return metadata, tensors, 8 + length


def _mapped(f, size):
    """The file mapped read-only (None if empty: mmap refuses empty files)."""
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None


def _tensor_view(mapping, start, tensor):
    """A read-only view of a tensor of a numpy dtype in the mapped file."""
    dtype = np.dtype(_ST_DTYPES[tensor.code][0])
    if mapping is None or tensor.end == tensor.begin:
        return np.zeros(tensor.shape, dtype)
    count = (tensor.end - tensor.begin) // dtype.itemsize
    return np.frombuffer(mapping, dtype, count, start + tensor.begin).reshape(tensor.shape)


def _release(mapping):
    """Drop the mapped pages from memory (the file keeps them) and close the
    mapping, unless arrays still view it (the last of them closes it)."""
    if mapping is None:
        return
    if hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
    try:
        mapping.close()
    except BufferError:
        pass


def _is_mark(name):
    """Whether a safetensors tensor's name is a layer's _NOT_PYTORCH note."""
    index, dot, rest = name.rpartition(".")
    return rest == _NOT_PYTORCH and (not dot or (index.isascii() and index.isdigit()))


def _read_safetensors(sequential_cls, f, size):
    """The checks and reads of `load` on an open safetensors file."""
    metadata, tensors, start = _safetensors_header(f, size)
    text = metadata.get("fastrnn")
    if text is None:
        raise _BadFile("its __metadata__ holds no fastrnn description (key 'fastrnn'): a bare "
                       "state dict (as PyTorch's save_file writes) loads with "
                       "layer.load_state_dict(fastrnn.load_state_dict_file(path))")
    if len(text) > _MAX_CONFIG_CHARS:
        raise _BadFile(f"its configuration has {len(text):,} characters, more than "
                       f"{_MAX_CONFIG_CHARS:,}")
    config = _parse_config(text)
    single = isinstance(config, dict) and config.get("kind") == "layer"
    weights, slots = {}, {}
    for name, tensor in tensors.items():
        if _is_mark(name) and tensor.code == "U8" and len(tensor.shape) == 1:
            continue                          # a note for PyTorch, not a weight
        optimizer = name.startswith(_OPTIMIZER_PREFIX)
        if tensor.code not in ("F32", "F64") and (optimizer or tensor.code not in ("I8",
                                                                                    "BF16")):
            what = ("optimizer arrays must be F32 or F64 (float32 or float64)" if optimizer
                    else "weights must be F32 or F64 (float32 or float64), or I8 or BF16 (a "
                    "quantized layer's)")
            raise _BadFile(f"tensor {_brief.repr(name)} holds {tensor.code} data; {what}")
        if tensor.code == "BF16":             # bfloat16 bit patterns
            tensor = tensor._replace(code="U16")
        item = (tensor, (tensor.shape, False, np.dtype(_ST_DTYPES[tensor.code][0]), None))
        if optimizer:
            slots[name[len(_OPTIMIZER_PREFIX):]] = item
        else:
            weights[f"0.{name}" if single else name] = item
    mapping = _mapped(f, size)
    try:
        def read(tensor, header):
            return _tensor_view(mapping, start, tensor)

        def drop_pages():      # at most one tensor's pages of the file stay in memory
            if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)

        def fill(i, layer, held):
            arrays = {key: read(*item) for key, item in held.items()}
            if isinstance(_recurrent(layer), QUANTIZED_CLASSES):
                try:       # the checks and packing of its own load
                    layer.load_state_dict(arrays)
                except (TypeError, ValueError) as exc:
                    raise _BadFile(f"layer {i} ({type(layer).__name__}): {exc}") from None
                drop_pages()
            else:
                _fill_parameters(i, layer, arrays, drop_pages)

        return _build(sequential_cls, config, weights, slots, fill, read)
    finally:
        _release(mapping)


def _fill_parameters(i, layer, arrays, after_each):
    """Copy `arrays` (checked names and shapes) once, straight into a new
    parameter set of a freshly built `layer`, calling `after_each()` after
    each; refuse non-finite values."""
    owner = type(_recurrent(layer)).__name__
    names = layer._names

    def write(storages):
        for name, value in arrays.items():
            index, rows = names[name]
            target = storages[index][slice(None) if rows is None else rows]
            with np.errstate(over="ignore"):   # overflow is reported just below
                target[...] = value
            if not np.isfinite(target).all():
                raise _BadFile(f"layer {i} ({owner}): {owner}: {name} has non-finite values "
                               f"(NaN or inf) after conversion to {target.dtype}")
            after_each()

    with layer._grad_lock:
        layer._swap_parameters(write)


def read_state_dict(path, owner="fastrnn.load_state_dict_file"):
    """The tensors of a safetensors file, name -> ndarray (see
    ``fastrnn.load_state_dict_file``)."""
    path = os.fspath(path)
    refused = f"{owner}: {path!r} is not a valid safetensors file: "
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(refused + "it is not a regular file")
    with open(path, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            metadata, tensors, start = _safetensors_header(f, size)
            for name, tensor in tensors.items():
                if _ST_DTYPES[tensor.code][0] is None and tensor.code != "BF16":
                    raise _BadFile(f"tensor {_brief.repr(name)} holds {tensor.code} data, "
                                   f"which numpy does not represent")
            ours = "fastrnn" in metadata     # (its optimizer's arrays and marks: not weights)
            mapping = _mapped(f, size)
            # copies: views of the mapping changed with a file copied over this
            # one later, and one cut shorter killed the process (SIGBUS) when read
            def copied(tensor):   # (no view of the mapping outlives this)
                if tensor.code == "BF16":      # the upper half of a float32
                    bits = _tensor_view(mapping, start, tensor._replace(code="U16"))
                    return (bits.astype("<u4") << 16).view("<f4")
                return _tensor_view(mapping, start, tensor).copy()

            try:
                return {name: copied(tensor) for name, tensor in tensors.items()
                        if not (ours and (name.startswith(_OPTIMIZER_PREFIX) or _is_mark(name)))}
            finally:
                _release(mapping)
        except _BadFile as exc:
            raise ValueError(refused + str(exc)) from None
        except (OSError, ValueError, OverflowError, struct.error) as exc:
            raise (_out_of_memory(owner, path, exc)
                   or ValueError(f"{refused}{type(exc).__name__}: {_clip(str(exc))}")) from exc


# The checked configuration: kind 'Sequential' or 'layer', the layers'
# (class, kwargs, layout), the random generators (built, with who holds them)
# and the training section (checked, built where cheap) or None.
# specs: per layer (class name, constructor arguments, _Layout) of the layer itself (inside
# any wrappers); wrappers: per layer its wrappers' (class name, arguments), outermost first
_Described = namedtuple("_Described", ["kind", "specs", "wrappers", "random", "training"])
_Training = namedtuple("_Training", ["loss", "metrics", "clip_grad_norm", "clip_grad_value",
                                     "optimizer"])
_OptimizerSpec = namedtuple("_OptimizerSpec", ["cls", "config", "instance", "step_count",
                                               "scalars", "schedules", "layers"])


def _check_config(config):
    """The configuration, checked without building any layer."""
    if not isinstance(config, dict):
        raise _BadFile(f"its configuration should be a JSON object, got "
                       f"{type(config).__name__}")
    fmt = config.get("format")
    if fmt not in (FORMAT, FORMAT_1):
        got = _brief.repr(fmt) if "format" in config else "nothing"
        number = fmt[8:].lstrip("0") if isinstance(fmt, str) else ""
        newer = (isinstance(fmt, str) and fmt.startswith("fastrnn/") and number.isascii()
                 and number.isdigit() and (len(number) > 1 or number > "2"))   # (no int())
        if newer:   # (a later fastrnn's: say so, not "not a model file")
            version = config.get("fastrnn_version")
            by = f" {_brief.repr(version)}" if isinstance(version, str) else ""
            raise _BadFile(f"it was written by a newer fastrnn{by} in format {got}, which "
                           f"this fastrnn {__version__} (format {FORMAT!r}) does not read; "
                           f"upgrade fastrnn to load it")
        raise _BadFile(f"it is not a fastrnn model file (its 'format' should be {FORMAT!r} "
                       f"or {FORMAT_1!r}, got {got})")
    kind = "Sequential" if fmt == FORMAT_1 else config.get("kind")
    if kind not in ("Sequential", "layer"):
        raise _BadFile(f"its 'kind' should be 'Sequential' or 'layer', got "
                       f"{_brief.repr(kind) if 'kind' in config else 'nothing'}")
    entries = config.get("layers")
    if not isinstance(entries, list) or not entries:
        got = _brief.repr(entries) if "layers" in config else "nothing"
        raise _BadFile(f"its 'layers' should be a non-empty list, got {got}")
    if kind == "layer" and len(entries) != 1:
        raise _BadFile(f"it is a single layer's file but lists {len(entries):,} layers")
    specs, wrappers = [], []
    for i, entry in enumerate(entries):
        entry, around = _check_wrappers(i, entry)
        wrappers.append(around)
        name = entry.get("class") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name not in _LAYER_CLASSES \
                or (kind == "Sequential" and name not in _GATES and name.endswith("Cell")):
            raise _BadFile(f"layer {i} names an unknown class {_brief.repr(name)}")
        if around and name not in _GATES:
            raise _BadFile(f"layer {i} ({around[-1][0]}) wraps a {name}; a wrapper holds an "
                           f"RNN, GRU or LSTM")
        label = _label(name, around)
        if "layer" in entry:
            raise _BadFile(f"layer {i} ({label}) has a 'layer' entry, which only a wrapper "
                           f"({', '.join(_WRAPPERS)}) has")
        kwargs = entry.get("config")
        if not isinstance(kwargs, dict):
            got = "nothing" if "config" not in entry else type(kwargs).__name__
            raise _BadFile(f"layer {i} ({label}) has a bad configuration: 'config' must be a "
                           f"JSON object of constructor arguments, got {got}")
        try:
            layout = _parameter_layout(name, kwargs)
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"layer {i} ({label}) has a bad configuration: "
                           f"{_clip(str(exc))}") from None
        specs.append((name, kwargs, layout))
    random = None if fmt == FORMAT_1 else _check_random(config.get("random"), len(specs))
    training = None
    if fmt != FORMAT_1 and config.get("training") is not None:
        if kind == "layer":
            raise _BadFile("a single layer's file holds a training section")
        training = _check_training(config["training"])
    return _Described(kind, specs, wrappers, random, training)


def _check_wrappers(i, entry):
    """(the entry of the layer inside layer i's wrappers, the wrappers'
    (class name, checked arguments), outermost first)."""
    around = []
    while isinstance(entry, dict) and isinstance(entry.get("class"), str) \
            and entry["class"] in _WRAPPERS:
        name = entry["class"]
        if set(entry) != {"class", "config", "layer"}:
            raise _BadFile(f"layer {i} ({name}) should be an object of 'class', 'config' and "
                           f"'layer' (the wrapped layer's entry), got "
                           f"{_brief.repr(sorted(entry))}")
        if len(around) == _MAX_WRAPPERS:
            raise _BadFile(f"layer {i} has more than {_MAX_WRAPPERS} wrappers "
                           f"({', '.join(w for w, _ in around)}, {name}, ...)")
        kwargs = entry["config"]
        if not isinstance(kwargs, dict):
            raise _BadFile(f"layer {i} ({name}) has a bad configuration: 'config' must be a "
                           f"JSON object of constructor arguments, got {type(kwargs).__name__}")
        try:
            _check_wrapper_arguments(name, kwargs)
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"layer {i} ({name}) has a bad configuration: "
                           f"{_clip(str(exc))}") from None
        around.append((name, kwargs))
        entry = entry["layer"]
        if not isinstance(entry, dict):
            raise _BadFile(f"layer {i} ({name}): its 'layer' should be the wrapped layer's "
                           f"entry (an object), got {_brief.repr(entry)}")
    return entry, around


def _check_wrapper_arguments(name, kwargs):
    """A wrapper's arguments (the wrapped layer aside) checked as its
    constructor checks them, before anything is built."""
    args = inspect.signature(_WRAPPERS[name]).bind(None, **kwargs)  # None: the layer
    args.apply_defaults()
    if name == "Reversed":
        v.check_bool(name, "keep_order", args.arguments["keep_order"])
    elif args.arguments["batch_size"] is not None:
        v.check_int(name, "batch_size", args.arguments["batch_size"])


def _check_random(section, n_layers):
    """(generators, model's index, layers' indices): generators rebuilt."""
    if section is None:
        return None
    keys = {"generators", "model", "layers"}
    if not isinstance(section, dict) or set(section) - {"pass"} != keys:
        raise _BadFile(f"its 'random' should be an object of 'generators', 'model' and "
                       f"'layers' (and 'pass'), got {_brief.repr(section)}")
    states, layers = section["generators"], section["layers"]
    if not isinstance(states, list) or not isinstance(layers, list) or len(layers) != n_layers:
        raise _BadFile(f"its 'random' should list generators and one entry per layer "
                       f"({n_layers}), got {_brief.repr(section)}")
    generators = []
    for i, state in enumerate(states):
        kind = state.get("bit_generator") if isinstance(state, dict) else None
        if kind not in _BIT_GENERATORS:
            raise _BadFile(f"random generator {i} names an unknown bit generator "
                           f"{_brief.repr(kind)} (expected one of {list(_BIT_GENERATORS)})")
        problem = _bad_generator_state(kind, state)
        if problem:
            raise _BadFile(f"random generator {i} ({kind}) has a bad state: {problem}")
        bit_generator = getattr(np.random, kind)()
        try:
            bit_generator.state = state
        except _STATE_ERRORS as exc:
            raise _BadFile(f"random generator {i} ({kind}) has a bad state: "
                           f"{_clip(str(exc))}") from None
        generators.append(np.random.Generator(bit_generator))
    for where, ref in [("the model's", section["model"])] + [
            (f"layer {i}'s", ref) for i, ref in enumerate(layers)]:
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int)
                                or not 0 <= ref < len(generators)):
            raise _BadFile(f"{where} random generator should be the index of one of the "
                           f"{len(generators)} generators, got {_brief.repr(ref)}")
    return generators, section["model"], layers, _check_pass(section.get("pass"), generators)


def _check_pass(entry, generators):
    """The 'pass' of the random section (a Sequential's fit left a pass over
    its arrays unfinished) as a batching.FitPass, or None."""
    if entry is None:
        return None
    fields = {"samples", "batch_size", "next", "order"}
    if not isinstance(entry, dict) or set(entry) != fields:
        raise _BadFile(f"its random 'pass' should be an object of {sorted(fields)}, got "
                       f"{_brief.repr(entry)}")
    for name in ("samples", "batch_size", "next"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadFile(f"its random 'pass' should have an int {name} >= 1, got "
                           f"{_brief.repr(value)}")
    batches = -(-entry["samples"] // entry["batch_size"])
    if entry["next"] >= batches:
        raise _BadFile(f"its random 'pass' stops at batch {entry['next']} of a pass of only "
                       f"{batches} batches")
    order = entry["order"]
    if order is not None and (isinstance(order, bool) or not isinstance(order, int)
                              or not 0 <= order < len(generators)):
        raise _BadFile(f"its random 'pass' order should be None or the index of one of the "
                       f"{len(generators)} generators, got {_brief.repr(order)}")
    return FitPass(entry["samples"], entry["batch_size"], entry["next"],
                   None if order is None else generators[order])


# Each bit generator's state as numpy writes it (arrays as lists of ints):
# {field: (low, high, length or None for one int)}, ints in [low, high].
# numpy's setters check the types but not the ranges: a Mersenne Twister at
# position 2**31 or a Philox buffer at position -2**31 loaded and then read
# far outside their arrays at the next draw (a segfault).
_U32, _U64, _U128 = 2 ** 32 - 1, 2 ** 64 - 1, 2 ** 128 - 1
_EXTRA = {"has_uint32": (0, 1, None), "uinteger": (0, _U32, None)}
_PCG_STATE = ({"state": (0, _U128, None), "inc": (0, _U128, None)}, _EXTRA)
_GENERATOR_STATES = {
    "MT19937": ({"key": (0, _U32, 624), "pos": (0, 624, None)}, {}),
    "Philox": ({"counter": (0, _U64, 4), "key": (0, _U64, 2)},
               {"buffer": (0, _U64, 4), "buffer_pos": (0, 4, None), **_EXTRA}),
    "PCG64": _PCG_STATE,
    "PCG64DXSM": _PCG_STATE,
    "SFC64": ({"state": (0, _U64, 4)}, _EXTRA),
}


def _bad_generator_state(kind, state):
    """What is wrong with a bit generator's state from a file ('' if nothing):
    exactly numpy's fields, each an int (or a list of ints of its length) in
    its range."""
    inner, outer = _GENERATOR_STATES[kind]
    for where, fields, given, own in (
            ("", outer, state, {"bit_generator", "state"}),
            ("'state' ", inner, state.get("state"), set())):
        if not isinstance(given, dict) or set(given) != set(fields) | own:
            keys = sorted(given) if isinstance(given, dict) else _brief.repr(given)
            return f"its {where}fields should be {sorted(set(fields) | own)}, got {keys}"
        for name, (low, high, length) in fields.items():
            value = given[name]
            values = value if length is not None and isinstance(value, list) else [value]
            if ((length is not None and (not isinstance(value, list) or len(value) != length))
                    or not all(isinstance(x, int) and not isinstance(x, bool)
                               and low <= x <= high for x in values)):
                shape = "an int" if length is None else f"a list of {length} ints"
                return (f"its {name!r} should be {shape} in [{low}, {high}], got "
                        f"{_brief.repr(value)}")
    if kind == "MT19937" and not any(state["state"]["key"]):
        return "its 'key' is all zeros, a state the Mersenne Twister never leaves"
    return ""


def _restore_random(random, model, layers):
    if random is None:
        return
    generators, model_ref, layer_refs, kept_pass = random
    if model is not None and model_ref is not None:
        model._rng = generators[model_ref]
    if kept_pass is not None:
        if model is None:
            raise _BadFile("a layer's file has a fit's pass in its random section")
        model._fit_pass = kept_pass
    for i, (layer, ref) in enumerate(zip(layers, layer_refs)):
        if ref is None:
            continue
        layer = _recurrent(layer)     # a wrapper's generator is its layer's
        if not hasattr(layer, "_rng"):
            raise _BadFile(f"layer {i} ({type(layer).__name__}) has a random generator in the "
                           f"file but draws no random numbers")
        layer._rng = generators[ref]


def _check_training(section):
    """The training section: the loss and metrics built, the optimizer's
    configuration checked (an unbound optimizer built from it)."""
    expected = {"loss", "metrics", "clip_grad_norm", "clip_grad_value", "optimizer"}
    if not isinstance(section, dict) or set(section) != expected:
        got = sorted(section) if isinstance(section, dict) else type(section).__name__
        raise _BadFile(f"its 'training' should be an object of {sorted(expected)}, got "
                       f"{_brief.repr(got)}")
    loss = None
    entry = section["loss"]
    if entry is not None:
        name = entry.get("class") if isinstance(entry, dict) else None
        cls = losses_module.LOSS_CLASSES.get(name) if isinstance(name, str) else None
        if cls is None or not isinstance(entry.get("config"), dict):
            raise _BadFile(f"its loss should name one of {sorted(losses_module.LOSS_CLASSES)} "
                           f"with a 'config' object, got {_brief.repr(entry)}")
        try:
            loss = cls(**entry["config"])
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"its loss ({name}) has a bad configuration: "
                           f"{_clip(str(exc))}") from None
        if loss.reduction == "none":
            raise _BadFile(f"its loss ({name}) has reduction 'none', which training refuses")
    metrics = []
    if not isinstance(section["metrics"], list):
        raise _BadFile(f"its metrics should be a list, got {_brief.repr(section['metrics'])}")
    for i, entry in enumerate(section["metrics"]):
        weighted = entry.get("weighted") if isinstance(entry, dict) else None
        if not isinstance(weighted, bool):
            raise _BadFile(f"metric {i} should be an object with 'weighted' true or false, got "
                           f"{_brief.repr(entry)}")
        try:
            if set(entry) == {"name", "weighted"} and isinstance(entry["name"], str):
                metrics_module.check("metric", entry["name"])
                metrics.append((entry["name"], weighted))
                continue
            cls = metrics_module.METRIC_CLASSES.get(entry.get("class")) \
                if isinstance(entry.get("class"), str) else None
            if set(entry) != {"class", "config", "weighted"} or cls is None \
                    or not isinstance(entry["config"], dict):
                raise _BadFile(f"metric {i} should have a 'name', or a 'class' (one of "
                               f"{sorted(metrics_module.METRIC_CLASSES)}) and a 'config', "
                               f"got {_brief.repr(entry)}")
            metrics.append((cls(**entry["config"]), weighted))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, _BadFile):
                raise
            raise _BadFile(f"metric {i} is bad: {_clip(str(exc))}") from None
    clips = []
    for key in ("clip_grad_norm", "clip_grad_value"):
        value = section[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isnan(value) or value < 0):
            raise _BadFile(f"its {key} should be a number >= 0 or null, got "
                           f"{_brief.repr(value)}")
        clips.append(value)
    return _Training(loss, metrics, clips[0], clips[1],
                     _check_optimizer(section["optimizer"]))


def _check_optimizer(section):
    expected = {"class", "config", "step_count", "scalars", "schedules"}
    # ("layers", the positions of the layers it trains, since 2026-12-07: a
    # file without it had the optimizer train every layer)
    if not isinstance(section, dict) or not expected <= set(section) <= expected | {"layers"}:
        got = sorted(section) if isinstance(section, dict) else type(section).__name__
        raise _BadFile(f"its optimizer should be an object of {sorted(expected)} (and "
                       f"optionally 'layers'), got {_brief.repr(got)}")
    layers = section.get("layers")
    if layers is not None and not (
            isinstance(layers, list) and all(type(i) is int and i >= 0 for i in layers)
            and len(set(layers)) == len(layers)):
        raise _BadFile(f"its optimizer's layers should be a list of distinct layer positions, "
                       f"got {_brief.repr(layers)}")
    name = section["class"]
    cls = _OPTIMIZERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise _BadFile(f"its optimizer names an unknown class {_brief.repr(name)} (expected "
                       f"one of {sorted(_OPTIMIZERS)})")
    if not isinstance(section["config"], dict):
        raise _BadFile(f"its optimizer's config should be an object, got "
                       f"{_brief.repr(section['config'])}")
    try:
        instance = cls(None, **section["config"])
    except (TypeError, ValueError) as exc:
        raise _BadFile(f"its optimizer ({name}) has a bad configuration: "
                       f"{_clip(str(exc))}") from None
    scalars = section["scalars"]
    if not isinstance(scalars, dict) or not all(isinstance(item, dict)
                                                for item in scalars.values()):
        raise _BadFile(f"its optimizer's scalars should be an object of objects, got "
                       f"{_brief.repr(scalars)}")
    if not isinstance(section["schedules"], list):
        raise _BadFile(f"its optimizer's schedules should be a list, got "
                       f"{_brief.repr(section['schedules'])}")
    return _OptimizerSpec(cls, section["config"], instance, section["step_count"], scalars,
                          section["schedules"], layers)


def _match_slots(specs, optimizer, slots):
    """(layer, parameter name) -> {slot: (ZipInfo, header)}, once every
    optimizer array is one the configuration calls for: a slot the optimizer
    keeps, of a parameter the layer has, of its shape and dtype; each
    parameter with state has all of its slots, and its scalars."""
    if optimizer is None:
        return {}
    expected_slots = optimizer.instance.slots()
    scalar_slots = set(optimizer.instance._scalar_slots)
    shapes = {}
    for i, (name, kwargs, layout) in enumerate(specs):
        if layout.arrays:
            try:   # (the layer's own check comes later: the file's dtype named here)
                dtype = v.check_dtype(name, kwargs.get("dtype", "float32"))
            except ValueError as exc:
                raise _BadFile(f"layer {i} ({name}): {exc}") from None
            shapes[i] = (dict(_parameter_layout(name, kwargs).shapes), dtype)
    held = {}
    for key, item in slots.items():
        index, _, rest = key.partition(".")
        param, _, slot = rest.rpartition(".")
        if not (index.isascii() and index.isdigit() and str(int(index)) == index
                and int(index) in shapes and param in shapes[int(index)][0]
                and slot in expected_slots):
            raise _BadFile(f"it holds the optimizer array {_brief.repr(key)}, which is no slot "
                           f"{list(expected_slots)} of a parameter of its layers")
        i = int(index)
        shape, dtype = shapes[i][0][param], shapes[i][1]
        got_shape, _, got_dtype, _ = item[1]
        if tuple(got_shape) != shape or got_dtype.newbyteorder("=") != dtype:
            raise _BadFile(f"optimizer array {key!r} is {shape_str(got_shape)} of "
                           f"{_dtype_text(got_dtype)}; its parameter is {shape_str(shape)} of "
                           f"{dtype.name}")
        held.setdefault((i, param), {})[slot] = item
    for (i, param), got in held.items():
        if set(got) != set(expected_slots):
            raise _BadFile(f"layer {i}'s {param} has optimizer arrays {sorted(got)}; a "
                           f"{optimizer.cls.__name__} with this configuration keeps "
                           f"{sorted(expected_slots)}")
    for key, values in optimizer.scalars.items():
        index, _, param = key.partition(".")
        if not (index.isascii() and index.isdigit() and str(int(index)) == index
                and (int(index), param) in held and set(values) == scalar_slots):
            raise _BadFile(f"its optimizer's scalars for {_brief.repr(key)} belong to no "
                           f"parameter with optimizer arrays (or are not "
                           f"{sorted(scalar_slots)})")
    if scalar_slots:
        missing = [f"{i}.{param}" for i, param in held if f"{i}.{param}" not in
                   optimizer.scalars]
        if missing:
            raise _BadFile(f"its optimizer keeps {sorted(scalar_slots)} per parameter, missing "
                           f"for {_some(missing)}")
    return held


def _restore_training(read, model, layers, training, per_slot):
    """Compile the model with the file's loss, metrics and optimizer, and
    read the optimizer's state into it."""
    model.loss = training.loss
    model.clip_grad_norm = training.clip_grad_norm
    model.clip_grad_value = training.clip_grad_value
    model._metric_specs, model._metrics = list(training.metrics), None
    spec = training.optimizer
    if spec is None:
        return
    opt = spec.cls(None, **spec.config)
    if spec.layers is None:
        opt.add(model)
    else:   # only the layers it trained: the others stay frozen
        trains = [i < len(layers) and isinstance(_recurrent(layers[i]), Module)
                  for i in spec.layers]
        if not all(trains):
            raise _BadFile(f"its optimizer trains layer {spec.layers[trains.index(False)]}, "
                           f"which holds no parameters (the model has {len(layers)} layers)")
        untrained = sorted({i for i, _ in per_slot} - set(spec.layers))
        if untrained:
            raise _BadFile(f"it holds optimizer arrays of layer {untrained[0]}, which its "
                           f"optimizer does not train (it trains layers {spec.layers})")
        opt.add([layers[i] for i in spec.layers])
        opt._quantized.extend(optim._quantized_in(model))   # (its step refuses them, as add's)
    states = []
    positions = {}
    for i, layer in enumerate(layers):
        positions.setdefault(id(_recurrent(layer)), i)
    for module in opt._modules:
        i = positions[id(module)]
        storages = module._params.storages
        by_storage = [[] for _ in storages]
        for name, (k, rows) in module._names.items():
            by_storage[k].append((name, rows))
        for k, storage in enumerate(storages):
            names = by_storage[k]
            present = [name for name, _ in names if (i, name) in per_slot]
            if not present:
                states.append({})
                continue
            if len(present) != len(names):
                absent = [name for name, _ in names if (i, name) not in per_slot]
                raise _BadFile(f"layer {i} has optimizer state for {present} but not for "
                               f"{absent}, which share one array of parameters")
            state = {}
            for slot in spec.instance.slots():
                array = np.empty(storage.shape, storage.dtype)
                for name, rows in names:
                    info, header = per_slot[(i, name)][slot]
                    array[slice(None) if rows is None else rows] = read(info, header)
                state[slot] = array
            scalars = [spec.scalars[f"{i}.{name}"] for name, _ in names if spec.scalars]
            if scalars:
                if any(item != scalars[0] for item in scalars):
                    raise _BadFile(f"layer {i}'s parameters {[name for name, _ in names]} share "
                                   f"one array but their optimizer scalars differ: {scalars}")
                state.update(scalars[0])
            states.append(state)
    try:
        opt._load_state({"class": spec.cls.__name__, "config": spec.config,
                         "step_count": spec.step_count, "state": states,
                         "schedules": spec.schedules}, copy=False)
    except (TypeError, ValueError) as exc:
        raise _BadFile(f"its optimizer state is bad: {_clip(str(exc))}") from None
    model.optimizer = opt

def _zip_directory(f, size):
    """(number of members, bytes of the central directory) from the zip's end
    records, found as zipfile finds them, before zipfile reads the directory."""
    end_size, locator_size, end64_size = 22, 20, 56
    tail_start = max(size - end_size - 0xFFFF, 0)   # the record, then a comment < 64 KiB
    f.seek(tail_start)
    tail = f.read()
    if len(tail) >= end_size and tail[-end_size:-end_size + 4] == b"PK\x05\x06" \
            and tail[-2:] == b"\0\0":
        at = len(tail) - end_size
    else:
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < end_size:
            raise _BadFile("it is not a complete zip archive (no end-of-central-directory "
                           "record: truncated?)")
    _, _, _, _, entries, directory_bytes, _, _ = struct.unpack("<4s4H2LH",
                                                               tail[at:at + end_size])
    record = tail_start + at
    if record >= locator_size + end64_size:          # a zip64 record overrides the counts
        f.seek(record - locator_size)
        locator = f.read(locator_size)
        if locator[:4] == b"PK\x06\x07":
            f.seek(record - locator_size - end64_size)
            end64 = f.read(end64_size)
            if end64[:4] == b"PK\x06\x06":
                entries, directory_bytes = struct.unpack("<QQ", end64[32:48])
    return entries, directory_bytes


def _check_members(zf, size):
    """Member name -> ZipInfo, once every member is one `save` could write,
    with sizes the file can hold and no bomb-like compression."""
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise _BadFile(f"it has {len(infos):,} members, more than {_MAX_MEMBERS:,}")
    members = {}
    compressed = 0
    for info in infos:
        name = info.filename
        shown = _brief.repr(name)
        if name in members:
            raise _BadFile(f"it holds the member {shown} twice")
        if name != "config.npy" and not (name.startswith(("weights/", "optimizer/"))
                                         and name.endswith(".npy")):
            raise _BadFile(f"it holds a member {shown} that is neither the configuration nor "
                           f"a weight or optimizer array")
        if info.flag_bits & 0x1:
            raise _BadFile(f"member {shown} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _BadFile(f"member {shown} uses compression method {info.compress_type}; only "
                           f"stored (0) and deflated (8) members are read")
        if info.compress_size > size - info.header_offset:
            raise _BadFile(f"member {shown} declares {info.compress_size:,} compressed bytes, "
                           f"more than the file's {size:,}")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _BadFile(f"member {shown} is stored uncompressed but declares "
                           f"{info.file_size:,} bytes for {info.compress_size:,}")
        if info.file_size > _MAX_RATIO * info.compress_size + _RATIO_SLACK:
            raise _BadFile(f"member {shown} would inflate from {info.compress_size:,} to "
                           f"{info.file_size:,} bytes (ratio "
                           f"{info.file_size // max(info.compress_size, 1):,}:1, more than "
                           f"{_MAX_RATIO}:1): a zip bomb?")
        compressed += info.compress_size
        members[name] = info
    if compressed > size:
        raise _BadFile(f"its members declare {compressed:,} compressed bytes in all, more than "
                       f"the file's {size:,} (overlapping members?)")
    return members


def _dtype_text(dtype):
    return dtype.str if dtype.kind in "SUV" else dtype.name


def _array_header(zf, info):
    """(shape, fortran_order, dtype, data offset) of a .npy member, read from
    its header alone; its shape and dtype must account for its bytes exactly."""
    shown = _brief.repr(info.filename)
    try:
        with zf.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} is not read")
            offset = member.tell()
    except (ValueError, TypeError, SyntaxError, RecursionError, EOFError, struct.error,
            UnicodeError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]   # not numpy's advice to trust it
        raise _BadFile(f"member {shown} has a damaged .npy header ({type(exc).__name__}: "
                       f"{_clip(first_line)})") from None
    if dtype.hasobject:
        raise _BadFile(f"member {shown} holds object data (pickle), which is never loaded")
    if info.filename == "config.npy":
        if dtype.kind != "U":
            raise _BadFile(f"member {shown} holds {_dtype_text(dtype)} data, not the "
                           f"configuration's JSON text")
    elif (dtype.kind != "f" or dtype.itemsize not in (4, 8) or dtype.fields
          or dtype.subdtype) and not (info.filename.startswith("weights/")
                                      and dtype.newbyteorder("=") in _REDUCED_DTYPES):
        what = ("weights must be float32 or float64, or int8 or uint16 (a quantized layer's)"
                if info.filename.startswith("weights/")
                else "optimizer arrays must be float32 or float64")
        raise _BadFile(f"member {shown} holds {_dtype_text(dtype)} data; {what}")
    if any(n < 0 for n in shape):
        raise _BadFile(f"member {shown}: its header declares the negative shape "
                       f"{shape_str(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != info.file_size - offset:
        raise _BadFile(f"member {shown}: its header declares shape {shape_str(shape)} of "
                       f"{_dtype_text(dtype)} ({nbytes:,} bytes), but the member holds "
                       f"{max(info.file_size - offset, 0):,} bytes of data")
    return shape, fortran, dtype, offset


def _read_array(zf, info, header):
    """The array of a checked member, read into its own buffer a chunk at a time."""
    shape, fortran, dtype, offset = header
    array = np.empty(shape[::-1] if fortran else shape, dtype)
    flat = array.reshape(-1).view(np.uint8)
    with zf.open(info) as member:
        member.read(offset)
        done = 0
        while done < flat.size:
            chunk = member.read(min(flat.size - done, _READ_CHUNK))
            if not chunk:
                raise _BadFile(f"member {_brief.repr(info.filename)} ends after {done:,} of its "
                               f"{flat.size:,} bytes of data")
            flat[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
            done += len(chunk)
        member.read(1)   # reaches the end of the member: zipfile checks its CRC-32
    return array.T if fortran else array


def _read_config(zf, info, header):
    """The parsed JSON configuration, of bounded length and nesting."""
    shape, _, dtype, _ = header
    if shape != ():
        raise _BadFile(f"member 'config.npy' holds an array of shape {shape_str(shape)}, not "
                       f"the configuration's JSON text")
    chars = dtype.itemsize // 4
    if chars > _MAX_CONFIG_CHARS:
        raise _BadFile(f"its configuration has {chars:,} characters, more than "
                       f"{_MAX_CONFIG_CHARS:,}")
    return _parse_config(str(_read_array(zf, info, header)[()]))


def _parse_config(text):
    """The parsed JSON configuration, of bounded nesting."""
    too_deep = _BadFile(f"its configuration (JSON) is nested too deeply (more than "
                        f"{_MAX_CONFIG_DEPTH} levels)")
    try:
        config = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise _BadFile(f"its configuration is not valid JSON ({_clip(str(exc))})") from None
    # no deeper values reach the checks and messages below (repr recurses)
    if _deeper_than(config, _MAX_CONFIG_DEPTH):
        raise too_deep
    return config



def _ln_sizes(name, H):
    """The sizes of a GRU's or LSTM's layer-norm parameters (_module.ln_names)
    of one direction."""
    return ln_parameter_sizes("lstm" if name.startswith("LSTM") else "gru", H)


def _parameter_layout(name, kwargs):
    """(number of arrays, number of values, iterator of (name, shape)) of the
    parameters a layer of class `name` built with `kwargs` would hold, found
    without building it: the counts are exact integers even for absurd sizes,
    and the shapes are generated only when asked for. The arguments they
    depend on are checked as the constructor checks them."""
    params = inspect.signature(_LAYER_CLASSES[name]).bind(**kwargs)
    params.apply_defaults()
    args = params.arguments
    kind = name.removeprefix("Quantized")   # a quantized class takes its float class's options
    if name in _GATES:
        D = v.check_int(name, "input_size", args["input_size"])
        H = v.check_int(name, "hidden_size", args["hidden_size"])
        L = v.check_int(name, "num_layers", args["num_layers"])
        bias = v.check_bool(name, "bias", args["bias"])
        dirs = 2 if v.check_bool(name, "bidirectional", args["bidirectional"]) else 1
        GH = _GATES[name] * H
        peep = kind == "LSTM" and v.check_bool(name, "peepholes", args["peepholes"])
        ln = kind != "RNN" and v.check_bool(name, "layer_norm", args["layer_norm"])
        ln_sizes = _ln_sizes(name, H) if ln else ()
        # learned initial states: initial_h (and initial_c), (H,) each
        states = (2 if kind == "LSTM" else 1) * v.check_bool(
            name, "learn_initial_state", args["learn_initial_state"])
        # proj_size P: W_hr (P, H), and h (W_hh's columns, the layers'
        # outputs, initial_h) P wide
        P = 0
        if kind == "LSTM":
            P = v.check_int(name, "proj_size", args["proj_size"], minimum=0)
            if P >= H:
                raise ValueError(f"{name}: proj_size must be smaller than hidden_size "
                                 f"({_int_text(H)}), got {_int_text(P)}")
        out = P or H
        state_sizes = (out, H)[:states]

        def per_direction(in_size):
            return (GH * in_size + GH * out + (2 * GH if bias else 0) + (3 * H if peep else 0)
                    + sum(state_sizes) + sum(ln_sizes) + P * H)

        arrays = L * dirs * ((4 if bias else 2) + peep + states + len(ln_sizes) + (P > 0))
        values = dirs * per_direction(D) + (L - 1) * dirs * per_direction(dirs * out)

        def shapes():
            for k in range(L):
                in_size = D if k == 0 else dirs * out
                for d in range(dirs):
                    sfx = f"_l{k}" + ("_reverse" if d else "")
                    yield f"weight_ih{sfx}", (GH, in_size)
                    yield f"weight_hh{sfx}", (GH, out)
                    if bias:
                        yield f"bias_ih{sfx}", (GH,)
                        yield f"bias_hh{sfx}", (GH,)
                    if P:
                        yield f"weight_hr{sfx}", (P, H)
                    if peep:
                        yield f"weight_peephole{sfx}", (3 * H,)
                    for state, size in zip(("initial_h", "initial_c"), state_sizes):
                        yield f"{state}{sfx}", (size,)
                    for ln_name, size in zip(ln_names("weight_ih" + sfx), ln_sizes):
                        yield ln_name, (size,)
        summary = (f"input_size={_int_text(D)}, hidden_size={_int_text(H)}, "
                   f"num_layers={_int_text(L)}, bias={bias}, bidirectional={dirs == 2}"
                   + (f", proj_size={_int_text(P)}" if P else ""))
    elif name in _CELL_GATES:
        D = v.check_int(name, "input_size", args["input_size"])
        H = v.check_int(name, "hidden_size", args["hidden_size"])
        bias = v.check_bool(name, "bias", args["bias"])
        GH = _CELL_GATES[name] * H
        peep = kind == "LSTMCell" and v.check_bool(name, "peepholes", args["peepholes"])
        ln = kind != "RNNCell" and v.check_bool(name, "layer_norm", args["layer_norm"])
        ln_sizes = _ln_sizes(name, H) if ln else ()
        states = (2 if kind == "LSTMCell" else 1) * v.check_bool(
            name, "learn_initial_state", args["learn_initial_state"])
        arrays = (4 if bias else 2) + peep + states + len(ln_sizes)
        values = (GH * D + GH * H + (2 * GH if bias else 0) + (3 * H if peep else 0) + states * H
                  + sum(ln_sizes))

        def shapes():
            yield "weight_ih", (GH, D)
            yield "weight_hh", (GH, H)
            if bias:
                yield "bias_ih", (GH,)
                yield "bias_hh", (GH,)
            if peep:
                yield "weight_peephole", (3 * H,)
            for state in ("initial_h", "initial_c")[:states]:
                yield state, (H,)
            for ln_name, size in zip(ln_names("weight_ih"), ln_sizes):
                yield ln_name, (size,)
        summary = f"input_size={_int_text(D)}, hidden_size={_int_text(H)}, bias={bias}"
    elif name in ("Linear", "QuantizedLinear"):
        n_in = v.check_int(name, "in_features", args["in_features"])
        n_out = v.check_int(name, "out_features", args["out_features"])
        bias = v.check_bool(name, "bias", args["bias"])
        arrays, values = 1 + bias, n_out * n_in + (n_out if bias else 0)

        def shapes():
            yield "weight", (n_out, n_in)
            if bias:
                yield "bias", (n_out,)
        summary = (f"in_features={_int_text(n_in)}, out_features={_int_text(n_out)}, "
                   f"bias={bias}")
    elif name == "Embedding":   # [masks]
        n = v.check_int(name, "num_embeddings", args["num_embeddings"])
        dim = v.check_int(name, "embedding_dim", args["embedding_dim"])
        arrays, values = 1, n * dim

        def shapes():
            yield "weight", (n, dim)
        summary = f"num_embeddings={_int_text(n)}, embedding_dim={_int_text(dim)}"
    else:
        arrays, values, summary = 0, 0, ""

        def shapes():
            return iter(())
    return _Layout(arrays, values, shapes(), summary)


# a layer's parameters as the loader predicts them (see _parameter_layout)
_Layout = namedtuple("_Layout", ["arrays", "values", "shapes", "summary"])


def _label(name, around):
    """A layer's class as messages name it: inside its wrappers, outermost
    first (``Stateful(Reversed(LSTM))``)."""
    for wrapper, _ in reversed(around):
        name = f"{wrapper}({name})"
    return name


def _match_weights(specs, weights, labels):
    """Per layer, parameter name -> (ZipInfo, header), once the file holds
    exactly the arrays the configuration calls for: counted first (cheap for
    any size), then by name and shape."""
    per_layer = [{} for _ in specs]
    stray = []
    for key, item in weights.items():
        index, dot, name = key.partition(".")
        if dot and index.isascii() and index.isdigit() and str(int(index)) == index \
                and int(index) < len(specs):
            per_layer[int(index)][name] = item
        else:
            stray.append(key)
    if stray:
        raise _BadFile(f"it holds weights {_some(stray)} that belong to none of its "
                       f"{len(specs)} layers")
    for i, ((cls, kwargs, layout), held, name) in enumerate(zip(specs, per_layer, labels)):
        arrays, values, shapes, summary = layout
        _check_weight_dtypes(i, cls, kwargs, held, name)
        # an int8 layer's weights may come with their scales: checked against the weights
        scales = {}
        if cls.startswith("Quantized") and kwargs.get("weight_dtype", "int8") == "int8":
            scales = {key: held.pop(key) for key in list(held)
                      if key.endswith(SCALE) and key.startswith("weight")
                      and key[:-len(SCALE)] in held}
        held_values = sum(math.prod(header[0]) for _, header in held.values())
        if arrays != len(held) or values != held_values:
            described = f"{name}, {summary}" if summary else name
            raise _BadFile(f"layer {i} ({described}) calls for {_counted(arrays, 'array')} of "
                           f"{_counted(values, 'value')}, but the file holds "
                           f"{_counted(len(held), 'array')} of "
                           f"{_counted(held_values, 'value')} for it")
        expected = dict(shapes)   # as many as the file holds, so bounded
        missing = [key for key in expected if key not in held]
        unexpected = [key for key in held if key not in expected]
        if missing or unexpected:
            raise _BadFile(f"layer {i} ({name}): missing weights {_some(missing)}, unexpected "
                           f"weights {_some(unexpected)}")
        for key, shape in expected.items():
            got = held[key][1][0]
            if tuple(got) != shape:
                raise _BadFile(f"layer {i} ({name}): {key} has shape {shape_str(shape)} in the "
                               f"configuration but {shape_str(got)} in the file")
        for key, item in scales.items():
            shape = expected[key[:-len(SCALE)]]
            got = item[1][0]
            if len(shape) != 2 or tuple(got) != shape[:1]:
                raise _BadFile(f"layer {i} ({name}): {key} has shape {shape_str(got)} in the "
                               f"file; expected the scales of the int8 {key[:-len(SCALE)]}, "
                               f"one per row: {shape_str(shape[:1])}")
        held.update(scales)
    return per_layer


def _check_weight_dtypes(i, cls, kwargs, held, label):
    """A layer's arrays must be floating point, but for a quantized layer's
    weight matrices, which may also be int8 (an int8 layer's) or uint16 (a
    bfloat16 layer's bit patterns): its load_state_dict checks them."""
    reduced = ()
    if cls.startswith("Quantized"):
        reduced = (np.dtype("int8") if kwargs.get("weight_dtype", "int8") == "int8"
                   else np.dtype("uint16"),)
    for key, (_, header) in held.items():
        dtype = header[2].newbyteorder("=")
        allowed = reduced if key.startswith("weight") and not key.endswith(SCALE) else ()
        if dtype.kind != "f" and dtype not in allowed:
            expected = "float32 or float64" + "".join(f" or {d.name}" for d in allowed)
            raise _BadFile(f"layer {i} ({label}): {key} holds {dtype.name} data; expected "
                           f"{expected}")
