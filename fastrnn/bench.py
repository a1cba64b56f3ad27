"""fastrnn against its peers on the benchmark grid, each library in a process of its own.

    fastrnn bench [--threads N] [--dtype DTYPE] [--quick | --cases NAMES] [--repeats N]
                  [--rounds N]
    python -m fastrnn.bench ...     (the same, outside the source tree)

``fastrnn bench --help`` lists the grid (:data:`CASES`: cell and shape of
each case); ``benchmarks/README.md`` in the source tree says what each case
stands for and why it is in the grid.

For every case, with the same random weights (a seeded fastrnn layer's
``state_dict``) loaded into each library and the same random time-major
input, zero initial state:

- inference: median milliseconds of a forward pass over the whole sequence
  for fastrnn, PyTorch CPU, ONNX Runtime and TensorFlow/Keras, whichever are
  installed, and the speed-up of fastrnn over the fastest of them;
- ``limit`` and ``/limit``: the GEMM-only limit (:func:`gemm_only`: the same
  input-projection and recurrent products as fastrnn's forward, through the
  same routines and BLAS, split over the same threads, without the gate math)
  and fastrnn's time over it;
- ``peak`` and ``/peak``: the time the case's multiply-adds (:func:`case_flops`)
  take at this machine's float32 FMA peak on ``threads`` threads (measured
  first, on one thread, by a register-only FMA loop:
  ``_forward.fma_peak_gflops``; printed above the table with the per-step
  product kernel's own GFLOP/s, ``_forward.product_gflops``) and fastrnn's
  time over it (float32 only);
- the max abs error of each library's output against a float64 reference
  (PyTorch in float64 when installed, independent of fastrnn; else fastrnn in
  float64);
- for the cases marked ``train``, a second table: a training step (forward,
  then backward of the summed output: gradients of every weight and of the
  input) in fastrnn, PyTorch and TensorFlow, and each peer's time over
  fastrnn's; ``peak`` and ``/peak`` as above for the step's multiply-adds
  (:func:`train_flops`, three times the forward's).

The peers: PyTorch's ``nn.RNN``/``GRU``/``LSTM`` under ``inference_mode``
with ``torch.set_num_threads(threads)``; ONNX Runtime on a graph of one ONNX
RNN/GRU/LSTM node per layer (weights as initializers, gate blocks reordered,
GRU with ``linear_before_reset=1`` as in PyTorch), ``threads`` intra-op
threads, inference only; Keras 3 on TensorFlow with the weights converted to
Keras' layout (GRU ``reset_after=True``), called in a compiled
``tf.function``, with XLA (``jit_compile``) where that runs the case faster
(each case takes the faster, timed before the measured calls), ``threads``
intra-op threads. ONNX Runtime and
TensorFlow run in float32 only. NumPy's BLAS is held at ``threads``
(threadpoolctl) and fastrnn runs on ``threads`` (:func:`fastrnn.set_num_threads`).
Each library runs each case in a process of its own, started afresh
(:func:`run_case`): no library's spinning thread pool, allocator or BLAS
setting can tax another. Within a process, calls run in blocks after a
pause (:func:`median_ms`). With ``--rounds N`` each library's process runs N
times, the libraries in turn (:func:`run_rounds`): each time is the
median over the rounds, each speed-up the median of the rounds' own
(:func:`paired_ratio`).
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import namedtuple

import numpy as np

import fastrnn
from fastrnn import _parallel, _plan
from fastrnn import _validation as v
from fastrnn._kernels import forward as _forward
from fastrnn.examples import _cli   # (the command lines' integer option types)

Case = namedtuple("Case", "name cell B T D H layers bidirectional train heavy")

CASES = [
    Case("stream-b1-h32", "LSTM", 1, 100, 16, 32, 1, False, True, False),
    Case("seed-keras-b32-h50", "RNN", 32, 50, 1, 50, 2, False, True, False),
    Case("b32-h128", "LSTM", 32, 100, 64, 128, 1, False, True, False),
    Case("b32-h128-gru", "GRU", 32, 100, 64, 128, 1, False, True, False),
    Case("b32-h128-rnn", "RNN", 32, 100, 64, 128, 1, False, True, False),
    Case("b64-h512", "LSTM", 64, 100, 256, 512, 1, False, True, True),
    Case("b1-t1000-h256", "GRU", 1, 1000, 64, 256, 1, False, True, False),
    Case("b256-h64", "LSTM", 256, 50, 32, 64, 1, False, True, False),
    Case("step-b1-lstm", "LSTM", 1, 1, 64, 128, 1, False, False, False),
    Case("step-b1-gru", "GRU", 1, 1, 64, 128, 1, False, False, False),
    Case("stream-b1-h64", "GRU", 1, 100, 64, 64, 1, False, False, False),
    Case("stream-b1-h256", "GRU", 1, 100, 64, 256, 1, False, False, False),
    Case("bidir-b1-gru", "GRU", 1, 128, 384, 256, 1, True, False, False),
    Case("bidir-b1-lstm", "LSTM", 1, 128, 384, 256, 1, True, False, False),
    Case("stack2-b32", "LSTM", 32, 60, 293, 128, 2, True, False, False),
    Case("imdb-b64", "GRU", 64, 150, 125, 100, 1, False, True, False),
    Case("long-b8", "LSTM", 8, 2000, 256, 256, 2, False, False, True),
    Case("wide-b500", "LSTM", 500, 5, 510, 32, 1, False, False, False),
    Case("ds2-b20", "GRU", 20, 300, 800, 800, 1, False, True, True),
]
QUICK = {"stream-b1-h32", "seed-keras-b32-h50", "b32-h128", "b32-h128-gru", "b32-h128-rnn",
         "step-b1-lstm", "stream-b1-h64", "bidir-b1-gru"}


def median_ms(fns, repeats, block=5, pause=0.25):
    """Median ms of each callable, interleaved in blocks.

    Each round runs ``block`` consecutive calls of every callable in turn,
    after a pause, and drops the first call of each block. A library's idle
    threads keep spinning after its calls (OpenBLAS ~0.1 s, OpenMP and ONNX
    Runtime pools too) and would tax the next library's calls: the pause lets
    them go to sleep, so each library is timed as it runs alone in a process.
    """
    times = [[] for _ in fns]
    for _ in range(max(1, math.ceil(repeats / (block - 1)))):
        for i, fn in enumerate(fns):
            time.sleep(pause)
            for j in range(block):
                start = time.perf_counter()
                fn()
                if j:
                    times[i].append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


# --- the libraries ---------------------------------------------------------------
def fastrnn_runner(case, state_dict, x, dtype):
    layer = getattr(fastrnn, case.cell)(case.D, case.H, num_layers=case.layers,
                                        bidirectional=case.bidirectional, dtype=dtype)
    layer.load_state_dict(state_dict)

    def infer():
        return layer(x)[0]

    def train():
        (out, _), backprop = layer.forward_train(x)
        backprop(np.ones_like(out))

    return infer, train, gemm_only(layer, x)


def case_flops(case):
    """The multiply-add flops of a case's forward: every layer's input
    projection and recurrent products (2 flops per multiply-add)."""
    dirs = 2 if case.bidirectional else 1
    GH = {"LSTM": 4, "GRU": 3, "RNN": 1}[case.cell] * case.H
    total = 0
    for k in range(case.layers):
        d_in = case.D if k == 0 else dirs * case.H
        total += dirs * 2 * case.T * case.B * GH * (d_in + case.H)
    return total


def train_flops(case):
    """The multiply-add flops of a case's training step: the forward's
    (:func:`case_flops`) three times over. The backward runs the same
    products twice more: the gradients of the inputs and of h_{t-1}
    (dG . W_ih, dG . W_hh) and those of the weights (dG^T . x, dG^T . h_{t-1}),
    each of a forward product's size."""
    return 3 * case_flops(case)


