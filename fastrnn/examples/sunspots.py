"""Example 1: a Keras sunspot model (two SimpleRNN(50)), trained with fastrnn.

The Keras original:

    model = Sequential()
    model.add(SimpleRNN(units=50, return_sequences=True, input_shape=(X.shape[1], 1)))
    model.add(Dropout(0.2))
    model.add(SimpleRNN(units=50))
    model.add(Dropout(0.2))
    model.add(Dense(1))
    model.compile(optimizer='adam', loss='mean_squared_error')
    history = model.fit(X, y, epochs=50, batch_size=32, validation_split=0.2, verbose=1)

Same architecture and settings here; the data are the 309 yearly sunspot
numbers (1700-2008, NOAA, public domain) scaled to [0, 1], in windows of 10
years predicting the next. Run: ``fastrnn sunspots`` (or ``fastrnn demo``).
"""
import argparse
import os
import time

import numpy as np

import fastrnn
from fastrnn.batching import held_out
from fastrnn.datasets import load_sunspots, windows
from fastrnn.examples import _cli


def build(seed=0):
    return fastrnn.Sequential([
        fastrnn.RNN(1, 50, batch_first=True, seed=seed),           # SimpleRNN(50, return_sequences)
        fastrnn.Dropout(0.2, seed=seed + 1),
        fastrnn.RNN(50, 50, batch_first=True, seed=seed + 2),      # SimpleRNN(50)
        fastrnn.LastStep(),
        fastrnn.Dropout(0.2, seed=seed + 3),
        fastrnn.Linear(50, 1, seed=seed + 4),                      # Dense(1)
    ], seed=seed)


def main(epochs=50, plot="sunspots_loss.png", seed=0, verbose=1):
    years, values = load_sunspots()
    scaled = (values - values.min()) / (values.max() - values.min())
    x, y = windows(scaled, steps=10)
    x, y = x.astype(np.float32), y.astype(np.float32)

    model = build(seed)
    model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3))
    start = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=32, validation_split=0.2,
                        verbose=verbose)
    seconds = time.perf_counter() - start

    n_val = held_out(len(x), 0.2)   # the windows fit held out for validation
    x_val, y_val = x[-n_val:], y[-n_val:]
    val_mse = model.evaluate(x_val, y_val)
    naive_mse = float(np.mean((x_val[:, -1] - y_val) ** 2))  # next year = this year
    print(f"\ntrained {epochs} epochs in {seconds:.2f} s "
          f"({1e3 * seconds / (epochs * int(np.ceil((len(x) - n_val) / 32))):.2f} ms per batch)")
    print(f"validation MSE (scaled units), years {years[-n_val]}-{years[-1]}:")
    print(f"  fastrnn model            {val_mse:.4f}   (best epoch "
          f"{min(history.history['val_loss']):.4f})")
    print(f"  naive last-value         {naive_mse:.4f}")
    if plot:
        print(_save_plot(history, plot))
    return history, val_mse, naive_mse


def _save_plot(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install 'fastrnn[plot]')"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(history.history["loss"], label="Training Loss")
    ax.plot(history.history["val_loss"], label="Validation Loss")
    ax.set_title("Model Loss During Training (fastrnn, sunspots)")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Loss (MSE)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"loss plot saved to {os.path.abspath(path)}"


def cli(argv=None, prog="fastrnn sunspots"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=_cli.epochs, default=50,
                        help="training epochs (default 50, at most 100,000)")
    parser.add_argument("--plot", type=_cli.writable_path, default="sunspots_loss.png",
                        help="where to save the loss plot, replacing a file there ('' for "
                             "none; default sunspots_loss.png in the current directory)")
    parser.add_argument("--seed", type=_cli.seed, default=0,
                        help="random seed of the weights and shuffling (default 0)")
    args = parser.parse_args(argv)
    history = main(args.epochs, "", args.seed)[0]
    if args.plot:
        try:
            print(_save_plot(history, args.plot))
        except OSError as exc:    # checked before the run, it could not be written after it
            parser.exit(1, f"{prog}: error: cannot write the loss plot {args.plot!r}: "
                           f"{exc.strerror or exc}\n")


def demo_cli(argv=None):
    """``fastrnn demo``: example 1 under the name the user typed."""
    cli(argv, prog="fastrnn demo")


if __name__ == "__main__":
    cli()
