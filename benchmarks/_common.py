"""What the benchmarks (and the tests that check their claims) measure the same way: XLA compilations and peak RSS."""

from __future__ import annotations

import contextlib
import resource

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as compiles:` -> a list that gets one entry (the seconds it took) per XLA compilation
    of any function while the block runs; `len(compiles)` after a step loop is how many times it compiled."""
    import jax

    compiles: list[float] = []

    def listener(event, secs, **_):
        if event == COMPILE_EVENT:
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def peak_rss_gib() -> float:
    """This process's peak resident set size (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