def gemm_only(layer, x):
    """The GEMM calls of a fastrnn forward alone: each layer's input
    projection and its per-step recurrent products, split as the layer splits
    them, no gate math; None where the layer splits its hidden units between
    the threads (the plan's ``units``), which these products cannot: they
    would run its recurrence in one part, or each part over all of W_hh, and
    the limit would not bound the call."""
    T, B = x.shape[:2]
    dirs, H = layer._dirs, layer.hidden_size
    N = dirs * layer._gates * H
    dtype = layer.dtype
    gx = np.empty((T * B, N), dtype)
    gh = (np.empty((dirs, B * layer._gates * H), dtype)
          if layer._kernel_code == _forward.CELL_GRU else None)
    h = np.zeros((dirs, B, H), dtype)
    inputs = [x.reshape(T * B, -1)] + [np.zeros((T * B, dirs * H), dtype)] * (layer._layers - 1)
    plan = _plan.forward_plan(layer, T, B, batch_first=False, train=False,
                              has_lengths=False)   # the layer's own split
    if plan.units is not None:
        return None
    parts = plan.parts

    def run():
        with _parallel.blas_at_one_thread:
            params = layer._params
            w_ih, w_hh = layer._weights(params)[:2]
            packed_ih = layer._packed_projection(params)
            packed_hh = layer._packed_recurrent(params)
            for k, (bias_x, _, w_hh_t) in enumerate(layer._kernel_weights(params)):
                _forward.project(x=inputs[k], w_ih=w_ih[k], bias_x=bias_x, gx=gx,
                                 max_rows=v.BLAS_INT_MAX, parts=_plan.chunks(T * B, plan.products),
                                 packed=None if packed_ih is None else packed_ih[k],
                                 hidden_size=H)
                _forward.gemm_limit(cell=layer._kernel_code, T=T, batch_first=False,
                                    parts=parts, w_hh=w_hh[k], w_hh_t=w_hh_t, h=h,
                                    gx=gx, gh=gh,
                                    packed=None if packed_hh is None else packed_hh[k])

    return run


