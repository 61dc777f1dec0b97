"""python -m medjax.plan: the step it compiles is the trainer's, its FLOPs are the model's, and on a TPU topology its
per-chip bytes fall with FSDP as the parameter and optimizer bytes predict.

The TPU test needs libtpu (the `tpu` extra). It is never installed into the test environment (it prints start-up
lines on every jax import): the test finds it importable, or in the folder named by MEDJAX_TPU_PATH (e.g.
`pip install --target DIR "libtpu==0.0.42.*"`), and runs the plan in a subprocess with that folder on PYTHONPATH.
Without it the test is skipped.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from medjax.testing import ROOT

# The FLOPs test's ViT: width D, depth L, MLP M, P x P patches of a S x S image (T = (S/P)^2 + 1 tokens with the CLS)
D, L, M, P, S, BATCH, CLASSES = 256, 4, 1024, 8, 64, 32, 5
TINY = {"family": "dinov2", "width": D, "depth": L, "num_heads": 4, "patch_size": P, "pos_grid": [S // P, S // P],
        "mlp_hidden": M, "layerscale": True}
# The TPU test's ViT (small, so that its compiles are quick)
SMALL = {"family": "dinov2", "width": 128, "depth": 2, "num_heads": 4, "patch_size": 8, "pos_grid": [4, 4],
         "mlp_hidden": 512, "layerscale": True}


def _config(arch, **extra):
    from medjax.schema import make

    return make({"dataset": "aptos2019", "model.family": "dinov2", "model.architecture": arch,
                 "model.freeze": "full", "compute_dtype": "float32", **extra})


def analytic_train_flops(batch):
    """2 FLOPs per multiply-add of every matmul of the forward pass (patch embedding, qkv, q.k, attention x v,
    projection, MLP, head on the CLS and mean patch token), times 3 for forward + backward (input and weight
    gradients)."""
    tokens = (S // P) ** 2 + 1
    patch = (S // P) ** 2 * (P * P * 3) * D
    block = tokens * D * 3 * D + 2 * tokens * tokens * D + tokens * D * D + 2 * tokens * D * M
    head = 2 * D * CLASSES
    return 3 * 2 * batch * (patch + L * block + head)


def test_flops_per_step_within_10_percent_of_analytic():
    from medjax import plan

    config = _config(TINY, image_size=S, batch_size=BATCH)
    flops = plan.model_flops(config, plan.dataset_shape(config))
    expected = analytic_train_flops(BATCH)
    assert abs(flops - expected) / expected < 0.10, (flops, expected)
    # the same count with the blocks scanned and rematerialised (what the step computes, not how it is compiled)
    scanned = _config(TINY, image_size=S, batch_size=BATCH, **{"model.scan": True, "model.remat": True})
    assert plan.model_flops(scanned, plan.dataset_shape(scanned)) == flops


def test_plan_step_is_the_trainers_step():
    """The same lowered HLO text for the trainer's train and eval steps (real weights, a real sharded batch) and the
    plan's (shapes only) on an 8-device CPU mesh (data 2 x fsdp 4); another mesh lowers differently."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "plan_worker.py"), "2", "4"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["train_chars"] > 10000
    assert out["train_equal"] and out["eval_equal"]
    assert out["other_mesh_differs"]


def test_bad_topology_is_one_error_line():
    proc = subprocess.run([sys.executable, "-m", "medjax.plan", "--config=configs/demo.py", "--topology=v9x:2x2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --topology='v9x:2x2'") and len(proc.stderr.strip().splitlines()) == 1


def _tpu_path():
    """PYTHONPATH entries under which libtpu imports, or None."""
    extra = os.environ.get("MEDJAX_TPU_PATH", "")
    if extra and os.path.isdir(os.path.join(extra, "libtpu")):
        return [extra]
    return [] if importlib.util.find_spec("libtpu") else None


def _write_config(tmp_path):
    path = tmp_path / "small.py"
    fields = {"dataset": "aptos2019", "model.family": "dinov2", "model.architecture": SMALL, "model.freeze": "full",
              "compute_dtype": "float32", "image_size": 32, "batch_size": 16}
    path.write_text(f"from medjax.schema import make\n\n\ndef get_config():\n    return make({fields!r})\n")
    return str(path)


def _plan_cli(config, *args, path=()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *path]))
    env.pop("JAX_PLATFORMS", None)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "medjax.plan", f"--config={config}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _small_kernel_count():
    """Elements of the matmul kernels FSDP shards (>= 2**14 elements), counted from the architecture: qkv, proj, fc1
    and fc2 of every block. The 4-D patch kernel (8, 8, 3, D) is sharded too, but the TPU lays out its two minor
    dimensions in (8, 128) tiles, so (3, D) and (3, D / 4) take the same padded bytes: it saves nothing per chip."""
    d, m, depth = SMALL["width"], SMALL["mlp_hidden"], SMALL["depth"]
    return depth * (d * 3 * d + d * d + d * m + m * d)


