"""Threads calling one module at once get exactly the results of calling it
one call at a time: the kernels release the GIL, so the calls really overlap,
and every call must use its own workspace and state."""
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastrnn
from fastrnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

T, B, D, H = 50, 8, 32, 64
WORKERS = 8
N_INPUTS = 8
ROUNDS = 2


def flat(res):
    """(out, h_n), (out, (h_n, c_n)), h or (h, c) -> a flat tuple of arrays."""
    if not isinstance(res, tuple):
        return (res,)
    first, second = res
    return (first, *second) if isinstance(second, tuple) else (first, second)


def layer_inputs(m, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D) if m.batch_first else (T, B, D)).astype(m.dtype)
    dirs = 2 if m.bidirectional else 1
    h = rng.standard_normal((m.num_layers * dirs, B, H)).astype(m.dtype)
    hx = (h, np.tanh(h[::-1])) if isinstance(m, LSTM) else h
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    return x, hx, lengths


def cell_inputs(m, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, D)).astype(m.dtype)
    h = rng.standard_normal((B, H)).astype(m.dtype)
    return x, ((h, np.tanh(h[::-1])) if isinstance(m, LSTMCell) else h)


def check_concurrent_equals_sequential(calls):
    """calls: a list of zero-argument functions. Runs each once alone, then all
    of them ROUNDS times, shuffled, on WORKERS threads, and compares bitwise."""
    expected = [flat(f()) for f in calls]
    jobs = list(range(len(calls))) * ROUNDS
    random.Random(0).shuffle(jobs)
    with ThreadPoolExecutor(WORKERS) as pool:
        got = list(pool.map(lambda i: flat(calls[i]()), jobs))
    for i, res in zip(jobs, got):
        assert len(res) == len(expected[i])
        for a, b in zip(res, expected[i]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a, b), f"call {i} differs when run concurrently"


def make_layer(cls, dtype, batch_first, seed=0):
    return cls(D, H, num_layers=2, bidirectional=True, batch_first=batch_first,
               dtype=dtype, seed=seed)


@pytest.mark.parametrize("cls", [RNN, GRU, LSTM])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_called_from_many_threads(cls, dtype, batch_first):
    m = make_layer(cls, dtype, batch_first)
    inputs = [layer_inputs(m, seed) for seed in range(N_INPUTS)]
    calls = [lambda x=x, hx=hx, lengths=lengths: m(x, hx, lengths=lengths)
             for x, hx, lengths in inputs]
    calls += [lambda x=x: m(x) for x, _, _ in inputs[:4]]  # no state, all full length
    check_concurrent_equals_sequential(calls)


@pytest.mark.parametrize("cls", [RNNCell, GRUCell, LSTMCell])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cell_called_from_many_threads(cls, dtype):
    m = cls(D, H, dtype=dtype, seed=0)
    inputs = [cell_inputs(m, seed) for seed in range(4 * N_INPUTS)]
    calls = [lambda x=x, hx=hx: m(x, hx) for x, hx in inputs]
    calls += [lambda x=x: m(x[0]) for x, _ in inputs[:8]]  # unbatched, no state
    check_concurrent_equals_sequential(calls)


@pytest.mark.parametrize("cls", [RNN, GRU, LSTM])
def test_first_calls_of_a_fresh_layer_from_many_threads(cls):
    """The first calls build the cached kernel biases; racing them must not matter."""
    twin = make_layer(cls, "float32", False)
    inputs = [layer_inputs(twin, seed) for seed in range(WORKERS)]
    expected = [flat(twin(x, hx, lengths=lengths)) for x, hx, lengths in inputs]
    for _ in range(5):
        fresh = make_layer(cls, "float32", False)
        with ThreadPoolExecutor(WORKERS) as pool:
            got = list(pool.map(lambda args: flat(fresh(args[0], args[1], lengths=args[2])),
                                inputs))
        for res, exp in zip(got, expected):
            assert all(np.array_equal(a, b) for a, b in zip(res, exp))


