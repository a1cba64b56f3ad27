"""fastrnn: fast CPU recurrent neural networks with PyTorch semantics.

Elman RNN (tanh/relu), GRU and LSTM as whole-sequence layers (stacked,
bidirectional, variable length) and single-step cells. Cython kernels with
BLAS do the work; names, shapes, gate orders and initialisation are
PyTorch's, so a PyTorch ``state_dict()`` loads directly.
"""
from fastrnn._version import __version__
from fastrnn.cells import GRUCell, LSTMCell, RNNCell
from fastrnn.layers import GRU, LSTM, RNN

__all__ = ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "__version__"]