def test_tpu_per_chip_bytes_fall_with_fsdp_as_predicted(tmp_path):
    path = _tpu_path()
    if path is None:
        pytest.skip("libtpu is not installed (pip install --target DIR 'libtpu==0.0.42.*'; MEDJAX_TPU_PATH=DIR)")
    config = _write_config(tmp_path)
    outs = {}
    for fsdp in (1, 4):
        proc = _plan_cli(config, "--topology=v5e:2x2", "--noeval", f"--config.mesh.fsdp={fsdp}",
                         f"--config.mesh.data={4 // fsdp}", path=path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.strip() == "", proc.stderr[-2000:]  # libtpu's start-up lines are kept out
        lines = proc.stdout.strip().splitlines()
        assert not any("libtpu" in line or "TPU_" in line for line in lines)
        outs[fsdp] = json.loads(lines[-1])
    one, four = outs[1], outs[4]
    assert one["chips"] == 4 and one["topology"] == "v5e:2x2" and one["fits"] and one["hbm_bytes"] == 16 * 2 ** 30
    # float32 parameters and AdamW's two moments: 12 bytes per element, three quarters of it gone per chip
    saved = 12 * _small_kernel_count() * 3 / 4
    for key in ("arguments", "outputs"):
        drop = one["train"][key] - four["train"][key]
        assert abs(drop - saved) / saved < 0.03, (key, drop, saved)
    assert four["per_chip_bytes"] < one["per_chip_bytes"]
    assert one["flops_per_step"] == four["flops_per_step"] > 0


def test_suggestions_bisect_the_largest_batch_with_every_fix():
    """When no change fits the asked batch, the plan bisects the largest batch that fits with all of them: at a limit
    set to the all-changes step's own bytes at batch 8, that batch fits and the next multiple of the chips does not
    (each checked by compiling again). One emulated chip: no FSDP change."""
    from medjax import models, plan
    from medjax.schema import make

    config = _config(SMALL, image_size=32, batch_size=16)
    tgt, shape = plan.target("gpu:1"), plan.dataset_shape(config)
    together = {"model.remat": True, "model.scan": True, "compute_dtype": "bfloat16"}

    def peak(batch, **change):
        c = plan._variant(config, batch_size=batch, **change)
        return plan.compile_config(c, tgt, shape, eval_step=False)[0].peak

    limit = peak(8, **together)
    got = plan.suggestions(config, tgt, shape, limit)
    assert [f["change"] for f in got["fixes"]] == [{"model.remat": True, "model.scan": True},
                                                   {"compute_dtype": "bfloat16"}, together]
    assert not any(f["fits"] for f in got["fixes"])
    with_all = got["largest_batch_with"]
    assert with_all["change"] == together and 8 <= with_all["batch_size"] < 16
    assert peak(with_all["batch_size"], **together) <= limit < peak(with_all["batch_size"] + 1, **together)
    assert 0 <= got["largest_batch"] <= with_all["batch_size"]
    assert peak(got["largest_batch"] + 1) > limit
    # a family whose blocks cannot be scanned is offered remat alone (SAM: windowed and global blocks alternate)
    sam = make({"dataset": "aptos2019", "model.family": "sam_vit", "model.architecture": {"family": "sam_vit"}})
    assert plan._execution_change(sam) == {"model.remat": True} and not models.family("sam_vit").scan
    assert plan._execution_change(_config(SMALL, **{"model.remat": True, "model.scan": True})) is None


def test_tpu_v4_and_v5p_slices_have_one_device_per_chip():
    """A v4-8 / v5p-8 slice is 4 chips of two TensorCores run as one device each (megacore), as jax on the VM shows;
    libtpu's default v4 description has a device per TensorCore (8, each with half the HBM)."""
    path = _tpu_path()
    if path is None:
        pytest.skip("libtpu is not installed (pip install --target DIR 'libtpu==0.0.42.*'; MEDJAX_TPU_PATH=DIR)")
    code = ("import json; from medjax import plan\n"
            "print(json.dumps({t: [len(plan.target(t).devices), plan.target(t).chip.name] "
            "for t in ('v4:2x2x1', 'v5p:2x2x1', 'v5e:2x4')}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *path]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"v4:2x2x1": [4, "TPU v4"], "v5p:2x2x1": [4, "TPU v5p"], "v5e:2x4": [8, "TPU v5e"]}


def test_the_committed_tables_are_the_scripts_output():
    """docs/plan_table.md and the README's plan-table block are what benchmarks/plan_table.py renders from the
    committed compiles (benchmarks/plans/), not typed."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # benchmarks/ is not an installed package
    from benchmarks import plan_table

    done = plan_table.load_results(os.path.join(ROOT, "benchmarks", "plans", "plan_table.jsonl"))
    with open(os.path.join(ROOT, "benchmarks", "plans", "grid_plan_v5e.json")) as f:
        grid = json.loads(f.read().strip().splitlines()[-1])
    with open(os.path.join(ROOT, "README.md")) as f:
        assert plan_table.render_summary(done, grid, 0.4) in f.read()
    with open(os.path.join(ROOT, "docs", "plan_table.md")) as f:
        assert f.read() == plan_table.render(plan_table.ordered(done), grid, 0.4)
    assert len(done) >= 11 and all(r["per_chip_bytes"] > 0 for r in done.values())
