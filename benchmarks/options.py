"""What each layer option costs: an LSTM 64 -> 128 over T=100 steps of B=32
rows, float32, inference (a call) and a training step (forward_train and its
backprop), at 1 and 2 threads, best of 7, against the plain layer.

    python benchmarks/options.py
"""
import argparse
import time

import numpy as np

import fastrnn

OPTIONS = [
    ("plain", {}),
    ("peepholes, clip, hard_sigmoid", dict(peepholes=True, clip=3.0,
                                           recurrent_activation="hard_sigmoid")),
    ("activation='softsign'", dict(activation="softsign")),
    ("zoneout=0.1", dict(zoneout=0.1)),
    ("recurrent_dropout=0.2", dict(recurrent_dropout=0.2)),
    ("input_dropout=0.2", dict(input_dropout=0.2)),
    ("weight_dropout=0.2", dict(weight_dropout=0.2)),
    ("learn_initial_state", dict(learn_initial_state=True)),
    ("layer_norm=True", dict(layer_norm=True)),
    ("proj_size=64", dict(proj_size=64)),
]


def best(run, repeats):
    run()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        times.append((time.perf_counter() - start) / repeats)
    return min(times)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)   # --help
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 32, 64)).astype(np.float32)
    print(f"{'option':32} {'threads':>7} {'call ms':>8} {'train ms':>9}")
    for threads in (1, 2):
        fastrnn.set_num_threads(threads)
        for label, options in OPTIONS:
            layer = fastrnn.LSTM(64, 128, seed=0, **options)
            dout = np.ones_like(layer(x)[0])   # (proj_size: 64 wide)

            def train():
                _, backprop = layer.forward_train(x)
                backprop(dout)
            print(f"{label:32} {threads:7d} {1e3 * best(lambda: layer(x), 10):8.2f} "
                  f"{1e3 * best(train, 3):9.2f}")


if __name__ == "__main__":
    main()