def torch_runner(case, state_dict, x, dtype, threads):
    import torch
    torch.set_num_threads(threads)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    module = getattr(torch.nn, case.cell)(case.D, case.H, num_layers=case.layers,
                                          bidirectional=case.bidirectional, dtype=tdtype)
    module.load_state_dict({k: torch.from_numpy(val) for k, val in state_dict.items()})
    tx = torch.from_numpy(x)

    def infer():
        with torch.inference_mode():
            return module(tx)[0].numpy()

    def train():
        xg = tx.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xg)[0].sum().backward()

    return infer, train


def ort_model(case, state_dict, x):
    """The case as an ONNX graph of one RNN/GRU/LSTM node per layer (input
    "X" laid out as x, time-major; output "OUT", (T, B, dirs * H) in memory,
    with no copy at the end: see the unidirectional branch)."""
    from onnx import TensorProto, helper, numpy_helper

    dirs = 2 if case.bidirectional else 1
    order = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}[case.cell]  # to i,o,f,c / z,r,h

    def reorder(w):
        blocks = np.split(w, len(order), axis=0)
        return np.concatenate([blocks[i] for i in order], axis=0)

    nodes, inits = [], []
    current = "X"
    for k in range(case.layers):
        sfx = [f"_l{k}", f"_l{k}_reverse"][:dirs]
        W = np.stack([reorder(state_dict["weight_ih" + s]) for s in sfx])
        R = np.stack([reorder(state_dict["weight_hh" + s]) for s in sfx])
        Bias = np.stack([np.concatenate([reorder(state_dict["bias_ih" + s]),
                                         reorder(state_dict["bias_hh" + s])]) for s in sfx])
        names = [f"W{k}", f"R{k}", f"B{k}"]
        inits += [numpy_helper.from_array(a.astype(np.float32), n)
                  for a, n in zip((W, R, Bias), names)]
        attrs = {"hidden_size": case.H,
                 "direction": "bidirectional" if case.bidirectional else "forward"}
        if case.cell == "GRU":
            attrs["linear_before_reset"] = 1
        last = k == case.layers - 1
        if dirs == 1:
            # Y (T, 1, B, H) is (T, B, H) in memory: the last layer's Y is the
            # output (reshaped by numpy, no copy; a Transpose and Reshape there
            # made ORT copy it, timed: 5-20% of b32-h128's and b256-h64's call),
            # a lower layer's is squeezed for the next
            nodes.append(helper.make_node(case.cell, [current] + names,
                                          ["OUT" if last else f"Y{k}"], **attrs))
            if not last:
                inits.append(numpy_helper.from_array(np.array([1], np.int64), f"axes{k}"))
                nodes.append(helper.make_node("Squeeze", [f"Y{k}", f"axes{k}"], [f"H{k}"]))
                current = f"H{k}"
            continue
        nodes.append(helper.make_node(case.cell, [current] + names, [f"Y{k}"], **attrs))
        # Y (T, 2, B, H) -> (T, B, 2 * H)
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"shape{k}"))
        current = "OUT" if last else f"H{k}"
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", f"shape{k}"], [current]))
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_session(model, threads):
    """An ONNX Runtime session of ``model`` (bytes or a path) on ``threads``
    intra-op threads (inter-op 1), its default (full) graph optimisation."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def ort_runner(case, state_dict, x, threads):
    session = ort_session(ort_model(case, state_dict, x).SerializeToString(), threads)
    x32 = x.astype(np.float32)

    T, B = x.shape[:2]

    def infer():
        return session.run(None, {"X": x32})[0].reshape(T, B, -1)

    return infer


def keras_runner(case, state_dict, x, threads):
    """Keras 3 on TensorFlow: the same weights converted to Keras' layout
    (kernels transposed; GRU gate blocks z, r, h and reset_after=True;
    PyTorch's two biases summed where Keras has one), compiled tf.functions."""
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process
        pass
    import keras

    def keras_weights(sfx):
        w_ih, w_hh = state_dict["weight_ih" + sfx], state_dict["weight_hh" + sfx]
        b_ih, b_hh = state_dict["bias_ih" + sfx], state_dict["bias_hh" + sfx]
        if case.cell == "GRU":
            def zrn(a):
                r, z, n = np.split(a, 3, axis=0)
                return np.concatenate([z, r, n], axis=0)
            return [zrn(w_ih).T, zrn(w_hh).T, np.stack([zrn(b_ih), zrn(b_hh)])]
        return [w_ih.T, w_hh.T, b_ih + b_hh]

    def make(k):
        kwargs = dict(units=case.H, return_sequences=True)
        if case.cell == "GRU":
            return keras.layers.GRU(reset_after=True, **kwargs)
        if case.cell == "LSTM":
            return keras.layers.LSTM(**kwargs)
        return keras.layers.SimpleRNN(**kwargs)

    inputs = keras.Input((case.T, case.D), batch_size=case.B)
    y, recurrent = inputs, []
    for k in range(case.layers):
        layer = make(k)
        if case.bidirectional:
            layer = keras.layers.Bidirectional(layer, merge_mode="concat")
        y = layer(y)
        recurrent.append(layer)
    model = keras.Model(inputs, y)
    for k, layer in enumerate(recurrent):
        if case.bidirectional:
            layer.forward_layer.set_weights(keras_weights(f"_l{k}"))
            layer.backward_layer.set_weights(keras_weights(f"_l{k}_reverse"))
        else:
            layer.set_weights(keras_weights(f"_l{k}"))
    xb = tf.constant(np.ascontiguousarray(x.transpose(1, 0, 2)).astype(np.float32))

    def forward(inp):
        return model(inp, training=False)

    def train_step(inp):
        with tf.GradientTape() as tape:
            tape.watch(inp)
            total = tf.reduce_sum(model(inp, training=True))
        return tape.gradient(total, model.trainable_variables + [inp])

    def fastest(fn):
        """fn as the faster of a compiled tf.function without XLA and one
        with (jit_compile): XLA ran some cases 1.2-12x faster and others
        1.5x slower on this machine, so each case takes its own best (the
        better of 3 calls each, after a first that compiles; a variant XLA
        cannot compile is passed over)."""
        best, best_s = None, math.inf
        for jit in (False, True):
            variant = tf.function(fn, jit_compile=jit)
            try:
                variant(xb)
            except Exception:   # (XLA may not compile a graph: the other stays)
                if not jit:
                    raise
                continue
            seconds = min(_seconds(lambda: variant(xb)) for _ in range(3))
            if seconds < best_s:
                best, best_s = variant, seconds
        return best

    compiled_forward = fastest(forward)

    def infer():   # batch-major, as the input it is given (both outside the timing)
        return compiled_forward(xb).numpy()

    infer.time_major = lambda y: y.transpose(1, 0, 2)
    if not case.train:
        return infer, None
    compiled_train = fastest(train_step)

    def train():
        compiled_train(xb)

    return infer, train


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the run -----------------------------------------------------------------------
def available(name):
    """Whether module ``name`` is installed (found, not imported: the peers
    are imported only in the processes that time them)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _installed_version(module):
    """The version of the distribution that provides ``module`` (tensorflow
    may come as tensorflow-cpu), without importing it."""
    for dist in importlib.metadata.packages_distributions().get(module, [module]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "(version unknown)"


PEER_MODULES = {"torch": ("torch",), "ORT": ("onnxruntime", "onnx"),
                "TF": ("tensorflow", "keras")}


def case_data(case, dtype):
    """The weights (a seeded fastrnn layer's ``state_dict``) and the input of
    ``case``: the same in every process that asks."""
    ref_layer = getattr(fastrnn, case.cell)(case.D, case.H, num_layers=case.layers,
                                            bidirectional=case.bidirectional, seed=0)
    state_dict = {k: val.astype(dtype) for k, val in ref_layer.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((case.T, case.B, case.D)).astype(dtype)
    return state_dict, x


def measure(case_name, library, dtype, threads, repeats, output_path):
    """Time one library on one case, in the calling process (the child that
    :func:`run_case` starts for it), save its output to ``output_path`` and
    return ``{"infer": ms, "train": ms or None, "limit": ms or None}``.
    ``library`` "reference" only computes the float64 reference output."""
    from threadpoolctl import threadpool_limits
    case = next(c for c in CASES if c.name == case_name)
    fastrnn.set_num_threads(threads)
    with threadpool_limits(threads, user_api="blas"):
        if library == "reference":
            state_dict, x = case_data(case, "float64")
            try:   # PyTorch in float64, independent of fastrnn, when it imports
                infer = torch_runner(case, state_dict, x, "float64", threads)[0]
            except ImportError:
                infer = fastrnn_runner(case, state_dict, x, "float64")[0]
            np.save(output_path, np.asarray(infer(), np.float64))
            return {}
        state_dict, x = case_data(case, dtype)
        train = limit = None
        if library == "fastrnn":
            infer, train, limit = fastrnn_runner(case, state_dict, x, dtype)
        elif library == "torch":
            infer, train = torch_runner(case, state_dict, x, dtype, threads)
        elif library == "ORT":
            infer = ort_runner(case, state_dict, x, threads)
        else:
            infer, train = keras_runner(case, state_dict, x, threads)
        out = infer()
        np.save(output_path, np.asarray(getattr(infer, "time_major", lambda y: y)(out)))
        if case.heavy:
            repeats = max(4, repeats // 5)
        timed = [infer] + ([limit] if limit is not None else [])
        infer_ms = median_ms(timed, repeats)
        train_ms = (median_ms([train], max(4, repeats // 2))[0]
                    if case.train and train is not None else None)
    return {"infer": infer_ms[0], "limit": infer_ms[1] if limit is not None else None,
            "train": train_ms}


def _measure_in_child(spec):
    """The child's entry: ``spec`` is the JSON of :func:`measure`'s
    arguments; the result goes to stdout as the last line, in JSON."""
    result = measure(**json.loads(spec))
    sys.stdout.write("\n" + json.dumps(result) + "\n")


def run_rounds(libraries, rounds, run_one, first=0):
    """Run each library's process ``rounds`` times: in each round every
    library once, in turn, the order rotated by one from round to round
    (round r starting at library ``first + r``: the caller rotates it from
    case to case too, so that one round's runs do not always start with the
    same library), so that no library always runs first or always right
    after the same other one. On this kind of shared machine the speed drifts by tens of percent
    over minutes: one process per library catches each in a different phase,
    while a library's median over rounds interleaved with the others' meets
    the same phases as theirs. ``run_one(library)`` returns the process's
    result, or None for a peer that failed (left out from then on). Returns
    {library: [its result of each round]} in the order of ``libraries``."""
    results = {library: [] for library in libraries}
    for r in range(rounds):
        active = list(results)
        k = (first + r) % len(active) if active else 0
        for library in active[k:] + active[:k]:
            result = run_one(library)
            if result is None:
                results.pop(library)
            else:
                results[library].append(result)
    return results


def median_of_rounds(results, key):
    """The median of ``key`` over one library's round results (None where
    its process did not measure it)."""
    values = [result[key] for result in results if result.get(key) is not None]
    return float(np.median(values)) if values else None


def paired_ratio(rounds_of, numerators, denominator):
    """The median over the rounds of one speed ratio, each round's from
    that round's own processes: the smallest time of the ``numerators`` in
    the round over the ``denominator``'s. ``rounds_of``: {library: [its
    time in each round]}, the rounds aligned (``run_rounds`` keeps a library
    for every round or drops it); libraries absent, and times not measured
    (None), are left out of a round; NaN where no round has both. A round's
    processes run within a minute or so, in one phase of the machine's
    drift, which their ratio cancels; the ratio of two medians of times
    may pair one library's fast phase with another's slow one."""
    ratios = []
    for r, den in enumerate(rounds_of.get(denominator, [])):
        nums = [rounds_of[n][r] for n in numerators
                if n in rounds_of and rounds_of[n][r] is not None]
        if nums and den:
            ratios.append(min(nums) / den)
    return float(np.median(ratios)) if ratios else float("nan")


def run_child(entry, spec, tmp, required):
    """Run ``_measure_in_child`` of module ``entry`` (``fastrnn.bench`` or
    ``fastrnn.bench_quantized``) on ``spec`` (its ``measure`` arguments) in
    a new process whose working directory is ``tmp``, and return its result;
    None for a peer that failed there (a broken install: a warning, and the
    caller leaves it out), RuntimeError for a library in ``required``."""
    # The fastrnn this process runs, never a source tree in the current
    # directory (cwd=tmp): a child whose path finds another (a relative
    # PYTHONPATH, an install beside a built tree) takes this one's first.
    origin = os.path.abspath(fastrnn.__file__)
    root = os.path.dirname(os.path.dirname(origin))
    code = (f"import importlib.util, sys; "
            f"spec = importlib.util.find_spec('fastrnn'); "
            f"spec is not None and spec.origin == {origin!r} or sys.path.insert(0, {root!r}); "
            f"from {entry} import _measure_in_child; _measure_in_child(sys.argv[1])")
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        cwd=tmp)
    if done.returncode != 0:
        message = (f"fastrnn bench: {spec['library']} failed on {spec['case_name']} "
                   f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
        if spec["library"] in required:
            raise RuntimeError(message)
        print(message, file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case, dtype, threads, repeats, peers, rounds=1):
    """Time ``case`` in fastrnn and each of ``peers``, each library in a
    process of its own (started afresh, so no library's thread pool or
    allocator state taxes another), ``rounds`` times in turn
    (:func:`run_rounds`), and return (inference ms, training ms, max abs
    errors against float64) as dicts by library, the times the medians over
    the rounds; inference also has fastrnn's GEMM-only ``limit``; and each
    library's time in each round, {"infer" or "train": {library: [ms or
    None]}}, for the speed-ups (:func:`paired_ratio`)."""
    infer_ms, train_ms, errors = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="fastrnn-bench-") as tmp:
        def output(library):
            return os.path.join(tmp, f"{library}.npy")

        def run_one(library):
            spec = dict(case_name=case.name, library=library, dtype=dtype, threads=threads,
                        repeats=repeats, output_path=output(library))
            return run_child("fastrnn.bench", spec, tmp, ("fastrnn", "reference"))

        libraries = ["fastrnn"] + [p for p in peers if dtype == "float32" or p == "torch"]
        results = run_rounds(libraries, rounds, run_one, first=CASES.index(case))
        run_one("reference")
        for library, rounds_of in results.items():
            infer_ms[library] = median_of_rounds(rounds_of, "infer")
            train = median_of_rounds(rounds_of, "train")
            if train is not None:
                train_ms[library] = train
        limit = median_of_rounds(results["fastrnn"], "limit")
        if limit is not None:
            infer_ms["limit"] = limit
        reference = np.load(output("reference"))
        for library in results:
            out = np.load(output(library)).astype(np.float64)
            errors[library] = float(np.abs(out - reference).max())
    per_round = {key: {library: [r.get(key) for r in rounds_of]
                       for library, rounds_of in results.items()} for key in ("infer", "train")}
    return infer_ms, train_ms, errors, per_round


def rounds_note(rounds):
    """The tables' header words for ``--rounds``."""
    return (f", the median of {rounds} rounds (a process per library each round, in turn, "
            f"the order rotated; each speed-up the median of the rounds' own)"
            if rounds > 1 else "")


