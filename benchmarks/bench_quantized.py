"""asv benchmarks of reduced-precision inference (fastrnn.quantize): every
case of the benchmark grid (fastrnn.bench.CASES) in float32, int8 and
bfloat16, with the bytes the layer holds for its weights (``fastrnn bench
--dtype int8`` compares the same with PyTorch's and ONNX Runtime's int8).
"""
import fastrnn
from benchmarks.bench_rnn import CASE_NAMES, THREADS, _layer_and_input
from fastrnn.bench_quantized import _weight_bytes


class Quantized:
    params = [CASE_NAMES, ["float32", "int8", "bfloat16"], THREADS]
    param_names = ["case", "weights", "threads"]
    timeout = 120

    def setup(self, name, weights, threads):
        fastrnn.set_num_threads(threads)
        layer, self.x = _layer_and_input(name)
        self.layer = layer if weights == "float32" else fastrnn.quantize(layer, dtype=weights)
        self.layer(self.x)   # warm caches (packed weights, worker threads)

    def teardown(self, name, weights, threads):
        fastrnn.set_num_threads(THREADS[-1])

    def time_forward(self, name, weights, threads):
        self.layer(self.x)

    def track_weight_bytes(self, name, weights, threads):
        return _weight_bytes(self.layer, weights != "float32")

    track_weight_bytes.unit = "bytes"
