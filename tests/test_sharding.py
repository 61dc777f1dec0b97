"""The same train step on 1 device, 8 emulated CPU devices (data parallel, FSDP, both) and 2 processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from medjax.testing import ROOT


def _run(devices: int, *args, env_extra=None, background=False):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "tests", "sharded_run.py"), *map(str, args)]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_device():
    return _run(1, 1, 1)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (1, 8), (2, 4)])
def test_mesh_matches_one_device(single_device, data, fsdp):
    out = _run(8, data, fsdp)
    assert out["devices"] == 8
    np.testing.assert_allclose(out["losses"], single_device["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["param_sq_sum"], single_device["param_sq_sum"], rtol=1e-5)
    # FSDP really shards: the (128, 256) MLP kernel is split over the fsdp axis
    assert out["fc1_shards"] == ([[128, 256 // fsdp]] if fsdp > 1 else [[128, 256]])
    assert single_device["losses"][0] != single_device["losses"][-1]


def test_two_processes_match_one(single_device):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_run(1, 2, 1, i, 2, port, background=True) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for out in outs:
        assert out["devices"] == 2
        np.testing.assert_allclose(out["losses"], single_device["losses"], rtol=1e-5, atol=1e-6)
