"""The plan of a quantized call (fastrnn/_plan.py, quantized_plan): every
choice it can make (parts on 2, 3 or 8 threads, time windows, the calling
thread without the dispatch, the unit split at batch 1 and of a few rows)
gives the plain plan's
outputs bit for bit, on random shapes, int8 (per channel and per tensor)
and bfloat16. Each row's arithmetic is its own in every kernel (int8 sums
are exact; bfloat16 rows never share a tile's order with other rows), so
no choice may change a bit."""
import numpy as np
import pytest

import fastrnn
from fastrnn import _parallel, _plan, quantized
from plan_settings import force_plan

KINDS = ["RNN", "GRU", "LSTM"]


def _random_cases(seed, count):
    rng = np.random.default_rng(seed)
    return [dict(kind=KINDS[rng.integers(3)], D=int(rng.integers(1, 40)),
                 H=int(rng.integers(1, 80)), T=int(rng.integers(1, 40)),
                 # past 16 rows the AMX build's products run on tiles
                 B=int(rng.integers(1, 40)), layers=int(rng.integers(1, 3)),
                 bidirectional=bool(rng.integers(2)), batch_first=bool(rng.integers(2)),
                 lengths=bool(rng.integers(2)), reset_after=bool(rng.integers(2)))
            for _ in range(count)]


# random shapes, and unidirectional ones whose hidden size the unit split
# takes: at batch 1 whole groups of 64 units; with a few rows H a multiple of
# 16 where the last gate's columns end on a group (the second part's last
# group partial: GRU 160, RNN 208), past the AMX tiles' 16 rows too
CASES = _random_cases(20261203, 14) + [
    dict(kind=kind, D=d, H=h, T=t, B=b, layers=layers, bidirectional=False,
         batch_first=bf, lengths=False, reset_after=True)
    for kind, d, h, t, b, layers, bf in [
        ("LSTM", 5, 128, 30, 1, 1, False), ("GRU", 9, 128, 17, 1, 2, True),
        ("RNN", 3, 192, 25, 1, 1, False), ("LSTM", 6, 192, 12, 5, 2, True),
        ("GRU", 11, 160, 9, 19, 1, False), ("RNN", 4, 208, 14, 3, 1, True)]]

# the plain plan: one thread, the whole sequence in one window, through the
# parts' dispatch (one part)
PLAIN = dict(threads=1, QUANT_WINDOW_BYTES=1 << 62, QUANT_DIRECT_WORK=0)
# each choice, forced by the tuning it reads
CHOICES = {
    "parts at 2 threads": dict(threads=2, MIN_PARALLEL_WORK=0),
    "parts at 3 threads": dict(threads=3, MIN_PARALLEL_WORK=0),
    "parts at 8 threads": dict(threads=8, MIN_PARALLEL_WORK=0),
    "time windows of one step": dict(threads=1, QUANT_WINDOW_BYTES=1),
    "windows in parts": dict(threads=2, MIN_PARALLEL_WORK=0, QUANT_WINDOW_BYTES=1),
    "direct, no dispatch": dict(threads=1, QUANT_DIRECT_WORK=1 << 62),
    "unit split": dict(threads=2, MIN_PARALLEL_WORK=0, UNIT_SPLIT_MIN_MACS=0,
                       UNIT_SPLIT_MIN_WORK=0),
    "unit split in windows": dict(threads=2, MIN_PARALLEL_WORK=0, UNIT_SPLIT_MIN_MACS=0,
                                  UNIT_SPLIT_MIN_WORK=0, QUANT_WINDOW_BYTES=1),
    "unit split of a few rows": dict(threads=2, MIN_PARALLEL_WORK=0, UNIT_SPLIT_MIN_MACS=0,
                                     UNIT_SPLIT_MIN_WORK=0, QUANT_UNIT_SPLIT_MIN_BYTES=0,
                                     QUANT_UNIT_SPLIT_DTYPES=("int8", "bfloat16")),
    "a few rows' unit split in windows": dict(
        threads=2, MIN_PARALLEL_WORK=0, UNIT_SPLIT_MIN_MACS=0, UNIT_SPLIT_MIN_WORK=0,
        QUANT_UNIT_SPLIT_MIN_BYTES=0, QUANT_UNIT_SPLIT_DTYPES=("int8", "bfloat16"),
        QUANT_WINDOW_BYTES=1),
}
DTYPES = [("int8", True), ("int8", False), ("bfloat16", True)]


def _model(case, dtype, per_channel):
    kwargs = dict(num_layers=case["layers"], bidirectional=case["bidirectional"],
                  batch_first=case["batch_first"], seed=3)
    if case["kind"] == "GRU":
        kwargs["reset_after"] = case["reset_after"]
    layer = getattr(fastrnn, case["kind"])(case["D"], case["H"], **kwargs)
    return fastrnn.quantize(layer, dtype=dtype, per_channel=per_channel)