def field(value, width, spec=".3f"):
    """``value`` formatted by ``spec``, right-aligned in a column of
    ``width`` characters and always after a space: a value too wide for its
    column widens it rather than run into the one before (a peer's 2664.408
    ms had filled its 8 characters and printed as "27.4222664.408"). NaN,
    a library or ratio the case has not, is "-"."""
    text = "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)
    return " " + text.rjust(width - 1)


def ratio_field(value, width):
    """A ratio as "1.23x" in a column of ``width`` characters ("-" for NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return field(value, width)
    return field(value, width - 1, ".2f") + "x"


def _thread_count(text):
    """--threads: 1 to fastrnn's cap (the peers and their BLAS are given the
    same count, which they may not cap)."""
    value = _cli.int_at_least(1)(text)
    if value > _parallel.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {_parallel.MAX_THREADS} (fastrnn's "
                                         f"thread cap), got {text!r}")
    return value


def _case_names(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated case names, got {text!r}")
    valid = [c.name for c in CASES]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown case{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
            f"the cases are: {', '.join(valid)}")
    return names


def _case_list():
    lines = []
    for c in CASES:
        extras = ([f"{c.layers} layers"] * (c.layers > 1) + ["bidirectional"] * c.bidirectional
                  + ["train"] * c.train + ["quick"] * (c.name in QUICK)
                  + ["heavy"] * c.heavy)
        lines.append(f"  {c.name:<19}{c.cell:<5}T={c.T:<5}B={c.B:<4}D={c.D:<4}H={c.H:<5}"
                     f"{', '.join(extras)}".rstrip())
    return "\n".join(lines)


def build_parser(prog="fastrnn bench"):
    """The command line of the benchmark (``prog`` is the name its usage shows)."""
    result = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "fastrnn against PyTorch, ONNX Runtime and TensorFlow/Keras (those installed) on "
            "the benchmark grid, the same weights in every library. For each case: median ms "
            "of inference in each library, fastrnn's speed-up over the fastest peer, "
            "fastrnn's time over its GEMM-only limit (the same GEMMs without the gate math), "
            "the max abs error against float64; for the 'train' cases, a training step "
            "(forward + backward).", 78),
        epilog=textwrap.fill(
            "cases (cell, steps T, batch B, input size D, hidden size H; 'train': the training "
            "step is timed too; 'quick': in --quick; 'heavy': a fifth of the repeats):", 78)
        + "\n" + _case_list())
    result.add_argument("--threads", type=_thread_count, default=2, metavar="N",
                        help=f"threads for fastrnn, for each peer and for NumPy's BLAS "
                             f"(default 2, at most {_parallel.MAX_THREADS})")
    result.add_argument("--dtype", choices=["float32", "float64", "int8", "bfloat16"],
                        default="float32",
                        help="float32 (default) or float64; ONNX Runtime and TensorFlow run "
                             "in float32 only and are left out at float64. int8 or bfloat16 (one "
                             "table): fastrnn's reduced-precision inference against its "
                             "float32 and the peers' int8 dynamic quantization "
                             "(fastrnn.bench_quantized)")
    selection = result.add_mutually_exclusive_group()
    selection.add_argument("--quick", action="store_true",
                           help="only the cases marked 'quick' below (small and fast)")
    selection.add_argument("--cases", type=_case_names, metavar="NAMES",
                           help="comma-separated names of the cases to run, from the list "
                                "below (default: every case)")
    result.add_argument("--repeats", type=_cli.int_at_least(1, 100_000), default=20, metavar="N",
                        help="timed calls per library and case for inference (default 20, "
                             "at most 100,000); "
                             "half as many for a training step, a fifth for a heavy case, "
                             "at least 4")
    result.add_argument("--rounds", type=_cli.int_at_least(1, 100), default=1, metavar="N",
                        help="processes per library and case (default 1, at most 100), the "
                             "libraries in "
                             "turn, their order rotated each round; each time printed is the "
                             "median over the rounds, each speed-up the median of the rounds' "
                             "own ratios (where the machine's speed drifts, every library then "
                             "meets the same phases)")
    return result


@contextlib.contextmanager
def _termination_as_exit():
    """SIGTERM and SIGHUP raise SystemExit while the bench runs (where their
    action is the default one and this is the main thread), so that its
    cleanup runs: ``subprocess.run`` kills the measuring child, the temporary
    directory goes. Killed by them, the bench had left its child measuring on
    for minutes, orphaned, and its temporary files behind."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = {}
    try:
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                previous[number] = signal.signal(number, stop)
    except ValueError:     # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv=None, prog="fastrnn bench"):
    """Run the benchmark with the command-line arguments ``argv`` (default
    ``sys.argv[1:]``) and print its tables."""
    args = build_parser(prog).parse_args(argv)
    with _termination_as_exit():
        return _run(args)


