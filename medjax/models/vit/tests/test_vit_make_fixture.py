"""The fixture scripts whose upstream is in the test environment (transformers) regenerate their committed fixtures:
`python -m medjax.models.vit.make_fixture hf_vit|hf_clip` writes the same weights and images bit for bit and the same
outputs (bit for bit on the CPUs checked, within float32 kernel differences elsewhere). The scripts whose upstream
is not installed here (timm, open_clip, the dinov2 / ml-aim / sam2 / VMamba checkouts) are not run in CI."""

import json

import numpy as np
import pytest
import safetensors.numpy

from medjax.models.vit import make_fixture
from medjax.testing import fixture_path

# float32 results of the same upstream code on other CPUs' kernels (oneDNN's convolution, MKL): well below the
# parity tolerance, far above what a wrong seed, recipe or config would give (O(0.1))
KERNEL_TOL = 1e-5


@pytest.mark.parametrize("name", ["hf_vit", "hf_clip"])
def test_transformers_fixture_scripts_reproduce_their_fixtures(tmp_path, name):
    make_fixture.FIXTURES[name](str(tmp_path))
    got = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    want = safetensors.numpy.load_file(fixture_path(name, "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert np.array_equal(np.load(tmp_path / "images.npy"), np.load(fixture_path(name, "images.npy")))
    got, want = np.load(tmp_path / "expected.npz"), np.load(fixture_path(name, "expected.npz"))
    assert got.files == want.files
    for key in want.files:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=KERNEL_TOL, err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    with open(fixture_path(name, "config.json")) as f:
        committed = json.load(f)
    for c in (config, committed):
        c.pop("transformers_version")
        c["upstream"].pop("version")
        c["upstream"].pop("versions")
    assert config == committed
