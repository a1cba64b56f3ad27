"""The plan (fastrnn/_plan.py): every choice it can make gives the numbers of
the plain plan (one thread, the whole sequence at once, no unit split), on
random shapes, in inference and training; and plans are cached by shape
class, thread count and tuning, never by parameter values."""
import tracemalloc

import numpy as np
import pytest

import fastrnn
from fastrnn import _parallel, _plan
from plan_settings import force_plan
from reference import layer_forward

KINDS = ["RNN", "GRU", "LSTM"]


def _random_cases(seed, count):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        cases.append(dict(kind=KINDS[rng.integers(3)], D=int(rng.integers(1, 40)),
                          H=int(rng.integers(1, 80)), T=int(rng.integers(1, 90)),
                          B=int(rng.integers(1, 12)), layers=int(rng.integers(1, 3)),
                          bidirectional=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
                          lengths=bool(rng.integers(2))))
    return cases


# random shapes, and batch-1 unidirectional ones (the unit split's)
CASES = _random_cases(20261201, 16) + [
    dict(kind=kind, D=d, H=h, T=t, B=1, layers=layers, bidirectional=False,
         batch_first=bf, lengths=False)
    for kind, d, h, t, layers, bf in [("LSTM", 5, 57, 30, 1, False), ("GRU", 9, 40, 17, 2, True),
                                       ("RNN", 3, 70, 25, 1, False), ("GRU", 12, 33, 9, 1, False),
                                       # wide enough for BPTT's split (whole column groups)
                                       ("LSTM", 5, 100, 20, 1, False),
                                       ("GRU", 9, 130, 11, 2, True)]]

# each plan choice, forced by the tuning it reads
CHOICES = {
    "parts at 2 threads": dict(threads=2, MIN_PARALLEL_WORK=0),
    "parts at 3 threads": dict(threads=3, MIN_PARALLEL_WORK=0),
    "parts at 8 threads": dict(threads=8, MIN_PARALLEL_WORK=0),
    "unit split": dict(threads=2, MIN_PARALLEL_WORK=0, UNIT_SPLIT_MIN_MACS=0,
                       UNIT_SPLIT_MIN_WORK=0),
    "time windows": dict(threads=1, WINDOW_BYTES=1, MIN_WINDOW_STEPS=7),
    "windows in parts": dict(threads=2, MIN_PARALLEL_WORK=0, WINDOW_BYTES=1,
                             MIN_WINDOW_STEPS=5),
    # (the plain plan folds nothing; the choices above fold where the
    # default tuning does)
    "folded projection": dict(threads=1, FOLD_MAX_BYTES=1 << 40),
    "folded in parts and windows": dict(threads=2, MIN_PARALLEL_WORK=0, WINDOW_BYTES=1,
                                        MIN_WINDOW_STEPS=6, FOLD_MAX_BYTES=1 << 40),
    # each part's rows through every layer
    "stacks in parts": dict(threads=2, MIN_PARALLEL_WORK=0, FOLD_MAX_BYTES=0),
    "stacks at 3 threads in windows": dict(threads=3, MIN_PARALLEL_WORK=0,
                                           FOLD_MAX_BYTES=1 << 40,
                                           WINDOW_BYTES=1, MIN_WINDOW_STEPS=5),
}
# the choices that exist in inference only: with training they would compare
# the plain plan with itself, or repeat "parts at 2 threads"
INFERENCE_ONLY = {"time windows", "stacks in parts", "stacks at 3 threads in windows"}


def _force(monkeypatch, choice):
    force_plan(monkeypatch, CHOICES[choice] if choice else {"threads": 1, "FOLD_MAX_BYTES": 0})


def _run(case, dtype, train):
    layer = getattr(fastrnn, case["kind"])(case["D"], case["H"], num_layers=case["layers"],
                                           bidirectional=case["bidirectional"],
                                           batch_first=case["batch_first"], dtype=dtype, seed=3)
    rng = np.random.default_rng(5)
    T, B = case["T"], case["B"]
    x = rng.standard_normal((B, T, case["D"]) if case["batch_first"] else (T, B, case["D"]))
    x = x.astype(dtype)
    lengths = rng.integers(1, T + 1, B) if case["lengths"] else None
    if lengths is not None:
        lengths[0] = T
    if not train:
        out, state = layer(x, lengths=lengths)
        return [out] + list(state if isinstance(state, tuple) else (state,))
    (out, state), backprop = layer.forward_train(x, lengths=lengths)
    dx, dstate = backprop(rng.standard_normal(out.shape).astype(dtype))
    dstate = dstate if isinstance(dstate, tuple) else (dstate,)
    return [out, dx, *dstate] + [layer.grads[name] for name in sorted(layer.grads)]