def _run(args):
    """main's work on the parsed ``args``."""
    cases = [c for c in CASES if (c.name in QUICK if args.quick
                                  else args.cases is None or c.name in args.cases)]
    if args.dtype in ("int8", "bfloat16"):
        from fastrnn import bench_quantized
        return bench_quantized.main(args, cases)

    peers = [p for p, mods in PEER_MODULES.items() if all(available(m) for m in mods)
             and (args.dtype == "float32" or p == "torch")]   # only PyTorch runs float64
    versions = [f"fastrnn {fastrnn.__version__}"] + [
        f"{PEER_MODULES[p][0]} {_installed_version(PEER_MODULES[p][0])}" for p in peers]
    print(f"{', '.join(versions)}; {platform.machine()}, {args.threads} "
          f"thread{'s' * (args.threads > 1)}, {args.dtype}, "
          f"median ms (blocks of 5 calls after a pause){rounds_note(args.rounds)}, "
          f"{time.strftime('%Y-%m-%d')}")
    peak = kernel = float("nan")
    if args.dtype == "float32":
        threads = fastrnn.get_num_threads()   # given back: main may be called from Python
        fastrnn.set_num_threads(1)
        try:
            peak = _forward.fma_peak_gflops()
            kernel = _forward.product_gflops(64, 512, 4, 512)
        finally:
            fastrnn.set_num_threads(threads)
        print(f"float32 FMA peak {peak:.0f} GFLOP/s per thread ({_forward.MICROKERNEL_ISA} "
              f"register-only loop); the per-step product kernel {kernel:.0f} GFLOP/s on one "
              f"thread ({kernel / peak:.0%} of peak; 64 x 512 @ 512 x 2048, the b64-h512 step)")
    with_peak = not math.isnan(peak)    # the peak is float32's: no columns at float64
    # a peer whose output is this far from the float64 reference computed
    # something else: its time is shown but not compared
    bound = 1e-3 if args.dtype == "float32" else 1e-9
    print(f"speed-up: over the fastest peer whose max abs error is within {bound:g} (a peer "
          f"past it is marked *, its time not compared); limit '-': the call splits its "
          f"hidden units between the threads, which the GEMM-only run cannot")
    header = (f"{'case':<20}{'fastrnn':>9}" + "".join(f"{p:>9}" for p in peers)
              + f"{'speed-up':>9}{'limit':>8}{'/limit':>7}"
              + f"{'peak':>8}{'/peak':>7}" * with_peak + "  max abs error vs float64")
    print(header)
    speedups, train_rows, notes = [], [], []
    for case in cases:
        infer_ms, train_ms, errors, per_round = run_case(
            case, args.dtype, args.threads, args.repeats, peers, args.rounds)
        # (NaN is off the reference too)
        wrong = {p for p in peers if p in errors and not errors[p] <= bound}
        missing = [p for p in peers if p not in infer_ms and
                   (args.dtype == "float32" or p == "torch")]
        if not errors["fastrnn"] <= bound:
            notes.append(f"{case.name}: fastrnn's own output is off the float64 reference "
                         f"(error {errors['fastrnn']:.1e})")
        if wrong or missing:
            notes.append(f"{case.name}: " + ", ".join(
                [f"{p} left out (error {errors[p]:.1e})" for p in sorted(wrong)]
                + [f"{p} failed" for p in missing]))
        compared = [p for p in peers if p not in wrong]
        speedup = paired_ratio(per_round["infer"], compared, "fastrnn")
        if not math.isnan(speedup):
            speedups.append(speedup)
        errs = " ".join(f"{n} {e:.1e}" for n, e in errors.items())
        peak_ms = case_flops(case) / (peak * 1e9 * args.threads) * 1e3
        limit = infer_ms.get("limit")
        print(f"{case.name:<20}{field(infer_ms['fastrnn'], 9)}"
              + "".join(field(infer_ms.get(p, float("nan")), 8) + ("*" if p in wrong else " ")
                        for p in peers)
              + ratio_field(speedup, 9)
              + (field(limit, 8) + field(infer_ms["fastrnn"] / limit, 7, ".2f") if limit else
                 f"{'-':>8}{'-':>7}")
              + (field(peak_ms, 8) + field(infer_ms["fastrnn"] / peak_ms, 7, ".2f")) * with_peak
              + f"  {errs}", flush=True)
        if train_ms:
            train_rows.append((case, train_ms,
                               {p: r for p, r in per_round["train"].items() if p not in wrong}))
    for note in notes:
        print(f"note: {note}")
    if speedups:
        print(f"inference: geometric mean speed-up over the fastest peer "
              f"{math.exp(np.mean(np.log(speedups))):.2f}x, worst {min(speedups):.2f}x"
              + (f" ({len(speedups)} of {len(cases)} cases had a peer to compare)"
                 if len(speedups) < len(cases) else ""))
    if train_rows:
        train_peers = [p for p in ("torch", "TF")
                       if all(p in ms for _, ms, _ in train_rows)]
        print(f"\ntraining step (forward + backward)\n{'case':<20}{'fastrnn':>9}"
              + "".join(f"{p:>9}{'x':>7}" for p in train_peers)
              + f"{'peak':>9}{'/peak':>7}" * with_peak)
        ratios = {p: [] for p in train_peers}
        for case, ms, train_rounds in train_rows:
            peak_ms = train_flops(case) / (peak * 1e9 * args.threads) * 1e3
            line = f"{case.name:<20}{field(ms['fastrnn'], 9)}"
            for p in train_peers:
                ratios[p].append(paired_ratio(train_rounds, [p], "fastrnn"))
                line += field(ms[p], 9) + ratio_field(ratios[p][-1], 7)
            print(line + (field(peak_ms, 9) + field(ms["fastrnn"] / peak_ms, 7, ".2f"))
                  * with_peak, flush=True)
        for p, r in ratios.items():
            r = [ratio for ratio in r if not math.isnan(ratio)]   # (a peer left out)
            if r:
                print(f"training: geometric mean speed-up over {p} "
                      f"{math.exp(np.mean(np.log(r))):.2f}x, worst {min(r):.2f}x")


if __name__ == "__main__":
    main(prog="python -m fastrnn.bench")
