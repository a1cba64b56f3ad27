"""asv benchmarks of the layer options (the gate options, zoneout, Keras'
dropouts, DropConnect, learned initial state, layer norm, projection): an
LSTM 64 -> 128 over T=100 steps of B=32 rows, float32, a call and a training
step, against the plain layer (benchmarks/options.py prints the same as a
table, and the README's options section holds one of its runs).
"""
import numpy as np

import fastrnn
from benchmarks.options import OPTIONS

LABELS = [label for label, _ in OPTIONS]
THREADS = sorted({1, fastrnn.get_num_threads()})


class Options:
    params = [LABELS, THREADS]
    param_names = ["option", "threads"]
    timeout = 120

    def setup(self, label, threads):
        fastrnn.set_num_threads(threads)
        self.layer = fastrnn.LSTM(64, 128, seed=0, **dict(OPTIONS)[label])
        self.x = np.random.default_rng(0).standard_normal((100, 32, 64)).astype(np.float32)
        self.dout = np.ones_like(self.layer(self.x)[0])   # (warms the caches too)

    def teardown(self, label, threads):
        fastrnn.set_num_threads(THREADS[-1])

    def time_forward(self, label, threads):
        self.layer(self.x)

    def time_train_step(self, label, threads):
        (_, _), backprop = self.layer.forward_train(self.x)
        backprop(self.dout)
