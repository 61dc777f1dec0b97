"""The headline figures on one accelerator, in one go (driven by benchmarks/device_check.sh; docs/planning.md).

    python benchmarks/device_check.py --out DIR [--dry-run] [--budget 480]

Sections, each in its own subprocess with a time limit (what did not finish in time is reported as such, the rest
still runs):
  env        the devices jax and PyTorch see, versions, nvidia-smi's GPU line, and each model's FLOPs per image of
             the full fine-tuning step (medjax.plan.model_flops: the lowered step on the CPU, XLA's attention)
  medjax     the trainer's bf16 full fine-tuning step (medjax.engine.build, as benchmarks/train_step.py builds it)
             for ViT-B/16 (batch 256; deit_base_patch16_224's shape) and DINOv2-L/14 (batch 64) at 224 px, with
             cuDNN's fused attention on and off: images/s (median of 10 steps after 2) and MFU = FLOPs per image x
             images/s / the chip's peak bf16 rate (H100 989 TFLOP/s)
  pytorch    the same models in transformers (SDPA attention), torch.autocast bf16, fused AdamW, on the same GPU
  input      the prepared-data pipeline: real-size APTOS PNGs (3216 x 2136) prepared at 256 px and read by
             `python -m medjax.data bench` with 16 worker processes: images/s and CPU ms per image
Writes DIR/device_check.json (every section's result) and DIR/device_check.md (the table), prints the table.

--dry-run: the same code path on CPU with tiny sizes (the first model only, as a 2-block ViT at 32 px, batch 8; 48
small images, 1 worker; no time limit unless --budget): what tests/test_device_check.py runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

PEAK = {"H100": 989e12, "A100": 312e12, "H200": 989e12}  # dense bf16 FLOP/s
MODELS = {"vit_b16": ("deit_base_patch16_224", 256), "dinov2_l14": ("dinov2_vitl14", 64)}  # variant, batch
TINY = {"family": "dinov2", "width": 64, "depth": 2, "num_heads": 2, "patch_size": 8, "pos_grid": [4, 4],
        "mlp_hidden": 128, "layerscale": True}


def models_to_run(dry: bool) -> list[str]:
    """Both models; a dry run takes the first (the same code path for the second) to stay quick."""
    return list(MODELS)[:1] if dry else list(MODELS)


def backbone(name: str, dry: bool):
    """The ViT config of a MODELS entry at 224 px (tiny in a dry run)."""
    from train_step import backbone_config

    from medjax import models

    if dry:
        return models.config_from_dict("dinov2", dict(TINY))
    return backbone_config(MODELS[name][0], 224)


def image_size(dry: bool) -> int:
    return 32 if dry else 224


def batch_size(name: str, dry: bool) -> int:
    return 8 if dry else MODELS[name][1]


def peak_flops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK.items() if k in device_kind), None)


# ------------------------------------------------------------------------------------------------ sections


def section_env(args) -> dict:
    """Versions, devices, nvidia-smi's line, and the model FLOPs per image (lowered on the CPU: XLA's attention)."""
    import jax
    import torch

    out = {"jax": jax.__version__, "devices": [str(d.device_kind) for d in jax.devices()],
           "backend": jax.default_backend(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "cpus": os.cpu_count()}
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["nvidia_smi"] = None
    out["flops_per_image"] = {name: model_flops_per_image(name, args.dry_run) for name in models_to_run(args.dry_run)}
    return out


def model_flops_per_image(name: str, dry: bool) -> float:
    """The full fine-tuning step's FLOPs per image, as medjax.plan counts them (XLA attention, unrolled, on CPU)."""
    from medjax import plan
    from medjax.schema import make

    config = backbone(name, dry)
    run = make({"dataset": "aptos2019", "model.family": config.family, "model.architecture": config.to_dict(),
                "model.freeze": "full", "compute_dtype": "bfloat16", "image_size": image_size(dry), "batch_size": 8})
    return plan.model_flops(run, ("multiclass", 5, 3)) / 8


def section_medjax(args) -> dict:
    """Every model with cuDNN attention on, then off, through benchmarks/train_step.py's medjax runner."""
    import jax
    import train_step

    from medjax.models import layers

    cudnn = layers.use_cudnn_attention
    out = {}
    for name in models_to_run(args.dry_run):
        for attention in ("on", "off"):
            layers.use_cudnn_attention = cudnn if attention == "on" else (lambda dtype, head_dim: False)
            config = backbone(name, args.dry_run)
            train_step.backbone_config = lambda _name, _size, config=config: config
            ns = argparse.Namespace(model=name, image_size=image_size(args.dry_run),
                                    batch_size=batch_size(name, args.dry_run), mode="train", frozen=False,
                                    dtype="bfloat16", remat=False, scan=False, fsdp=1, warmup=2,
                                    steps=3 if args.dry_run else 10)
            try:
                result = train_step.run_medjax(ns)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported, the other runs go on
                result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            out[f"{name}_{attention}"] = result | {"device_kind": str(jax.devices()[0].device_kind)}
            print(f"medjax {name} cuDNN attention {attention}: {result.get('images_per_s', result.get('error'))}",
                  file=sys.stderr, flush=True)
    return out