@pytest.mark.parametrize("choice, train", [
    (choice, train) for choice in CHOICES for train in (False, True)
    if not (train and choice in INFERENCE_ONLY)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_plan_choice_gives_the_plain_plans_numbers(choice, dtype, train, monkeypatch):
    """float32 (the micro-kernel: one fixed FMA chain per element) bit for
    bit; float64 (BLAS, whose blocking may change with the rows it gets)
    within rounding."""
    for case in CASES:
        with monkeypatch.context() as m:
            _force(m, None)
            plain = _run(case, dtype, train)
        with monkeypatch.context() as m:
            _force(m, choice)
            got = _run(case, dtype, train)
        for a, b in zip(got, plain):
            if dtype == "float32":
                np.testing.assert_array_equal(a, b, err_msg=f"{choice}: {case}")
            else:
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12,
                                           err_msg=f"{choice}: {case}")


def test_the_forced_choices_are_the_ones_planned(monkeypatch):
    """The forcing above reaches the plan: a test of a choice that never ran
    could not fail."""
    def _layer(case):
        return getattr(fastrnn, case["kind"])(case["D"], case["H"], num_layers=case["layers"],
                                              bidirectional=case["bidirectional"], seed=0)

    def planned(case, train=False):
        return _plan.forward_plan(_layer(case), case["T"], case["B"],
                                  batch_first=case["batch_first"], train=train,
                                  has_lengths=case["lengths"])
    _force(monkeypatch, "unit split")
    assert sum(planned(c).units is not None for c in CASES) >= 3
    # training too, and float32 BPTT where W_hh's column groups allow
    assert sum(planned(c, train=True).units is not None for c in CASES) >= 5
    assert sum(_plan.backward_plan(_layer(c), c["T"], c["B"], c["lengths"]).units is not None
               for c in CASES) >= 3
    _force(monkeypatch, "time windows")
    assert sum(planned(c).window is not None for c in CASES) >= 8
    _force(monkeypatch, "parts at 3 threads")
    assert sum(len(planned(c).parts) > 1 for c in CASES) >= 15
    _force(monkeypatch, "stacks in parts")
    assert sum(planned(c).stack for c in CASES) >= 4
    assert not any(planned(c, train=True).stack for c in CASES)
    _force(monkeypatch, "folded projection")
    assert sum(any(planned(c).fold) for c in CASES) >= 6   # the LSTM cases
    _force(monkeypatch, None)
    assert not any(any(planned(c).fold) for c in CASES)
    layer = fastrnn.LSTM(6, 40, seed=0)
    _force(monkeypatch, "parts at 3 threads")
    assert len(_plan.forward_plan(layer, 20, 9, batch_first=False, train=False,
                                  has_lengths=False).parts) == 3
    _force(monkeypatch, "unit split")
    plan = _plan.forward_plan(layer, 20, 1, batch_first=False, train=False, has_lengths=False)
    assert plan.units is not None and plan.units[0] < plan.units[1] < plan.units[2] == 40
    _force(monkeypatch, "time windows")
    assert _plan.forward_plan(layer, 20, 3, batch_first=False, train=False,
                              has_lengths=False).window == 7
    # training never runs in windows
    assert _plan.forward_plan(layer, 20, 3, batch_first=False, train=True,
                              has_lengths=False).window is None
    # bidirectional layers do, layer by layer (recur_windows), in float32
    # unless a layer folds its projection (which writes none out)
    def bi_window(**options):
        bi = fastrnn.LSTM(6, 40, num_layers=2, bidirectional=True, seed=0, **options)
        return _plan.forward_plan(bi, 20, 3, batch_first=False, train=False,
                                  has_lengths=True).window
    assert bi_window() == 7 and bi_window(dtype="float64") is None
    assert bi_window(zoneout=0.1) is None and bi_window(layer_norm=True) is None
    monkeypatch.setattr(_plan, "FOLD_MAX_BYTES", 1 << 40)
    assert bi_window() is None


STACK_KINDS = [("RNN", {}, False), ("RNN", {"nonlinearity": "relu"}, False), ("GRU", {}, False),
               ("GRU", {"reset_after": False}, False), ("LSTM", {}, False), ("LSTM", {}, True)]


@pytest.mark.parametrize("kind, options, fold", STACK_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_stacks_in_parts_give_one_threads_bits(kind, options, fold, batch_first, monkeypatch):
    """A float32 stack whose parts are ranges of the batch runs each part's
    rows through every layer (Plan.stack): at 2, 3, 4 and 8 threads the
    outputs and final states are one thread's, bit for bit, with three
    layers, lengths, a given initial state and the learned one, and with
    one layer; an LSTM's layers folding their projections into the steps
    (fold) or not."""
    rng = np.random.default_rng(7)
    T, B, D, H = 13, 19, 6, 37
    layer = getattr(fastrnn, kind)(D, H, num_layers=3, batch_first=batch_first, seed=4,
                                   **options)
    learned = getattr(fastrnn, kind)(D, H, num_layers=2, batch_first=batch_first, seed=5,
                                     learn_initial_state=True, **options)
    learned.load_state_dict({name: rng.standard_normal(value.shape).astype(np.float32)
                             if name.startswith("initial_") else value
                             for name, value in learned.state_dict().items()})
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    shape = (3, B, H)
    hx = rng.standard_normal(shape).astype(np.float32)
    hx = (hx, rng.standard_normal(shape).astype(np.float32)) if kind == "LSTM" else hx
    single = getattr(fastrnn, kind)(D, H, batch_first=batch_first, seed=6, **options)
    calls = [(layer, dict()), (layer, dict(lengths=lengths)), (layer, dict(hx=hx)),
             (learned, dict(lengths=lengths)), (single, dict()), (single, dict(lengths=lengths))]

    def results(threads):
        force_plan(monkeypatch, dict(threads=threads, MIN_PARALLEL_WORK=0,
                                     FOLD_MAX_BYTES=(1 << 40) if fold else 0))
        got = []
        for net, kw in calls:
            plan = _plan.forward_plan(net, T, B, batch_first=batch_first, train=False,
                                      has_lengths="lengths" in kw)
            assert plan.stack == (threads > 1) and all(plan.fold) == fold
            out, state = net(x, **kw)
            got.append([out] + list(state if isinstance(state, tuple) else (state,)))
        return got

    one = results(1)
    for threads in (2, 3, 4, 8):
        for a, b in zip(results(threads), one):
            for p, q in zip(a, b):
                np.testing.assert_array_equal(p, q, err_msg=f"{threads} threads")


@pytest.mark.parametrize("kind, options, fold", STACK_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_windows_give_the_whole_sequences_bits(kind, options, fold, batch_first,
                                                             monkeypatch, close):
    """A float32 bidirectional stack runs each layer in time windows
    (recur_windows), the reverse direction's from the last step: at 1, 2,
    3 and 4 threads (parts by direction, or by direction and rows), windows
    of 7 steps over 45 (a part-filled last one), the outputs and final
    states are the whole sequence's at one thread bit for bit, with three
    layers, lengths (ending in every window, and at 1), a given initial
    state and the learned one, and with one layer; and the NumPy
    reference's. (fold: the LSTM's first layer folds its projection into
    the steps and runs whole between windowed ones; one layer folding
    alone runs no windows.)"""
    rng = np.random.default_rng(8)
    T, B, D, H = 45, 11, 6, 21
    layer = getattr(fastrnn, kind)(D, H, num_layers=3, bidirectional=True,
                                   batch_first=batch_first, seed=4, **options)
    learned = getattr(fastrnn, kind)(D, H, num_layers=2, bidirectional=True,
                                     batch_first=batch_first, seed=5,
                                     learn_initial_state=True, **options)
    learned.load_state_dict({name: rng.standard_normal(value.shape).astype(np.float32)
                             if name.startswith("initial_") else value
                             for name, value in learned.state_dict().items()})
    x = rng.standard_normal((B, T, D) if batch_first else (T, B, D)).astype(np.float32)
    lengths = np.array([45, 1, 7, 8, 14, 20, 29, 36, 43, 44, 45])
    shape = (6, B, H)
    hx = rng.standard_normal(shape).astype(np.float32)
    hx = (hx, rng.standard_normal(shape).astype(np.float32)) if kind == "LSTM" else hx
    single = getattr(fastrnn, kind)(D, H, bidirectional=True, batch_first=batch_first, seed=6,
                                    **options)
    calls = [(layer, dict()), (layer, dict(lengths=lengths)), (layer, dict(hx=hx)),
             (learned, dict(lengths=lengths)), (single, dict()), (single, dict(lengths=lengths))]

    # (the first layer's [W_ih, W_hh], (6 + 21) x 84 floats, within; the
    # others', (42 + 21) x 84, beyond)
    fold_max = 10_000 if fold else 0

    def results(threads, window_bytes):
        force_plan(monkeypatch, dict(threads=threads, MIN_PARALLEL_WORK=0,
                                     FOLD_MAX_BYTES=fold_max, WINDOW_BYTES=window_bytes,
                                     MIN_WINDOW_STEPS=7))
        got = []
        for net, kw in calls:
            plan = _plan.forward_plan(net, T, B, batch_first=batch_first, train=False,
                                      has_lengths="lengths" in kw)
            assert plan.fold[0] == fold and not any(plan.fold[1:])
            assert (plan.window == 7) == (window_bytes == 1 and not all(plan.fold))
            out, state = net(x, **kw)
            got.append([out] + list(state if isinstance(state, tuple) else (state,)))
        return got

    whole = results(1, 1 << 40)
    for threads in (1, 2, 3, 4):
        for a, b in zip(results(threads, 1), whole):
            for p, q in zip(a, b):
                np.testing.assert_array_equal(p, q, err_msg=f"{threads} threads")
    mode = ("rnn_" + options.get("nonlinearity", "tanh") if kind == "RNN" else
            "gru_reset_before" if options.get("reset_after") is False else kind.lower())
    zeros = np.zeros(shape)
    ref = layer_forward(mode, layer.state_dict(), x.transpose(1, 0, 2) if batch_first else x,
                        zeros, zeros if kind == "LSTM" else None, num_layers=3,
                        bidirectional=True, lengths=lengths)
    got = whole[1]
    close(got[0].transpose(1, 0, 2) if batch_first else got[0], ref[0], np.float32)
    for g, r in zip(got[1:], ref[1:]):
        close(g, r, np.float32)


@pytest.mark.parametrize("kind, options", [("RNN", {}), ("RNN", {"nonlinearity": "relu"}),
                                           ("GRU", {}), ("GRU", {"reset_after": False}),
                                           ("LSTM", {})])
@pytest.mark.parametrize("batch_first", [False, True])
def test_float64_bidirectional_windows_give_the_whole_sequences_numbers(kind, options,
                                                                        batch_first,
                                                                        monkeypatch, close):
    """A float64 bidirectional stack runs in time windows too (its
    products through BLAS, which may sum by a call's shape: within 1e-12,
    not bits): windows of 7 steps over 45, at 1, 2 and 3 threads, batch 1
    (BLAS's per-step row products), 11 and 17 (a window's projection a
    call over the whole window, or 256 rows of a batch-first one at a time:
    WINDOW_GEMM_ROWS), with lengths ending
    in every window, a given initial state, the learned one and one layer,
    against the whole sequence and the NumPy reference."""
    rng = np.random.default_rng(9)
    T, D, H = 45, 6, 21
    make = getattr(fastrnn, kind)
    layer = make(D, H, num_layers=3, bidirectional=True, batch_first=batch_first, seed=4,
                 dtype="float64", **options)
    learned = make(D, H, num_layers=2, bidirectional=True, batch_first=batch_first, seed=5,
                   dtype="float64", learn_initial_state=True, **options)
    learned.load_state_dict({name: rng.standard_normal(value.shape) if
                             name.startswith("initial_") else value
                             for name, value in learned.state_dict().items()})
    single = make(D, H, bidirectional=True, batch_first=batch_first, seed=6, dtype="float64",
                  **options)
    mode = ("rnn_" + options.get("nonlinearity", "tanh") if kind == "RNN" else
            "gru_reset_before" if options.get("reset_after") is False else kind.lower())
    for B in (1, 11, 17):
        x = rng.standard_normal((B, T, D) if batch_first else (T, B, D))
        lengths = np.resize([45, 1, 7, 8, 14, 20, 29, 36, 43, 44, 45], B)
        hx = rng.standard_normal((6, B, H))
        hx = (hx, rng.standard_normal((6, B, H))) if kind == "LSTM" else hx
        calls = [(layer, dict()), (layer, dict(lengths=lengths)), (layer, dict(hx=hx)),
                 (learned, dict(lengths=lengths)), (single, dict())]

        def results(threads, window_bytes):
            force_plan(monkeypatch, dict(threads=threads, MIN_PARALLEL_WORK=0,
                                         WINDOW_BYTES=window_bytes, MIN_WINDOW_STEPS=7,
                                         FLOAT64_WINDOWS_MIN_BYTES=0))
            got = []
            for net, kw in calls:
                plan = _plan.forward_plan(net, T, B, batch_first=batch_first, train=False,
                                          has_lengths="lengths" in kw)
                assert (plan.window == 7) == (window_bytes == 1)
                out, state = net(x, **kw)
                got.append([out] + list(state if isinstance(state, tuple) else (state,)))
            return got

        whole = results(1, 1 << 40)
        for threads in (1, 2, 3):
            for a, b in zip(results(threads, 1), whole):
                for p, q in zip(a, b):
                    close(p, q, np.float64)
        zeros = np.zeros((6, B, H))
        ref = layer_forward(mode, layer.state_dict(), x.transpose(1, 0, 2) if batch_first else x,
                            zeros, zeros if kind == "LSTM" else None, num_layers=3,
                            bidirectional=True, lengths=lengths)
        got = results(2, 1)[1]
        close(got[0].transpose(1, 0, 2) if batch_first else got[0], ref[0], np.float64)
        for g, r in zip(got[1:], ref[1:]):
            close(g, r, np.float64)
    # a projection under FLOAT64_WINDOWS_MIN_BYTES runs whole (one BLAS call
    # for both directions was faster than a window's and a direction's each)
    force_plan(monkeypatch, dict(threads=1, WINDOW_BYTES=1, MIN_WINDOW_STEPS=7,
                                 FLOAT64_WINDOWS_MIN_BYTES=T * 11 * 2 * layer._gates * H * 8 + 8))
    assert _plan.forward_plan(layer, T, 11, batch_first=batch_first, train=False,
                              has_lengths=False).window is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_bidirectional_inference_holds_a_window_of_projections(kind, dtype, monkeypatch):
    """A long bidirectional call holds its output, the layers between and
    one window's input projections (WINDOW_BYTES), not the sequence's (an
    LSTM's would be four times the output): traced NumPy memory at its
    peak. (float64's windows came later: it held the whole projection.)"""
    force_plan(monkeypatch, dict(threads=2, FOLD_MAX_BYTES=0, FLOAT64_WINDOWS_MIN_BYTES=0))
    layer = getattr(fastrnn, kind)(32, 64, num_layers=2, bidirectional=True, batch_first=True,
                                   seed=0, dtype=dtype)
    x = np.random.default_rng(0).standard_normal((16, 2000, 32)).astype(dtype)
    layer(x[:, :10])                       # the packed weights, before tracing
    tracemalloc.start()
    try:
        out, _ = layer(x, lengths=np.full(16, 2000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert _plan.forward_plan(layer, 2000, 16, batch_first=True, train=False,
                              has_lengths=True).window is not None
    assert peak <= 2 * out.nbytes + 2 * _plan.WINDOW_BYTES, (peak, out.nbytes)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("B, threads", [(100, 2), (20, 2), (6, 2), (9, 3)])
def test_time_major_parts_project_their_rows_in_chunks_of_steps(kind, B, threads,
                                                                monkeypatch, close):
    """A time-major stack in parts projects each part's rows of a chunk of
    steps at a time, with inputs so wide (700) that a chunk is 48 rows: a
    part of 50 rows in chunks of its rows, 10 rows four steps a chunk (each
    step's rows a call), 3 rows sixteen steps a chunk (each row's steps a
    call), 37 steps leaving a part-filled last chunk; the outputs are one
    thread's bit for bit, and the NumPy reference's (a part of 50 rows takes
    the one-thread path's chunks of rows, which bits alone cannot check)."""
    rng = np.random.default_rng(11)
    T, D, H = 37, 700, 24
    layer = getattr(fastrnn, kind)(D, H, num_layers=2, seed=3)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    zeros = np.zeros((2, B, H))
    reference = layer_forward(kind.lower(), layer.state_dict(), x, zeros,
                              zeros if kind == "LSTM" else None, num_layers=2)

    def result(n):
        force_plan(monkeypatch, dict(threads=n, MIN_PARALLEL_WORK=0, FOLD_MAX_BYTES=0))
        plan = _plan.forward_plan(layer, T, B, batch_first=False, train=False,
                                  has_lengths=False)
        assert plan.stack == (n > 1) and len(plan.parts) == n
        out, state = layer(x)
        return [out] + list(state if isinstance(state, tuple) else (state,))

    one = result(1)
    for got, want, ref in zip(result(threads), one, reference):
        np.testing.assert_array_equal(got, want)
        close(got, ref, np.float32)


def test_stacks_need_every_part_a_range_of_the_batch(monkeypatch):
    """Plan.stack only where run_stack applies: float32 inference of plain
    unfolded layers in parts of the batch; and run_stack refuses buffers
    that do not fit."""
    force_plan(monkeypatch, dict(threads=2, MIN_PARALLEL_WORK=0))

    def stack(layer, B=2, batch_first=False, train=False):
        return _plan.forward_plan(layer, 20, B, batch_first=batch_first, train=train,
                                  has_lengths=False).stack
    gru = fastrnn.GRU(8, 40, num_layers=2, seed=0)
    assert stack(gru) and stack(gru, batch_first=True)
    assert not stack(gru, B=1)                                          # one part
    assert not stack(gru, train=True)
    assert stack(fastrnn.GRU(8, 40, seed=0))                            # one layer too
    assert not stack(fastrnn.GRU(8, 40, num_layers=2, bidirectional=True, seed=0),
                     B=8)                                             # a part per direction
    assert not stack(fastrnn.GRU(8, 40, num_layers=2, dtype="float64", seed=0))
    assert stack(fastrnn.LSTM(8, 40, num_layers=2, seed=0))             # folds
    assert stack(fastrnn.LSTM(8, 300, num_layers=2, seed=0))            # too big to fold
    assert not stack(fastrnn.GRU(8, 40, num_layers=2, layer_norm=True, seed=0))

    runner = gru._sequence_runner(gru._params)
    T, B, H = 5, 4, 40
    good = dict(T=T, B=B, batch_first=False, parts=[(0, 1, 0, 2), (0, 1, 2, 4)],
                x=np.zeros((T * B, 8), np.float32), h=np.zeros((2, B, H), np.float32), c=None,
                gx=np.zeros((T * B, 3 * H), np.float32), gh=np.zeros((1, B * 3 * H), np.float32),
                between=np.zeros((T * B, H), np.float32), out=np.zeros((T * B, H), np.float32),
                acts=np.zeros((B, gru._saved * H), np.float32), lengths=None)
    runner.run_stack(**good)
    for name, bad in [("x", np.zeros((T * B, 7), np.float32)),
                      ("h", np.zeros((1, B, H), np.float32)),
                      ("gx", np.zeros((T * B - 1, 3 * H), np.float32)),
                      ("gh", None), ("out", np.zeros((T * B, H + 1), np.float32)),
                      ("acts", np.zeros((B - 1, gru._saved * H), np.float32)),
                      ("lengths", np.ones(B + 1, np.int64)),
                      ("parts", [(0, 1, 0, 2), (0, 1, 2, 5)])]:
        with pytest.raises(ValueError, match="run_stack"):
            runner.run_stack(**dict(good, **{name: bad}))


def test_batch_one_calls_split_their_products_over_all_rows(monkeypatch):
    """A batch-1 call's recurrence runs in one part (or its units split),
    but its projection and BPTT's weight and input gradients, products over
    T rows, take every thread once they reach MIN_PARALLEL_WORK; a float64
    call then holds BLAS at one thread (each part calls it)."""
    with monkeypatch.context() as m:
        _force(m, "parts at 3 threads")
        for dtype in ("float32", "float64"):
            layer = fastrnn.GRU(6, 40, dtype=dtype, seed=0)
            plan = _plan.forward_plan(layer, 20, 1, batch_first=False, train=True,
                                      has_lengths=False)
            back = _plan.backward_plan(layer, 20, 1)
            assert len(plan.parts) == len(back.parts) == 1
            assert plan.products == back.products == 3
            assert plan.hold_blas == back.hold_blas == (dtype == "float64")
    # below the bound, as many as the recurrence's parts
    monkeypatch.setattr(_parallel, "_threads", 2)
    layer = fastrnn.GRU(6, 40, seed=0)
    assert _plan.forward_plan(layer, 20, 1, batch_first=False, train=True,
                              has_lengths=False).products == 1
    assert _plan.backward_plan(layer, 20, 1).products == 1
    big = fastrnn.GRU(64, 256, seed=0)
    assert _plan.backward_plan(big, 1000, 1).products == 2
    assert len(_plan.backward_plan(big, 1000, 1).parts) == 1
    # layer norm and projection layers (their own engines) keep the parts
    for kw in ({"layer_norm": True}, {"proj_size": 20}):
        other = fastrnn.LSTM(64, 256, seed=0, **kw)
        assert _plan.backward_plan(other, 1000, 1).products == 1


def test_plans_are_cached_by_shape_class_threads_and_tuning(monkeypatch):
    monkeypatch.setattr(_plan, "_plans", {})
    monkeypatch.setattr(_parallel, "_threads", 2)
    layer = fastrnn.GRU(5, 64, seed=0)
    args = dict(batch_first=False, train=False, has_lengths=False)
    first = _plan.forward_plan(layer, 50, 32, **args)
    assert _plan.forward_plan(layer, 50, 32, **args) is first
    # new parameter values: the same plan (it depends on shapes only)
    layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
    assert _plan.forward_plan(layer, 50, 32, **args) is first
    # another thread count or tuning: another plan
    monkeypatch.setattr(_parallel, "_threads", 1)
    assert len(_plan.forward_plan(layer, 50, 32, **args).parts) == 1
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 10**15)
    assert len(_plan.forward_plan(layer, 50, 32, **args).parts) == 1


def test_the_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_plan, "_plans", {})
    monkeypatch.setattr(_plan, "PLAN_CACHE_SIZE", 10)
    layer = fastrnn.RNN(3, 4, seed=0)
    for T in range(1, 40):
        _plan.forward_plan(layer, T, 2, batch_first=False, train=False, has_lengths=False)
        assert len(_plan._plans) <= 10


def test_folded_steps_run_and_give_the_unfolded_numbers(monkeypatch):
    """The layer's calls reach the folded kernel (it is not only planned), in
    stacks whose layers fold or not by their input width, with an initial
    state and padded rows, in inference (a unidirectional stack: each part's
    rows through every layer, run_stack) and training; the results (outputs,
    dx, every gradient) are the unfolded calls' bits. An Elman RNN never
    folds."""
    from fastrnn._engine import RecurrentEngine, _forward
    calls = []
    recur = _forward.recur

    def counting(**kw):
        calls.append(kw.get("folded") is not None)
        return recur(**kw)

    class CountingRunner:   # inference in parts of the batch: run_stack folds too
        def __init__(self, runner):
            self._runner = runner

        def run(self, x, hx):
            return self._runner.run(x, hx)

        def run_stack(self, **kw):
            calls.extend(f is not None for f in kw.get("folded") or [])
            return self._runner.run_stack(**kw)
    sequence_runner = RecurrentEngine._sequence_runner
    monkeypatch.setattr(_forward, "recur", counting)
    monkeypatch.setattr(RecurrentEngine, "_sequence_runner",
                        lambda self, params: CountingRunner(sequence_runner(self, params)))
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(7)
    H, T, B = 9, 23, 5
    lengths = np.array([23, 1, 2, 17, 9])
    # (kind, input size, layers, bidirectional, folded layers): a layer folds
    # when D + H <= G * H (LSTM: D <= 27): layer 0 of the first stack (30)
    # does not, its layer 1 (2 * 9 = 18) does
    for kind, D, L, bi, expect in (("LSTM", 30, 2, True, 1), ("LSTM", 20, 2, False, 2),
                                   ("RNN", 3, 1, False, 0)):
        layer = getattr(fastrnn, kind)(D, H, num_layers=L, bidirectional=bi, seed=1)
        dirs = 2 if bi else 1
        x = rng.standard_normal((T, B, D)).astype(np.float32)
        h0 = rng.standard_normal((L * dirs, B, H)).astype(np.float32)
        hx = (h0, h0 * 0.5) if kind == "LSTM" else h0
        dout = rng.standard_normal((T, B, dirs * H)).astype(np.float32)
        results = {}
        for fold in (True, False):
            monkeypatch.setattr(_plan, "FOLD_MAX_BYTES", 1 << 40 if fold else 0)
            calls.clear()
            out, state = layer(x, hx, lengths=lengths)
            assert sum(calls) == (expect if fold else 0), (kind, calls)
            calls.clear()
            layer.zero_grad()
            (out_t, _), backprop = layer.forward_train(x, hx, lengths=lengths)
            assert sum(calls) == (expect if fold else 0), (kind, calls)
            dx, _ = backprop(dout)
            results[fold] = ([out, out_t, dx] + list(state if isinstance(state, tuple) else
                                                     (state,))
                             + [layer.grads[n].copy() for n in sorted(layer.grads)])
        for a, b in zip(results[True], results[False]):
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} {D} {L} {bi}")


def test_the_folded_kernel_refuses_what_it_cannot_fold():
    """A folded call it cannot run is a ValueError naming the problem, never
    a wrong or unprojected result."""
    from fastrnn._engine import _forward
    H, D, B, T = 4, 3, 2, 5
    rng = np.random.default_rng(0)
    f32 = np.float32
    w_ih = rng.standard_normal((4 * H, D)).astype(f32)
    w_hh = rng.standard_normal((4 * H, H)).astype(f32)
    folded = _forward.pack_folded(w_ih, w_hh, _forward.CELL_LSTM, H, 1)

    def call(dtype=f32, train=False, xh_size=B * (D + H), packs=folded, x_rows=T * B,
             drop=False):
        _forward.recur(cell=_forward.CELL_LSTM, T=T, batch_first=False, parts=[(0, 1, 0, B)],
                       w_hh=w_hh.astype(dtype), w_hh_t=np.ascontiguousarray(w_hh.T, dtype),
                       bias_h=None, h=np.zeros((1, B, H), dtype), c=np.zeros((1, B, H), dtype),
                       gx=np.zeros((T * B, 4 * H), dtype), gh=None,
                       out=np.zeros((T * B, H), dtype), lengths=None,
                       acts=np.zeros((T * B if train else B, 4 * H), dtype), train=train,
                       h_prev=np.zeros((T * B, H), dtype) if train else None,
                       c_prev=np.zeros((T * B, H), dtype) if train else None,
                       blas_held=False, x=np.zeros((x_rows, D), f32), folded=packs,
                       xh=np.zeros(xh_size, f32),
                       dropout_masks=np.ones((1, 4, B, H), dtype) if drop else None,
                       dropout_scratch=np.zeros(B * H, dtype) if drop else None)
    call()   # fits
    with pytest.raises(ValueError, match="only float32"):
        call(dtype=np.float64)
    call(train=True)   # fits too
    with pytest.raises(ValueError, match="without recurrent dropout"):
        call(train=True, drop=True)
    with pytest.raises(ValueError, match="do not fit"):
        call(xh_size=B * (D + H) - 1)
    with pytest.raises(ValueError, match="do not fit"):
        call(x_rows=T * B - 1)
    with pytest.raises(ValueError, match="does not fit|do not fit"):
        call(packs=[folded[0][:-1]])
    with pytest.raises(ValueError, match="only the LSTM"):
        _forward.pack_folded(w_ih[:3 * H], w_hh[:3 * H], _forward.CELL_GRU, H, 1)


def test_folded_steps_write_only_their_batch_rows_of_gx():
    """A folded call's steps write their pre-activations to gx's rows
    [b_lo, b_hi) of each part, whatever the layout, so that a gx of B rows
    will do: the whole-sequence (T * B, 8H) buffer a bidirectional LSTM that
    folds had asked for (one row a batch row touched) made a call whose
    output fits fail (T = 125 M at H = 8: "Unable to allocate 29.8 GiB",
    the output 7.5 GiB). (Before: the first rows of each part's own, a page
    apart batch-first, a page of memory each: a bidirectional LSTM 200->100,
    B=16, T=2000 grew the resident set by 54 MiB for its 24 MiB output.)
    The same numbers whatever the parts; fewer rows refused."""
    from fastrnn._engine import _forward
    H, D, B, T = 5, 3, 4, 7
    rng = np.random.default_rng(3)
    f32 = np.float32
    w_ih = rng.standard_normal((2 * 4 * H, D)).astype(f32)
    w_hh = rng.standard_normal((2 * 4 * H, H)).astype(f32)
    folded = _forward.pack_folded(w_ih, w_hh, _forward.CELL_LSTM, H, 2)
    x = rng.standard_normal((T * B, D)).astype(f32)

    def run(batch_first, parts, rows):
        gx = np.full((rows, 2 * 4 * H), np.nan, f32)
        out = np.zeros((T * B, 2 * H), f32)
        h = np.zeros((2, B, H), f32)
        c = np.zeros((2, B, H), f32)
        _forward.recur(cell=_forward.CELL_LSTM, T=T, batch_first=batch_first,
                       parts=parts, w_hh=w_hh, w_hh_t=np.ascontiguousarray(w_hh.T),
                       bias_h=None, h=h, c=c, gx=gx, gh=None, out=out, lengths=None,
                       acts=np.zeros((B, 2 * 5 * H), f32), train=False, h_prev=None,
                       c_prev=None, blas_held=False, x=x, folded=folded,
                       xh=np.zeros(2 * B * (D + H), f32))
        return gx, (out, h, c)

    for batch_first in (True, False):
        results = []
        for parts in ([(0, 2, 0, B)], [(0, 1, 0, 1), (1, 2, 0, 1), (0, 2, 1, B)]):
            gx, result = run(batch_first, parts, B)
            assert not np.isnan(gx).any(), (batch_first, parts)
            results.append(result)
        for a, b in zip(results[1], results[0]):
            np.testing.assert_array_equal(a, b)
        gx, result = run(batch_first, [(0, 2, 0, B)], T * B)   # (a larger gx: the same)
        assert np.isnan(gx[B:]).all()
        for a, b in zip(result, results[0]):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="recur: gx has fewer rows than the call writes"):
            run(batch_first, [(0, 2, 0, B)], B - 1)


@pytest.mark.parametrize("batch_first", [False, True])
def test_a_stacks_folded_steps_write_only_their_parts_own_rows(batch_first, monkeypatch):
    """In run_stack each part takes its rows through every layer without
    waiting for the others, so a part's folded steps must write only rows of
    its own: batch-first, gx's first B rows (which the folded steps had
    taken) are the first sequences' steps, another part's projections at
    another layer (a race: 2-thread outputs off the 1-thread ones under
    load). They write folded_gx now, apart from gx, each part its batch
    rows; gx (B rows when every layer folds) is not written at all."""
    from fastrnn._engine import RecurrentEngine
    T, B, D, H = 5, 4, 3, 8
    seen = []
    sequence_runner = RecurrentEngine._sequence_runner

    class Watching:
        def __init__(self, runner):
            self._runner = runner

        def run(self, x, hx):
            return self._runner.run(x, hx)

        def run_stack(self, **kw):
            kw["gx"][...] = np.nan
            kw["folded_gx"][...] = np.nan
            seen.append((kw["gx"], kw["folded_gx"]))
            return self._runner.run_stack(**kw)

    monkeypatch.setattr(RecurrentEngine, "_sequence_runner",
                        lambda self, params: Watching(sequence_runner(self, params)))
    force_plan(monkeypatch, dict(threads=2, MIN_PARALLEL_WORK=0, FOLD_MAX_BYTES=1 << 40))
    layer = fastrnn.LSTM(D, H, num_layers=2, batch_first=batch_first, seed=0)
    plan = _plan.forward_plan(layer, T, B, batch_first=batch_first, train=False,
                              has_lengths=False)
    assert plan.stack and all(plan.fold) and len(plan.parts) == 2
    x = np.random.default_rng(0).standard_normal((B, T, D) if batch_first else (T, B, D))
    one = layer(x.astype(np.float32))
    gx, folded_gx = seen[0]
    assert gx.shape[0] == B and np.isnan(gx).all()
    assert folded_gx.shape[0] == B and not np.isnan(folded_gx).any()
    force_plan(monkeypatch, dict(threads=1, FOLD_MAX_BYTES=1 << 40))
    np.testing.assert_array_equal(layer(x.astype(np.float32))[0], one[0])


def test_a_plan_is_never_shared_with_a_layer_of_other_options(monkeypatch):
    """A zoneout layer (the general path, with the plain layer's kernel code),
    called after a plain layer of the same shapes, gets its own plan: with
    the plain layer's (a unit split at batch 1, a folded projection), the
    options were silently skipped (found 2026-12-02: zoneout's output off by
    0.1 after a plain LSTM's call)."""
    _force(monkeypatch, "unit split")
    monkeypatch.setattr(_plan, "_plans", {})
    rng = np.random.default_rng(0)
    for B in (1, 6):   # the unit split; the fold
        x = rng.standard_normal((40, B, 8)).astype(np.float32)
        special = fastrnn.LSTM(8, 32, seed=0, zoneout=0.3)
        _plan._plans.clear()
        alone = special(x)[0]
        _plan._plans.clear()
        fastrnn.LSTM(8, 32, seed=0)(x)
        np.testing.assert_array_equal(special(x)[0], alone, err_msg=f"B={B}")


def test_a_training_plan_is_never_shared_with_a_layer_of_keras_dropout(monkeypatch):
    """A layer with Keras' recurrent dropout trained at batch 1 after a plain
    layer of the same shapes gets its own plans: the plain layer's split
    its units, forward and BPTT, which know no dropout masks."""
    _force(monkeypatch, "unit split")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 1, 8)).astype(np.float32)
    dout = rng.standard_normal((30, 1, 100)).astype(np.float32)

    def train(layer):
        (out, _), backprop = layer.forward_train(x)
        dx, _ = backprop(dout)
        return [out, dx] + [layer.grads[k].copy() for k in sorted(layer.grads)]

    def special():
        return fastrnn.LSTM(8, 100, seed=0, recurrent_dropout=0.4)
    monkeypatch.setattr(_plan, "_plans", {})
    alone = train(special())
    _plan._plans.clear()
    train(fastrnn.LSTM(8, 100, seed=0))
    for a, b in zip(train(special()), alone):
        np.testing.assert_array_equal(a, b)


