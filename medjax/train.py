"""The trainer: files -> grain batches -> one sharded, jit-compiled train step -> evaluation, checkpoints, metrics.

Everything a run needs to resume lives in its work directory: orbax checkpoints of the train state and the input
iterator (`checkpoints/`), the best model by the validation target metric (`best/`), `metrics.json` and TensorBoard
event files (`tensorboard/`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from medjax import classifier, metrics, optim, sharding


class NonFiniteLossError(RuntimeError):
    pass


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def loss_fn(logits, labels, task: str, mask=None):
    """CrossEntropyLoss (multi-class) or BCEWithLogitsLoss (multi-label), averaged over the rows where `mask` is
    True (a row the loader could not read under skip_bad_images is masked out)."""
    if task == "multiclass":
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    if mask is None:
        return per_example.mean()
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_train_step(model, tx, task: str, trainable):
    """One update. Frozen parameters sit behind stop_gradient, so no backward pass runs through a frozen backbone.
    A non-finite loss or gradient leaves the state unchanged and is reported in `finite`."""

    def train_step(state: TrainState, batch):
        def compute_loss(params):
            params = jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
            return loss_fn(model.apply({"params": params}, batch["image"]), batch["label"], task, batch.get("mask"))

        loss, grads = jax.value_and_grad(compute_loss)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_eval_step(model, task: str):
    def eval_step(params, images):
        logits = model.apply({"params": params}, images)
        return jax.nn.softmax(logits) if task == "multiclass" else jax.nn.sigmoid(logits)
    return eval_step


def sharded_train_step(model, params, trainable, tx, task: str, mesh, rules, seed: int = 0):
    """(state placed on the mesh, its shardings, the jitted train step with explicit shardings and donated state)."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(seed + 1))
    specs = sharding.param_specs(params, mesh, [tuple(r) for r in rules])
    state_sharding = sharding.tree_shardings(state, params, specs, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(make_train_step(model, tx, task, trainable), in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    return jax.device_put(state, state_sharding), state_sharding, step


# ----------------------------------------------------------------------------------------------- the run


class Trainer:
    """Builds data, model, optimizer, shardings and checkpointing from a config; `run()` trains and evaluates."""

    def __init__(self, config, workdir: str):
        import orbax.checkpoint as ocp

        from medjax import data

        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.dataset = data.get_dataset(config.dataset, config.data_root, workdir=workdir, seed=config.seed,
                                        **dict(config.get("data_options", {})))
        d = self.dataset
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
        if config.batch_size % jax.process_count():
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
        if config.batch_size % self.mesh.size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {self.mesh.size} devices")
        self.local_batch = config.batch_size // jax.process_count()
        n_train = len(d.splits["train"])
        self.steps_per_epoch = n_train // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train split has {n_train} images, fewer than one batch of {config.batch_size}")
        self.total_steps = config.get("total_steps") or config.epochs * self.steps_per_epoch
        o = config.optim
        warmup = o.warmup_steps if o.get("warmup_steps") is not None else int(o.warmup_epochs * self.steps_per_epoch)
        self.eval_every = config.get("eval_every") or self.steps_per_epoch
        self.checkpoint_every = config.get("checkpoint_every") or self.eval_every

        dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
        self.model, params = classifier.build_classifier(config.model, len(d.class_names), d.channels,
                                                         config.image_size, jax.random.PRNGKey(config.seed), dtype)
        self.trainable = optim.trainable_mask(params, config.model.freeze, config.model.get("unfreeze_from_block", 0))
        self.tx, self.schedule = optim.make_optimizer(o, params, self.trainable, self.total_steps, warmup)
        self.state, self.state_sharding, self.train_step = sharded_train_step(
            self.model, params, self.trainable, self.tx, d.task, self.mesh, config.sharding_rules, config.seed)
        self.params_sharding = self.state_sharding.params
        self.eval_step = jax.jit(make_eval_step(self.model, d.task), in_shardings=(self.params_sharding, None))
        self.train_iter = iter(self._loader("train", train=True))

        self.ckpt = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.get("keep_checkpoints", 2), create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _grain_handler()})
        self.best = {"step": None, "value": None, "metrics": None}
        self.history: list[dict] = []
        self._restore()

    def _loader(self, split: str, train: bool):
        from medjax import data

        c = self.config
        return data.make_loader(self.dataset, split, batch_size=self.local_batch, image_size=c.image_size,
                                train=train, seed=c.seed, normalization=c.get("normalization", "dataset"),
                                worker_count=c.get("worker_count", 0))

    # -------------------------------------------------------------------------------------------- checkpoints

    def _restore(self):
        import orbax.checkpoint as ocp
        import grain

        step = self.ckpt.latest_step()
        if step is None:
            return
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.state_sharding)
        restored = self.ckpt.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(self.train_iter)))
        self.state = restored["state"]
        summary = os.path.join(self.workdir, "progress.json")
        if os.path.exists(summary):
            with open(summary) as f:
                saved = json.load(f)
            self.best, self.history = saved["best"], saved["history"]
        logging.info("resumed from %s at step %d", self.workdir, step)
        print(f"Resumed from {self.workdir} at step {step}")

    def _save(self, step: int, force=False):
        import orbax.checkpoint as ocp
        import grain

        self.ckpt.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), data=grain.checkpoint.CheckpointSave(self.train_iter)),
            force=force)
        self.ckpt.wait_until_finished()
        if jax.process_index() == 0:
            _write_json(os.path.join(self.workdir, "progress.json"), {"best": self.best, "history": self.history})

    def _save_best(self, step: int):
        import orbax.checkpoint as ocp

        path = os.path.abspath(os.path.join(self.workdir, "best", "params"))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, self.state.params, force=True)
            ckptr.wait_until_finished()

    def _load_best(self):
        import orbax.checkpoint as ocp

        path = os.path.abspath(os.path.join(self.workdir, "best", "params"))
        abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          self.state.params, self.params_sharding)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, abstract)

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, params, split: str) -> dict:
        """Every example of the split, in order: the loader pads the last batch and marks the padding."""
        from jax.experimental import multihost_utils

        probs, labels = [], []
        for batch in self._loader(split, train=False):
            mask = np.asarray(batch["mask"])
            out = self.eval_step(params, sharding.global_batch({"image": batch["image"]}, self.mesh)["image"])
            out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else np.asarray(out)
            gathered = [np.asarray(batch["label"]), mask]
            if jax.process_count() > 1:
                gathered = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in gathered]
            probs.append(np.asarray(out, np.float64)[gathered[1]])
            labels.append(gathered[0][gathered[1]])
        probs, labels = np.concatenate(probs), np.concatenate(labels)
        result = metrics.compute_metrics(self.dataset.task, probs, labels, self.dataset.class_names)
        result["num_examples"] = int(len(labels))
        return result

    # -------------------------------------------------------------------------------------------- training

    def run(self) -> dict:
        from tqdm import tqdm

        c, d = self.config, self.dataset
        writer = _tensorboard(self.workdir)
        start = int(jax.device_get(self.state.step))
        bar = tqdm(total=self.total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0 or not c.get("progress_bar", True))
        t0, seen = time.perf_counter(), 0
        log_every = c.get("log_every", 10)
        pending = []
        batches = iter(())
        for step in range(start + 1, self.total_steps + 1):
            batch = next(batches, None)
            if batch is None:  # a new stretch up to the next checkpoint
                batches = self._prefetch(step)
                batch = next(batches)
            self.state, out = self.train_step(self.state, batch)
            pending.append(out)
            seen += c.batch_size
            if step % log_every == 0 or step == self.total_steps or step % self.eval_every == 0 \
                    or step % self.checkpoint_every == 0:  # nothing is saved before its losses are checked
                host = jax.device_get(pending)
                pending = []
                if not all(bool(o["finite"]) for o in host):
                    bad = next(o for o in host if not bool(o["finite"]))
                    last = self.ckpt.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(bad['loss'])}) or gradient norm ({float(bad['grad_norm'])}) at or "
                        f"before step {step}: the update was not applied and training stopped. The last good "
                        f"checkpoint is step {last} in {self.workdir}/checkpoints. Lower optim.lr or use "
                        "compute_dtype='float32'.")
                loss = float(host[-1]["loss"])
                rate = seen / (time.perf_counter() - t0)
                lr = float(self.schedule(step - 1))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                if writer:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/images_per_second", rate, step)
            bar.update(1)
            if step % self.eval_every == 0 or step == self.total_steps:
                self._validate(step, writer, bar)
                self._save(step)
            elif step % self.checkpoint_every == 0:
                self._save(step)
            if step == c.get("debug_sigkill_at_step"):  # tests: a preemption at a known point
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        return self._finish(writer)

    def _prefetch(self, step: int):
        """Device batches for the steps from `step` up to the next checkpoint, `prefetch` (default 2) transferred
        ahead. Reading stops at the checkpoint, so the saved input iterator is exactly at the step saved with it."""
        end = next(s for s in range(step, self.total_steps + 1)
                   if s % self.eval_every == 0 or s % self.checkpoint_every == 0 or s == self.total_steps)
        return sharding.prefetch_to_device(itertools.islice(self.train_iter, end - step + 1), self.mesh,
                                           self.config.get("prefetch", 2))

    def _validate(self, step: int, writer, bar):
        d = self.dataset
        val = self.evaluate(self.state.params, "val")
        value = metrics.target_metric(d.target_metric, val)
        improved = value is not None and (self.best["value"] is None or value > self.best["value"])
        if improved:
            self.best = {"step": step, "value": value, "metrics": val}
            self._save_best(step)
        self.history.append({"step": step, "epoch": step / self.steps_per_epoch, d.target_metric: value})
        fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
        bar.write(f"step {step} (epoch {step / self.steps_per_epoch:.2f}): val {d.target_metric} {fmt(value)}"
                  f"{' (new best)' if improved else ''}; best {fmt(self.best['value'])} at step {self.best['step']}")
        if writer:
            for k, v in val.items():
                if isinstance(v, (int, float)) and v is not None:
                    writer.add_scalar(f"val/{k}", v, step)

    def _finish(self, writer) -> dict:
        d = self.dataset
        result = {"dataset": d.name, "task": d.task, "target_metric": d.target_metric,
                  "best_step": self.best["step"], "val": self.best["metrics"], "history": self.history,
                  "steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}
        if "test" in d.splits and self.best["step"] is not None:
            test = self.evaluate(self._load_best(), "test")
            result["test"] = test
            print(f"test {d.target_metric} (best model, step {self.best['step']}): "
                  f"{metrics.target_metric(d.target_metric, test)}")
            if writer:
                for k, v in test.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"test/{k}", v, self.best["step"])
        if writer:
            writer.close()
        if jax.process_index() == 0:
            _write_json(os.path.join(self.workdir, "metrics.json"), result)
        return result


def _grain_handler():
    import grain

    return grain.checkpoint.CheckpointHandler()


def _tensorboard(workdir: str):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON-serialisable: {type(x)}")
