"""The trainer: files -> grain batches -> one sharded, jit-compiled train step -> evaluation, checkpoints, metrics.

Everything a run needs to resume lives in its work directory, and is committed together:
- `checkpoints/<step>/`: one orbax checkpoint holding the train state (parameters, every other variable collection
  such as BatchNorm statistics, optimizer state, step, RNG), the input iterator (per process) and the run's progress
  (best step and value, validation history) as one item each, with the SHA-256 of every state array in its metadata
  (`medjax.checkpoint`), written to a temporary folder and renamed into place, so a kill at any moment leaves the
  previous complete checkpoint; a restore checks the digests and falls back to the previous checkpoint, saying so;
- `best/step_<N>/`: the best model by the validation target metric (every variable collection, with digests),
  written before the checkpoint that names it; a best model is removed only once no kept checkpoint names it, so at
  every moment each checkpoint's best step has a complete model on disk;
- `run_config.json`: the config the run started with; a restart with a config that changes the run's meaning is
  refused, naming the fields;
- `splits/`: the run's data, frozen when it starts: a restart over changed data (images added, removed, relabelled
  or moved between splits) is refused, naming what changed;
- `metrics.json` and TensorBoard event files (`tensorboard/`); `failed.json` for a run that ended without a result.

The trainer holds the work directory's lock (`medjax.rundir`) from start to end. SIGTERM and SIGINT (Ctrl-C) finish
the current step, save a checkpoint at it and raise `Stopped` (medjax.main: one line, exit 143 / 130); a second
Ctrl-C stops at once. Nothing is written to the work directory before every start-up check has passed (the data is
read into a staging folder and its split files committed with the recorded config).
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm import tqdm

from medjax import bootstrap, checkpoint, data, engine, metrics, rundir, schema, sharding, thresholds
from medjax.errors import UserError, atomic_write


class NonFiniteLossError(RuntimeError):
    pass


class RunError(UserError):
    """The run cannot start as configured (work directory, batch size, splits); the message says what to change."""


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run after a step; `saved` says whether a checkpoint stands at `step`."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step, self.saved = signum, step, saved
        super().__init__(f"stopped at step {step}, saved; run the same command to resume" if saved else
                         f"stopped before training step {step + 1}; nothing new to save; run the same command to "
                         "resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports a process the signal ended


def check_config(config) -> None:
    """The trainer's own fields, before anything is written."""
    keep = config.keep_checkpoints
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise RunError(f"keep_checkpoints={keep!r}: must be an integer >= 1 (the checkpoints a stopped run resumes "
                       "from; the best model is kept apart)")


# Config fields that may change between a run and its restart: they do not alter what is computed.
RESTART_SAFE = ("log_every", "progress_bar", "prefetch", "worker_count", "keep_checkpoints", "debug_sigkill_at_step",
                "debug_signal_at_step", "epochs", "total_steps", "mesh", "sharding_rules", "eval_every",
                "checkpoint_every", "debug_sigkill_at", "data_options.check_images", "data_root", "model.pretrained",
                "model.convert_from.checkpoint", "model.convert_from.config", "model.attention_head.deit_params",
                "weights_dir", "data_dir", "grid_cell.arg", "thresholds", "bootstrap")


# ----------------------------------------------------------------------------------------------- the run