def test_a_plan_is_built_for_the_thread_count_of_its_key(monkeypatch):
    # forward_plan read the count once for the cache key and again while
    # building: a set_num_threads from another thread in between cached,
    # under the key of 2 threads, a plan of 1 (every later call of that shape
    # ran it). Here the count reads 2, then 1 from the second read on.
    layer = fastrnn.GRU(8, 128, dtype=np.float64, seed=0)
    reads = iter([2])
    monkeypatch.setattr(_parallel, "get_num_threads", lambda: next(reads, 1))
    _plan._plans.clear()
    try:
        plan = _plan.forward_plan(layer, 40, 64, batch_first=False, train=False,
                                  has_lengths=False)
        ((key, kept),) = _plan._plans.items()
        assert key[-1] == 2 and kept is plan
        assert len(plan.parts) == 2
    finally:
        _plan._plans.clear()   # (none kept of the patched count)


@pytest.mark.parametrize("dtype, train, options, detour", [
    ("float32", False, {}, False), ("float32", False, {"bidirectional": True}, False),
    ("float64", False, {}, True), ("float32", True, {}, True),
    ("float32", False, {"layer_norm": True}, True), ("float32", False, {"proj_size": 4}, True)])
def test_a_batch_first_call_beyond_blas_int_runs_time_major_only_for_blas(dtype, train,
                                                                          options, detour):
    """A batch-first call with T * N > 2**31 - 1 ran time-major (copies of x
    and of the output) for BLAS' int leading dimension, also as a plain
    float32 inference, whose products are the micro-kernel's with
    Py_ssize_t strides: twice the memory and the time (LSTM 1->16 at B=2,
    T=2**25: 8.3 GiB and 27 s with the detour, 4.3 GiB and 17 s without,
    each row bit-identical to a B=1 call: checked by hand, too large for the
    suite). [failed before: time-major for float32 inference]"""
    layer = fastrnn.LSTM(1, 16, batch_first=True, dtype=dtype, **options)
    T = 2**31 // (layer._dirs * 64) + 1
    plan = _plan.forward_plan(layer, T, 2, batch_first=True, train=train, has_lengths=False)
    assert plan.time_major is detour