def test_different_modules_at_once():
    modules = [make_layer(RNN, "float32", True, seed=1), make_layer(GRU, "float64", False, seed=2),
               make_layer(LSTM, "float32", False, seed=3), RNNCell(D, H, nonlinearity="relu", seed=4),
               GRUCell(D, H, dtype="float64", seed=5), LSTMCell(D, H, seed=6)]
    calls = []
    for k, m in enumerate(modules):
        for seed in range(4):
            if isinstance(m, (RNN, GRU, LSTM)):
                x, hx, lengths = layer_inputs(m, 100 * k + seed)
                calls.append(lambda m=m, x=x, hx=hx, lengths=lengths: m(x, hx, lengths=lengths))
            else:
                x, hx = cell_inputs(m, 100 * k + seed)
                calls.append(lambda m=m, x=x, hx=hx: m(x, hx))
    check_concurrent_equals_sequential(calls)


@pytest.mark.parametrize("cls", [RNN, GRU, LSTM])
def test_shared_input_arrays_across_threads(cls):
    """Many threads reading the same x and hx arrays at once leave them intact."""
    m = make_layer(cls, "float32", False)
    x, hx, lengths = layer_inputs(m, 0)
    for a in (x, *(hx if isinstance(hx, tuple) else (hx,)), lengths):
        a.setflags(write=False)
    copies = [a.copy() for a in (x, *(hx if isinstance(hx, tuple) else (hx,)))]
    check_concurrent_equals_sequential([lambda: m(x, hx, lengths=lengths)] * WORKERS)
    for a, c in zip((x, *(hx if isinstance(hx, tuple) else (hx,))), copies):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("cls", [fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parallel_parts_give_the_serial_results(cls, bidirectional, monkeypatch):
    """Directions or batch halves in two threads: the same numbers as one
    thread (the per-row arithmetic is identical; BLAS sums may round apart)."""
    from fastrnn import _parallel, _plan
    rng = np.random.default_rng(0)
    layer = cls(6, 16, num_layers=2, bidirectional=bidirectional, batch_first=True,
                dtype="float64", seed=1)
    x = rng.standard_normal((7, 9, 6))
    lengths = rng.integers(1, 10, size=7)
    dout = rng.standard_normal((7, 9, 32 if bidirectional else 16))

    def run():
        layer.zero_grad()
        (out, state), backprop = layer.forward_train(x, lengths=lengths)
        dx, dhx = backprop(dout)
        grads = {k: g.copy() for k, g in layer.grads.items()}
        return [layer(x, lengths=lengths)[0], out, dx, *np.atleast_1d(dhx)], grads

    monkeypatch.setattr(_parallel, "_threads", 1)
    serial, serial_grads = run()
    monkeypatch.setattr(_parallel, "_threads", 2)
    monkeypatch.setattr(_plan, "MIN_PARALLEL_WORK", 0)
    assert len(_plan.split(2 if bidirectional else 1, 7, 1)) == 2
    parallel, parallel_grads = run()
    for p, s in zip(parallel, serial):
        np.testing.assert_allclose(p, s, rtol=0, atol=1e-12)
    for k in serial_grads:
        np.testing.assert_allclose(parallel_grads[k], serial_grads[k], rtol=0, atol=1e-12)


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="set_num_threads: expected an int >= 1"):
        fastrnn.set_num_threads(0)
    # (str() of an int of over 4300 digits raised a ValueError of its own,
    # "Exceeds the limit (4300 digits)", in place of this message)
    with pytest.raises(ValueError, match="set_num_threads: expected an int >= 1, got a "
                                         "negative int of about 5001 digits"):
        fastrnn.set_num_threads(-10**5000 - 1)
    for bad in ("2", 2.0, True, None):
        with pytest.raises(TypeError, match="set_num_threads: expected an int >= 1"):
            fastrnn.set_num_threads(bad)
    before = fastrnn.get_num_threads()
    try:
        fastrnn.set_num_threads(np.int64(1))        # numpy ints, like other int arguments
        assert fastrnn.get_num_threads() == 1 and type(fastrnn.get_num_threads()) is int
    finally:
        fastrnn.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here (Windows)")
def test_a_forked_child_can_run_parallel_calls():
    """The worker thread does not survive fork(); the child must make its own
    (it used to wait forever for the parent's)."""
    import multiprocessing
    from fastrnn import _plan
    layer = fastrnn.GRU(8, 32, bidirectional=True, seed=0)
    x = np.random.default_rng(0).standard_normal((50, 4, 8)).astype(np.float32)
    old = _plan.MIN_PARALLEL_WORK
    _plan.MIN_PARALLEL_WORK = 0
    try:
        expected, _ = layer(x)          # the parent starts its worker
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            result = pool.apply_async(_child_forward, (layer, x))
            got = result.get(timeout=60)
    finally:
        _plan.MIN_PARALLEL_WORK = old
    np.testing.assert_array_equal(got, expected)


def _child_forward(layer, x):
    from fastrnn import _plan
    _plan.MIN_PARALLEL_WORK = 0
    return layer(x)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="moves threads on Linux only")
