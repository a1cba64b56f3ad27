"""int8 and bfloat16 inference of the shipped examples' trained models: the
task metric and the deviation of the outputs from float32.

Trains each example's model as its ``fastrnn <example>`` command does (same
data, seeds, epochs), then quantizes it (``fastrnn.quantize``: int8 per-channel
and per-tensor, bfloat16) and, where PyTorch is installed, also runs PyTorch's dynamic
int8 quantization of the same weights (``torch.ao.quantization.quantize_dynamic``
of ``fastrnn.to_torch``'s module, per-tensor, its default). Prints, per model,
the validation metric (MSE, or nats per character) of float32 and of each
int8 version, its relative change, and the max / mean abs deviation of the
outputs from float32's.

    python benchmarks/quantized_examples.py [--quick]

``--quick`` trains for fewer epochs (a check that it runs, not the figures).
"""
import argparse
import time
import warnings

import numpy as np

import fastrnn
from fastrnn.datasets import load_hamlet, load_sunspots, windows
from fastrnn.examples import adding_problem, char_lm, sunspots


def _torch_int8(model):
    """The model's outputs through PyTorch's dynamic int8 (its recurrent layer
    and Linear quantized; the other layers applied in NumPy), or None."""
    try:
        import torch
        from torch.ao import quantization as tq
    except ImportError:
        return None
    steps = []
    for layer in model.layers:
        if isinstance(layer, (fastrnn.LSTM, fastrnn.GRU)):
            module = fastrnn.to_torch(layer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = tq.quantize_dynamic(torch.nn.Sequential(module), {type(module)},
                                        dtype=torch.qint8)[0]
            steps.append(("rnn", q, layer.batch_first))
        elif isinstance(layer, fastrnn.Linear):
            module = torch.nn.Linear(layer.in_features, layer.out_features)
            module.load_state_dict({k: torch.from_numpy(v) for k, v in
                                    layer.state_dict().items()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = tq.quantize_dynamic(torch.nn.Sequential(module), {torch.nn.Linear},
                                        dtype=torch.qint8)[0]
            steps.append(("linear", q, None))
        elif isinstance(layer, fastrnn.RNN):
            return None    # PyTorch has no dynamically quantized RNN layer
        else:
            steps.append(("numpy", layer, None))

    def run(x):
        with torch.inference_mode():
            for kind, module, batch_first in steps:
                if kind == "numpy":
                    x = module._seq_infer(x)
                elif kind == "linear":
                    x = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
                else:
                    t = torch.from_numpy(np.ascontiguousarray(x if batch_first
                                                              else x.swapaxes(0, 1)))
                    out = module(t)[0].numpy()
                    x = out if batch_first else out.swapaxes(0, 1)
        return x
    return run


def report(name, model, x_val, y_val, metric):
    """One row per version: metric, its change, deviation of the outputs."""
    ref_out = model.predict(x_val)
    ref = metric(ref_out, y_val)
    print(f"{name:<22}{'float32':<16}{ref:>10.4f}{'':>9}{'':>22}")
    versions = [("int8 per-channel", fastrnn.quantize(model).predict),
                ("int8 per-tensor", fastrnn.quantize(model, per_channel=False).predict),
                ("bfloat16", fastrnn.quantize(model, dtype="bfloat16").predict)]
    torch_run = _torch_int8(model)
    if torch_run is not None:
        versions.append(("torch int8", torch_run))
    rows = {}
    for label, predict in versions:
        out = predict(x_val)
        value = metric(out, y_val)
        dev = np.abs(out - ref_out)
        rows[label] = value
        print(f"{'':<22}{label:<16}{value:>10.4f}{(value - ref) / ref:>+8.2%}"
              f"{dev.max():>11.1e}{dev.mean():>11.1e}")
    return ref, rows


def mse(out, y):
    return float(np.mean((out - y) ** 2))


def main(quick=False):
    """Train, quantize and report every example; returns {model: (float32
    metric, {version: int8 metric})}."""
    results = {}
    print(f"{'model':<22}{'version':<16}{'metric':>10}{'change':>9}{'max dev':>11}"
          f"{'mean dev':>11}")
    start = time.perf_counter()
    # sunspots: validation MSE on the windows fit held out (validation_split=0.2)
    years, values = load_sunspots()
    scaled = (values - values.min()) / (values.max() - values.min())
    x, y = windows(scaled, steps=10)
    x, y = x.astype(np.float32), y.astype(np.float32)
    model = sunspots.build(0)
    model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-3))
    model.fit(x, y, epochs=5 if quick else 50, batch_size=32, validation_split=0.2, verbose=0)
    n_val = fastrnn.batching.held_out(len(x), 0.2)
    results["sunspots"] = report("sunspots (val MSE)", model, x[-n_val:], y[-n_val:], mse)

    # char-LM: validation cross-entropy, nats per character
    text = load_hamlet()
    vocab = sorted(set(text))
    codes = np.array([vocab.index(ch) for ch in text])
    rng = np.random.default_rng(0)
    V = len(vocab)

    def random_windows(n):
        starts = rng.integers(0, len(codes) - 64 - 1, n)
        idx = starts[:, None] + np.arange(64)
        return char_lm.one_hot(codes[idx], V), codes[idx + 1]

    gru = fastrnn.GRU(V, 128, batch_first=True, seed=0)
    head = fastrnn.Linear(128, V, seed=1)
    model = fastrnn.Sequential([gru, head], seed=0)
    loss = fastrnn.CrossEntropyLoss()
    model.compile(loss=loss, optimizer=fastrnn.optim.Adam(lr=3e-3), clip_grad_norm=5.0)
    x_val, y_val = random_windows(256)
    for _ in range(2 if quick else 12):
        xs, ys = random_windows(1600)
        model.fit(xs, ys, epochs=1, batch_size=32, verbose=0)
    results["char-LM"] = report("char-LM (nats/char)", model, x_val, y_val,
                                lambda out, y: float(loss.value_and_grad(out, y)[0]))

    # the adding problem, T = 100: validation MSE of each cell
    rng = np.random.default_rng(0)
    x, y = adding_problem.make_data(6400, 100, rng)
    x_val, y_val = adding_problem.make_data(1000, 100, rng)
    for kind in ("RNN", "GRU", "LSTM"):
        model = adding_problem.build(kind, 32, 0)
        model.compile(loss="mse", optimizer=fastrnn.optim.Adam(lr=1e-2), clip_grad_norm=1.0)
        model.fit(x, y, epochs=2 if quick else 12, batch_size=64, verbose=0)
        results[f"adding {kind}"] = report(f"adding {kind} (val MSE)", model, x_val, y_val,
                                           mse)
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs: a smoke test")
    main(parser.parse_args().quick)
