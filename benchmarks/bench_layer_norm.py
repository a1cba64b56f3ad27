"""asv benchmarks of layer_norm=True: a b32-t100-h128 LSTM and GRU forward
and training step, with and without layer normalisation (the cost of the
option; benchmarks/layer_norm.py prints the same comparison as a table).
"""
import numpy as np

import fastrnn

THREADS = sorted({1, fastrnn.get_num_threads()})


class LayerNorm:
    params = [["LSTM", "GRU"], [False, True], THREADS]
    param_names = ["cell", "layer_norm", "threads"]
    timeout = 120

    def setup(self, cell, layer_norm, threads):
        fastrnn.set_num_threads(threads)
        self.layer = getattr(fastrnn, cell)(128, 128, layer_norm=layer_norm, seed=0)
        self.x = np.random.default_rng(0).random((100, 32, 128)).astype(np.float32)
        self.dout = np.ones((100, 32, 128), np.float32)
        self.layer(self.x)   # warm caches (packed weights, worker threads)

    def teardown(self, cell, layer_norm, threads):
        fastrnn.set_num_threads(THREADS[-1])

    def time_forward(self, cell, layer_norm, threads):
        self.layer(self.x)

    def time_train_step(self, cell, layer_norm, threads):
        (_, _), backprop = self.layer.forward_train(self.x)
        backprop(self.dout)
