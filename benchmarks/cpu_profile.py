"""Where the CPU time of the ViT fine-tuning train step goes, in medjax (XLA:CPU) and in PyTorch eager, side by side.

    python benchmarks/cpu_profile.py split [--model mae_vit_base_patch16] [--rounds 3] [--steps 3]
    python benchmarks/cpu_profile.py matmul [--rounds 3]
    python benchmarks/cpu_profile.py flags [--rounds 3] [--variant NAME=XLA_FLAGS ...] [--dtype bfloat16]

The step is `benchmarks/train_step.py`'s (full fine-tuning, float32, 224 px, batch 8, AdamW, clipping 1.0); each
framework runs in its own subprocess and the subprocesses alternate (medjax, PyTorch, medjax, ...), so that both see
the same load on a shared machine. Every line says the load average when it ran.

`split`: per round, one medjax process and one PyTorch process each time `--steps` steps (after 2 warm-up steps)
and then profile one more step:
- medjax: `jax.profiler.trace` with `--xla_cpu_enable_xprof_traceme`: every XLA thunk (one fused kernel) of the step
  with its duration; each thunk is put in a category from its HLO instruction (the optimized module of the compiled
  step): its `op_name` metadata (the flax module path: `.../blocks_3/mlp/fc1/dot_general`) and whether it holds a
  dot. Host overhead: the step's wall time minus the span from the first thunk's start to the last one's end.
- PyTorch: `torch.profiler` self CPU time per aten operator, put in the same categories by name; the clipping and
  the AdamW step are timed by themselves (eager CPU ops are synchronous). Host overhead: the step's wall time minus
  the operators' self time (Python, the autograd engine, the dispatcher).
The profiled step is slower than an unprofiled one (the profiler's own cost), so the categories are printed as shares
of the profiled step and as seconds scaled to the median unprofiled step.

`matmul`: the 12 matrix products of one ViT-B/16 block at batch 8 (1576 tokens: qkv, proj, fc1, fc2; forward,
input gradient, weight gradient) jitted one by one in XLA and as `torch.mm` on views, alternating; GFLOP/s.

`flags`: the whole medjax step (train_step.py's medjax run) under each `--variant NAME=XLA_FLAGS` (default: the
XLA:CPU flags this jaxlib has that could matter; see VARIANTS), alternating with the default flags and PyTorch in
every round; per variant the median over rounds of its images/s relative to the same round's default run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import train_step as ts  # noqa: E402
from benchmarks._common import median_seconds  # noqa: E402

TRACEME = "--xla_cpu_enable_xprof_traceme=true"
# XLA:CPU flags of jaxlib 0.10.2 that could change the step's speed (listed by XLA_FLAGS=--help).
# `--xla_cpu_use_onednn=true` alone changes nothing: the dots stay YNNPACK fusions unless YNN gives up `dot` and
# oneDNN's fusion list takes it (checked in the compiled HLO: `__onednn_fusion`).
ONEDNN_DOT = ("--xla_cpu_experimental_ynn_fusion_type=-dot --xla_cpu_use_onednn=true "
              "--xla_cpu_experimental_onednn_fusion_type=dot")
VARIANTS = {
    "onednn-dot": ONEDNN_DOT,
    "vector-512": "--xla_cpu_prefer_vector_width=512",
    "ynn-eltwise-reduce": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
}
CATEGORIES = ("matmul (dense layers, patch embedding, head)", "attention core (QK^T, softmax, AV, its transposes)",
              "LayerNorm", "GELU", "bias gradients, residual adds, other elementwise", "clipping + AdamW update",
              "copies", "host overhead")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


# ------------------------------------------------------------------------------------------------ medjax


def hlo_instructions(hlo_text: str) -> dict:
    """{instruction name: (opcode, op_name metadata, holds a dot)} for the optimized module's instructions."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)}
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([^,\s]+)", line)
        body = bodies.get(calls.group(1), "") if calls else ""
        dot = m.group(2) in ("dot", "convolution") or " dot(" in body or " convolution(" in body
        out[m.group(1)] = (m.group(2), op.group(1) if op else "", dot)
    return out


