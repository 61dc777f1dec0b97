"""Images/s of the fine-tuning train step in medjax and in the equivalent PyTorch code, side by side.

    python benchmarks/train_step.py --model mae_vit_base_patch16 --batch-size 8 --steps 5 [--image-size 224]
        [--frozen] [--mode train|embed] [--framework medjax|pytorch|both] [--dtype float32|bfloat16]
        [--remat] [--scan] [--fsdp N] [--rounds 1] [--warmup 2] [--threads N] [--no-hugepages] [--json]

`--model` is a ViT-family variant of `python -m converters` (mae_vit_base_patch16, dinov2_vitb14, deit_base_patch16_224,
clip_vit_b16, aimv2_large_patch14_224, ...) built with random weights at `--image-size`.

- `--mode train` (default): one full fine-tuning step: backbone -> linear head -> cross-entropy -> backward ->
  global-norm clipping (1.0) -> AdamW (weight decay on ndim > 1 only) -> update. medjax runs its own code:
  the trainer's `engine.build` (classifier, freezing rules, optimizer, mesh, one jitted step with the state donated)
  fed by `prefetch_to_device`.
  PyTorch runs transformers' model of the family (ViTMAEModel, Dinov2Model, ViTModel, CLIPVisionModelWithProjection,
  Aimv2VisionModel; SDPA attention) with nn.Linear, F.cross_entropy, clip_grad_norm_ and torch.optim.AdamW(fused=True),
  eagerly (fused is torch's fastest CPU AdamW: 50 ms for ViT-B with clipping, against 190 ms with foreach).
  `--frozen`: the backbone is frozen and only the head trains (no backward through the backbone on either side).
- `--mode embed`: inference, the backbone's pooled embedding (the linear head's input), jitted / under inference_mode.

`--dtype bfloat16`: medjax computes in bf16 with float32 parameters (Classifier dtype); PyTorch runs under
torch.autocast(bfloat16). Each framework runs in its own subprocess (so their peak memory does not mix) with the same
thread count (`--threads`, default: the cores this process may use; torch.set_num_threads) and the same environment:
`--hugepages` (default on) gives both glibc's transparent huge pages for malloc (see HUGEPAGES). `--warmup` steps
(compilation included) are not timed; each of `--steps` steps is timed to completion and images/s is batch / median
step time (robust to other jobs on a shared machine; the mean is printed too). `--rounds R` alternates R runs of each
framework. Printed last: `FRAMEWORK images/s: X` per framework (median over rounds) and, with both, `ratio: R`
(medjax / pytorch, the median of the per-round ratios: a round's two runs are adjacent in time, so the ratio is robust
to the load drifting). Memory: the peak RSS of each process (`peak_rss_gib`; `steady_rss_gib`: the peak over the
timed steps only, after compilation) and, for medjax, XLA's compiled memory analysis of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import count_compiles, peak_rss_gib  # noqa: E402

NUM_CLASSES = 5
LR = 1e-4
# glibc >= 2.35: malloc'ed blocks get transparent huge pages (THP "madvise" mode). Both frameworks allocate their
# activations afresh every step; with 4 KiB pages that costs ~600k page faults per ViT-B step in a VM.
HUGEPAGES = "glibc.malloc.hugetlb=1"


def backbone_config(name: str, image_size: int):
    """The variant's ViTConfig with its pos-embed stored for `image_size` (as converted for that size), except the
    families that resize at run time (DINOv2), which keep their 518 px table like the released checkpoints."""
    from medjax.models import VARIANTS
    from medjax.models.vit.convert import parse_config

    if name not in VARIANTS:
        raise SystemExit(f"unknown --model {name!r}; known: {', '.join(sorted(VARIANTS))}")
    family, kwargs = VARIANTS[name]
    kwargs = dict(kwargs)
    if family == "dinov2":
        pass
    elif family in ("clip", "coca"):
        kwargs["vision_cfg"] = dict(kwargs["vision_cfg"], image_size=image_size)
    elif "img_size" in kwargs:
        kwargs["img_size"] = image_size
    else:
        raise SystemExit(f"--model {name!r} ({family}) is not a ViT-family variant")
    return parse_config(family, kwargs)


# ------------------------------------------------------------------------------------------------ memory


def _rss_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ medjax


def run_medjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from medjax import engine, models, sharding
    from medjax.schema import make

    config = backbone_config(args.model, args.image_size)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    pool = [{"image": rng.standard_normal((args.batch_size, args.image_size, args.image_size, config.in_chans),
                                          dtype=np.float32),
             "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)} for _ in range(2)]
    mesh = sharding.make_mesh(1, args.fsdp) if args.fsdp > 1 else sharding.make_mesh(-1, 1)
    total = args.warmup + args.steps
    host_batches = (pool[i % 2] for i in range(total))
    result = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count()}

    if args.mode == "embed":
        backbone = models.build_backbone(dataclasses.replace(config, remat=False, scan=args.scan), dtype)
        variables = jax.jit(backbone.init)(jax.random.PRNGKey(0), jnp.asarray(pool[0]["image"][:1]))
        fn = jax.jit(lambda v, x: backbone.apply(v, x)["linear_head_input"])
        batches = sharding.prefetch_to_device(({"image": b["image"]} for b in host_batches), mesh, 2)
        first = next(batches)
        t0 = time.perf_counter()
        compiled = fn.lower(variables, first["image"]).compile()
        result["compile_s"] = time.perf_counter() - t0
        step = lambda batch: fn(variables, batch["image"])  # noqa: E731
        result["params"] = models.count_params(variables["params"])
    else:
        # the trainer's own build: constant lr, AdamW with weight decay 0.05 (ndim > 1), clipping 1.0 (the defaults)
        run_config = make({"model.family": config.family, "model.architecture": config.to_dict(),
                           "model.freeze": "frozen" if args.frozen else "full", "model.remat": args.remat,
                           "model.scan": args.scan, "compute_dtype": args.dtype, "image_size": args.image_size,
                           "optim.lr": LR, "optim.weight_decay": 0.05, "optim.schedule": "constant"})
        built = engine.build(run_config, num_classes=NUM_CLASSES, channels=config.in_chans, task="multiclass",
                             total_steps=total, mesh=mesh)
        fn = built.train_step
        result["params"] = models.count_params(built.state.params["backbone"])
        batches = sharding.prefetch_to_device(host_batches, mesh, 2)
        first = next(batches)
        t0 = time.perf_counter()
        compiled = fn.lower(built.state, first).compile()
        result["compile_s"] = time.perf_counter() - t0
        result["state_gib_per_device"] = _bytes_on(jax.devices()[0], (built.state.params, built.state.opt_state)) \
            / 2 ** 30
        holder = {"state": built.state}
        del built  # the steps donate the state: nothing else may hold it

        def step(batch):
            holder["state"], out = fn(holder["state"], batch)
            return out["loss"]

    mem = compiled.memory_analysis()
    if mem is not None:
        result["xla_memory_gib"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 30
                                    for k in ("argument", "output", "alias", "temp", "generated_code")}
        result["xla_memory_gib"]["peak_estimate"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 30
    del compiled

    def batches_with_first():
        yield first
        yield from batches

    with count_compiles() as compiles:
        times = _time_steps(args, batches_with_first(), lambda b: jax.block_until_ready(step(b)))
    result["compiles_in_steps"] = len(compiles)  # 0: the steps reuse the compiled executable
    return result | times


def _bytes_on(device, tree) -> int:
    """Bytes of the arrays of `tree` that live on `device` (its shards of sharded arrays)."""
    import jax

    return sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(tree) for s in leaf.addressable_shards
               if s.device == device)


def _time_steps(args, batches, run_one) -> dict:
    """Runs warm-up then timed steps; a step is timed until its result is ready."""
    times, cpu, reset, peak = [], [], False, 0.0
    for i, batch in enumerate(batches):
        if i == args.warmup:
            peak = peak_rss_gib()  # compilation and warm-up included
            reset = _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        run_one(batch)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    median = statistics.median(times)
    # CPU seconds of the process (all its threads) per step: less sensitive than wall time to other jobs' load
    return {"step_s": [round(t, 4) for t in times], "median_step_s": median, "median_cpu_s": statistics.median(cpu),
            "images_per_s": args.batch_size / median, "mean_images_per_s": args.batch_size * len(times) / sum(times),
            "steady_rss_gib": _rss_gib("VmHWM") if reset else None, "peak_rss_gib": max(peak, peak_rss_gib())}


# ------------------------------------------------------------------------------------------------ PyTorch


def torch_backbone(config):
    """transformers' model of the same architecture (random init) and a function images -> pooled embedding, the
    same vector medjax's linear head reads (`linear_head_input`)."""
    import transformers

    c = config
    image_size = c.pos_grid[0] * c.patch_size
    common = dict(hidden_size=c.width, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                  patch_size=c.patch_size, image_size=image_size, num_channels=c.in_chans)
    if c.family == "dinov2":
        if c.num_registers or c.ffn != "mlp":
            raise SystemExit("the PyTorch side covers the plain DINOv2 models (no registers, MLP)")
        model = transformers.Dinov2Model(transformers.Dinov2Config(
            mlp_ratio=c.mlp_hidden // c.width, layerscale_value=1.0, layer_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias,
            **common))
        return model, lambda x: model(x).pooler_output  # the final-normed CLS
    if c.family == "mae":
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(
            intermediate_size=c.mlp_hidden, layer_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias, mask_ratio=0.0, **common))
        return model, lambda x: model(x).last_hidden_state[:, 1:].mean(dim=1)  # mean of the normed patch tokens
    if c.family == "deit":
        model = transformers.ViTModel(transformers.ViTConfig(
            intermediate_size=c.mlp_hidden, layer_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias, **common),
            add_pooling_layer=False)
        return model, lambda x: model(x).last_hidden_state[:, 0]
    if c.family == "clip":
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            intermediate_size=c.mlp_hidden, layer_norm_eps=c.norm_eps, hidden_act="gelu", projection_dim=c.proj_dim,
            **common))
        return model, lambda x: model(x).image_embeds
    if c.family == "aimv2":
        model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(
            intermediate_size=c.mlp_hidden, rms_norm_eps=c.norm_eps, qkv_bias=c.qkv_bias, mlp_bias=c.ffn_bias,
            use_head=False, **common))
        return model, lambda x: model(x).last_hidden_state.mean(dim=1)
    raise SystemExit(f"no PyTorch counterpart for the {c.family} family in this benchmark")


