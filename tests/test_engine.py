"""The float32 engine: products on the micro-kernel over weights packed once.

Every element of a product is one chain (its start value, then k = 0, 1, ...
in order) whatever the tile, the batch or the thread that computes it, so a
row's results are bit-identical alone or in any batch, at any thread count.
"""
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastrnn
import reference_options as ro
from fastrnn import _parallel, _plan
from fastrnn._kernels import backward as _backward, forward as _forward
from option_cases import assert_close

# thread counts tried, more than this machine's cores too (2 on the CI machine)
THREADS = [2, 3, 4, 8]

KINDS = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("GRU", {}),
         ("GRU", {"reset_after": False}), ("LSTM", {})]


def states(state):
    return state if isinstance(state, tuple) else (state,)


def make(kind, options, D, H, **kw):
    return getattr(fastrnn, kind)(D, H, seed=3, **options, **kw)


@pytest.mark.parametrize("kind,options", KINDS)
@pytest.mark.parametrize("H", [1, 7, 16, 17, 40, 130])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(kind, options, H, bidirectional):
    rng = np.random.default_rng(H)
    T, B, D = 6, 13, 5
    layer = make(kind, options, D, H, num_layers=2, bidirectional=bidirectional)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    out, state = layer(x, lengths=lengths)
    for b in (0, 5, B - 1):
        for sub in ([b], [b, (b + 1) % B], list(range(b, B))):
            out_b, state_b = layer(np.ascontiguousarray(x[:, sub]), lengths=lengths[sub])
            np.testing.assert_array_equal(out_b[:, 0], out[:, b])
            for s_b, s in zip(states(state_b), states(state)):
                np.testing.assert_array_equal(s_b[:, 0], s[:, b])


@pytest.mark.parametrize("kind,options", KINDS)
def test_thread_counts_give_the_same_bits(kind, options, monkeypatch):
    rng = np.random.default_rng(0)
    for T, B, D, H, bidirectional in [(40, 9, 6, 48, True), (40, 9, 6, 48, False),
                                      (300, 1, 8, 256, False)]:
        layer = make(kind, options, D, H, bidirectional=bidirectional)
        x = rng.standard_normal((T, B, D)).astype(np.float32)
        monkeypatch.setattr(_parallel, "_threads", 1)
        one = layer(x)
        monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
        for threads in THREADS:
            monkeypatch.setattr(_parallel, "_threads", threads)
            np.testing.assert_array_equal(layer(x)[0], one[0], err_msg=f"{threads} threads")


def test_the_build_runs_its_own_micro_kernel():
    from fastrnn import _kernels
    expected = {"baseline": "portable", "avx2": "avx2", "avx512": "avx512"}[_kernels.SIMD]
    assert _forward.MICROKERNEL_ISA == expected