class Trainer:
    """Builds data, model, optimizer, shardings and checkpointing from a config; `run()` trains and evaluates."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        check_config(config)
        thresholds.parse_rule(config.thresholds)  # a bad operating-point rule stops at start-up
        self._locked = jax.process_index() == 0
        if self._locked:
            rundir.lock(workdir)  # one writer per work directory; re-entrant (medjax.main holds it already)
        self._stop, self._handlers = None, {}
        self._stage = None
        try:
            self._install_signal_handlers()
            self._start(config, workdir)
        except BaseException:
            self.close()
            raise

    def _start(self, config, workdir: str):
        self._check_restart()
        self._phase(f"Reading {config.dataset} from {config.data_root}")
        # the split files and caches go to a staging folder, committed to WORKDIR/splits once every check passed
        self._stage = tempfile.mkdtemp(prefix="medjax-start-")
        if os.path.isdir(rundir.path(workdir, rundir.SPLITS)):
            shutil.copytree(rundir.path(workdir, rundir.SPLITS), os.path.join(self._stage, rundir.SPLITS))
        self.dataset = data.get_dataset(config.dataset, config.data_root, workdir=self._stage, seed=config.seed,
                                        **schema.data_options(config))
        d = self.dataset
        if getattr(d, "failure_log", None):
            d.failure_log = rundir.path(workdir, rundir.SPLITS, os.path.basename(d.failure_log))
        self._check_frozen_splits()
        self._check_splits()
        self.selection_metric = config.selection_metric or d.target_metric
        try:
            metrics.check_target(self.selection_metric, d.task)
        except ValueError as e:
            raise RunError(f"selection_metric: {e}") from None
        if config.batch_size % jax.process_count():
            raise RunError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
        if config.batch_size % mesh.size:
            raise RunError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; set "
                           f"--config.batch_size to a multiple of {mesh.size}")
        self.local_batch = config.batch_size // jax.process_count()
        n_train = len(d.splits["train"])
        self.steps_per_epoch = n_train // config.batch_size
        if self.steps_per_epoch == 0:
            raise RunError(f"the train split has {n_train} images, fewer than one batch of {config.batch_size}; "
                           "lower --config.batch_size")
        self.total_steps = config.total_steps or config.epochs * self.steps_per_epoch
        o = config.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_epochs * self.steps_per_epoch)
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.checkpoint_every = config.checkpoint_every or self.eval_every

        self._check_length()
        self._phase(f"Building {config.model.family or 'the'} model and its sharded train step on {mesh.size} "
                    "device(s)")
        self.engine = engine.build(config, num_classes=len(d.class_names), channels=d.channels, task=d.task,
                                   total_steps=self.total_steps, warmup_steps=warmup, mesh=mesh)
        e = self.engine
        self.mesh, self.state, self.schedule = e.mesh, e.state, e.schedule
        self.train_step, self.eval_step = e.train_step, e.eval_step
        self.train_iter = iter(self._loader("train", train=True))

        self.ckpt = ocp.CheckpointManager(
            os.path.abspath(rundir.path(workdir, rundir.CHECKPOINTS)),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _grain_handler(),
                           "progress": ocp.JsonCheckpointHandler()})
        self.best = {"step": None, "value": None, "metrics": None}
        self.history: list[dict] = []
        self._best_of: dict[int, int | None] = {}  # checkpoint step -> the best step it names
        self._iter_states: dict[int, dict] = {}  # step -> the input iterator's state after that step's batch
        self._restore()
        self._commit_splits()
        self._record_config()
        if jax.process_index() == 0:
            print(engine.summary_table(e, self.state), flush=True)

    def close(self):
        """Releases the work directory's lock and the signal handlers (run() does it when it ends)."""
        if self._stage:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}
        if self._locked:
            self._locked = False
            rundir.unlock(self.workdir)

    # -------------------------------------------------------------------------------------------- stopping

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self._stop is None:
            self._stop = signum  # the loop finishes its step, saves and stops
        elif signum == signal.SIGINT:  # a second Ctrl-C: at once (the last complete checkpoint stands)
            raise KeyboardInterrupt
        # a repeated SIGTERM changes nothing: the save is under way

    def _stopping(self) -> int | None:
        """The signal that stops the run, agreed by every process (a flag reduced over the processes each step)."""
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self._stop or 0))
            return int(np.max(flags)) or None
        return self._stop

    def _phase(self, message: str):
        if jax.process_index() == 0:
            print(message, flush=True)

    def _loader(self, split: str, train: bool):
        c = self.config
        return data.make_loader(self.dataset, split, batch_size=self.local_batch, image_size=c.image_size,
                                train=train, seed=c.seed, normalization=c.normalization, worker_count=c.worker_count,
                                augment=c.train_augment, resize=c.resize)

    # -------------------------------------------------------------------------------------------- start-up checks

    def _check_restart(self):
        """A restart must not change what the run computes (the config is recorded by `_record_config` once a start
        has passed every check, so a start refused for bad input records nothing)."""
        path = rundir.path(self.workdir, rundir.RUN_CONFIG)
        now = schema.flatten(self.config)
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
            # a field that did not exist when the run started (a newer medjax) ran at its declared default
            defaults = schema.flatten(schema.study_config())
            before = {k: before.get(k, defaults.get(k, "<absent>")) for k in set(before) | set(now)}
            changed = sorted(k for k in set(before) | set(now)
                             if before.get(k, "<absent>") != now.get(k, "<absent>")
                             and not any(k == f or k.startswith(f + ".") for f in RESTART_SAFE))
            if changed:
                diff = ", ".join(f"{k}: {before.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
                                 for k in changed[:8])
                raise RunError(f"{self.workdir} holds a run started with another config ({diff}); restart it with "
                               "its own config, or use a new --workdir")

    def _split_files(self) -> tuple[str, str]:
        """(the recorded split file in WORKDIR/splits, the one this start wrote to its staging folder)."""
        name = f"{self.dataset.name}.json"
        return rundir.path(self.workdir, rundir.SPLITS, name), os.path.join(self._stage, rundir.SPLITS, name)

    def _check_frozen_splits(self):
        """A restart of a recorded run must see the data it started with: every image in the same split with the
        same label. Anything else (rows added, removed, relabelled, moved) is refused, naming what changed."""
        recorded, now = self._split_files()
        if not (os.path.exists(rundir.path(self.workdir, rundir.RUN_CONFIG)) and os.path.exists(recorded)):
            return
        with open(recorded) as f_old, open(now) as f_new:
            try:
                old = json.load(f_old)
            except ValueError:
                raise RunError(f"{recorded}: not valid JSON; the run's frozen splits are damaged; use a new "
                               "--workdir") from None
            new = json.load(f_new)
        if old.get("splits") == new.get("splits") and old.get("class_names") == new.get("class_names"):
            return
        changes = describe_split_changes(old, new)
        raise RunError(f"the data at {self.config.data_root} changed since the run in {self.workdir} started "
                       f"({'; '.join(changes)}; recorded in {recorded}); a run's splits are frozen when it starts: "
                       "restore the data as it was, or train on the new data in a new --workdir")

    def _commit_splits(self):
        """Every start-up check has passed: the staged split files and caches go to WORKDIR/splits (each atomic)."""
        staged = os.path.join(self._stage, rundir.SPLITS)
        target = rundir.path(self.workdir, rundir.SPLITS)
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(staged)) if os.path.isdir(staged) else ():
            src, dst = os.path.join(staged, name), os.path.join(target, name)
            if os.path.isfile(src) and name != os.path.basename(self.dataset.failure_log or ""):
                tmp = f"{dst}.tmp{os.getpid()}"
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
        if getattr(self.dataset, "split_file", None):
            self.dataset.split_file = os.path.join(target, os.path.basename(self.dataset.split_file))
        shutil.rmtree(self._stage, ignore_errors=True)
        self._stage = None

    def _check_length(self, trained: int | None = None):
        """A run is never shortened: its checkpoints (and metrics) describe the steps it trained."""
        if trained is None:
            root = rundir.path(self.workdir, rundir.CHECKPOINTS)
            trained = max((int(n) for n in os.listdir(root) if n.isdigit()), default=0) if os.path.isdir(root) else 0
        if trained > self.total_steps:
            raise RunError(f"{self.workdir} holds a run trained to step {trained}, past the {self.total_steps} steps "
                           "configured now; a run cannot be shortened (its metrics would describe a longer run): "
                           "restart it with its own length (epochs / total_steps), or use a new --workdir")

    def _record_config(self):
        path = rundir.path(self.workdir, rundir.RUN_CONFIG)
        if jax.process_index() == 0 and not os.path.exists(path):
            _write_json(path, schema.flatten(self.config))

    def _check_splits(self):
        """Every split the run selects or reports on must be able to define the target metric."""
        d = self.dataset
        for split in ("train", "val"):
            if split not in d.splits or not d.splits[split]:
                raise RunError(f"{d.name}: the {split} split is empty; the run needs train and val images")
        for split in ("val", "test"):
            if split not in d.splits:
                continue
            labels = np.asarray([r.label for r in d.splits[split]])
            if d.task == "multiclass":
                counts = np.bincount(labels.astype(int), minlength=len(d.class_names))
                if (counts > 0).sum() < 2:
                    raise RunError(
                        f"{d.name}: the {split} split cannot define {d.target_metric}: its class counts are "
                        + ", ".join(f"{n} {c}" for n, c in zip(d.class_names, counts))
                        + "; it needs images of at least two classes (use more data or another split seed)")
            else:
                labels = labels.reshape(len(labels), -1)
                both = [(labels[:, k] > 0).any() and (labels[:, k] <= 0).any() for k in range(labels.shape[1])]
                if not any(both):
                    raise RunError(f"{d.name}: the {split} split cannot define {d.target_metric}: no class has both "
                                   "positive and negative images")

    # -------------------------------------------------------------------------------------------- checkpoints

    def _abstract(self, tree, shardings):
        return jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    def _restore(self):
        """Resumes from the latest checkpoint whose arrays match their digests; a damaged or unreadable one is set
        aside (renamed `damaged-<step>`) and the previous one used, each said in one line. A partial save (a kill
        while writing) left only orbax's temporary folder, which is named and ignored."""
        root = rundir.path(self.workdir, rundir.CHECKPOINTS)
        partial = sorted(n for n in os.listdir(root) if ".orbax-checkpoint-tmp" in n) if os.path.isdir(root) else []
        for name in partial:
            self._phase(f"warning: {root}/{name}: a checkpoint the run did not finish writing (stopped while "
                        "saving); ignored")
        steps = sorted(self.ckpt.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                restored = self._restore_step(step)
            except checkpoint.DamagedCheckpoint as e:
                damaged.append(step)
                older = [s for s in steps if s < step]
                self._phase(f"warning: {e}; " + (f"falling back to the checkpoint of step {older[0]}" if older
                                                  else "no older checkpoint"))
                continue
            break
        else:
            if damaged:
                raise RunError(f"{root}: every checkpoint is damaged (steps {', '.join(map(str, damaged))}); move "
                               "them away to start the run over from step 1, or use a new --workdir")
            if partial:
                self._phase("no complete checkpoint stands: the run starts again from step 1")
            return
        if damaged and jax.process_index() == 0:  # kept for inspection, out of orbax's way
            for s in damaged:
                os.replace(os.path.join(root, str(s)), os.path.join(root, f"damaged-{s}"))
        if damaged:
            self.ckpt.reload()
        self.state = restored["state"]
        self.best, self.history = restored["progress"]["best"], restored["progress"]["history"]
        self._check_length(int(jax.device_get(self.state.step)))
        logging.info("resumed from %s at step %d", self.workdir, step)
        print(f"Resumed from {self.workdir} at step {step}" + (f" (the checkpoint of step {damaged[0]} is damaged)"
                                                              if damaged else ""))

    def _restore_step(self, step: int) -> dict:
        where = rundir.path(self.workdir, rundir.CHECKPOINTS, str(step))
        self._phase(f"Restoring the checkpoint of step {step}")
        try:
            recorded = checkpoint.recorded_digests(self.ckpt.metadata(step))
            restored = self.ckpt.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(self._abstract(self.state, self.engine.state_sharding)),
                data=grain.checkpoint.CheckpointRestore(self.train_iter), progress=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint's files is damage to report
            raise checkpoint.DamagedCheckpoint(f"{where}: cannot be read ({type(e).__name__}: "
                                               f"{' '.join(str(e).split())[:300]})") from None
        checkpoint.check(restored["state"], recorded, where)
        self._best_of[step] = restored["progress"]["best"]["step"]
        return restored

    def _save(self, step: int):
        self.ckpt.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=grain.checkpoint.CheckpointSave(self.train_iter),
            progress=ocp.args.JsonSave({"best": self.best, "history": self.history})), force=True,
            custom_metadata={rundir.DIGESTS_KEY: checkpoint.digests(self.state)})
        self.ckpt.wait_until_finished()
        self._best_of[step] = self.best["step"]
        self._debug_kill("after_checkpoint")
        if jax.process_index() == 0:
            self._prune_best()

    def _best_dir(self, step: int) -> str:
        return rundir.best_dir(self.workdir, step)

    def _save_best(self, step: int):
        # orbax writes a temporary folder and renames it when complete, the arrays' digests inside
        checkpoint.save_best(self._best_dir(step), self.engine.variables_of(self.state))
        thresholds.save_for_best(self._best_dir(step), self.config.thresholds, self.dataset, *self.last_eval, step)
        self._debug_kill("after_best")

    def _prune_best(self):
        """Remove best models that no kept checkpoint names (and unfinished writes)."""
        root = rundir.path(self.workdir, rundir.BEST)
        kept = set(self.ckpt.all_steps())
        for s in kept - set(self._best_of):  # kept checkpoints of an earlier start
            self._best_of[s] = self.ckpt.restore(s, args=self._progress_only())["progress"]["best"]["step"]
        keep = {f"step_{b}" for s, b in self._best_of.items() if s in kept} | {f"step_{self.best['step']}"}
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if name not in keep:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    @staticmethod
    def _progress_only():
        return ocp.args.Composite(progress=ocp.args.JsonRestore())

    def _load_best(self):
        abstract = self._abstract(self.engine.variables_of(self.state), self.engine.variables_sharding)
        try:
            return checkpoint.restore_best(self._best_dir(self.best["step"]), abstract)
        except checkpoint.DamagedCheckpoint as e:
            raise RunError(f"{e}; the best model cannot be tested") from None

    def _debug_kill(self, point: str):
        if self.config.debug_sigkill_at == point:  # tests: a kill in an exact window of the save path
            os.kill(os.getpid(), signal.SIGKILL)

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, variables, split: str) -> dict:
        """Every example of the split, in order: the loader pads the last batch and marks the padding."""
        probs, labels = [], []
        for batch in self._loader(split, train=False):
            mask = np.asarray(batch["mask"])
            out = self.eval_step(variables, sharding.global_batch({"image": batch["image"]}, self.mesh)["image"])
            out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else np.asarray(out)
            gathered = [np.asarray(batch["label"]), mask]
            if jax.process_count() > 1:
                gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in gathered]
            probs.append(np.asarray(out, np.float64)[gathered[1]])
            labels.append(gathered[0][gathered[1]])
        probs, labels = np.concatenate(probs), np.concatenate(labels)
        # the last evaluation's probabilities: validation's choose the operating points (thresholds.py), the test's
        # go to the bootstrap intervals (bootstrap.py)
        self.last_eval = (probs, labels)
        result = metrics.compute_metrics(self.dataset.task, probs, labels, self.dataset.class_names)
        result["num_examples"] = int(len(labels))
        return result

    # -------------------------------------------------------------------------------------------- training

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def _check_finite(self, host: list, step: int):
        if not all(bool(o["finite"]) for o in host):
            bad = next(o for o in host if not bool(o["finite"]))
            last = self.ckpt.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss ({float(bad['loss'])}) or gradient norm ({float(bad['grad_norm'])}) at or "
                f"before step {step}: the update was not applied and training stopped. The last good "
                f"checkpoint is step {last} in {self.workdir}/checkpoints. Lower optim.lr or use "
                "compute_dtype='float32'.")

    def _run(self) -> dict:
        c = self.config
        start = int(jax.device_get(self.state.step))
        if self._stopping():
            raise Stopped(self._stopping(), start, saved=False)
        writer = _tensorboard(self.workdir)
        if start < self.total_steps:
            self._phase(f"Training steps {start + 1}..{self.total_steps} ({self.steps_per_epoch} per epoch); the "
                        "first step compiles")
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0 or not c.progress_bar)
        window = collections.deque(maxlen=8)  # (time, images) at the recent log points: throughput after compile
        pending = []
        batches = iter(())
        for step in range(start + 1, self.total_steps + 1):
            batch = next(batches, None)
            if batch is None:  # a new stretch up to the next checkpoint
                batches = self._prefetch(step)
                batch = next(batches)
            self.state, out = self.train_step(self.state, batch)
            pending.append(out)
            if step == start + 1:
                jax.block_until_ready(out)
                window.append((time.perf_counter(), 0))
            if step % c.log_every == 0 or step == self.total_steps or step % self.eval_every == 0 \
                    or step % self.checkpoint_every == 0:  # nothing is saved before its losses are checked
                host = jax.device_get(pending)
                pending = []
                self._check_finite(host, step)
                loss = float(host[-1]["loss"])
                window.append((time.perf_counter(), (step - start - 1) * c.batch_size))
                (t0, n0), (t1, n1) = window[0], window[-1]
                rate = (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else float("nan")
                lr = float(self.schedule(step - 1))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if writer:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/lr", lr, step)
                    if math.isfinite(rate):
                        writer.add_scalar("train/images_per_second", rate, step)
            bar.update(1)
            if step % self.eval_every == 0 or step == self.total_steps:
                self._validate(step, writer, bar)
                self._save(step)
            elif step % self.checkpoint_every == 0:
                self._save(step)
            if step % self.eval_every == 0 or step % self.checkpoint_every == 0:  # throughput: training time only
                window.clear()
                window.append((time.perf_counter(), (step - start - 1) * c.batch_size))
            if step == c.debug_sigkill_at_step:  # tests: a preemption at a known point
                os.kill(os.getpid(), signal.SIGKILL)
            if step == c.debug_signal_at_step:  # tests: a SIGTERM at a known step
                os.kill(os.getpid(), signal.SIGTERM)
            stop = self._stopping()
            if stop and step < self.total_steps:
                bar.close()
                self._check_finite(jax.device_get(pending), step)
                if self.ckpt.latest_step() != step:
                    self.train_iter.set_state(self._iter_states[step])  # the input position after this step
                    self._save(step)
                if writer:
                    writer.close()
                raise Stopped(stop, step, saved=True)
        bar.close()
        return self._finish(writer)

    def _prefetch(self, step: int):
        """Device batches for the steps from `step` up to the next checkpoint, `prefetch` transferred ahead. Reading
        stops at the checkpoint, so the saved input iterator is exactly at the step saved with it; the iterator's
        state after each batch is kept, so a stop between checkpoints saves the position of its step."""
        end = next(s for s in range(step, self.total_steps + 1)
                   if s % self.eval_every == 0 or s % self.checkpoint_every == 0 or s == self.total_steps)
        self._iter_states = {}

        def read():
            for s in range(step, end + 1):
                batch = next(self.train_iter)
                self._iter_states[s] = self.train_iter.get_state()
                yield batch

        return sharding.prefetch_to_device(read(), self.mesh, self.config.prefetch)

    def _validate(self, step: int, writer, bar):
        val = self.evaluate(self.engine.variables_of(self.state), "val")
        value = metrics.target_metric(self.selection_metric, val)
        improved = value is not None and (self.best["value"] is None or value > self.best["value"])
        if improved:
            self._save_best(step)
            self.best = {"step": step, "value": value, "metrics": val}
        self.history.append({"step": step, "epoch": step / self.steps_per_epoch, self.selection_metric: value})
        fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
        bar.write(f"step {step} (epoch {step / self.steps_per_epoch:.2f}): val {self.selection_metric} {fmt(value)}"
                  f"{' (new best)' if improved else ''}; best {fmt(self.best['value'])} at step {self.best['step']}")
        if writer:
            for k, v in val.items():
                if isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(f"val/{k}", v, step)

    def _finish(self, writer) -> dict:
        d = self.dataset
        result = {"dataset": d.name, "task": d.task, "target_metric": d.target_metric,
                  "selection_metric": self.selection_metric, "best_step": self.best["step"],
                  "val": self.best["metrics"], "history": self.history, "steps": self.total_steps,
                  "steps_per_epoch": self.steps_per_epoch, "skipped_images": d.skipped_images}
        if self.best["step"] is None:  # every validation left the target metric undefined (e.g. NaN probabilities)
            # not metrics.json: its presence marks a run done (the grid skips it, the report lists it)
            failed = rundir.path(self.workdir, rundir.FAILED)
            if jax.process_index() == 0:
                _write_json(failed, result)
            raise RunError(f"no validation of {d.name} defined {self.selection_metric}, so no best model was chosen "
                           f"and nothing was tested; the history is in {failed}")
        if "test" in d.splits:
            test = self.evaluate(self._load_best(), "test")
            result["test"] = test
            if jax.process_index() == 0:
                result["test_bootstrap"] = bootstrap.finish_test(self.config, d, *self.last_eval, self.workdir)
            print(f"test {d.target_metric} (best model, step {self.best['step']}): "
                  f"{metrics.target_metric(d.target_metric, test)}")
            if writer:
                for k, v in test.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"test/{k}", v, self.best["step"])
        thresholds.report(result, self._best_dir(self.best["step"]), self.last_eval if "test" in result else None)
        if writer:
            writer.close()
        if jax.process_index() == 0:
            _write_json(rundir.path(self.workdir, rundir.METRICS), result)
            if os.path.exists(rundir.path(self.workdir, rundir.FAILED)):
                os.remove(rundir.path(self.workdir, rundir.FAILED))
        return result


