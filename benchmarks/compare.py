"""Compare fastrnn with PyTorch CPU on the same weights, in one process.

    python benchmarks/compare.py [--threads N] [--repeats R]

For each case: median milliseconds of inference (forward, no gradient) and
of a training step (forward + backward of a summed output, gradients of the
weights and the input), the libraries interleaved in blocks, and the max abs
difference of the outputs. The full grid of PERFORMANCE.md is issue 4's.
"""
import argparse
import time

import numpy as np

import fastrnn

CASES = [  # name, class, B, T, D, H
    ("b32-h128", "LSTM", 32, 100, 64, 128),
    ("b32-h128-gru", "GRU", 32, 100, 64, 128),
    ("b32-h128-rnn", "RNN", 32, 100, 64, 128),
]


def median_ms(fns, repeats, block=5):
    """Median ms of each callable, interleaved in blocks.

    Each round runs ``block`` consecutive calls of every callable in turn and
    drops the first of each block: a library's idle threads keep spinning for
    a while after its calls (OpenMP, OpenBLAS) and would otherwise tax the
    next library's first call, not a cost either pays in steady use.
    """
    times = [[] for _ in fns]
    for _ in range(max(1, repeats // (block - 1))):
        for i, fn in enumerate(fns):
            for j in range(block):
                start = time.perf_counter()
                fn()
                if j:
                    times[i].append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(f"fastrnn {fastrnn.__version__}, torch {torch.__version__} ({args.threads} threads), "
          f"float32, median of {args.repeats}")
    print(f"{'case':<14}{'fastrnn infer':>14}{'torch infer':>12}{'fastrnn train':>15}"
          f"{'torch train':>12}{'max |diff|':>12}")
    for name, cls, B, T, D, H in CASES:
        rng = np.random.default_rng(0)
        tmod = getattr(torch.nn, cls)(D, H)
        fmod = getattr(fastrnn, cls)(D, H)
        fmod.load_state_dict(tmod.state_dict())
        x = rng.standard_normal((T, B, D)).astype(np.float32)
        tx = torch.from_numpy(x)

        def f_infer():
            return fmod(x)

        def t_infer():
            with torch.inference_mode():
                return tmod(tx)

        def f_train():
            (out, _), backprop = fmod.forward_train(x)
            backprop(np.ones_like(out))

        def t_train():
            txg = tx.clone().requires_grad_(True)
            tmod(txg)[0].sum().backward()

        fi, ti, ft, tt = median_ms([f_infer, t_infer, f_train, t_train], args.repeats)
        diff = np.abs(f_infer()[0] - t_infer()[0].numpy()).max()
        print(f"{name:<14}{fi:>14.2f}{ti:>12.2f}{ft:>15.2f}{tt:>12.2f}{diff:>12.1e}")


if __name__ == "__main__":
    main()
