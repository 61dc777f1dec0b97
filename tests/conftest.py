import os
import subprocess
import sys

import numpy as np
import pytest

from medjax.models.fixtures import perturb_  # noqa: F401 (the tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PARITY_TOL = 2e-5


def fixture_path(family, *names):
    return os.path.join(FIXTURES, family, *names)


def run_cli(*args, check=True):
    """Run `python -m ...` as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def convert_and_embed(tmp_path, family, checkpoint, model, config, *extra):
    """A fixture through the CLIs as a user runs them: `python -m converters` then `python -m medjax.embed` on its
    images (`checkpoint` relative to the fixture's folder, or a path). Returns (the embed outputs, the fixture's
    expected.npz, the converter's stdout)."""
    out_dir, out_npz = tmp_path / "params", tmp_path / "out.npz"
    proc = run_cli("converters", fixture_path(family, checkpoint), str(out_dir), "--model", model, "--config", config,
                   *extra)
    run_cli("medjax.embed", "--params", str(out_dir), "--images", fixture_path(family, "images.npy"),
            "--output", str(out_npz))
    return np.load(out_npz), np.load(fixture_path(family, "expected.npz")), proc.stdout


def assert_fixture_outputs(got, expected, family, skip=(), tol=PARITY_TOL) -> list:
    """Every expected array but `skip` matches the embed output within `tol` (a fixture's debug_NAME may be an
    upstream output medjax exposes as NAME, e.g. x_norm_regtokens); returns the keys compared."""
    compared = []
    for key in expected.files:
        if key in skip:
            continue
        name = key if key in got.files else key.removeprefix("debug_")
        assert name in got.files, f"{key} missing from medjax.embed output ({got.files})"
        diff = max_abs(got[name], expected[key])
        assert diff <= tol, f"{family}/{key}: max abs diff {diff:.3g}"
        compared.append(key)
    return compared


def train_two_steps(eng, size: int) -> tuple[dict, set]:
    """Two train steps of an engine on one fixed grayscale batch of 4 (classes 0, 1, 2, 1); returns the flat
    parameters before and the set of parameter paths that changed."""
    import jax
    import jax.numpy as jnp

    from medjax.pretrained import flatten

    before = flatten(jax.device_get(eng.state.params))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((4, size, size, 1)), jnp.float32),
             "label": jnp.asarray([0, 1, 2, 1])}
    state = eng.state
    for _ in range(2):
        state, metrics = eng.train_step(state, batch)
        assert bool(metrics["finite"])
    after = flatten(jax.device_get(state.params))
    return before, {k for k in before if not np.array_equal(before[k], after[k])}


def max_abs(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


@pytest.fixture
def matmul_f32():
    import jax

    with jax.default_matmul_precision("float32"):
        yield