def describe_split_changes(old: dict, new: dict) -> list[str]:
    """What changed between two split files (`medjax.data.splits.write_split_file`): images added, removed,
    relabelled, moved to another split, class names; each with its first example."""
    def index(content):
        return {str(image): (split, json.dumps(label)) for split, rows in (content.get("splits") or {}).items()
                for image, label, *_ in rows}

    a, b = index(old), index(new)
    kinds = [("added", sorted(set(b) - set(a))), ("removed", sorted(set(a) - set(b))),
             ("relabelled", sorted(k for k in set(a) & set(b) if a[k][1] != b[k][1])),
             ("moved to another split",
              sorted(k for k in set(a) & set(b) if a[k][1] == b[k][1] and a[k][0] != b[k][0]))]
    out = [f"{len(paths)} image(s) {what} (first: {paths[0]})" for what, paths in kinds if paths]
    if old.get("class_names") != new.get("class_names"):
        out.insert(0, f"class names {old.get('class_names')} -> {new.get('class_names')}")
    return out or ["the records' order changed"]


def _grain_handler():
    return grain.checkpoint.CheckpointHandler()


def _tensorboard(workdir: str):
    if jax.process_index() != 0:
        return None
    return SummaryWriter(rundir.path(workdir, rundir.TENSORBOARD))


def _write_json(path: str, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, default=_json_default)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON-serialisable: {type(x)}")
