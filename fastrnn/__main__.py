"""The ``fastrnn`` command (also ``python -m fastrnn`` outside the source tree).

    fastrnn demo       train the seeds' Keras sunspot model (example 1)
    fastrnn sunspots   the same, with options (--epochs, --plot, --seed)
    fastrnn adding     example 2: the adding problem, RNN vs GRU vs LSTM
    fastrnn charlm     example 3: a character-level GRU language model
    fastrnn timing     time a forward pass of each layer on random data
    fastrnn bench      fastrnn against PyTorch / ONNX Runtime / TensorFlow (--help)
"""
import platform
import sys
import time

import numpy as np

import fastrnn


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def timing(argv=None):
    T, B, D, H = 100, 32, 64, 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    print(f"fastrnn {fastrnn.__version__} on {platform.machine()}, "
          f"Python {platform.python_version()}")
    print(f"forward of one layer over T={T} steps, batch B={B}, input D={D}, hidden H={H}, "
          f"float32")
    for layer in (fastrnn.RNN(D, H, seed=0), fastrnn.GRU(D, H, seed=0),
                  fastrnn.LSTM(D, H, seed=0),
                  fastrnn.LSTM(D, H, num_layers=2, bidirectional=True, seed=0)):
        ms = median_ms(lambda: layer(x), repeats=20)
        print(f"  {repr(layer):<50} {ms:8.3f} ms")
    cell = fastrnn.LSTMCell(16, 32, seed=0)
    frame = rng.standard_normal(16).astype(np.float32)
    state = cell(frame)
    us = 1e3 * median_ms(lambda: cell(frame, state), repeats=2000)
    print(f"  {repr(cell) + ', one step, batch 1':<50} {us:8.1f} us")


def _commands():
    from fastrnn import bench
    from fastrnn.examples import adding_problem, char_lm, sunspots
    return {"demo": sunspots.cli, "sunspots": sunspots.cli, "adding": adding_problem.cli,
            "charlm": char_lm.cli, "timing": timing, "bench": bench.main}


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _commands()
    if not argv:
        argv = ["demo"]
    if argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(cli())