def run_pytorch(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = backbone_config(args.model, args.image_size)
    model, embed = torch_backbone(config)
    rng = np.random.default_rng(0)
    pool = [(torch.from_numpy(rng.standard_normal((args.batch_size, config.in_chans, args.image_size,
                                                   args.image_size), dtype=np.float32)),
             torch.from_numpy(rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int64))) for _ in range(2)]
    batches = (pool[i % 2] for i in range(args.warmup + args.steps))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else \
        (lambda: torch.autocast("cpu", enabled=False))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "params": sum(p.numel() for p in model.parameters())}

    if args.mode == "embed":
        model.eval()

        def run_one(batch):
            with torch.inference_mode(), autocast():
                embed(batch[0])
    else:
        model.train()  # dropout is 0 in these configs; as in fine-tuning
        head = torch.nn.Linear(_embed_dim(config), NUM_CLASSES)
        for p in model.parameters():
            p.requires_grad_(not args.frozen)
        named = [(n, p) for n, p in list(model.named_parameters()) + list(head.named_parameters())
                 if p.requires_grad]
        groups = [{"params": [p for _, p in named if p.ndim > 1]},
                  {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, fused=True)
        trained = [p for _, p in named]

        def run_one(batch):
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = head(embed(batch[0]))
            loss = torch.nn.functional.cross_entropy(logits.float(), batch[1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            return loss.item()

    return result | _time_steps(args, batches, run_one)


def _embed_dim(config) -> int:
    return config.proj_dim or config.width


# ------------------------------------------------------------------------------------------------ driver


def worker(args) -> int:
    if args.framework == "medjax":
        result = run_medjax(args)
    else:
        result = run_pytorch(args)
    print("RESULT " + json.dumps(result))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--frozen", action="store_true", help="frozen backbone: only the linear head trains")
    p.add_argument("--mode", default="train", choices=("train", "embed"))
    p.add_argument("--framework", default="both", choices=("medjax", "pytorch", "both"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--remat", action="store_true", help="medjax: rematerialise each block (ViTConfig.remat)")
    p.add_argument("--scan", action="store_true", help="medjax: scan over the blocks (ViTConfig.scan)")
    p.add_argument("--fsdp", type=int, default=1,
                   help="medjax: shard parameters and optimizer state over this many devices (a (1, N) mesh; on CPU "
                        "N devices are emulated with --xla_force_host_platform_device_count)")
    p.add_argument("--rounds", type=int, default=1, help="alternate this many runs of each framework")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                   help=f"run both frameworks with GLIBC_TUNABLES={HUGEPAGES} (transparent huge pages for malloc)")
    p.add_argument("--json", action="store_true", help="also print every run's full result as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (the first step compiles)")

    frameworks = ["medjax", "pytorch"] if args.framework == "both" else [args.framework]
    runs = {f: [] for f in frameworks}
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for r in range(args.rounds):
        for f in frameworks:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--framework", f, "--worker"]
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            if args.fsdp > 1 and env["JAX_PLATFORMS"] == "cpu":
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.fsdp}"
            if args.hugepages:  # both frameworks alike
                env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGEPAGES]))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                print(f"error: the {f} run failed ({proc.returncode})", file=sys.stderr)
                return 1
            out = json.loads(lines[-1][len("RESULT "):])
            runs[f].append(out)
            if args.json:
                print(json.dumps({"framework": f, "round": r, **out}))
            _summary(f, out)

    what = {"train": "frozen-backbone train step" if args.frozen else "full fine-tuning train step",
            "embed": "inference (embedding)"}[args.mode]
    print(f"# {args.model} {args.image_size}px batch {args.batch_size} {args.dtype}, {what}, {args.threads} threads"
          f"{', remat' if args.remat else ''}{', scan' if args.scan else ''}"
          f"{f', FSDP over {args.fsdp} devices' if args.fsdp > 1 else ''}"
          f"{', malloc huge pages' if args.hugepages else ''}; median over {args.steps} steps"
          f"{f' and {args.rounds} rounds' if args.rounds > 1 else ''}")
    rate = {f: statistics.median(o["images_per_s"] for o in runs[f]) for f in frameworks}
    for f in frameworks:
        print(f"{f} images/s: {rate[f]:.3f}")
    if len(frameworks) == 2:
        # each round's runs are adjacent in time, so their ratio is robust to the machine's load drifting
        ratios = [m["images_per_s"] / t["images_per_s"] for m, t in zip(runs["medjax"], runs["pytorch"])]
        if len(ratios) > 1:
            print(f"# ratio per round: {', '.join(f'{r:.3f}' for r in ratios)}")
        print(f"ratio: {statistics.median(ratios):.3f}")
    return 0


def _summary(framework: str, out: dict):
    parts = [f"{framework}: {out['images_per_s']:.3f} img/s (median step {out['median_step_s']:.3f} s, "
             f"mean {out['mean_images_per_s']:.3f} img/s)", f"params {out['params'] / 1e6:.1f} M",
             f"peak RSS {out['peak_rss_gib']:.2f} GiB"]
    if out.get("steady_rss_gib") is not None:
        parts.append(f"steady-state peak RSS {out['steady_rss_gib']:.2f} GiB")
    if "compile_s" in out:
        parts.append(f"compile {out['compile_s']:.1f} s, {out['compiles_in_steps']} compilation(s) during the steps")
    if "state_gib_per_device" in out:
        parts.append(f"parameters + optimizer state on device 0 {out['state_gib_per_device']:.3f} GiB")
    if "xla_memory_gib" in out:
        m = out["xla_memory_gib"]
        parts.append(f"XLA: arguments {m['argument']:.2f} + outputs {m['output']:.2f} - aliased {m['alias']:.2f} "
                     f"+ temporaries {m['temp']:.2f} = {m['peak_estimate']:.2f} GiB")
    print("; ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
