"""Threads whose calls interleave, for the tests of shared objects."""
import sys
import threading


def run_interleaved(targets):
    """Run each callable in a thread of its own at once, the interpreter
    switching between them every 10 us (a call takes microseconds), and
    wait for them all."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
