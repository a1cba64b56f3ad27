"""fastrnn: fast CPU recurrent neural networks with PyTorch semantics.

Elman RNN (tanh/relu), GRU and LSTM as whole-sequence layers (stacked,
bidirectional, variable length) and single-step cells. Cython kernels with
BLAS do the work; names, shapes, gate orders and initialisation are
PyTorch's, so a PyTorch ``state_dict()`` loads directly.
"""
from __future__ import annotations

from types import ModuleType as _ModuleType

from fastrnn._version import __version__

try:
    from fastrnn import _kernels  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - depends on how it was installed
    # (any other ImportError, such as a bad FASTRNN_SIMD, says what is wrong itself)
    raise ImportError(
        "fastrnn's compiled kernels are missing: install with 'pip install .', or build in "
        "place with 'python setup.py build_ext --inplace'. If you installed it and are in the "
        "source tree, Python is importing the unbuilt sources: run from another directory or "
        "use the 'pytest' command rather than 'python -m pytest'.") from exc
from fastrnn import batching, callbacks, losses, metrics, optim
from fastrnn._parallel import get_num_threads, set_num_threads
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN, tbptt
from fastrnn.losses import BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, L1Loss, MSELoss
from fastrnn.callbacks import (Callback, CSVLogger, EarlyStopping, History, LambdaCallback,
                               LearningRateScheduler, ModelCheckpoint, ReduceLROnPlateau,
                               TerminateOnNaN)
from fastrnn.model import Sequential, load, load_state_dict_file, save
from fastrnn.nn import (Dropout, Embedding, LastStep, Linear, Masking, MergeDirections, ReLU,
                        Sigmoid, Tanh, ZeroMasked)
from fastrnn.convert import from_keras, from_onnx, from_torch, to_onnx, to_torch
from fastrnn.streaming import Stream
from fastrnn.wrappers import Reversed, Stateful
from fastrnn.quantized import quantize

__all__ = ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "Linear", "Dropout",
           "Embedding", "Masking", "ZeroMasked", "MergeDirections",
           "LastStep", "ReLU", "Tanh", "Sigmoid", "Sequential", "History", "Callback",
           "EarlyStopping", "ModelCheckpoint", "CSVLogger", "ReduceLROnPlateau",
           "TerminateOnNaN", "LearningRateScheduler", "LambdaCallback", "load", "load_state_dict_file", "save", "tbptt",
           "MSELoss", "L1Loss", "HuberLoss", "CrossEntropyLoss", "BCEWithLogitsLoss", "losses",
           "optim", "metrics", "callbacks", "batching", "set_num_threads", "get_num_threads",
           "Stream", "Reversed", "Stateful", "from_torch", "to_torch", "from_keras", "to_onnx",
           "from_onnx", "quantize",
           "__version__"]


def __getattr__(name: str) -> _ModuleType:
    # fastrnn.dask and fastrnn.sklearn are imported on first use: dask and
    # scikit-learn are optional dependencies
    if name in ("dask", "sklearn"):
        import importlib
        return importlib.import_module("fastrnn." + name)
    raise AttributeError(f"module 'fastrnn' has no attribute {name!r}")
