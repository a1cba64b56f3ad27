"""Forcing a plan choice in a test: the thread count and the plan's tuning
constants (fastrnn/_plan.py) set for the duration of a monkeypatch context."""
from fastrnn import _parallel, _plan


def force_plan(monkeypatch, settings):
    """settings: {"threads": n, <tuning constant>: value, ...}."""
    settings = dict(settings)
    monkeypatch.setattr(_parallel, "_threads", settings.pop("threads"))
    # a unit split waits for its worker however slow it is to wake, never backs off
    monkeypatch.setattr(_plan, "UNIT_SPLIT_WAIT_NS", 10**10)
    monkeypatch.setattr(_plan, "_backoff", 0)
    for name, value in settings.items():
        monkeypatch.setattr(_plan, name, value)