def _run(model, case):
    rng = np.random.default_rng(5)
    T, B = case["T"], case["B"]
    x = rng.standard_normal((B, T, case["D"]) if case["batch_first"] else (T, B, case["D"]))
    lengths = rng.integers(1, T + 1, B) if case["lengths"] else None
    if lengths is not None:
        lengths[0] = T
    out, state = model(x.astype(np.float32), lengths=lengths)
    return [out] + list(state if isinstance(state, tuple) else (state,))


# what each choice must have run at least once over CASES: a kernel entry
# and a test of its arguments
RAN = {
    "parts at 2 threads": ("forward", lambda k: len(k["parts"]) == 2),
    "parts at 3 threads": ("forward", lambda k: len(k["parts"]) == 3),
    "parts at 8 threads": ("forward", lambda k: len(k["parts"]) == 8),
    "time windows of one step": ("forward", lambda k: k["window_bytes"] == 1),
    "windows in parts": ("forward", lambda k: len(k["parts"]) == 2 and k["window_bytes"] == 1),
    "direct, no dispatch": ("forward", lambda k: k["direct"]),
    "unit split": ("forward_units", lambda k: k["window_bytes"] > 1),
    "unit split in windows": ("forward_units", lambda k: k["window_bytes"] == 1),
    "unit split of a few rows": ("forward_units", lambda k: k["h"].shape[1] > 1
                                 and k["h"].shape[2] % 64 and k["window_bytes"] > 1),
    "a few rows' unit split in windows": ("forward_units", lambda k: k["h"].shape[1] > 16
                                          and k["window_bytes"] == 1),
}


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("dtype, per_channel", DTYPES)
def test_every_quantized_plan_choice_gives_the_plain_plans_bits(choice, dtype, per_channel,
                                                                 monkeypatch):
    """The plan's paths (the lean path of small calls, which the plan's
    direct choice stands for, is off here: tests/test_quant_runner.py
    compares it with these), each choice counted where it reaches the
    kernels (the plain plan's calls match none of the counts)."""
    entry, ran_as_named = RAN[choice]
    calls = []
    kernels = quantized._quant
    for name in ("forward", "forward_units"):
        def wrapped(*args, _name=name, _kernel=getattr(kernels, name), **kwargs):
            calls.append((_name, kwargs))
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(kernels, name, wrapped)
    for case in CASES:
        model = _model(case, dtype, per_channel)
        monkeypatch.setattr(type(model), "_runner", lambda self, params: _NoRunner())
        with monkeypatch.context() as m:
            force_plan(m, PLAIN)
            plain = _run(model, case)
        with monkeypatch.context() as m:
            force_plan(m, dict(PLAIN, **CHOICES[choice]))
            got = _run(model, case)
        for a, b in zip(got, plain):
            np.testing.assert_array_equal(a, b, err_msg=f"{choice}: {case}")
    assert any(name == entry and ran_as_named(kwargs) for name, kwargs in calls), choice


class _NoRunner:
    def run(self, x, hx):
        return None

    def step(self, x, hx):
        return None


def test_the_forced_choices_are_the_ones_planned(monkeypatch):
    """The settings above do reach the choices they name (else the test
    would compare the plain plan with itself)."""
    rnn = fastrnn.quantize(fastrnn.RNN(4, 64, num_layers=2))
    with monkeypatch.context() as m:
        force_plan(m, PLAIN)
        plain = _plan.quantized_plan(rnn, 30, 12)
        assert plain.parts == [(0, 1, 0, 12)] and not plain.direct and plain.units is None
    with monkeypatch.context() as m:
        force_plan(m, dict(PLAIN, **CHOICES["parts at 3 threads"]))
        assert len(_plan.quantized_plan(rnn, 30, 12).parts) == 3
    with monkeypatch.context() as m:
        force_plan(m, dict(PLAIN, **CHOICES["direct, no dispatch"]))
        assert _plan.quantized_plan(rnn, 30, 12).direct
    with monkeypatch.context() as m:
        force_plan(m, dict(PLAIN, **CHOICES["unit split"]))
        assert _plan.quantized_plan(rnn, 30, 1).units is None   # one group of 64: no split
        gru = fastrnn.quantize(fastrnn.GRU(9, 128))
        assert _plan.quantized_plan(gru, 17, 1).units == [0, 64, 128]
        assert _plan.quantized_plan(gru, 17, 5).units is None    # W_hh 48 KB: the rows split
    with monkeypatch.context() as m:
        force_plan(m, dict(PLAIN, **CHOICES["unit split of a few rows"]))
        gru = fastrnn.quantize(fastrnn.GRU(9, 160, num_layers=2))
        assert _plan.quantized_plan(gru, 9, 19).units == [0, 64, 160]
        assert _plan.quantized_plan(gru, 9, 31).units == [0, 64, 160]
        # batch 1 splits too, H not a multiple of 64: each part its own packed rows
        assert _plan.quantized_plan(gru, 9, 1).units == [0, 64, 160]
        for B, lengths in [(32, False), (19, True)]:
            assert _plan.quantized_plan(gru, 9, B, has_lengths=lengths).units is None
        bidir = fastrnn.quantize(fastrnn.GRU(9, 160, bidirectional=True))
        assert _plan.quantized_plan(bidir, 9, 19).units is None
        # the last gate's columns of the second part would end inside a group
        # past the packed weights' padding (3 * 144 + 64 = 496 = 7.75 groups)
        lstm = fastrnn.quantize(fastrnn.LSTM(9, 144))
        assert _plan.quantized_plan(lstm, 9, 19).units is None


