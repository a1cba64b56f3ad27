"""The cost of layer_norm=True: a forward (inference) and a training step
(forward_train + backprop) of an LSTM and a GRU, by default B=32, T=100,
D=H=128, with and without layer normalisation. The plain and LN layers run
alternately, so that a busy machine slows both alike; the minimum (the
least disturbed run) and the median of each are printed.

    python benchmarks/layer_norm.py [--threads 1] [--dtype float32] [--repeats 40]
                                    [--batch 32 --steps 100 --input 128 --hidden 128]
"""
import argparse
import time

import numpy as np

import fastrnn
from fastrnn.examples._cli import int_at_least


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int_at_least(1, 64), default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int_at_least(1, 100_000), default=40)
    parser.add_argument("--batch", type=int_at_least(1, 100_000), default=32)
    parser.add_argument("--steps", type=int_at_least(1, 100_000), default=100)
    parser.add_argument("--input", type=int_at_least(1, 65_536), default=128)
    parser.add_argument("--hidden", type=int_at_least(1, 65_536), default=128)
    args = parser.parse_args(argv)
    fastrnn.set_num_threads(args.threads)
    B, T, D, H = args.batch, args.steps, args.input, args.hidden
    x = np.random.default_rng(0).random((T, B, D)).astype(args.dtype)
    dout = np.ones((T, B, H), args.dtype)
    print(f"b{B}-t{T}-d{D}-h{H}, {args.dtype}, {args.threads} thread(s), {args.repeats} runs "
          f"each: minimum (median) ms")
    for cls in (fastrnn.LSTM, fastrnn.GRU):
        layers = [cls(D, H, dtype=args.dtype, layer_norm=ln, seed=0) for ln in (False, True)]

        def infer(layer):
            layer(x)

        def train(layer):
            (_, _), backprop = layer.forward_train(x)
            backprop(dout)

        for what, run in (("forward", infer), ("training step", train)):
            times = [[], []]
            for layer in layers:   # warm up (packing, caches)
                run(layer)
            for _ in range(args.repeats):
                for k, layer in enumerate(layers):
                    start = time.perf_counter()
                    run(layer)
                    times[k].append(time.perf_counter() - start)
            (plain, normed), (plain_med, normed_med) = (
                [1000 * float(f(t)) for t in times] for f in (np.min, np.median))
            print(f"{cls.__name__:<5} {what:<14} plain {plain:7.2f} ({plain_med:7.2f})   "
                  f"layer_norm {normed:7.2f} ({normed_med:7.2f})   {normed / plain:.2f}x "
                  f"({normed_med / plain_med:.2f}x)")


if __name__ == "__main__":
    main()
