"""Small public-domain data sets shipped with fastrnn (see data/README.md)."""
from __future__ import annotations

from importlib import resources

import numpy as np
from numpy.typing import ArrayLike

from fastrnn import _validation as v


def _read_text(name):
    return resources.files("fastrnn").joinpath("data", name).read_text(encoding="utf-8")


def load_sunspots() -> tuple[np.ndarray, np.ndarray]:
    """Yearly mean sunspot numbers 1700-2008 (NOAA NGDC; public domain).

    Returns
    -------
    years : ndarray of shape (309,), int
    values : ndarray of shape (309,), float64
    """
    rows = [line.split(",") for line in _read_text("sunspots.csv").splitlines()[1:] if line]
    table = np.array(rows, dtype=np.float64)
    return table[:, 0].astype(np.int64), table[:, 1]


def load_hamlet() -> str:
    """Shakespeare's Hamlet, Acts I and II, as one plain-text string (public domain)."""
    return _read_text("hamlet_acts_1_2.txt")


def windows(series: ArrayLike, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows for one-step-ahead forecasting.

    Returns x of shape (N - steps, steps, 1), the windows, and y of shape
    (N - steps, 1), the value after each window (both new arrays: changing
    them leaves the series as it was).
    """
    steps = v.check_int("windows", "steps", steps, minimum=1)
    series = v.to_numpy("windows", "series", series)
    series = np.asarray(series, dtype=np.float64)
    if series.ndim != 1 or not steps < len(series):
        raise ValueError(f"windows: expected a 1-D series longer than steps={steps}, "
                         f"got shape {series.shape}")
    idx = np.arange(steps)[None, :] + np.arange(len(series) - steps)[:, None]
    return series[idx][..., None], series[steps:, None].copy()