def test_a_thread_moves_off_its_cpu_and_keeps_its_affinity():
    """A worker woken on its caller's CPU moves itself to another one
    (_worker.h): its affinity narrowed for the move, then restored."""
    from fastrnn import _worker

    def move(cpus):
        os.sched_setaffinity(0, cpus)      # this thread only
        before, moved, moved_to = _worker.move_off_current_cpu()
        return before, moved, moved_to, os.sched_getaffinity(0)

    allowed = sorted(os.sched_getaffinity(0))
    with ThreadPoolExecutor(1) as pool:
        # one CPU allowed: nowhere to go
        before, moved, moved_to, kept = pool.submit(move, {allowed[0]}).result()
        assert (before, moved, moved_to, kept) == (allowed[0], False, -1, {allowed[0]})
        if len(allowed) >= 2:
            before, moved, moved_to, kept = pool.submit(move, set(allowed)).result()
            assert moved and moved_to != before and moved_to in allowed
            assert kept == set(allowed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_threads_keep_the_process_affinity_after_parallel_calls(monkeypatch):
    """Workers that moved off their caller's CPU (after sleeping: pauses
    between the calls) end with the affinity they started with."""
    import time
    from fastrnn import _parallel
    monkeypatch.setattr(_parallel, "_threads", 2)
    allowed = os.sched_getaffinity(0)
    layer = LSTM(32, 64, seed=0)
    x = np.random.default_rng(0).standard_normal((20, 64, 32)).astype(np.float32)
    for _ in range(5):
        layer(x)
        time.sleep(0.01)         # past the workers' spin: they sleep, then wake
    time.sleep(0.05)             # (a worker woken after the call's last part restores late)
    for tid in os.listdir("/proc/self/task"):
        assert os.sched_getaffinity(int(tid)) == allowed, tid


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="steers wake-ups on Linux, with 2 CPUs or more")
def test_a_sleeping_workers_wake_up_is_steered_off_the_callers_cpu(monkeypatch):
    """A worker woken from sleep was often placed on its caller's CPU,
    where it waited, runnable, while the caller ran every part itself (for
    5 to 20 calls after a pause). The caller narrows a sleeping worker's
    affinity to the other CPUs before the wake-up (_portable.h's
    fastrnn_steer_off), and the worker, awake, puts its own back."""
    import time
    from fastrnn import _parallel, _worker
    monkeypatch.setattr(_parallel, "_threads", 2)
    allowed = os.sched_getaffinity(0)
    _worker.busy_parts([0.001, 0.001])        # the worker exists
    steered = _worker.stats()[4]
    for _ in range(3):
        time.sleep(0.02)                       # past its spin: it sleeps
        assert len(_worker.busy_parts([0.002, 0.002])) == 2
    assert _worker.stats()[4] >= steered + 3
    time.sleep(0.05)
    for tid in os.listdir("/proc/self/task"):
        assert os.sched_getaffinity(int(tid)) == allowed, tid


@pytest.mark.parametrize("files,want", [
    ({"cpu.max": "150000 100000\n"}, 2), ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "100000 100000"}, 1), ({"cpu.max": "5000 100000"}, 1),
    ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "max 100000", "cpu/cpu.cfs_quota_us": "100000",   # v2 wins
      "cpu/cpu.cfs_period_us": "100000"}, None),
    ({"cpu.max": "garbage"}, None), ({}, None)])
