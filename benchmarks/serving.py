"""Thread-level serving: frames per second of batch-1 streams over 1 and 2
Python threads sharing one cell (the kernels release the GIL).

    python benchmarks/serving.py
"""
import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import fastrnn


def frames_per_second(cell, frames, n_streams, n_threads):
    states = [None] * n_streams

    def work(ids):
        for frame in frames:
            for i in ids:
                states[i] = cell(frame, states[i])

    groups = [list(range(k, n_streams, n_threads)) for k in range(n_threads)]
    start = time.perf_counter()
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(work, groups))
    return n_streams * len(frames) / (time.perf_counter() - start)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)   # --help
    for D, H, T in ((16, 32, 400), (256, 512, 40)):
        cell = fastrnn.LSTMCell(D, H, seed=0)
        frames = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
        best = {n: max(frames_per_second(cell, frames, 32, n) for _ in range(2)) for n in (1, 2)}
        print(f"LSTMCell({D}, {H}), batch 1, 32 streams: "
              + ", ".join(f"{n} thread{'s' * (n > 1)} {fps:,.0f} frames/s"
                          for n, fps in best.items()))


if __name__ == "__main__":
    main()
