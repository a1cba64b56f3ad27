"""Two options of the recurrent layers that change their training rather
than their gates: a learned initial state (``learn_initial_state``) and
DropConnect on the recurrent weights (``weight_dropout``, AWD-LSTM).

The layers check the arguments (``_validation``); the parameters of the
learned state live with the others (``_module.RecurrentWeights._build``),
the masks of DropConnect are drawn by ``_engine.RecurrentEngine._dropconnect``.
This module holds what the layers and cells share of the options' text:
their repr and their docstring entries.
"""
from __future__ import annotations

# (config key, default) of each option, in the order repr shows them
DEFAULTS = (("learn_initial_state", False), ("weight_dropout", 0.0))


def repr_options(config):
    """(key, value) of the options that differ from their defaults."""
    return [(key, config[key]) for key, default in DEFAULTS
            if key in config and config[key] != default]


INITIAL_STATE_DOC = """
    learn_initial_state : bool, default False
        Keyword only: the initial state is a parameter, ``initial_h{where}``
        (and ``initial_c{where}`` for an LSTM), of shape (H,){per}, zero at
        first, broadcast over the batch and trained as the others (its
        gradient is the sum over the batch of the initial state's). It is used
        when a call passes no ``hx``; a call that passes ``hx`` (even in part:
        a missing part is zeros) starts from that, and the parameters get no
        gradient from it. No
        PyTorch, Keras or ONNX equivalent (to_onnx writes it as the node's
        initial_h/initial_c, a constant; to_torch refuses it)."""
LAYER_INITIAL_STATE_DOC = INITIAL_STATE_DOC.format(
    where="_l{k}", per=" per layer and direction (``_reverse`` for the second)")
CELL_INITIAL_STATE_DOC = INITIAL_STATE_DOC.format(where="", per="")
WEIGHT_DROPOUT_DOC = """
    weight_dropout : float in [0, 1), default 0
        Keyword only: DropConnect on the recurrent weights (AWD-LSTM, Merity
        et al. 2017). In training (``forward_train``, ``fit``) each forward
        draws one mask per W_hh matrix from the layer's random generator
        (each weight kept with probability 1 - p, scaled by 1 / (1 - p);
        drawn before the zoneout and between-layer dropout masks), every
        step of that forward uses W_hh * mask, and W_hh's gradient is the
        masked one; inference uses W_hh unchanged. No PyTorch, Keras or ONNX
        equivalent (to_torch refuses it; to_onnx writes inference, which it
        does not change)."""
LAYER_DOC = LAYER_INITIAL_STATE_DOC + WEIGHT_DROPOUT_DOC
