"""Example 2: vanishing gradients made visible with the adding problem.

Each input is T steps of (value, marker): values ~ U(0, 1), and exactly two
markers are 1, one in each half of the sequence. The target is the sum of
the two marked values. Predicting the mean (1.0) scores MSE = 1/6 ~ 0.167;
to do better a model must carry a value across up to T steps. Trained with
RNN, GRU and LSTM of the same size, the gated cells learn it; the plain RNN
does not, and the gradient reaching the early steps shows why.
Run: ``fastrnn adding``.
"""
import argparse
import time

import numpy as np

import fastrnn
from fastrnn.examples import _cli


def make_data(n, steps, rng):
    x = np.zeros((n, steps, 2), np.float32)
    x[:, :, 0] = rng.random((n, steps))
    first = rng.integers(0, steps // 2, n)
    second = rng.integers(steps // 2, steps, n)
    rows = np.arange(n)
    x[rows, first, 1] = 1
    x[rows, second, 1] = 1
    y = (x[rows, first, 0] + x[rows, second, 0])[:, None]
    return x, y


def build(kind, hidden, seed):
    layer = {"RNN": fastrnn.RNN, "GRU": fastrnn.GRU, "LSTM": fastrnn.LSTM}[kind]
    recurrent = layer(2, hidden, batch_first=True, seed=seed)
    if kind == "LSTM":
        # forget-gate bias 1 (Keras' unit_forget_bias): remember by default
        bias = recurrent.bias_ih_l0.copy()
        bias[hidden:2 * hidden] = 1.0
        recurrent.bias_ih_l0 = bias
        recurrent.bias_hh_l0 = np.zeros_like(bias)
    return fastrnn.Sequential([recurrent, fastrnn.LastStep(),
                               fastrnn.Linear(hidden, 1, seed=seed + 1)], seed=seed)


def early_gradient_ratio(model, x, y):
    """|dL/dx| on the first 10 steps over the last 10 (1 = no decay); of
    fewer steps, the first and the last half (windows of 10 overlapped there,
    and at 10 steps or fewer were the same: 1.00 whatever the cell)."""
    out, backprops = x, []
    for layer in model.layers:
        out, backprop = layer._seq_train(out)
        backprops.append(backprop)
    _, grad = model.loss.value_and_grad(out, y)
    for backprop in reversed(backprops):
        grad = backprop(grad)
    model.zero_grad()
    per_step = np.abs(grad).sum(axis=(0, 2))
    window = min(10, len(per_step) // 2)
    return per_step[:window].mean() / per_step[-window:].mean()


def main(steps=100, hidden=32, epochs=12, n_train=6400, seed=0, verbose=0):
    rng = np.random.default_rng(seed)
    x, y = make_data(n_train, steps, rng)
    x_val, y_val = make_data(1000, steps, rng)
    print(f"adding problem, T={steps}, hidden {hidden}, {n_train} training sequences, "
          f"{epochs} epochs; predicting the mean scores MSE {np.var(y_val):.3f}")
    print(f"{'cell':<6}{'val MSE':>10}{'early/late grad (init)':>26}{'(trained)':>12}{'time s':>9}")
    results = {}
    for kind in ("RNN", "GRU", "LSTM"):
        model = build(kind, hidden, seed)
        model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-2), clip_grad_norm=1.0)
        ratio_init = early_gradient_ratio(model, x_val[:256], y_val[:256])
        start = time.perf_counter()
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=verbose)
        seconds = time.perf_counter() - start
        mse = model.evaluate(x_val, y_val)
        ratio = early_gradient_ratio(model, x_val[:256], y_val[:256])
        results[kind] = mse
        print(f"{kind:<6}{mse:>10.4f}{ratio_init:>26.2e}{ratio:>12.2e}{seconds:>9.1f}")
    return results


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="fastrnn adding",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=_cli.int_at_least(2, 10_000), default=100,
                        help="sequence length T, at least 2 (default 100)")
    parser.add_argument("--hidden", type=_cli.int_at_least(1, 4096), default=32,
                        help="hidden size (default 32)")
    parser.add_argument("--epochs", type=_cli.epochs, default=12,
                        help="training epochs (default 12, at most 100,000)")
    parser.add_argument("--seed", type=_cli.seed, default=0,
                        help="random seed of the weights and data (default 0)")
    args = parser.parse_args(argv)
    main(args.steps, args.hidden, args.epochs, seed=args.seed)


if __name__ == "__main__":
    cli()
