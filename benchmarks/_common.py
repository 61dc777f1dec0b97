"""What the benchmarks (and the tests that check their claims) measure the same way: XLA compilations, peak RSS and
the median time of a call."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time

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


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `fn()` over `repeats` calls, after two untimed warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
