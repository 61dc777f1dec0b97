"""The trainer with every variable collection (a BatchNorm network's `batch_stats`), and the save path's atomicity:
kills in the exact windows of the save path, restarts with another config, converted folders round-tripping every
collection."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax import models, pretrained
from medjax.testing import ROOT

FAST = ["--config.fake_data=96", "--config.epochs=2", "--config.batch_size=8", "--config.progress_bar=False"]


def _main(config, workdir, data_root, *overrides, devices=1):
    cmd = [sys.executable, "-m", "medjax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.data_root={data_root}", *FAST, *overrides]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "CheXpert-v1.0-small")


def _state(workdir):
    import orbax.checkpoint as ocp

    ckpt = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    path = os.path.join(ckpt, str(step), "state")
    with ocp.StandardCheckpointer() as c:  # onto this process's one device, whatever mesh wrote it
        meta = c.metadata(path).item_metadata
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                          meta.tree if hasattr(meta, "tree") else meta)
        return step, c.restore(path, abstract)


def _same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.slow
def test_batchnorm_run_resumes_bitwise_after_sigkill_and_onto_8_devices(tmp_path, data_root):
    extra = ["--config.model.freeze=full", "--config.checkpoint_every=3", "--config.eval_every=100"]
    a = _main("tests/bn_demo.py", tmp_path / "a", data_root, *extra)
    assert a.returncode == 0, a.stderr[-3000:]
    assert "batch_stats" in a.stdout  # the start-up table lists the collection
    killed = _main("tests/bn_demo.py", tmp_path / "b", data_root, *extra, "--config.debug_sigkill_at_step=5")
    assert killed.returncode == -signal.SIGKILL
    resumed = _main("tests/bn_demo.py", tmp_path / "b", data_root, *extra)
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout, resumed.stderr[-3000:]
    (sa, state_a), (sb, state_b) = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert sa == sb and _same(state_a["params"], state_b["params"])
    assert state_a["model_state"]["batch_stats"] and _same(state_a["model_state"], state_b["model_state"])
    stats = state_a["model_state"]["batch_stats"]["backbone"]["bn1"]
    assert not np.allclose(np.asarray(stats["var"]), 1.0)  # trained: the running statistics moved
    a_test, b_test = (json.load(open(tmp_path / run / "metrics.json"))["test"] for run in ("a", "b"))
    assert a_test == b_test
    more = _main("tests/bn_demo.py", tmp_path / "a", data_root, *extra, "--config.epochs=3", "--config.mesh.data=1",
                 "--config.mesh.fsdp=8", devices=8)
    assert more.returncode == 0 and "Resumed from" in more.stdout, more.stderr[-3000:]
    step, state = _state(tmp_path / "a")
    assert step > sa and not _same(state["model_state"], state_a["model_state"])


@pytest.mark.slow
def test_frozen_batchnorm_keeps_running_statistics_bitwise(tmp_path, data_root):
    proc = _main("tests/bn_demo.py", tmp_path / "run", data_root, "--config.model.freeze=frozen",
                 "--config.total_steps=4", "--config.checkpoint_every=4", "--config.eval_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, state = _state(tmp_path / "run")
    config = models.config_from_dict("resnet", {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0,
                                                "img_size": 32, "in_chans": 1})
    init = jax.eval_shape(lambda: models.build_backbone(config).init(jax.random.key(0), np.zeros((1, 32, 32, 1))))
    stats = pretrained.flatten(state["model_state"]["batch_stats"]["backbone"])
    assert stats.keys() == pretrained.flatten(init["batch_stats"]).keys()
    for path, value in stats.items():  # a fresh BatchNorm's statistics: mean 0, var 1, untouched by training
        assert np.array_equal(np.asarray(value), np.zeros_like(value) if path.endswith("mean") else np.ones_like(value))
    assert "frozen: stored statistics" in proc.stdout


def test_converted_folder_round_trips_every_collection(tmp_path):
    config = models.config_from_dict("resnet", {"block": "basic", "layers": (1, 1, 1, 1), "num_classes": 0,
                                                "img_size": 32})
    variables = models.build_backbone(config).init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.standard_normal(x.shape).astype(np.float32),
                                       dict(variables))
    pretrained.save(str(tmp_path / "bb"), variables, {"family": "resnet", "architecture": config.to_dict()})
    _, loaded, meta = models.load_pretrained(str(tmp_path / "bb"))
    assert set(loaded) == {"params", "batch_stats"}
    assert len(meta["digests"]) == len(pretrained.flatten_variables(variables))
    assert _same(loaded, variables)
    assert pretrained.flatten_variables(loaded).keys() == pretrained.flatten_variables(variables).keys()
    # a damaged tensor is named, not loaded
    path = tmp_path / "bb" / pretrained.PARAMS_FILE
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(pretrained.PretrainedError, match="differ from the digests"):
        models.load_pretrained(str(tmp_path / "bb"))
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(pretrained.PretrainedError, match="damaged or truncated"):
        models.load_pretrained(str(tmp_path / "bb"))


# ------------------------------------------------------------------------------------------------ save-path windows


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_best", "after_checkpoint"])
def test_kill_in_the_save_path_loses_nothing(tmp_path, data_root, point):
    """A kill right after the best model is written (before its checkpoint), or right after a checkpoint (before the
    old best model is removed): the resumed run ends with the uninterrupted run's metrics.json and state."""
    reference = tmp_path / "ref"
    assert _main("configs/demo.py", reference, data_root).returncode == 0
    run = tmp_path / point
    killed = _main("configs/demo.py", run, data_root, f"--config.debug_sigkill_at={point}")
    assert killed.returncode == -signal.SIGKILL
    assert os.listdir(run / "best")  # at every moment a complete best model is on disk
    resumed = _main("configs/demo.py", run, data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.load(open(reference / "metrics.json")) == json.load(open(run / "metrics.json"))
    assert _same(_state(reference)[1], _state(run)[1])
    assert os.listdir(run / "best") == [f"step_{json.load(open(run / 'metrics.json'))['best_step']}"]


def test_restart_with_another_config_is_refused_naming_the_fields(tmp_path, data_root):
    first = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                  "--config.checkpoint_every=2", "--config.eval_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    again = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                  "--config.checkpoint_every=2", "--config.eval_every=2", "--config.batch_size=16", "--config.seed=1")
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "batch_size: 8 -> 16" in lines[0] and "seed" in lines[0]
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics  # nothing rewritten
    harmless = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                     "--config.checkpoint_every=2", "--config.eval_every=2", "--config.log_every=1")
    assert harmless.returncode == 0, harmless.stderr[-3000:]


def test_restart_after_an_upgrade_accepts_new_fields_at_their_default(tmp_path, data_root):
    """A run started by an older medjax has no record of fields added since; they ran as their defaults."""
    first = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                  "--config.checkpoint_every=2", "--config.eval_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "run" / "run_config.json"
    recorded = json.loads(path.read_text())
    del recorded["model.mlp_hidden"]  # as if the field did not exist when the run started
    path.write_text(json.dumps(recorded))
    again = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                  "--config.checkpoint_every=2", "--config.eval_every=2")
    assert again.returncode == 0, again.stderr[-3000:]
    changed = _main("configs/demo.py", tmp_path / "run", data_root, "--config.total_steps=2",
                    "--config.checkpoint_every=2", "--config.eval_every=2", "--config.model.mlp_hidden=64")
    assert changed.returncode == 2 and "model.mlp_hidden: 256 -> 64" in changed.stderr
