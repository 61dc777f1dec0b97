"""pytest's shared fixtures for the whole checkout: tests/ and the families' tests (medjax/models/<family>/tests/).
The shared helpers (paths, the fixtures, both CLIs on a fixture, the parity comparison) are in medjax.testing."""

import jax
import pytest


@pytest.fixture
def matmul_f32():
    with jax.default_matmul_precision("float32"):
        yield