def xla_category(opcode: str, op_name: str, dot: bool) -> str:
    """The category of one XLA thunk from its instruction: the backbone's ops carry their flax module path."""
    if "Classifier" in op_name:
        if "/attn/" in op_name and not re.search(r"/attn/(qkv|proj)/", op_name):
            return CATEGORIES[1]
        if dot or "patch_embed" in op_name:
            return CATEGORIES[0]
        if re.search(r"/(norm\d*|fc_norm|norm_pre)/", op_name):
            return CATEGORIES[2]
        if re.search(r"/mlp/(erf|mul|add|select|exp|integer_pow|sub|neg)", op_name) or "gelu" in op_name:
            return CATEGORIES[3]
        return CATEGORIES[4]
    if opcode == "copy":
        return CATEGORIES[6]
    if dot:  # the head's matmul sits outside the backbone
        return CATEGORIES[0]
    return CATEGORIES[5]


def medjax_split(args) -> dict:
    import jax
    import numpy as np

    from medjax import engine, sharding
    from medjax.schema import make

    config = ts.backbone_config(args.model, 224)
    run_config = make({"model.family": config.family, "model.architecture": config.to_dict(), "model.freeze": "full",
                       "compute_dtype": "float32", "image_size": 224, "optim.lr": ts.LR, "optim.weight_decay": 0.05,
                       "optim.schedule": "constant"})
    mesh = sharding.make_mesh(-1, 1)
    built = engine.build(run_config, num_classes=ts.NUM_CLASSES, channels=3, task="multiclass", total_steps=100,
                         mesh=mesh)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.standard_normal((8, 224, 224, 3), dtype=np.float32),
                                   "label": rng.integers(0, ts.NUM_CLASSES, 8).astype(np.int32)}, mesh)
    compiled = built.train_step.lower(built.state, batch).compile()
    instructions = hlo_instructions(compiled.as_text())
    state = built.state
    del built  # donated by every step
    times, cpu = [], []
    for i in range(2 + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            state, out = compiled(state, batch)
            jax.block_until_ready(out)
            wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    split = collections.Counter()
    for e in events:
        split[xla_category(*instructions.get(e["args"]["hlo_op"], ("?", "", False)))] += e["dur"] / 1e6
    start, end = min(e["ts"] for e in events), max(e["ts"] + e["dur"] for e in events)
    split[CATEGORIES[7]] = max(wall - (end - start) / 1e6, 0.0)
    return {"median_step_s": statistics.median(times), "median_cpu_s": statistics.median(cpu), "profiled_step_s": wall,
            "kernel_sum_s": sum(e["dur"] for e in events) / 1e6, "kernels": len(events), "split": dict(split),
            "load": load()}


# ------------------------------------------------------------------------------------------------ PyTorch


def torch_category(name: str) -> str | None:
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n or n in ("aten::bmm", "aten::baddbmm", "aten::_softmax",
                                                                     "aten::_softmax_backward_data"):
        return CATEGORIES[1]
    if n in ("aten::mm", "aten::addmm", "aten::matmul") or "convolution" in n:
        return CATEGORIES[0]
    if "layer_norm" in n:
        return CATEGORIES[2]
    if "gelu" in n:
        return CATEGORIES[3]
    if n in ("aten::copy_", "aten::clone", "aten::contiguous"):
        return CATEGORIES[6]
    return CATEGORIES[4]


def torch_split(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    config = ts.backbone_config(args.model, 224)
    model, embed = ts.torch_backbone(config)
    model.train()
    head = torch.nn.Linear(ts._embed_dim(config), ts.NUM_CLASSES)
    named = list(model.named_parameters()) + list(head.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim > 1]},
              {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=ts.LR, weight_decay=0.05, fused=True)
    params = [p for _, p in named]
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((8, 3, 224, 224), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, ts.NUM_CLASSES, 8).astype(np.int64))

    def step(parts=None):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(embed(images)), labels)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if parts is not None:
            parts.append(time.perf_counter() - t1)
        return loss.item()

    times, cpu = [], []
    for i in range(2 + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    optimizer = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step(optimizer)
        wall = time.perf_counter() - t0
    split = collections.Counter()
    for row in prof.key_averages():
        if row.key.startswith("Optimizer.") or "adamw" in row.key.lower() or "foreach" in row.key.lower() \
                or row.key in ("aten::linalg_vector_norm", "aten::stack", "aten::clamp"):
            continue  # inside the separately timed clip + AdamW
        split[torch_category(row.key)] += row.self_cpu_time_total / 1e6
    # the optimizer section's wall time; its ops were excluded above
    split[CATEGORIES[5]] = optimizer[0]
    ops = sum(split.values())
    split[CATEGORIES[7]] = max(wall - ops, 0.0)
    return {"median_step_s": statistics.median(times), "median_cpu_s": statistics.median(cpu), "profiled_step_s": wall,
            "kernel_sum_s": ops, "split": dict(split), "load": load()}


# ------------------------------------------------------------------------------------------------ matmul


def matmul_shapes():
    """(name, m, k, n) of the 12 products of one ViT-B/16 block at batch 8 (1576 tokens), forward and backward."""
    tokens = 8 * 197
    out = []
    for layer, fan_in, fan_out in (("qkv", 768, 2304), ("proj", 768, 768), ("fc1", 768, 3072), ("fc2", 3072, 768)):
        out += [(f"{layer} forward", tokens, fan_in, fan_out), (f"{layer} input grad", tokens, fan_out, fan_in),
                (f"{layer} weight grad", fan_in, tokens, fan_out)]
    return out


def matmul_xla(args) -> dict:
    import jax
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    out = {}
    for name, m, k, n in matmul_shapes():
        # the layouts the backward pass has: x^T g contracts the rows, g W^T contracts the columns of W
        if "weight" in name:
            a, b, dims = rng.standard_normal((m, k)).T, rng.standard_normal((k, n)), (((0,), (0,)), ((), ()))
            a = np.ascontiguousarray(a, np.float32)
        elif "input" in name:
            a, b, dims = rng.standard_normal((m, k)), rng.standard_normal((n, k)), (((1,), (1,)), ((), ()))
        else:
            a, b, dims = rng.standard_normal((m, k)), rng.standard_normal((k, n)), (((1,), (0,)), ((), ()))
        a, b = jax.numpy.asarray(a, np.float32), jax.numpy.asarray(b, np.float32)
        fn = jax.jit(lambda a, b, dims=dims: lax.dot_general(a, b, dims))
        out[name] = median_seconds(lambda: fn(a, b).block_until_ready(), args.repeats)
    return {"seconds": out, "load": load()}


def matmul_torch(args) -> dict:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = {}
    for name, m, k, n in matmul_shapes():
        if "weight" in name:
            a, b = torch.randn(k, m).t(), torch.randn(k, n)
        elif "input" in name:
            a, b = torch.randn(m, k), torch.randn(n, k).t()
        else:
            a, b = torch.randn(m, k), torch.randn(k, n)
        out[name] = median_seconds(lambda: torch.mm(a, b), args.repeats)
    return {"seconds": out, "load": load()}


# ------------------------------------------------------------------------------------------------ driver


def _subprocess(what: str, args, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", what, "--model", args.model, "--steps",
           str(args.steps), "--repeats", str(args.repeats)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), ts.HUGEPAGES]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: the {what} run failed ({proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def split_main(args):
    runs = {"medjax": [], "pytorch": []}
    for r in range(args.rounds):
        for f in runs:
            env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {TRACEME}".strip()} if f == "medjax" else {}
            out = _subprocess(f"split-{f}", args, env)
            runs[f].append(out)
            print(f"# round {r} {f}: median step {out['median_step_s']:.2f} s ({8 / out['median_step_s']:.2f} img/s), "
                  f"CPU time {out['median_cpu_s']:.2f} s, profiled step {out['profiled_step_s']:.2f} s, {out['load']}",
                  flush=True)
            if args.json:
                print(json.dumps({"framework": f, "round": r, **out}), flush=True)
    ratios = [(8 / m["median_step_s"]) / (8 / t["median_step_s"]) for m, t in zip(runs["medjax"], runs["pytorch"])]
    cpu = [t["median_cpu_s"] / m["median_cpu_s"] for m, t in zip(runs["medjax"], runs["pytorch"])]
    print(f"# ratio (medjax / PyTorch images/s) per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"median {statistics.median(ratios):.2f}; by CPU time per step: {', '.join(f'{x:.2f}' for x in cpu)}; "
          f"median {statistics.median(cpu):.2f}")
    print("| category | medjax s (share) | PyTorch s (share) |\n|---|---|---|")
    for c in CATEGORIES:
        cells = []
        for f in runs:
            # each round's profiled split scaled to that round's unprofiled median step, then the median over rounds
            secs = [o["split"].get(c, 0.0) / sum(o["split"].values()) * o["median_step_s"] for o in runs[f]]
            shares = [o["split"].get(c, 0.0) / sum(o["split"].values()) for o in runs[f]]
            cells.append(f"{statistics.median(secs):.2f} ({100 * statistics.median(shares):.0f}%)")
        print(f"| {c} | {cells[0]} | {cells[1]} |")
    for f in runs:
        steps = [o["median_step_s"] for o in runs[f]]
        print(f"| step ({f}) | median {statistics.median(steps):.2f} s, range {min(steps):.2f}-{max(steps):.2f} s |")


def matmul_main(args):
    runs = {"xla": [], "torch": []}
    flags = os.environ.get("XLA_FLAGS", "")
    for _ in range(args.rounds):
        for f in runs:
            runs[f].append(_subprocess(f"matmul-{f}", args))
    print(f"# XLA_FLAGS={flags!r}; {runs['xla'][-1]['load']}")
    print("| product (m x k x n) | XLA GFLOP/s | PyTorch GFLOP/s |\n|---|---|---|")
    total = {f: 0.0 for f in runs}
    flops_total = 0
    for name, m, k, n in matmul_shapes():
        flops = 2 * m * k * n
        flops_total += flops
        cells = []
        for f in runs:
            secs = statistics.median(o["seconds"][name] for o in runs[f])
            total[f] += secs
            cells.append(f"{flops / secs / 1e9:.0f}")
        print(f"| {name} ({m} x {k} x {n}) | {cells[0]} | {cells[1]} |")
    print(f"| one block's 12 products, {flops_total / 1e9:.1f} GFLOP | {flops_total / total['xla'] / 1e9:.0f} "
          f"({total['xla'] * 1e3:.0f} ms) | {flops_total / total['torch'] / 1e9:.0f} ({total['torch'] * 1e3:.0f} ms) |")


def flags_main(args):
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else dict(VARIANTS)
    base = os.environ.get("XLA_FLAGS", "")
    step_args = ["--model", args.model, "--steps", str(args.steps), "--warmup", "1", "--dtype", args.dtype]
    rel = {v: [] for v in variants}
    rates, cpu_rates = collections.defaultdict(list), collections.defaultdict(list)
    for r in range(args.rounds):
        order = [("default", None)] + [("pytorch", None)] * args.pytorch + [(v, variants[v]) for v in variants]
        got = {}
        for name, flags in order:
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["XLA_FLAGS"] = f"{base} {flags or ''}".strip()
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), ts.HUGEPAGES]))
            fw = "pytorch" if name == "pytorch" else "medjax"
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), *step_args,
                                   "--framework", fw, "--worker"], capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"# round {r} {name}: failed ({proc.returncode}): {proc.stderr.strip()[-300:]}", flush=True)
                continue
            out = json.loads(lines[-1][len("RESULT "):])
            got[name] = out["images_per_s"]
            rates[name].append(got[name])
            cpu_rates[name].append(8 / out["median_cpu_s"])
            print(f"# round {r} {name} ({flags or 'default flags'}): {got[name]:.3f} img/s, "
                  f"{out['median_cpu_s']:.2f} CPU s per step, {load()}", flush=True)
        for v in variants:
            if v in got and "default" in got:
                rel[v].append(got[v] / got["default"])
    print("| XLA flags | img/s (median) | images per CPU-second | vs default flags, per round | median |\n"
          "|---|---|---|---|---|")
    for name in ["default", *["pytorch"] * args.pytorch, *variants]:
        flags = variants.get(name, "(PyTorch eager)" if name == "pytorch" else "(none)")
        per = ", ".join(f"{x:.2f}" for x in rel.get(name, []))
        med = f"{statistics.median(rel[name]):.2f}" if rel.get(name) else "-"
        rate = f"{statistics.median(rates[name]):.3f}" if rates[name] else "failed"
        cpu = f"{statistics.median(cpu_rates[name]):.3f}" if cpu_rates[name] else "-"
        print(f"| {name}: `{flags}` | {rate} | {cpu} | {per} | {med} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("split", "matmul", "flags", "split-medjax", "split-pytorch", "matmul-xla",
                                    "matmul-torch"))
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (after 2 untimed)")
    p.add_argument("--repeats", type=int, default=5, help="matmul: timed repeats per product")
    p.add_argument("--variant", action="append", help="flags: NAME=XLA_FLAGS (repeatable; default: VARIANTS)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="flags: the step's compute dtype (PyTorch: autocast); split and matmul are float32")
    p.add_argument("--pytorch", action=argparse.BooleanOptionalAction, default=True,
                   help="flags: also run PyTorch's step in every round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn = {"split-medjax": medjax_split, "split-pytorch": torch_split, "matmul-xla": matmul_xla,
              "matmul-torch": matmul_torch}[args.what]
        print("RESULT " + json.dumps(fn(args)))
        return 0
    {"split": split_main, "matmul": matmul_main, "flags": flags_main}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