def test_a_few_rows_split_their_units_over_large_weights(monkeypatch):
    """The rule as measured (_plan.QUANT_UNIT_SPLIT_MAX_ROWS): int8 with
    W_hh of 768 KB or more where the products run on AMX tiles (twice that
    without), fewer than 32 rows; bfloat16 splits its rows."""
    monkeypatch.setattr(_parallel, "_threads", 2)
    least = (1 if quantized._quant.AMX else 2) * _plan.QUANT_UNIT_SPLIT_MIN_BYTES
    big = int(np.ceil(np.sqrt(least / 3) / 16)) * 16           # a GRU's W_hh of >= least
    gru = fastrnn.quantize(fastrnn.GRU(16, big))
    assert _plan.quantized_plan(gru, 300, 20).units is not None
    assert _plan.quantized_plan(gru, 300, 32).units is None
    assert _plan.quantized_plan(fastrnn.quantize(fastrnn.GRU(16, big - 32)), 300, 20).units is None
    half = fastrnn.quantize(fastrnn.GRU(16, big), dtype="bfloat16")
    assert _plan.quantized_plan(half, 300, 20).units is None
    # however far the row bound is tuned, never past what forward_units takes
    monkeypatch.setattr(_plan, "QUANT_UNIT_SPLIT_MAX_ROWS", 1000)
    most = quantized._quant.UNIT_MAX_ROWS
    assert _plan.quantized_plan(gru, 300, most).units is not None
    assert _plan.quantized_plan(gru, 300, most + 1).units is None


def test_the_work_estimate_counts_layers_and_the_gate_pass(monkeypatch):
    """A small gate-bound stack (seed-keras: RNN 1 -> 50, two layers, B=32,
    T=50) splits at 2 threads as float32's does; one layer of it, half the
    work, stays on one thread."""
    monkeypatch.setattr(_parallel, "_threads", 2)
    two = fastrnn.quantize(fastrnn.RNN(1, 50, num_layers=2))
    one = fastrnn.quantize(fastrnn.RNN(1, 50))
    assert len(_plan.quantized_plan(two, 50, 32).parts) == 2
    assert len(_plan.quantized_plan(one, 50, 32).parts) == 1


def test_quantized_plans_are_cached_by_shape_class_threads_and_tuning(monkeypatch):
    monkeypatch.setattr(_plan, "_plans", {})
    monkeypatch.setattr(_parallel, "_threads", 2)
    model = fastrnn.quantize(fastrnn.GRU(5, 64, num_layers=2, seed=0))
    first = _plan.quantized_plan(model, 50, 32)
    assert _plan.quantized_plan(model, 50, 32) is first
    assert _plan.quantized_plan(model, 50, 32, has_lengths=True) is not first
    # another model of the same kind, shapes and weight dtype: the same plan; in
    # the other dtype its own (whether a few rows split their units depends on it)
    other = fastrnn.quantize(fastrnn.GRU(7, 64, num_layers=2, seed=1))
    assert _plan.quantized_plan(other, 50, 32) is first
    half = fastrnn.quantize(fastrnn.GRU(7, 64, num_layers=2, seed=1), dtype="bfloat16")
    assert _plan.quantized_plan(half, 50, 32) is not first
    # another depth, thread count or tuning: another plan
    assert len(_plan.quantized_plan(model, 50, 8).parts) == 2
    assert len(_plan.quantized_plan(fastrnn.quantize(fastrnn.GRU(5, 64)), 50, 8).parts) == 1
    monkeypatch.setattr(_parallel, "_threads", 1)
    assert len(_plan.quantized_plan(model, 50, 32).parts) == 1
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "QUANT_WINDOW_BYTES", 1)
    assert _plan.quantized_plan(model, 50, 32).window_bytes == 1
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 1 << 62)
    assert not _plan.quantized_plan(model, 50, 32).direct
    monkeypatch.setattr(_plan, "QUANT_DIRECT_WORK", 1 << 62)
    assert _plan.quantized_plan(model, 50, 32).direct
    # the unit split's group: H = 160 splits at [0, 64, 160] in groups of 64,
    # at [0, 96, 160] in groups of 32
    monkeypatch.setattr(_plan, "UNIT_SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(_plan, "UNIT_SPLIT_MIN_WORK", 0)
    gru160 = fastrnn.quantize(fastrnn.GRU(8, 160))
    assert _plan.quantized_plan(gru160, 50, 1).units == [0, 64, 160]
    monkeypatch.setattr(_plan, "QUANT_UNIT_GROUP", 32)
    assert _plan.quantized_plan(gru160, 50, 1).units == [0, 96, 160]
