"""asv benchmarks: forward inference and training steps over the benchmark
grid (fastrnn.bench.CASES; benchmarks/README.md says what each case stands
for), a single cell step, one fit epoch of the sunspot model of example 1,
and the peak memory of inference on a long sequence.

    asv run --python=same --quick      # the installed fastrnn, each case once
    asv continuous main HEAD           # compare two commits (builds them)
"""
import numpy as np

import fastrnn
from fastrnn.bench import CASES

CASE_NAMES = [c.name for c in CASES]
TRAIN_NAMES = [c.name for c in CASES if c.train]
# fastrnn's threads for one call (fastrnn.set_num_threads): one, and every core
THREADS = sorted({1, fastrnn.get_num_threads()})


def _layer_and_input(name):
    case = next(c for c in CASES if c.name == name)
    layer = getattr(fastrnn, case.cell)(case.D, case.H, num_layers=case.layers,
                                        bidirectional=case.bidirectional, seed=0)
    x = np.random.default_rng(0).standard_normal((case.T, case.B, case.D)).astype(np.float32)
    return layer, x


class Inference:
    params = [CASE_NAMES, THREADS]
    param_names = ["case", "threads"]
    timeout = 120

    def setup(self, name, threads):
        fastrnn.set_num_threads(threads)
        self.layer, self.x = _layer_and_input(name)
        self.layer(self.x)  # warm caches (packed weights, worker threads)

    def teardown(self, name, threads):
        fastrnn.set_num_threads(THREADS[-1])

    def time_forward(self, name, threads):
        self.layer(self.x)

    def peakmem_forward(self, name, threads):
        self.layer(self.x)


class TrainingStep:
    params = [TRAIN_NAMES, THREADS]
    param_names = ["case", "threads"]
    timeout = 300

    def setup(self, name, threads):
        fastrnn.set_num_threads(threads)
        self.layer, self.x = _layer_and_input(name)
        (out, _), _ = self.layer.forward_train(self.x)
        self.dout = np.ones_like(out)

    def teardown(self, name, threads):
        fastrnn.set_num_threads(THREADS[-1])

    def time_train_step(self, name, threads):
        (_, _), backprop = self.layer.forward_train(self.x)
        backprop(self.dout)

    def peakmem_train_step(self, name, threads):
        (_, _), backprop = self.layer.forward_train(self.x)
        backprop(self.dout)


class CellStep:
    """One batch-1 step of a (16, 32) cell from Python: the streaming path."""
    params = [["LSTMCell", "GRUCell", "RNNCell"]]
    param_names = ["cell"]

    def setup(self, name):
        self.cell = getattr(fastrnn, name)(16, 32, seed=0)
        self.frame = np.random.default_rng(0).standard_normal(16).astype(np.float32)
        self.state = self.cell(self.frame)

    def time_step(self, name):
        self.cell(self.frame, self.state)


class LongSequenceMemory:
    """Inference keeps no per-step intermediates: peak memory grows with the
    output (T x B x H) only."""
    params = [[500, 2000, 8000]]
    param_names = ["steps"]

    def setup(self, steps):
        self.layer = fastrnn.LSTM(64, 128, seed=0)
        self.x = np.random.default_rng(0).standard_normal((steps, 4, 64)).astype(np.float32)

    def peakmem_forward(self, steps):
        self.layer(self.x)


class SeedModelEpoch:
    """One fit epoch of example 1's model (the Keras sunspot model) on the
    sunspot windows."""
    timeout = 120

    def setup(self):
        from fastrnn.datasets import load_sunspots, windows
        from fastrnn.examples.sunspots import build
        _, values = load_sunspots()
        scaled = (values - values.min()) / (values.max() - values.min())
        x, y = windows(scaled, steps=10)
        self.x, self.y = x.astype(np.float32), y.astype(np.float32)
        self.model = build(seed=0)
        self.model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3))

    def time_fit_epoch(self):
        self.model.fit(self.x, self.y, epochs=1, batch_size=32, validation_split=0.2, verbose=0)
