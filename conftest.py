"""pytest's shared fixtures for the whole checkout: tests/ and the families' tests (medjax/models/<family>/tests/).
The shared helpers (paths, the fixtures, both CLIs on a fixture, the parity comparison) are in medjax.testing."""

import os
import tempfile

# One persistent XLA compilation cache for the test session and every process it starts (set before jax is imported;
# subprocesses inherit the environment): the trainer's command-line runs compile the same small models again and
# again. Measured on 2 cores: the demo run 16.3 s cold, 12.1 s with a warm cache. A user's own setting is kept.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"medjax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 - after the cache's environment above
import pytest  # noqa: E402


@pytest.fixture
def matmul_f32():
    with jax.default_matmul_precision("float32"):
        yield
