"""``fastrnn demo`` (or ``python -m fastrnn``): run each layer forward on
random data and time it."""
import argparse
import platform
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


def main():
    T, B, D, H = 100, 32, 64, 128
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    print(f"fastrnn {fastrnn.__version__} on {platform.machine()}, Python {platform.python_version()}")
    print(f"forward of one layer over T={T} steps, batch B={B}, input D={D}, hidden H={H}, float32")
    print(f"{'layer':<28} {'output':<16} {'median ms':>10}")
    layers = [
        fastrnn.RNN(D, H, seed=0),
        fastrnn.GRU(D, H, seed=0),
        fastrnn.LSTM(D, H, seed=0),
        fastrnn.LSTM(D, H, num_layers=2, bidirectional=True, seed=0),
    ]
    for layer in layers:
        out, _ = layer(x)
        ms = median_ms(lambda: layer(x), repeats=20)
        print(f"{repr(layer):<28} {str(out.shape):<16} {ms:>10.3f}")
    cell = fastrnn.LSTMCell(16, 32, seed=0)
    frame = rng.standard_normal(16).astype(np.float32)
    state = cell(frame)
    us = 1e3 * median_ms(lambda: cell(frame, state), repeats=2000)
    print(f"{repr(cell) + ' one step, batch 1':<45} {us:>10.1f} us")


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="fastrnn", description=__doc__)
    parser.add_argument("command", nargs="?", default="demo", choices=["demo"],
                        help="what to run (default: demo)")
    parser.parse_args(argv)
    main()


if __name__ == "__main__":
    cli()
