"""The lean path of quantized layers' small calls and cells' steps
(_quant.QRunner): it takes the plain calls the plan would run directly on
the calling thread, gives the general path's bits, and leaves everything
else (and every error) to the general path."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _parallel, _plan, quantized

F32 = np.float32
KINDS = ["RNN", "GRU", "LSTM"]


def _general(monkeypatch, model):
    """The model's calls without the lean path."""
    class NoRunner:
        def run(self, x, hx):
            return None

        def step(self, x, hx):
            return None
    monkeypatch.setattr(type(model), "_runner", lambda self, params: NoRunner())


def _cases(seed, count):
    rng = np.random.default_rng(seed)
    return [dict(kind=KINDS[rng.integers(3)], D=int(rng.integers(1, 30)),
                 H=int(rng.integers(1, 70)), T=int(rng.integers(1, 12)),
                 B=int(rng.integers(1, 20)), layers=int(rng.integers(1, 3)),
                 bidirectional=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
                 unbatched=bool(rng.integers(4) == 0), with_hx=bool(rng.integers(2)),
                 reset_after=bool(rng.integers(2)))
            for _ in range(count)]


def _model(case, dtype):
    kwargs = dict(num_layers=case["layers"], bidirectional=case["bidirectional"],
                  batch_first=case["batch_first"], seed=2)
    if case["kind"] == "GRU":
        kwargs["reset_after"] = case["reset_after"]
    return fastrnn.quantize(getattr(fastrnn, case["kind"])(case["D"], case["H"], **kwargs),
                            dtype=dtype)


def _inputs(case):
    rng = np.random.default_rng(7)
    T, B, D, H = case["T"], case["B"], case["D"], case["H"]
    rows = case["layers"] * (2 if case["bidirectional"] else 1)
    if case["unbatched"]:
        x, state = rng.standard_normal((T, D)), (rows, H)
    else:
        x = rng.standard_normal((B, T, D) if case["batch_first"] else (T, B, D))
        state = (rows, B, H)
    hx = None
    if case["with_hx"]:
        hx = rng.standard_normal(state).astype(F32)
        if case["kind"] == "LSTM":
            hx = (hx, rng.standard_normal(state).astype(F32))
    return x.astype(F32), hx


def _flat(result):
    out, state = result
    return [out] + list(state if isinstance(state, tuple) else (state,))


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_the_lean_path_gives_the_general_paths_bits(dtype, monkeypatch):
    ran = 0
    for case in _cases(20261203, 40):
        model = _model(case, dtype)
        x, hx = _inputs(case)
        lean = model._runner(model._params).run(x, hx)
        ran += lean is not None
        got = _flat(model(x, hx))
        with monkeypatch.context() as m:
            _general(m, model)
            expected = _flat(model(x, hx))
        assert [a.shape for a in got] == [a.shape for a in expected], case
        for a, b in zip(got, expected):
            assert a.dtype == F32
            np.testing.assert_array_equal(a, b, err_msg=str(case))
        if lean is not None:
            for a, b in zip(_flat(lean), expected):
                np.testing.assert_array_equal(a, b, err_msg=str(case))
    assert ran >= 30    # the lean path took most of these small calls


def test_the_caller_s_arrays_are_left_as_they_were():
    model = fastrnn.quantize(fastrnn.LSTM(6, 8, seed=0))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 6)).astype(F32)
    h, c = rng.standard_normal((2, 1, 3, 8)).astype(F32)
    copies = [a.copy() for a in (x, h, c)]
    assert model._runner(model._params).run(x, (h, c)) is not None
    out, (h_n, c_n) = model(x, (h, c))
    for a, b in zip((x, h, c), copies):
        np.testing.assert_array_equal(a, b)
    assert not np.shares_memory(h_n, h) and not np.shares_memory(c_n, c)


def test_anything_else_takes_the_general_path_which_reports_it():
    model = fastrnn.quantize(fastrnn.GRU(4, 6, seed=0))
    runner = model._runner(model._params)
    x = np.random.default_rng(2).standard_normal((5, 2, 4)).astype(F32)
    h = np.zeros((1, 2, 6), F32)
    declined = [x.astype(np.float64), x[:, :, :3].copy(), x.transpose(1, 0, 2),
                x.reshape(5, 2, 4, 1), x.tolist(), x[:0], x.astype(">f4")]
    for bad in declined:
        assert runner.run(bad, None) is None
    for bad_hx in [np.zeros((1, 3, 6), F32), np.zeros((1, 2, 6)), (h,), [h], h[0]]:
        assert runner.run(x, bad_hx) is None
    # and the general path reports what it cannot take
    with pytest.raises(ValueError, match=r"expected input of shape \(T, B, 4\)"):
        model(x[:, :, :3].copy())
    with pytest.raises(ValueError, match="non-finite"):
        model(np.where(np.arange(40).reshape(5, 2, 4) == 7, np.nan, x).astype(F32))
    with pytest.raises(ValueError, match="non-finite"):
        model(x, np.full((1, 2, 6), np.inf, F32))
    # a wider dtype is converted there, as for any call
    np.testing.assert_array_equal(model(x.astype(np.float64))[0], model(x)[0])