def section_pytorch(args) -> dict:
    """Every model in PyTorch on the GPU (CPU in a dry run)."""
    out = {}
    for name in models_to_run(args.dry_run):
        try:
            out[name] = pytorch_step(name, args.dry_run)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: reported, the other model still runs
            out[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return out


def pytorch_step(name: str, dry: bool) -> dict:
    """transformers' model of the same shape: autocast bf16, fused AdamW, clipping; median step time."""
    import numpy as np
    import torch
    import train_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = backbone(name, dry)
    torch.manual_seed(0)
    model, embed = train_step.torch_backbone(config)
    model.to(device).train()
    head = torch.nn.Linear(train_step._embed_dim(config), 5).to(device)  # noqa: SLF001
    size, batch = image_size(dry), batch_size(name, dry)
    params = list(model.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim > 1]
    other = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.0}], lr=1e-4,
                            weight_decay=0.05, fused=True)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, 5, batch).astype(np.int64)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = head(embed(x))
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(2 + (3 if dry else 10)):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device_kind": kind, "median_step_s": median, "images_per_s": batch / median,
            "attention": getattr(model.config, "_attn_implementation", None)}


def section_input(args) -> dict:
    """Real-size APTOS PNGs (data_prepared's synthetic fundus images), prepared at 256 px, read by the CLI bench."""
    import data_prepared

    from medjax.data import prepare

    base = os.path.join(args.out, "input")
    num = 48 if args.dry_run else 256  # bench reads batches of 32 from the train split (70%)
    if args.dry_run:
        data_prepared.SIZES["aptos2019"] = (96, 128)
    raw = data_prepared.write_real_size("aptos2019", os.path.join(base, "raw"), num)
    prepared = os.path.join(base, "prepared")
    summary = prepare.prepare("aptos2019", raw, prepared, workers=os.cpu_count() or 1, progress=False)
    workers = 1 if args.dry_run else 16
    proc = subprocess.run([sys.executable, "-m", "medjax.data", "bench", "--dataset", "aptos2019", "--root", prepared,
                           "--batches", "2" if args.dry_run else "20", "--workers", str(workers)],
                          cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "bench failed")
    out = {"workers": workers, "images": num, "size": "x".join(map(str, data_prepared.SIZES["aptos2019"][::-1])),
           "storage_ratio": summary["ratio"]}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("images/s", "cpu ms/image"):
            out[key.strip().replace(" ", "_").replace("/", "_per_")] = float(value.split()[0])
    return out


SECTIONS = {"env": section_env, "medjax": section_medjax, "pytorch": section_pytorch, "input": section_input}


# ------------------------------------------------------------------------------------------------ driver


def run_section(args, name: str, timeout: float) -> dict:
    """A section in a subprocess (fresh jax / torch state), its JSON result or {'error': ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--out", args.out,
           *(["--dry-run"] if args.dry_run else [])]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.dry_run or name == "env":
        env["JAX_PLATFORMS"] = "cpu"  # env's FLOP count lowers for the CPU: XLA's attention, no cuDNN custom call
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1][len("RESULT "):]) | {"seconds": round(time.perf_counter() - start, 1)}


def table(results: dict) -> str:
    env = results.get("env", {})
    flops = env.get("flops_per_image", {})
    device = ", ".join(sorted(set(env.get("devices", [])))) or "?"
    lines = [f"device: {device}; jax {env.get('jax')}, torch {env.get('torch')}", "",
             "| model | framework | attention | images/s | MFU |", "|---|---|---|---|---|"]
    medjax, torch_runs = results.get("medjax", {}), results.get("pytorch", {})
    for name in [m for m in MODELS if m in flops or not flops]:
        for r, framework, attention in ((medjax.get(f"{name}_on"), "medjax", "cuDNN fused"),
                                        (medjax.get(f"{name}_off"), "medjax", "XLA"),
                                        (torch_runs.get(name), "PyTorch", "SDPA")):
            if not r or "error" in r:
                why = (r or {}).get("error") or medjax.get("error") or torch_runs.get("error") or "not run"
                lines.append(f"| {name} | {framework} | {attention} | {why} | |")
                continue
            peak = peak_flops(r.get("device_kind", ""))
            per_image = flops.get(name)
            mfu = f"{100 * r['images_per_s'] * per_image / peak:.1f}%" if peak and per_image else "n/a (no peak)"
            lines.append(f"| {name} | {framework} | {attention} | {r['images_per_s']:,.1f} | {mfu} |")
    i = results.get("input", {})
    if "error" in i or not i.get("cpu_ms_per_image"):
        lines.append(f"\ninput pipeline: {i.get('error', 'not run')}")
    else:
        lines.append(f"\ninput pipeline (prepared APTOS {i['size']}, {i['workers']} workers): "
                     f"{i['images_per_s']:,.1f} images/s, {i['cpu_ms_per_image']:.2f} CPU ms per image "
                     f"({1000 / i['cpu_ms_per_image']:.0f} images/s per core)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "medjax_device_check"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the whole path in about a minute")
    p.add_argument("--budget", type=float, help="seconds for everything (default 480: 8 minutes; 3600 in a dry run, "
                                                "where a loaded CPU must not cut sections short)")
    p.add_argument("--section", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.section:
        print("RESULT " + json.dumps(SECTIONS[args.section](args)), flush=True)
        return 0

    deadline = time.perf_counter() + (args.budget or (3600 if args.dry_run else 480))
    # (section, share of the time left): the later sections keep time for themselves
    results = {}
    for section, share in (("env", 0.15), ("medjax", 0.55), ("pytorch", 0.5), ("input", 1.0)):
        left = deadline - time.perf_counter()
        results[section] = run_section(args, section, max(left * share, min(left, 60)))
        print(f"{section}: {json.dumps(results[section])[:300]}", flush=True)
    text = table(results)
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "device_check.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