def unit_blocks(gates, units):
    """(unit blocks per group, groups): at most 4 vectors a group, the
    blocks spread evenly over as few groups as that allows."""
    blocks = -(-units // _forward.MICROKERNEL_LANES)
    groups = -(-blocks // max(1, 4 // gates))
    return -(-blocks // groups), groups


@pytest.mark.parametrize("gates,units,lanes,ub", [
    (1, 32, 16, 2), (1, 48, 16, 3), (1, 64, 16, 4), (1, 80, 16, 3), (1, 100, 16, 4),
    (1, 160, 16, 4), (1, 130, 16, 3), (2, 16, 16, 1), (2, 20, 16, 2), (4, 64, 16, 1),
    (1, 32, 8, 4), (1, 40, 8, 3), (1, 72, 8, 3)])
def test_unit_blocks_per_group(gates, units, lanes, ub):
    if _forward.MICROKERNEL_LANES != lanes:
        pytest.skip(f"a {lanes}-lane case; this build has {_forward.MICROKERNEL_LANES} lanes")
    assert unit_blocks(gates, units)[0] == ub
    assert _forward.group_units(gates, units) == ub * lanes


def test_packing_refuses_no_gates():
    with pytest.raises(ValueError, match="gates"):
        _forward.group_units(0, 16)
    with pytest.raises(ValueError, match="do not fit"):
        _forward.pack_weights(np.ones((4, 3), np.float32), 0, 2, 0)


@pytest.mark.parametrize("gates", [1, 2, 3, 4])
@pytest.mark.parametrize("units", [1, 8, 15, 16, 17, 33, 70, 80])
def test_pack_weights_layout(gates, units):
    """Group q, vector v = b * gates + g, lane l holds W[g * units + u, k]
    for u = (q * ub + b) * lanes + l (zero past the units)."""
    K = 5
    w = np.arange(gates * units * K, dtype=np.float32).reshape(gates * units, K) + 1
    packed = _forward.pack_weights(w, 0, units, gates)
    lanes = _forward.MICROKERNEL_LANES
    ub, groups = unit_blocks(gates, units)
    panels = packed.reshape(groups, K, ub * gates, lanes)
    for q in range(groups):
        for b in range(ub):
            for g in range(gates):
                for lane in range(lanes):
                    u = (q * ub + b) * lanes + lane
                    want = w[g * units + u] if u < units else np.zeros(K, np.float32)
                    np.testing.assert_array_equal(panels[q, :, b * gates + g, lane], want)
    assert packed.ctypes.data % 64 == 0


@pytest.mark.parametrize("cols", [1, 16, 32, 48, 70, 80])
def test_pack_rows_layout(cols):
    """BPTT's packs (dG . W, the weight sums): rows of w are k, a window of
    its columns the units of one gate, in the same groups."""
    rows, row0, col0 = 6, 2, 3
    w = np.arange(10 * 90, dtype=np.float32).reshape(10, 90) + 1
    packed = _backward.pack_rows(w, row0, rows, col0, cols)
    lanes = _forward.MICROKERNEL_LANES
    ub, groups = unit_blocks(1, cols)
    panels = packed.reshape(groups, rows, ub, lanes)
    for q in range(groups):
        for b in range(ub):
            for lane in range(lanes):
                u = (q * ub + b) * lanes + lane
                want = w[row0:row0 + rows, col0 + u] if u < cols else np.zeros(rows, np.float32)
                np.testing.assert_array_equal(panels[q, :, b, lane], want)
    assert packed.ctypes.data % 64 == 0


@pytest.mark.parametrize("offset", [0, 1, 15])
def test_pack_rows_into_a_buffer(offset):
    """pack_rows into a given buffer (a training buffer lent again): the
    same values as a new array, on a cache line of the buffer whatever its
    start; a buffer too small is refused."""
    w = np.random.default_rng(3).standard_normal((40, 90)).astype(np.float32)
    size = _backward.pack_rows_size(37, 70)
    whole = np.full(size + offset, np.nan, np.float32)
    buffer = whole[offset:]
    packed = _backward.pack_rows(w, 2, 37, 3, 70, buffer=buffer)
    np.testing.assert_array_equal(packed, _backward.pack_rows(w, 2, 37, 3, 70))
    assert packed.ctypes.data % 64 == 0 and np.shares_memory(packed, buffer)
    with pytest.raises(ValueError, match="a buffer of 99 values, expected at least"):
        _backward.pack_rows(w, 2, 37, 3, 70, buffer=buffer[:99])


@pytest.mark.parametrize("separate_dgh", [False, True])
@pytest.mark.parametrize("R,split", [(1, 1), (37, 21), (300, 37), (531, 100)])
def test_weight_sums_on_the_kernel(R, split, separate_dgh):
    """weight_grads over packed activations in two column parts (split off
    any tile boundary; R past the 256-row blocks): the bias sums are each
    column's float32 chain over the rows in order (bit for bit), the weight
    sums the products to float32 rounding."""
    from fastrnn import _validation
    rng = np.random.default_rng(R)
    D, H = 23, 35
    N = 4 * H
    x = rng.standard_normal((R, D)).astype(np.float32)
    h_prev = rng.standard_normal((R, H)).astype(np.float32)
    dgx = rng.standard_normal((R, N)).astype(np.float32)
    dgh = rng.standard_normal((R, N)).astype(np.float32) if separate_dgh else None
    dw_ih, dw_hh = np.zeros((N, D), np.float32), np.zeros((N, H), np.float32)
    db_ih, db_hh = np.zeros(N, np.float32), np.zeros(N, np.float32)
    packed = (_backward.pack_rows(x, 0, R), [_backward.pack_rows(h_prev, 0, R)], None)
    _backward.weight_grads(parts=[(0, split), (split, N)], x=x, h_prev=h_prev,
                           reset_acts=None, dgx=dgx, dgh=dgh, dw_ih=dw_ih, dw_hh=dw_hh,
                           db_ih=db_ih, db_hh=db_hh, max_rows=_validation.BLAS_INT_MAX,
                           packed=packed)
    dg_h = dgx if dgh is None else dgh
    chain_x, chain_h = np.zeros(N, np.float32), np.zeros(N, np.float32)
    for r in range(R):
        chain_x += dgx[r]
        chain_h += dg_h[r]
    np.testing.assert_array_equal(db_ih, chain_x)
    np.testing.assert_array_equal(db_hh, chain_h)
    np.testing.assert_allclose(dw_ih, dgx.astype(np.float64).T @ x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw_hh, dg_h.astype(np.float64).T @ h_prev, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_gradient_products_flush_denormals(dtype):
    """dx = dG . W_ih and the weight sums read denormal dG as zero, as the
    time loops do (dG of a last-step loss decays into denormals: each
    multiply-add on one stalled, dx took 30 ms instead of 4.7 at GRU
    125->100, B=64, T=150). [failed before: sums of 300 denormals came out
    normal]"""
    from fastrnn import _validation
    R, D, N = 40, 7, 300
    tiny = np.finfo(dtype).smallest_normal / 4            # a denormal
    dgx = np.full((R, N), tiny, dtype)
    w_ih = np.ones((N, D), dtype)
    dx = np.empty((R, D), dtype)
    float32 = dtype == "float32"
    _backward.input_grad(dgx=dgx, w_ih=w_ih, dx=dx, max_rows=_validation.BLAS_INT_MAX,
                         parts=[(0, R)], packed=_backward.pack_rows(w_ih, 0, N) if float32
                         else None)
    assert not dx.any()
    x, h_prev = np.ones((R, D), dtype), np.ones((R, 4), dtype)
    sums = [np.zeros(shape, dtype) for shape in ((N, D), (N, 4), (N,), (N,))]
    packed = None
    if float32:
        packed = (_backward.pack_rows(x, 0, R), [_backward.pack_rows(h_prev, 0, R)], None)
    _backward.weight_grads(parts=[(0, N)], x=x, h_prev=h_prev, reset_acts=None, dgx=dgx,
                           dgh=None, dw_ih=sums[0], dw_hh=sums[1], db_ih=sums[2],
                           db_hh=sums[3], max_rows=_validation.BLAS_INT_MAX, packed=packed)
    assert not any(total.any() for total in sums)


def train_step(layer, x, lengths, dout):
    layer.zero_grad()
    (out, state), backprop = layer.forward_train(x, lengths=lengths)
    dx, dstate = backprop(dout)
    return out, dx, states(dstate), {k: g.copy() for k, g in layer.grads.items()}


@pytest.mark.parametrize("kind,options", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_rows_gradients_are_the_same_bits_alone_and_in_a_batch(kind, options,
                                                                  bidirectional):
    """dx and the initial state's gradient of a row do not depend on the
    other rows of the batch."""
    rng = np.random.default_rng(5)
    T, B, D, H = 7, 11, 4, 37
    layer = make(kind, options, D, H, num_layers=2, bidirectional=bidirectional)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    dout = rng.standard_normal((T, B, (2 if bidirectional else 1) * H)).astype(np.float32)
    _, dx, dstate, _ = train_step(layer, x, lengths, dout)
    for sub in ([3], [3, 4, 9], [0, 10]):
        _, dx_s, dstate_s, _ = train_step(layer, np.ascontiguousarray(x[:, sub]), lengths[sub],
                                          np.ascontiguousarray(dout[:, sub]))
        np.testing.assert_array_equal(dx_s, dx[:, sub])
        for a, b in zip(dstate_s, dstate):
            np.testing.assert_array_equal(a, b[:, sub])


@pytest.mark.parametrize("kind,options", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("B", [8, 1])
def test_gradients_are_the_same_bits_at_any_thread_count(kind, options, bidirectional, B,
                                                         monkeypatch):
    """(At B = 1 the recurrences run in one part per direction, the
    products over all rows in one per thread: _plan.product_parts.)"""
    rng = np.random.default_rng(6)
    T, D, H = 30, 6, 40
    layer = make(kind, options, D, H, num_layers=2, bidirectional=bidirectional)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    dout = rng.standard_normal((T, B, (2 if bidirectional else 1) * H)).astype(np.float32)
    monkeypatch.setattr(_parallel, "_threads", 1)
    one = train_step(layer, x, lengths, dout)
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    for threads in THREADS:
        monkeypatch.setattr(_parallel, "_threads", threads)
        dirs = 2 if bidirectional else 1
        assert len(_plan.split(dirs, B, 1)) == dirs * max(1, min(threads // dirs, B))
        many = train_step(layer, x, lengths, dout)
        np.testing.assert_array_equal(many[0], one[0])
        np.testing.assert_array_equal(many[1], one[1])
        for a, b in zip(many[2], one[2]):
            np.testing.assert_array_equal(a, b)
        for name in one[3]:
            np.testing.assert_array_equal(many[3][name], one[3][name],
                                          err_msg=f"{name}, {threads} threads")


# Sizes whose packed W_hh exceeds _forward.MICROKERNEL_STREAM_BYTES: each
# group's tiles then fetch the next group's panel into L2 as they run (a
# prefetch changes no value: the oracle and bit checks guard the k loop's
# three runs and the tiles' shares around it).
BIG_H = {"RNN": 520, "GRU": 420, "LSTM": 300}


def oracle_case(kind, options):
    """The NumPy oracle's (reference_options) kind and options for a layer
    of KINDS."""
    oracle_kind = {"RNN": "rnn", "LSTM": "lstm"}.get(kind) or \
        ("gru" if options.get("reset_after", True) else "gru_reset_before")
    return oracle_kind, {k: v for k, v in options.items() if k != "reset_after"}


def check_against_the_oracle_and_sub_batches(kind, options, T, D, H, bidirectional, seed):
    """A layer's outputs, input and state gradients and weight gradients over
    13 batch rows against the NumPy oracle; its outputs for 1, 2 and 7 of the
    rows alone bit for bit those of the whole batch (other tilings and
    chunks)."""
    B = 13
    dirs = 2 if bidirectional else 1
    oracle_kind, oracle_options = oracle_case(kind, options)
    rng = np.random.default_rng(seed)
    layer = make(kind, options, D, H, bidirectional=bidirectional)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    h0 = rng.standard_normal((dirs, B, H)).astype(np.float32)
    c0 = rng.standard_normal((dirs, B, H)).astype(np.float32) if kind == "LSTM" else None
    hx = (h0, c0) if kind == "LSTM" else h0
    params = layer.state_dict()

    out, state = layer(x, hx)
    want_out, want_h, _ = ro.layer_forward(oracle_kind, params, x, h0, c0, 1, bidirectional,
                                           **oracle_options)
    assert_close(out, want_out, 1e-5, "out")
    assert_close(states(state)[0], want_h, 1e-5, "h_n")
    for sub in ([0], [5, 6], list(range(6, B))):      # 1, 2 and 7 rows: other tilings
        out_s, _ = layer(np.ascontiguousarray(x[:, sub]),
                         tuple(np.ascontiguousarray(s[:, sub]) for s in states(hx))
                         if kind == "LSTM" else np.ascontiguousarray(h0[:, sub]))
        np.testing.assert_array_equal(out_s, out[:, sub])

    dout = rng.standard_normal((T, B, dirs * H)).astype(np.float32)
    dh_n = rng.standard_normal((dirs, B, H)).astype(np.float32)
    dc_n = rng.standard_normal((dirs, B, H)).astype(np.float32) if kind == "LSTM" else None
    want_dx, want_dh0, _, want_grads = ro.layer_backward(
        oracle_kind, params, x, h0, c0, 1, bidirectional, None, dout=dout, dh_n=dh_n,
        dc_n=dc_n, **oracle_options)
    layer.zero_grad()
    _, backprop = layer.forward_train(x, hx)
    dx, dhx = backprop(dout, (dh_n, dc_n) if kind == "LSTM" else dh_n)
    assert_close(dx, want_dx, 1e-5, "dx")
    assert_close(states(dhx)[0], want_dh0, 1e-5, "dh0")
    for name in params:
        assert_close(layer.grads[name], want_grads[name], 1e-5, name)


@pytest.mark.parametrize("kind,options", KINDS)
def test_weights_past_the_stream_bound_match_the_oracle_and_keep_their_bits(kind, options):
    H = BIG_H[kind]
    oracle_kind, _ = oracle_case(kind, options)
    # the path tested (the reset-before GRU packs its candidate's block apart)
    gates = 2 if oracle_kind == "gru_reset_before" else ro.GATES[oracle_kind]
    assert gates * H * H * 4 > _forward.MICROKERNEL_STREAM_BYTES
    check_against_the_oracle_and_sub_batches(kind, options, 4, 9, H, False, 7)


# Sizes whose products over all steps' rows (the input projection, of
# D = 350 columns; the input gradient, of 2 G H) run in chunks of 48 rows:
# the 143 rows of T = 11, B = 13 in two whole chunks and 47 rows (one part;
# in two parts, a chunk and a part of one each).
CHUNKED_H = {"RNN": 180, "GRU": 60, "LSTM": 45}


@pytest.mark.parametrize("kind,options", KINDS)
def test_products_over_more_rows_than_a_chunk_match_the_oracle_and_keep_their_bits(
        kind, options):
    T, D, H = 11, 350, CHUNKED_H[kind]
    gates = ro.GATES[oracle_case(kind, options)[0]]
    assert _forward.product_chunk(D) == _forward.product_chunk(2 * gates * H) == 48 < T * 13
    assert D + H > gates * H    # not folded into the step: the projection runs
    check_against_the_oracle_and_sub_batches(kind, options, T, D, H, True, 9)


@pytest.mark.parametrize("kind,options", KINDS)
def test_weight_sums_over_more_rows_than_a_block_match_the_oracle(kind, options):
    """The weight gradients sum dG^T act over the T * B rows in blocks of
    WEIGHT_BLOCK_ROWS (256), each block of dG's columns transposed first:
    299 rows (a whole block and a part), odd sizes, both directions."""
    T, B, D, H = 23, 13, 5, 37
    rng = np.random.default_rng(8)
    layer = make(kind, options, D, H, bidirectional=True)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    h0 = rng.standard_normal((2, B, H)).astype(np.float32)
    c0 = rng.standard_normal((2, B, H)).astype(np.float32) if kind == "LSTM" else None
    oracle_kind, oracle_options = oracle_case(kind, options)
    params = layer.state_dict()
    dout = rng.standard_normal((T, B, 2 * H)).astype(np.float32)
    _, _, _, want = ro.layer_backward(oracle_kind, params, x, h0, c0, 1, True, None,
                                      dout=dout, **oracle_options)
    layer.zero_grad()
    _, backprop = layer.forward_train(x, (h0, c0) if kind == "LSTM" else h0)
    backprop(dout)
    for name in params:
        assert_close(layer.grads[name], want[name], 1e-5, name)


CELLS = [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("GRUCell", {}),
         ("GRUCell", {"reset_after": False}), ("LSTMCell", {})]


@pytest.mark.parametrize("kind,options", CELLS)
@pytest.mark.parametrize("shape", [(5,), (1, 5), (4, 5), (64, 5)])
def test_a_cell_step_gives_the_layers_bits(kind, options, shape):
    """The streaming path takes (D,), (1, D) and small batches, and gives
    exactly the numbers of the layer with the same weights at T = 1."""
    cell = getattr(fastrnn, kind)(5, 19, seed=2, **options)
    layer = getattr(fastrnn, kind[:-4])(5, 19, seed=9, **options)
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    h = rng.standard_normal(shape[:-1] + (19,)).astype(np.float32)
    hx = (h, np.tanh(h)) if kind == "LSTMCell" else h
    assert cell._stepper(cell._params).step(x, hx) is not None    # the streaming path
    got = states(cell(x, hx))
    layer_hx = tuple(s[None] for s in states(hx))
    _, want = layer(x[None], layer_hx if kind == "LSTMCell" else layer_hx[0])
    for g, w in zip(got, states(want)):
        np.testing.assert_array_equal(g, w[0])


@pytest.mark.parametrize("kind,options", CELLS)
@pytest.mark.parametrize("B,state_dtype", [(65, np.float32), (16, np.float64)])
def test_a_cell_call_in_parts_gives_the_bits_of_one_thread(kind, options, B, state_dtype,
                                                          monkeypatch):
    """A cell call that leaves the streaming path (more rows than it takes,
    or a state to convert) and is large enough to run in parts: the parts'
    driver once read the layers' batch_first, which cells do not have
    (KeyError at 2 threads and more)."""
    cell = getattr(fastrnn, kind)(64, 256, seed=2, **options)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, 64)).astype(np.float32)
    h = rng.standard_normal((B, 256)).astype(state_dtype)
    hx = (h, np.tanh(h)) if kind == "LSTMCell" else h
    monkeypatch.setattr(_parallel, "_threads", 1)
    one = states(cell(x, hx))
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    for threads in THREADS:
        monkeypatch.setattr(_parallel, "_threads", threads)
        for got, want in zip(states(cell(x, hx)), one):
            np.testing.assert_array_equal(got, want, err_msg=f"{threads} threads")


def _page_faults_per_step(tmp_path, layer, shape, infer, warm, timed):
    """Page faults per training step (and inference call first, with
    ``infer``) of ``layer`` (source text) on a random float32 x of ``shape``,
    in a fresh process of the installed fastrnn at one thread; with ``infer``
    False, an inference output is held throughout, as the bench does."""
    code = textwrap.dedent(f"""
        import resource, numpy as np, fastrnn
        fastrnn.set_num_threads(1)
        layer = {layer}
        x = np.random.default_rng(0).standard_normal({shape}).astype(np.float32)
        held = layer(x)[0]
        def step():
            if {infer}:
                layer(x)
            (out, _), backprop = layer.forward_train(x)
            backprop(np.ones_like(out))
        for _ in range({warm}):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range({timed}):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / {timed})
    """)
    # without glibc tunables of the environment, which take precedence (a dask
    # LocalCluster, run by an earlier test, sets MALLOC_TRIM_THRESHOLD_=65536)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)   # the installed fastrnn
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


GLIBC = pytest.mark.skipif(not sys.platform.startswith("linux")
                           or platform.libc_ver()[0] != "glibc", reason="glibc's page faults")


@GLIBC
def test_repeated_calls_reuse_their_memory_in_a_fresh_process(tmp_path):
    """In a fresh process, glibc's malloc gave every call's buffers of a few
    hundred KB new pages (mmap, or a heap grown and trimmed at every call):
    295 page faults per inference call of this stack and 168 per training
    step. fastrnn primes glibc's thresholds at import (_engine._prime_malloc)."""
    assert _page_faults_per_step(tmp_path, "fastrnn.RNN(1, 50, num_layers=2, seed=0)",
                                 (50, 32, 1), infer=True, warm=5, timed=20) < 20


@GLIBC
def test_a_warm_training_step_takes_no_new_pages(tmp_path):
    """A GRU 125 -> 100 at B=64, T=150 (about 70 MB of buffers a step) with an
    inference output held: its buffers below 31 MB came from new pages at
    every step (4,650 page faults, 25% of the step), the heap's free top
    trimmed after each; lent again (_engine._TrainingBuffers), they take none."""
    assert _page_faults_per_step(tmp_path, "fastrnn.GRU(125, 100, seed=0)", (150, 64, 125),
                                 infer=False, warm=3, timed=3) < 100


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 7), (65, 3), (130, 129), (512, 128)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_is_a_contiguous_copy_of_the_transpose(shape, dtype):
    """W_hh^T for the BLAS paths, built 64 rows at a time (numpy's copy of
    w.T ran at 0.6 GB/s on large weights, at every parameter change)."""
    from fastrnn._engine import transposed
    w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    t = transposed(w)
    assert t.flags.c_contiguous and t.dtype == dtype and t.shape == shape[::-1]
    assert np.array_equal(t, w.T) and not np.shares_memory(t, w)


def _no_general_path(module):
    """Make the general path (validation and the layers' driver) fail on
    ``module``: a call that still succeeds took the lean path."""
    def refuse(*args, **kwargs):
        raise AssertionError("the general path ran")
    module._prepare = refuse
    return module


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_a_strided_or_other_dtype_frame_takes_the_cells_streaming_path(kind):
    """``cell(x[:, t], h)`` over batch-first data passes a strided view; a
    float64 frame reaches a float32 cell: both converted for the streaming
    path (the same numbers as the converted frame), not sent to the general
    path (15-20 us more a call). [failed before: the general path ran]"""
    rng = np.random.default_rng(0)
    seq = rng.standard_normal((4, 6, 16))
    cell = getattr(fastrnn, kind)(16, 32, seed=0)
    expected = cell(np.ascontiguousarray(seq[:, 2], np.float32))
    expected = expected if isinstance(expected, tuple) else (expected,)
    _no_general_path(cell)
    for frame in (seq[:, 2].astype(np.float32), seq[:, 2], seq[0, 2]):
        got = cell(frame)
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, expected):
            np.testing.assert_array_equal(g, w if frame.ndim == 2 else w[0])


def test_a_strided_or_float64_input_takes_the_layers_lean_path():
    """[failed before: the general path ran]"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8, 5))
    layer = fastrnn.LSTM(5, 7, seed=0)
    expected = layer(np.ascontiguousarray(x.transpose(1, 0, 2), np.float32))
    _no_general_path(layer)
    for given in (x.transpose(1, 0, 2), x.transpose(1, 0, 2).astype(np.float32)):
        out, (h, c) = layer(given)
        np.testing.assert_array_equal(out, expected[0])
        np.testing.assert_array_equal(h, expected[1][0])


def test_a_batched_cell_step_splits_only_where_it_pays():
    """One thread: the streaming path at any batch (the driver would only add
    its Python); more: the driver, which splits the batch, once the step's
    multiply-adds pass CELL_STEP_SPLIT_MACS (2 M). [failed before: the
    driver above 64 rows at any size, the streaming path up to 64 rows at
    any size]"""
    rng = np.random.default_rng(0)
    small = fastrnn.LSTMCell(16, 32, seed=0)        # 6144 multiply-adds a row
    big = fastrnn.GRUCell(128, 256, seed=0)         # 294912 a row
    x_small = rng.standard_normal((200, 16)).astype(np.float32)   # 1.2 M
    x_big = rng.standard_normal((16, 128)).astype(np.float32)     # 4.7 M
    expected = small(x_small), big(x_big)
    before = _parallel.get_num_threads()
    try:
        fastrnn.set_num_threads(2)
        h, c = _no_general_path(small)(x_small)
        np.testing.assert_array_equal(h, expected[0][0])
        with pytest.raises(AssertionError, match="the general path ran"):
            _no_general_path(big)(x_big)
        fastrnn.set_num_threads(1)
        np.testing.assert_array_equal(big(x_big), expected[1])
        # past CELL_STEP_MAX_ROWS (1024) the driver at any thread count
        tiny = fastrnn.RNNCell(2, 3, seed=0)
        rows = rng.standard_normal((1025, 2)).astype(np.float32)
        expected_rows = tiny(rows)
        _no_general_path(tiny)(rows[:1024])
        with pytest.raises(AssertionError, match="the general path ran"):
            tiny(rows)
        del tiny._prepare
        np.testing.assert_array_equal(tiny(rows), expected_rows)
    finally:
        fastrnn.set_num_threads(before)