def test_default_threads_stay_within_a_cgroup_cpu_quota(files, want, tmp_path, monkeypatch):
    """A container's --cpus is a CPU quota, not an affinity: the default
    thread count takes it too (rounded up), from cgroup v2's cpu.max or v1's
    CFS quota and period; no quota, or files it cannot read, leave the
    affinity's count."""
    from fastrnn import _parallel
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(_parallel, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.delenv("FASTRNN_NUM_THREADS", raising=False)
    assert _parallel._quota_cpus() == want
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    expected = affinity if want is None else min(affinity, want)
    assert _parallel._cores() == expected
    assert _parallel._default_threads() == min(expected, _parallel.MAX_THREADS)
    monkeypatch.setenv("FASTRNN_NUM_THREADS", "5")          # the variable wins
    assert _parallel._default_threads() == 5
    monkeypatch.setenv("FASTRNN_NUM_THREADS", " ")          # empty: as if unset
    assert _parallel._default_threads() == min(expected, _parallel.MAX_THREADS)
    for bad in ("2_0", "+3", "\u0663", "two", "0" * 5000):
        monkeypatch.setenv("FASTRNN_NUM_THREADS", bad)
        with pytest.raises(ImportError, match="FASTRNN_NUM_THREADS must be an int >= 1"):
            _parallel._default_threads()
    # any number of digits (int() refuses more than 4300), counts past the cap capped
    for text, n in [("0" * 5000 + "3", 3), ("9" * 5000, _parallel.MAX_THREADS),
                    ("00" + str(_parallel.MAX_THREADS + 1), _parallel.MAX_THREADS)]:
        monkeypatch.setenv("FASTRNN_NUM_THREADS", text)
        assert _parallel._default_threads() == n


def test_scipys_blas_is_held_at_one_thread_again_after_the_user_changed_it():
    """[failed before] The hold set scipy's own BLAS to one thread once and
    never looked again: a user's threadpool_limits(2) (or a limits block
    around fastrnn's first call, restored at its end) left fastrnn's float64
    products threaded for good (training 1.9 s -> 4.2 s)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastrnn import _parallel
    hold = _parallel.blas_at_one_thread
    with hold:
        pass
    if not hold._private:
        pytest.skip("scipy shares its BLAS with numpy here (held per call, restored after)")
    limits = threadpoolctl.threadpool_limits(limits=2, user_api="blas")
    try:
        assert any(lib.num_threads == 2 for lib in hold._libs)
        with hold:
            assert [lib.num_threads for lib in hold._libs] == [1] * len(hold._libs)
    finally:
        limits.restore_original_limits()
        with hold:
            pass


BLAS_REENTRY_SCRIPT = r"""
import numpy as np, fastrnn
from fastrnn import _parallel
layer = fastrnn.GRU(32, 256, dtype="float64", seed=0)     # its plan holds BLAS
x = np.random.default_rng(0).standard_normal((20, 1, 32))
expected = layer(x)[0]
hold = _parallel.blas_at_one_thread
inside = [False]
outputs = []

class Blas:
    # a BLAS handle whose thread count read is where a signal handler
    # (calling the model) lands
    user_api = "blas"

    @property
    def num_threads(self):
        if not inside[0]:
            inside[0] = True
            outputs.append(layer(x)[0])
            inside[0] = False
        return 1

    def set_num_threads(self, n):
        pass

hold._libs, hold._private = [Blas()], True
outputs.append(layer(x)[0])
assert len(outputs) == 2 and all(np.array_equal(out, expected) for out in outputs)
print("ok")
"""


def test_a_call_reentering_the_blas_hold_does_not_deadlock(tmp_path):
    # the BLAS hold's lock was a plain one, with Python code under it: a
    # signal handler calling a float64 layer there waited for good; in a
    # child, so that a hang fails here (from tmp_path: not the source tree's
    # unbuilt package)
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", BLAS_REENTRY_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr


def _asleep_flags_while_every_worker_runs():
    """The workers' 'asleep' flags while each runs a part of 60 ms (the
    call made from another thread: it releases the GIL)."""
    import threading
    import time
    from fastrnn import _worker
    call = threading.Thread(target=_worker.busy_parts, args=([0.06, 0.06, 0.06],))
    call.start()
    time.sleep(0.02)
    flags = _worker.asleep_flags()
    call.join()
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="steers wake-ups on Linux, with 2 CPUs or more")
def test_a_forked_childs_awake_workers_are_not_narrowed(monkeypatch):
    """After fork the child's new workers took slots whose 'asleep' flags
    were the parent's (its workers asleep at the fork): a caller then
    narrowed a worker that was running, which kept the narrowed affinity
    until it next slept. A worker's slot starts awake."""
    import multiprocessing
    import time
    from fastrnn import _parallel, _worker
    monkeypatch.setattr(_parallel, "_threads", 3)
    _worker.busy_parts([0.001, 0.001, 0.001])
    time.sleep(0.02)                          # the parent's workers asleep
    assert set(_worker.asleep_flags()) == {1}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        flags = pool.apply(_asleep_flags_while_every_worker_runs)
    assert flags and set(flags) == {0}
