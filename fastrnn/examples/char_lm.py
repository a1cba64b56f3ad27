"""Example 3: a character-level language model (GRU) on Shakespeare's Hamlet.

One-hot characters in, a GRU, and a Linear layer giving next-character
logits at every step, trained with per-step softmax cross-entropy on random
64-character windows of Acts I and II (public domain, shipped in the
package). After training it samples new text one character at a time,
carrying the GRU state between calls. Run: ``fastrnn charlm``.
"""
import argparse
import time

import numpy as np

import fastrnn
from fastrnn.datasets import load_hamlet
from fastrnn.examples import _cli


def one_hot(codes, vocab_size):
    return np.eye(vocab_size, dtype=np.float32)[codes]


def sample(gru, head, vocab, start, length, temperature, rng):
    """Generate text: feed the start, then each sampled character."""
    index = {ch: i for i, ch in enumerate(vocab)}
    h = None
    text = start
    x = one_hot(np.array([[index[ch] for ch in start]]), len(vocab))     # (1, T, V)
    for _ in range(length):
        out, h = gru(x, h)                       # state carried between calls
        logits = head(out[0, -1]) / temperature
        p = np.exp(logits - logits.max())
        ch = vocab[rng.choice(len(vocab), p=p / p.sum())]
        text += ch
        x = one_hot(np.array([[index[ch]]]), len(vocab))
    return text


def main(hidden=128, steps=64, epochs=12, windows_per_epoch=1600, seed=0, verbose=2):
    text = load_hamlet()
    vocab = sorted(set(text))
    codes = np.array([vocab.index(ch) for ch in text])
    rng = np.random.default_rng(seed)
    V = len(vocab)

    def random_windows(n):
        starts = rng.integers(0, len(codes) - steps - 1, n)
        idx = starts[:, None] + np.arange(steps)
        return one_hot(codes[idx], V), codes[idx + 1]       # inputs, next characters

    gru = fastrnn.GRU(V, hidden, batch_first=True, seed=seed)
    head = fastrnn.Linear(hidden, V, seed=seed + 1)
    model = fastrnn.Sequential([gru, head], seed=seed)
    model.compile(loss=fastrnn.CrossEntropyLoss(), optimizer=fastrnn.optim.Adam(lr=3e-3),
                  clip_grad_norm=5.0)
    x_val, y_val = random_windows(256)
    print(f"{len(text)} characters, {V} distinct; GRU({V}, {hidden}) -> Linear({hidden}, {V}); "
          f"uniform guessing scores {np.log(V):.2f} nats per character")
    start = time.perf_counter()
    for epoch in range(epochs):
        x, y = random_windows(windows_per_epoch)
        history = model.fit(x, y, epochs=1, batch_size=32, verbose=0)
        if verbose:
            print(f"epoch {epoch + 1:2d}/{epochs}: loss {history.history['loss'][0]:.3f}, "
                  f"validation {model.evaluate(x_val, y_val):.3f} nats per character")
    seconds = time.perf_counter() - start
    val = model.evaluate(x_val, y_val)
    print(f"trained in {seconds:.1f} s; validation cross-entropy {val:.3f} nats per character\n")
    print(sample(gru, head, vocab, "HAMLET:\n", 400, 0.7, rng))
    return val


def cli(argv=None):
    parser = argparse.ArgumentParser(prog="fastrnn charlm",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=_cli.int_at_least(1, 4096), default=128,
                        help="hidden size (default 128)")
    parser.add_argument("--epochs", type=_cli.epochs, default=12,
                        help="training epochs (default 12, at most 100,000)")
    parser.add_argument("--seed", type=_cli.seed, default=0,
                        help="random seed of the weights and data (default 0)")
    args = parser.parse_args(argv)
    main(args.hidden, epochs=args.epochs, seed=args.seed)


if __name__ == "__main__":
    cli()
