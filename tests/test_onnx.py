"""ONNX export: ONNX Runtime computes what the layer computes (skipped
without onnx / onnxruntime)."""
import numpy as np
import pytest

import fastrnn
from test_forward import KINDS, make_layer

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,with_lengths", [
    (1, False, False, True, False), (2, True, False, True, True), (2, False, True, False, True),
    (3, True, True, True, False)])
def test_onnx_runtime_matches_the_layer(kind, num_layers, bidirectional, batch_first, bias,
                                        with_lengths, tmp_path):
    rng = np.random.default_rng(0)
    layer = make_layer(kind, 4, 5, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, seed=1)
    T, B = 7, 3
    dirs = 2 if bidirectional else 1
    x = rng.standard_normal((B, T, 4) if batch_first else (T, B, 4)).astype(np.float32)
    h0 = rng.standard_normal((num_layers * dirs, B, 5)).astype(np.float32)
    c0 = rng.standard_normal((num_layers * dirs, B, 5)).astype(np.float32)
    lengths = np.array([7, 2, 5], np.int32) if with_lengths else None
    model = fastrnn.to_onnx(layer, tmp_path / "layer.onnx", lengths=with_lengths)
    assert (tmp_path / "layer.onnx").exists()
    feeds = {"X": x, "initial_h": h0}
    if kind == "lstm":
        feeds["initial_c"] = c0
    if with_lengths:
        feeds["sequence_lens"] = lengths
    got = run(model, feeds)
    out, state = layer(x, (h0, c0) if kind == "lstm" else h0, lengths=lengths)
    np.testing.assert_allclose(got[0], out, rtol=0, atol=3e-6)
    for g, s in zip(got[1:], state if kind == "lstm" else (state,)):
        np.testing.assert_allclose(g, s, rtol=0, atol=3e-6)


def test_onnx_state_outputs_stream():
    """Y_h / Y_c fed back as the initial state continue the sequence."""
    rng = np.random.default_rng(1)
    layer = fastrnn.LSTM(3, 4, num_layers=2, seed=0)
    model = fastrnn.to_onnx(layer)
    x = rng.standard_normal((10, 2, 3)).astype(np.float32)
    zeros = np.zeros((2, 2, 4), np.float32)
    y1, h, c = run(model, {"X": x[:6], "initial_h": zeros, "initial_c": zeros})
    y2, _, _ = run(model, {"X": x[6:], "initial_h": h, "initial_c": c})
    np.testing.assert_allclose(np.concatenate([y1, y2]), layer(x)[0], rtol=0, atol=3e-6)


def test_to_onnx_refuses_non_layers():
    with pytest.raises(TypeError, match="to_onnx: expected a fastrnn RNN, GRU or LSTM"):
        fastrnn.to_onnx(fastrnn.GRUCell(3, 4))
