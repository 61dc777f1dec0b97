"""The one build path: a config -> (model, variables, trainable rules, optimizer, mesh, sharded state, jitted steps).

The trainer, the protocols, the benchmarks and the tests all call `build`; nothing else assembles a model and its
step. Every flax variable collection of the model travels with it: `TrainState.params` holds the parameters,
`TrainState.model_state` every other collection (`batch_stats` of BatchNorm), returned by the train step (mutable) and
kept with the parameters in checkpoints and the best model.

    from medjax.schema import study_config
    e = engine.build(config, num_classes=5, channels=3, task="multiclass", total_steps=1000)
    state, out = e.train_step(e.state, sharding.global_batch(batch, e.mesh))
    probs = e.eval_step(e.variables_of(state), images)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import classifier, models, optim, peft, rules, sharding
from medjax.models.layers import frozen_norms
from medjax.pretrained import flatten


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # every variable collection besides params, e.g. {'batch_stats': ...}; {} for most backbones
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


def make_train_step(model, tx, task: str, trainable, norms_frozen=frozenset()):
    """One update. Frozen parameters sit behind stop_gradient, so no backward pass runs through a frozen backbone.
    The model runs with train=True: BatchNorm uses batch statistics and updates its running ones (returned in
    `model_state`), except the BatchNorms in `norms_frozen`; dropout draws from rng `dropout` (the state's key folded
    with the step). A non-finite loss or gradient leaves the whole state unchanged and is reported in `finite`."""

    def train_step(state: TrainState, batch):
        collections = list(state.model_state)
        rng = jax.random.fold_in(state.rng, state.step)

        def compute_loss(params):
            params = jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
            with frozen_norms(norms_frozen):
                out = model.apply({"params": params, **state.model_state}, batch["image"], train=True,
                                  rngs={"dropout": rng}, mutable=collections or False)
            logits, new_model_state = out if collections else (out, {})
            return loss_fn(logits, batch["label"], task, batch.get("mask")), new_model_state

        (loss, new_model_state), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  model_state=keep(dict(new_model_state), state.model_state),
                                  opt_state=keep(opt_state, state.opt_state))
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_eval_step(model, task: str):
    """(variables, images) -> class probabilities, with train=False (stored BatchNorm statistics, no dropout)."""
    def eval_step(variables, images):
        logits = model.apply(variables, images)
        return jax.nn.softmax(logits) if task == "multiclass" else jax.nn.sigmoid(logits)
    return eval_step


def frozen_norm_paths(variables: dict, trainable: dict) -> frozenset:
    """Module paths of the BatchNorms whose parameters are frozen: they keep their statistics (see layers.BatchNorm)."""
    stats = flatten(variables.get("batch_stats", {}))
    mask = flatten(trainable)
    modules = {k.rsplit("/", 1)[0] for k in stats}
    return frozenset(m for m in modules if not mask.get(f"{m}/scale", False))


@dataclasses.dataclass
class Engine:
    """What `build` returns; `state` (the initial state) is placed on `mesh`, `train_step` and `eval_step` are jitted
    with shardings. `train_step` donates the state it is given: keep the state it returns, not `Engine.state`."""

    model: Any
    family: models.Family
    backbone_config: Any
    trainable: dict  # {path: bool} tree over the parameters
    trainable_rules: list  # the (regex, train|freeze) rules that made it
    lr_scale_rules: list
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: jax.sharding.Mesh
    state: TrainState
    state_sharding: TrainState
    train_step: Callable
    eval_step: Callable
    norms_frozen: frozenset

    @staticmethod
    def variables_of(state: TrainState) -> dict:
        return {"params": state.params, **state.model_state}

    @property
    def variables_sharding(self) -> dict:
        return self.variables_of(self.state_sharding)


def build(config, *, num_classes: int, channels: int, task: str, total_steps: int, warmup_steps: int = 0,
          mesh=None, abstract: bool = False) -> Engine:
    """Everything a run needs from a config (its `model`, `optim`, `compute_dtype`, `image_size`, `seed`, `mesh`,
    `sharding_rules` fields): the classifier with its pretrained variables, LoRA adapters if `model.peft='lora'`, the
    trainable mask and lr multipliers from the rules, the optimizer, the mesh, the sharded state and the jitted steps.

    abstract=True (`python -m medjax.plan`): the same steps, but `state` is a tree of jax.ShapeDtypeStructs carrying
    their shardings: no weights are read and nothing is allocated, so the steps can be lowered and compiled ahead of
    time, also for devices that are not attached (a TPU topology)."""
    m = config.model
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model, variables = classifier.build_classifier(m, num_classes, channels, config.image_size,
                                                   jax.random.PRNGKey(config.seed), dtype, abstract=abstract)
    family = models.family(model.backbone.family)
    params = variables["params"]
    if m.peft == "lora":
        targets = list(m.lora.targets) or family.lora_targets(model.backbone)
        if not targets:
            raise rules.RuleError(f"model.peft='lora': the {family.name} family names no LoRA targets; set "
                                  "model.lora.targets (regexes over backbone parameter paths)")
        model, params = peft.add_lora(model, params, jax.random.PRNGKey(config.seed + 1),
                                      peft.backbone_patterns(targets), m.lora.rank, m.lora.alpha)
    backbone = model_backbone(model)
    trainable_rules = rules.trainable_rules(m, family, backbone)
    trainable = rules.trainable_mask(params, trainable_rules)
    lr_rules = rules.lr_scale_rules(config.optim, family, backbone)
    tx, schedule = optim.make_optimizer(config.optim, trainable, total_steps, warmup_steps,
                                        rules.lr_scales(params, lr_rules))
    mesh = mesh or sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    norms_frozen = frozen_norm_paths(variables, trainable)

    def new_state(params, model_state):
        # the dropout stream's key is not LoRA's init key (seed + 1)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed + 2))

    # The state is created on the mesh, already sharded: the optimizer moments never exist whole on one device.
    shapes = jax.eval_shape(new_state, params, model_state)
    specs = sharding.param_specs(params, mesh, [tuple(r) for r in config.sharding_rules])
    state_sharding = sharding.tree_shardings(shapes, params, specs, mesh)
    if abstract:
        state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                       state_sharding)
    else:
        state = jax.jit(new_state, out_shardings=state_sharding)(
            jax.device_put(params, state_sharding.params), jax.device_put(model_state, state_sharding.model_state))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(make_train_step(model, tx, task, trainable, norms_frozen), in_shardings=(state_sharding, None),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, task),
                        in_shardings=(Engine.variables_of(state_sharding), None))
    return Engine(model=model, family=family, backbone_config=backbone, trainable=trainable,
                  trainable_rules=trainable_rules, lr_scale_rules=lr_rules, tx=tx, schedule=schedule, mesh=mesh,
                  state=state, state_sharding=state_sharding, train_step=step,
                  eval_step=eval_step, norms_frozen=norms_frozen)


def model_backbone(model):
    """The backbone config of a classifier (or of the classifier inside a LoRA wrapper)."""
    return getattr(model, "model", model).backbone


# ------------------------------------------------------------------------------------------------ start-up summary


def summary_table(engine: Engine, state: TrainState | None = None) -> str:
    """One row per top-level module and collection: parameter count, trained / frozen counts and the rules that
    decided them (the index in the rule list and its regex)."""
    state = engine.state if state is None else state
    flat_params = flatten(jax.tree_util.tree_map(np.shape, state.params, is_leaf=lambda x: hasattr(x, "shape")))
    hits = rules.resolve(engine.trainable_rules, flat_params, "model.trainable_rules")
    rows = []
    groups: dict[str, list[str]] = {}
    for path in flat_params:
        groups.setdefault(path.split("/", 1)[0], []).append(path)
    for top, paths in groups.items():
        size = {p: int(np.prod(flat_params[p])) for p in paths}
        trained = sum(size[p] for p in paths if hits[p][1] == rules.TRAIN)
        used = sorted({hits[p][0] for p in paths})
        why = "; ".join(f"#{i} {engine.trainable_rules[i][0]!r} -> {engine.trainable_rules[i][1]}" for i in used)
        rows.append((top, "params", sum(size.values()), trained, sum(size.values()) - trained, why))
    for collection, tree in state.model_state.items():
        flat = flatten(jax.tree_util.tree_map(np.shape, dict(tree), is_leaf=lambda x: hasattr(x, "shape")))
        count = sum(int(np.prod(s)) for s in flat.values())
        modules = {k.rsplit("/", 1)[0] for k in flat}
        frozen = len(modules & engine.norms_frozen)
        rows.append(("backbone", collection, count, None, None,
                     f"running statistics of {len(modules)} norms ({frozen} frozen: stored statistics)"))
    header = ("module", "collection", "count", "trained", "frozen", "rule")
    table = [header] + [(a, b, f"{c:,}", "-" if d is None else f"{d:,}", "-" if e is None else f"{e:,}", f)
                        for a, b, c, d, e, f in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join(str(r[i]).ljust(widths[i]) if i < len(widths) else str(r[i]) for i in range(len(header)))
             for r in table]
    total = sum(r[2] for r in rows if r[1] == "params")
    trained = sum(r[3] for r in rows if r[1] == "params")
    lines.append(f"total parameters {total:,}, trained {trained:,}")
    return "\n".join(lines)