def test_the_lean_path_takes_only_the_plans_direct_calls(monkeypatch):
    """Past the plan's direct work, or at a batch-1 length the plan
    splits, the lean path declines."""
    monkeypatch.setattr(_parallel, "_threads", 1)
    gru = fastrnn.quantize(fastrnn.GRU(8, 64, seed=0))
    runner = gru._runner(gru._params)
    small = np.zeros((10, 4, 8), F32)
    assert runner.run(small, None) is not None
    assert _plan.quantized_plan(gru, 10, 4).direct
    big = np.zeros((400, 32, 8), F32)
    assert not _plan.quantized_plan(gru, 400, 32).direct
    assert runner.run(big, None) is None
    # two threads: the unit split's batch-1 lengths go to the plan
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "UNIT_SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(_plan, "UNIT_SPLIT_MIN_WORK", 0)
    wide = fastrnn.quantize(fastrnn.GRU(8, 128, seed=0))
    steps = _plan.unit_split_steps(128, 3)
    assert steps is not None and _plan.quantized_plan(wide, steps, 1).units is not None
    assert wide._runner(wide._params).run(np.zeros((steps, 1, 8), F32), None) is None
    # a new thread count or tuning builds another runner
    assert gru._runner(gru._params) is not runner


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_a_cell_step_on_the_lean_path_gives_the_general_paths_bits(kind, dtype, monkeypatch):
    rng = np.random.default_rng(11)
    for D, H, B, batched, with_hx in [(5, 7, 1, False, False), (5, 7, 1, False, True),
                                      (3, 64, 4, True, True), (9, 33, 17, True, False),
                                      (16, 128, 1, True, True)]:
        kwargs = {"reset_after": False} if kind == "GRUCell" and H == 33 else {}
        cell = fastrnn.quantize(getattr(fastrnn, kind)(D, H, seed=4, **kwargs), dtype=dtype)
        x = rng.standard_normal((B, D) if batched else (D,)).astype(F32)
        hx = None
        if with_hx:
            shape = (B, H) if batched else (H,)
            hx = rng.standard_normal(shape).astype(F32)
            if kind == "LSTMCell":
                hx = (hx, rng.standard_normal(shape).astype(F32))
        copies = None if hx is None else [a.copy() for a in (hx if isinstance(hx, tuple) else (hx,))]
        lean = cell._runner(cell._params).step(x, hx)
        assert lean is not None
        got = cell(x, hx)
        with monkeypatch.context() as m:
            _general(m, cell)
            expected = cell(x, hx)
        for a, b, c in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, expected, lean))):
            assert a.shape == b.shape == c.shape == ((B, H) if batched else (H,))
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(c, b)
        if copies is not None:   # the caller's state untouched
            for a, b in zip(hx if isinstance(hx, tuple) else (hx,), copies):
                np.testing.assert_array_equal(a, b)


def test_a_cell_step_the_lean_path_declines_goes_the_general_way():
    cell = fastrnn.quantize(fastrnn.LSTMCell(4, 6, seed=0))
    runner = cell._runner(cell._params)
    x = np.ones(4, F32)
    h = np.zeros(6, F32)
    for bad_x in [x.astype(np.float64), np.ones(5, F32), np.ones((2, 2, 4), F32),
                  np.ones((4, 2), F32).T, x.tolist(), np.ones((0, 4), F32)]:
        assert runner.step(bad_x, None) is None
    for bad_hx in [h, (h,), (h, np.zeros(5, F32)), (h, h.astype(np.float64)),
                   (np.zeros((1, 6), F32), np.zeros((1, 6), F32))]:
        assert runner.step(x, bad_hx) is None
    with pytest.raises(ValueError, match="non-finite"):
        cell(np.full(4, np.nan, F32))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h, c\)"):
        cell(x, h)
    np.testing.assert_array_equal(cell(x.astype(np.float64))[0], cell(x)[0])


@pytest.mark.parametrize("kwargs", [dict(peepholes=True), dict(clip=2.0),
                                    dict(learn_initial_state=True), dict(layer_norm=True),
                                    dict(zoneout=0.1)])
@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_a_quantized_class_built_directly_refuses_what_the_kernels_do_not_compute(kind,
                                                                                  kwargs):
    """as quantize() does: built directly, such a model would have run the
    plain kernels (or, for a learned state, started from zeros)"""
    cls = getattr(quantized, "Quantized" + kind)
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))}=.*which the reduced-precision "
                                         f"kernels do not compute"):
        cls(4, 8, **kwargs)
    cls(4, 8, cell_activation="tanh")   # an explicit default passes
