"""The trainer's reliability (docs/reliability.md): a SIGTERM / Ctrl-C saves the current step and stops with one line,
the restart resumes bitwise; checkpoints and best models are verified against their digests (a damaged latest
checkpoint falls back to the previous one, a damaged best model is one error line); a run's splits are frozen; one
writer per work directory; refused starts write nothing; the grid forwards signals to its cell and marks failures."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from test_trainer_state import _same, _state

from medjax import grid as grid_cli
from medjax import predict, rundir, train, trained
from medjax.testing import ROOT

# 10 steps of 8 images (9 per epoch); a validation at 5 and 10, checkpoints at 4, 5, 8, 10 (2 kept)
RUN = {"fake_data": 96, "batch_size": 8, "progress_bar": False, "total_steps": 10, "checkpoint_every": 4,
       "eval_every": 5}


def _cmd(workdir, data_root, *extra):
    return [sys.executable, "-m", "medjax.main", "--config=configs/demo.py", f"--workdir={workdir}",
            f"--config.data_root={data_root}", *(f"--config.{k}={v}" for k, v in RUN.items()), *extra]


def _main(workdir, data_root, *extra):
    return subprocess.run(_cmd(workdir, data_root, *extra), cwd=ROOT, capture_output=True, text=True)


def _config(data_root, backbone, **overrides):
    """The config `_main` runs, built in this process (for Trainer start-ups that must be refused), with the
    backbone a run converted."""
    from configs import demo

    config = demo.get_config()
    for key, value in {**RUN, "data_root": data_root, "model.pretrained": str(backbone), **overrides}.items():
        node, *path = [config, *key.split(".")]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return config


def _flip(folder, at=0.5):
    """Four bytes flipped in the largest data file of an orbax folder."""
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    i = int(len(data) * at)
    data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
    open(path, "wb").write(bytes(data))


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run `a`; the same run SIGTERMed after step 6 (between the checkpoints of 5 and 8) as `b`,
    copied to `c` before `b` resumes."""
    root = tmp_path_factory.mktemp("reliability")
    data_root = str(root / "data" / "CheXpert-v1.0-small")
    a = _main(root / "a", data_root)
    assert a.returncode == 0, a.stderr[-3000:]
    b = _main(root / "b", data_root, "--config.debug_signal_at_step=6")
    if os.path.isdir(root / "b"):
        shutil.copytree(root / "b", root / "c")
    resumed = _main(root / "b", data_root)
    return types.SimpleNamespace(root=root, data_root=data_root, a=root / "a", b=root / "b", c=root / "c",
                                 stopped=b, resumed=resumed)


# ------------------------------------------------------------------------------------------------ preemption


def test_sigterm_saves_the_current_step_and_the_restart_resumes_bitwise(runs):
    assert runs.stopped.returncode == 143
    assert _lines(runs.stopped.stderr) == ["stopped at step 6, saved; run the same command to resume"]
    assert sorted(os.listdir(runs.c / "checkpoints")) == ["5", "6"]  # a checkpoint stands at the stop step
    assert _state(runs.c)[0] == 6 and int(_state(runs.c)[1]["step"]) == 6
    assert runs.resumed.returncode == 0, runs.resumed.stderr[-3000:]
    assert f"Resumed from {runs.b} at step 6" in runs.resumed.stdout
    (step_a, state_a), (step_b, state_b) = _state(runs.a), _state(runs.b)
    assert step_a == step_b == 10 and _same(state_a, state_b)  # parameters, optimizer state, RNG: bitwise
    assert json.load(open(runs.a / "metrics.json")) == json.load(open(runs.b / "metrics.json"))


