"""The main job end to end: the demo config (smaller), resume, and a SIGKILL mid-training."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from medjax.testing import ROOT

FAST = ["--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False"]


def _main(workdir, data_root, *overrides, check=True, devices=1, config="configs/demo.py", cwd=ROOT):
    cmd = [sys.executable, "-m", "medjax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data_root={data_root}", *FAST, *overrides]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "CheXpert-v1.0-small")


def test_demo_trains_end_to_end(tmp_path, data_root):
    (tmp_path / "empty").mkdir()  # the recipe by name, from a directory that is not the checkout
    proc = _main(tmp_path / "run", data_root, config="demo", cwd=tmp_path / "empty")
    assert "val mean_auc" in proc.stdout and "test mean_auc" in proc.stdout
    result = json.load(open(tmp_path / "run" / "metrics.json"))
    assert result["dataset"] == "chexpert" and result["target_metric"] == "mean_auc"
    assert result["test"]["num_examples"] > 0 and len(result["test"]["roc_auc_per_class"]) == 14
    assert result["val"]["num_examples"] > 0 and result["best_step"] in [h["step"] for h in result["history"]]
    assert os.listdir(tmp_path / "run" / "tensorboard")
    # a second run in the same work directory resumes at the end and does not train again
    again = _main(tmp_path / "run", data_root)
    assert "Resumed from" in again.stdout
    # the checkpoint of a 1-device run restores onto 8 devices with FSDP sharding and trains one more epoch
    more = _main(tmp_path / "run", data_root, "--config.epochs=3", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                 devices=8)
    assert "Resumed from" in more.stdout and "(epoch 3.00)" in more.stdout


def _final_params(workdir):
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    with ocp.StandardCheckpointer() as c:
        restored = c.restore(os.path.join(ckpt, str(step), "state"))
    return step, restored["params"]


def test_sigkill_and_resume_is_bitwise_identical(tmp_path, data_root):
    extra = ["--config.checkpoint_every=3", "--config.eval_every=100"]
    _main(tmp_path / "a", data_root, *extra)
    killed = _main(tmp_path / "b", data_root, *extra, "--config.debug_sigkill_at_step=5", check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "b" / "metrics.json")
    resumed = _main(tmp_path / "b", data_root, *extra)
    assert "at step 3" in resumed.stdout  # the last checkpoint before the kill
    step_a, params_a = _final_params(tmp_path / "a")
    step_b, params_b = _final_params(tmp_path / "b")
    assert step_a == step_b
    import jax

    leaves_a, leaves_b = jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    a_test, b_test = (json.load(open(tmp_path / run / "metrics.json"))["test"] for run in ("a", "b"))
    assert a_test == b_test


def test_missing_data_and_weights_say_what_to_run(tmp_path):
    proc = _main(tmp_path / "run", str(tmp_path / "nowhere"), "--config.fake_data=0", check=False)
    assert proc.returncode != 0 and "python -m medjax.data fake --dataset chexpert" in proc.stderr + proc.stdout
    proc = _main(tmp_path / "run", str(tmp_path / "nowhere"), "--config.model.pretrained=/nonexistent",
                 check=False)
    assert proc.returncode != 0 and "python -m converters CHECKPOINT /nonexistent" in proc.stderr + proc.stdout


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    proc = _main(tmp_path / "run", data_root, "--config.optim.lr=1e30", "--config.optim.warmup_steps=2",
                 "--config.checkpoint_every=1", "--config.eval_every=100", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite loss" in proc.stderr and "last good checkpoint is step" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.json")
    step, params = _final_params(tmp_path / "run")
    import jax

    assert step >= 1 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