@pytest.mark.parametrize("threads", [1, 2])
def test_a_bidirectional_folding_lstm_asks_for_no_whole_sequence_projection(threads,
                                                                           monkeypatch):
    """A bidirectional LSTM whose layers fold their projection runs whole
    (no time windows) and asked for a (T * B, 8H) gx of which it wrote B
    rows: four times its output, so a call whose output fits failed with
    MemoryError (T = 125 M at H = 8 asked for 29.8 GiB). It asks for B rows
    now. [failed before: peak 5x the output]"""
    import tracemalloc
    force_plan(monkeypatch, dict(threads=threads, MIN_PARALLEL_WORK=0))
    layer = fastrnn.LSTM(2, 8, bidirectional=True, seed=0)
    T, B = 50_000, 4
    assert all(_plan.forward_plan(layer, T, B, batch_first=False, train=False,
                                  has_lengths=False).fold)
    x = np.random.default_rng(0).standard_normal((T, B, 2)).astype(np.float32)
    tracemalloc.start()
    try:
        out, _ = layer(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * out.nbytes, (peak, out.nbytes)
    one = fastrnn.LSTM(2, 8, bidirectional=True, seed=0)
    force_plan(monkeypatch, dict(threads=1, FOLD_MAX_BYTES=0))   # unfolded: the same bits
    np.testing.assert_array_equal(one(x)[0], out)