def test_sigint_prints_one_line_without_a_traceback(runs, tmp_path):
    shutil.copytree(runs.a, tmp_path / "run")  # the finished run, extended: many short steps to interrupt
    proc = subprocess.Popen(_cmd(tmp_path / "run", runs.data_root, "--config.total_steps=400"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Training steps"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("stopped at step ") and lines[0].endswith(
        ", saved; run the same command to resume"), err[-3000:]
    step = int(lines[0].split()[3].rstrip(","))
    assert 10 < step < 400 and str(step) in os.listdir(tmp_path / "run" / "checkpoints")


def test_a_second_ctrl_c_stops_at_once():
    trainer = types.SimpleNamespace(_stop=None)
    train.Trainer._on_signal(trainer, signal.SIGINT, None)
    assert trainer._stop == signal.SIGINT  # the first: finish the step, save, stop
    train.Trainer._on_signal(trainer, signal.SIGTERM, None)  # a repeated SIGTERM: the save goes on
    with pytest.raises(KeyboardInterrupt):
        train.Trainer._on_signal(trainer, signal.SIGINT, None)


# ------------------------------------------------------------------------------------------------ verified checkpoints


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(runs):
    _flip(runs.c / "checkpoints" / "6" / "state")
    proc = _main(runs.c, runs.data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{runs.c}/checkpoints/6: 1 array(s) differ from the digests" in proc.stdout \
        or f"{runs.c}/checkpoints/6: cannot be read" in proc.stdout, proc.stdout
    assert "falling back to the checkpoint of step 5" in proc.stdout
    assert f"Resumed from {runs.c} at step 5 (the checkpoint of step 6 is damaged)" in proc.stdout
    assert "damaged-6" in os.listdir(runs.c / "checkpoints")  # set aside for inspection
    assert _same(_state(runs.a)[1], _state(runs.c)[1])  # steps 6..10 again: the same parameters


def test_a_damaged_best_model_is_one_error_naming_it(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs.a, run)
    best = run / "best" / f"step_{json.load(open(run / 'metrics.json'))['best_step']}"
    _flip(best)
    code = predict.main(["--workdir", str(run), "--images", os.path.join(runs.data_root, "valid"), "--output",
                         str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and not os.path.exists(tmp_path / "p.csv")
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {best}: 1 array(s) differ from the digests"), err


# ------------------------------------------------------------------------------------------------ frozen splits


def test_a_restart_over_changed_data_is_refused_naming_the_change(runs, tmp_path):
    data = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(runs.data_root, data)
    rows = list(csv.DictReader(open(data / "train.csv")))
    relabelled, removed = rows[0]["Path"], rows.pop()["Path"]
    rows[0]["Cardiomegaly"] = "0.0" if rows[0]["Cardiomegaly"] == "1.0" else "1.0"
    with open(data / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    shutil.copytree(runs.a, run)
    split_file = (run / "splits" / "chexpert.json").read_bytes()
    with pytest.raises(train.RunError) as e:
        train.Trainer(_config(str(data), run / "backbone"), str(run))
    message = str(e.value)
    assert "changed since the run" in message and "1 image(s) removed" in message and "1 image(s) relabelled" in message
    assert removed.split("/", 1)[1] in message and relabelled.split("/", 1)[1] in message
    assert (run / "splits" / "chexpert.json").read_bytes() == split_file  # the frozen splits stand


def test_a_refused_start_writes_nothing(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(train.RunError, match="fewer than one batch"):
        train.Trainer(_config(runs.data_root, runs.a / "backbone", batch_size=512), str(run))
    assert not os.path.exists(run / "splits") and not os.path.exists(run / "run_config.json")
    assert os.listdir(run) == [rundir.LOCK]  # nothing else: the corrected restart is a first start


# ------------------------------------------------------------------------------------------------ one writer


def test_one_writer_per_work_directory(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs.a, run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from medjax import rundir; "
                               "rundir.lock(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.WorkdirBusy, match=f"pid {holder.pid} "):
            train.Trainer(_config(runs.data_root, run / "backbone"), str(run))
        with pytest.raises(trained.PredictError, match=f"{run}: the run is being written by a trainer, pid "
                                                      f"{holder.pid} "):
            trained.load_run(str(run))
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    with rundir.locked(str(run)):
        pass


def test_a_work_directory_that_cannot_be_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(rundir.WorkdirError, match=f"{tmp_path}/file: cannot be used as a work directory"):
        rundir.lock(str(tmp_path / "file"))


# ------------------------------------------------------------------------------------------------ checked values


def test_keep_checkpoints_zero_is_refused_before_anything_is_written(runs, tmp_path):
    with pytest.raises(train.RunError, match="keep_checkpoints=0: must be an integer >= 1"):
        train.Trainer(_config(runs.data_root, runs.a / "backbone", keep_checkpoints=0), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_finished_run_restarted_shorter_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs.a, run)
    metrics = (run / "metrics.json").read_bytes()
    with pytest.raises(train.RunError, match="trained to step 10, past the 5 steps configured now"):
        train.Trainer(_config(runs.data_root, run / "backbone", total_steps=5), str(run))
    assert (run / "metrics.json").read_bytes() == metrics


def test_a_run_without_a_result_writes_no_metrics_json(tmp_path):
    """No validation defined the metric: the history goes to failed.json; metrics.json marks a run done."""
    dataset = types.SimpleNamespace(name="chexpert", task="multilabel", target_metric="mean_auc", splits={},
                                    skipped_images=[])
    trainer = types.SimpleNamespace(dataset=dataset, selection_metric="mean_auc", history=[{"step": 5}],
                                    best={"step": None, "value": None, "metrics": None}, total_steps=10,
                                    steps_per_epoch=9, workdir=str(tmp_path))
    with pytest.raises(train.RunError, match="failed.json"):
        train.Trainer._finish(trainer, None)
    assert not os.path.exists(tmp_path / "metrics.json")
    assert json.load(open(tmp_path / "failed.json"))["history"] == [{"step": 5}]


# ------------------------------------------------------------------------------------------------ the grid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid: int, timeout=20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


CELL = ("import os, sys, time\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n")
GRID = ("import sys; from medjax import grid\n"
        "r = grid.run_cell_process([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
        "print(r.returncode, r.signal, flush=True)\n")


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_the_grid_takes_its_cell_with_it(tmp_path, kill):
    pid_file = tmp_path / "pid"
    grid = subprocess.Popen([sys.executable, "-c", GRID, CELL, str(pid_file)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    end = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < end:
        time.sleep(0.05)
    cell = int(pid_file.read_text())
    assert os.getpgid(cell) == cell != os.getpgid(grid.pid)  # the cell runs in its own process group
    grid.send_signal(kill)
    out, _ = grid.communicate(timeout=60)
    assert _gone(cell), "the cell's process outlived the grid"
    if kill == signal.SIGTERM:  # forwarded; the grid reports the cell's end
        assert out.split() == [str(-signal.SIGTERM), str(int(signal.SIGTERM))]


class _Done:
    def __init__(self, returncode):
        self.returncode = returncode


def test_a_failed_cell_is_marked_failed_and_run_again(tmp_path):
    grid = grid_cli.load_grid()
    cells = grid_cli.select(grid.cells(), grid_cli.parse_filter("model=dinov2_s,dataset=chexpert,head=linear,"
                                                                "freeze=full", grid.FILTER_AXES))
    calls = []

    def failing(cmd):  # a run that failed after an older medjax wrote metrics.json
        calls.append(cmd)
        workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
        open(os.path.join(workdir, "metrics.json"), "w").write("{}")
        return _Done(2)

    log = open(tmp_path / "log.txt", "w")
    assert grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", runner=failing, out=log) == 1
    record = json.load(open(grid_cli.cell_workdir(str(tmp_path), cells[0]) + "/grid_cell.json"))
    assert record["status"] == "failed" and record["returncode"] == 2
    assert grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", runner=failing, out=log) == 1
    assert len(calls) == 2  # not skipped
    with pytest.raises(grid_cli.GridInterrupted, match="run the same command to resume"):
        grid_cli.run_cells(grid, cells, str(tmp_path), "configs/grid.py", runner=lambda cmd: _Done(143), out=log)
