"""python -m medjax.protocols {probe,knn,fewshot,peft} --params DIR --dataset NAME --root DIR --workdir DIR [...]

Runs one of the radiology study's protocols on a converted backbone and prints its results as JSON (also written to
<workdir>/<command>.json). The frozen protocols share the feature cache in <workdir>/features: the first of them
runs the backbone once per split, the others read the cache. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

from medjax import data, metrics, models, peft, rundir, schema, train
from medjax.data import fake
from medjax.errors import atomic_write, cli_main
from medjax.protocols import features, few_shot, knn, linear_probe
from medjax.schema import study_config

DEFAULTS = schema.study_config()  # every default below is the schema's declared one
PROBE = DEFAULTS.probe


def _floats(s):
    return [float(v) for v in s.split(",") if v]


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _option(s):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.protocols", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", required=True, help="converted backbone folder (python -m converters ...)")
    common.add_argument("--dataset", required=True, help="chexpert, ddsm, cbis_ddsm, isic2019, aptos2019, csv, folder")
    common.add_argument("--root", required=True, help="the dataset folder in its public layout")
    common.add_argument("--workdir", required=True, help="feature cache, split file and results go here")
    common.add_argument("--image-size", type=int, default=224, help="input size (a multiple of the patch size)")
    common.add_argument("--normalization", default="dataset", choices=("dataset", "imagenet", "clip"))
    common.add_argument("--grayscale", default="red", choices=("red", "sum"), help="1-channel stem reduction")
    common.add_argument("--seed", type=int, default=0, help="the dataset's split seed")
    common.add_argument("--data-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="reader option, e.g. uncertain=ones (repeatable; values parsed as JSON when they can be)")
    common.add_argument("--extract-batch-size", type=int, default=PROBE.extract_batch_size,
                        help="batch size of the backbone pass")
    common.add_argument("--cache-blocks", type=int, default=4,
                        help="last blocks whose CLS is cached (shared by all frozen protocols; clipped to the depth)")
    common.add_argument("--fake-data", type=int, default=0, metavar="N",
                        help="write N synthetic images at --root first if it does not exist (demo, tests)")
    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--blocks", type=_ints, default=list(PROBE.blocks), help="n last blocks of the grid (default "
                      + ",".join(map(str, PROBE.blocks)) + ")")
    grid.add_argument("--lrs", type=_floats, default=list(PROBE.lrs))
    grid.add_argument("--epochs", type=int, default=PROBE.epochs)
    grid.add_argument("--batch-size", type=int, default=PROBE.batch_size, help="linear-probe batch size")

    probe = sub.add_parser("probe", parents=[common, grid], help="linear probe: grid, val selection, retrain, test")
    probe.add_argument("--probe-seed", type=int, default=PROBE.seed)
    probe.add_argument("--no-retrain", action="store_true", help="test the grid-trained head (no train+val retrain)")
    knn = sub.add_parser("knn", parents=[common], help="weighted kNN (multi-class) or ML-kNN (multi-label)")
    knn.add_argument("--k", type=int, default=DEFAULTS.knn.k)
    knn.add_argument("--temperature", type=float, default=DEFAULTS.knn.temperature)
    few = sub.add_parser("fewshot", parents=[common, grid], help="linear probe on k examples (patients) per class")
    few.add_argument("--shots", type=_ints, default=[1, 2, 4, 8, 16])
    few.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    peft = sub.add_parser("peft", parents=[common], help="LoRA or BitFit fine-tuning with a linear head")
    peft.add_argument("--method", required=True, choices=("lora", "bitfit"))
    peft.add_argument("--epochs", type=int, default=10)
    peft.add_argument("--batch-size", type=int, default=64)
    peft.add_argument("--lr", type=float, default=1e-4)
    peft.add_argument("--rank", type=int, default=DEFAULTS.model.lora.rank)
    peft.add_argument("--alpha", type=float, default=DEFAULTS.model.lora.alpha)
    return p


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def run(args) -> dict:
    if args.fake_data and not os.path.exists(args.root):
        _log(f"writing {args.fake_data} synthetic {args.dataset} images to {args.root}")
        fake.write_once(args.dataset, args.root, args.fake_data, seed=args.seed)
    os.makedirs(args.workdir, exist_ok=True)
    ds = data.get_dataset(args.dataset, args.root, workdir=args.workdir, seed=args.seed, **dict(args.data_option))
    head = {"protocol": args.command, "dataset": ds.name, "task": ds.task, "params": os.path.abspath(args.params),
            "image_size": args.image_size, "split_file": ds.split_file}
    if args.command == "peft":
        return head | _peft(args)
    missing = [s for s in ("train", "val", "test") if s not in ds.splits]
    if missing:
        raise ValueError(f"{ds.name} has no {', '.join(missing)} split; the protocols need train, val and test")
    cache_blocks = max([args.cache_blocks] + list(getattr(args, "blocks", [])))
    feats, info = features.cached_features(args.params, ds, ("train", "val", "test"), args.workdir,
                                           image_size=args.image_size, num_blocks=cache_blocks,
                                           batch_size=args.extract_batch_size, normalization=args.normalization,
                                           grayscale=args.grayscale, log=_log)
    head["features"] = info
    common = dict(task=ds.task, class_names=ds.class_names, target_metric=ds.target_metric)
    if args.command == "knn":
        return head | knn.knn_protocol(feats["train"], {"val": feats["val"], "test": feats["test"]}, k=args.k,
                                       temperature=args.temperature, **common)
    if args.command == "probe":
        r, _ = linear_probe.run(feats, args.workdir, max_blocks=info["num_blocks"], blocks=args.blocks,
                                avgpool=(False, True), lrs=args.lrs, epochs=args.epochs, batch_size=args.batch_size,
                                seed=args.probe_seed, retrain=not args.no_retrain, log=_log, **common)
        return head | r | {"head_file": os.path.join(args.workdir, r["head_file"])}
    heads, skipped = linear_probe.head_grid(args.blocks, (False, True), args.lrs, max_blocks=info["num_blocks"],
                                            log=_log)
    head["skipped_heads"] = skipped
    return head | few_shot.few_shot(feats["train"], feats["val"], feats["test"], ds.splits["train"],
                                    shots=args.shots, seeds=args.seeds, heads=heads, epochs=args.epochs,
                                    batch_size=args.batch_size, **common)


def peft_config(args):
    """The trainer config of the peft protocol: the study's AdamW (decay on ndim > 1, clipping 1.0), one warm-up
    epoch then cosine to 0, train transforms, validation every epoch, the best model tested once."""
    c = study_config()
    c.dataset, c.data_root, c.seed = args.dataset, args.root, args.seed
    for key, value in args.data_option:
        if key not in c.data_options:
            raise ValueError(f"--data-option {key}: not an option of any dataset")
        c.data_options[key] = value
    c.image_size, c.normalization = args.image_size, args.normalization
    c.model.pretrained, c.model.grayscale, c.model.peft = args.params, args.grayscale, args.method
    c.model.lora.rank, c.model.lora.alpha = args.rank, args.alpha
    c.optim.lr, c.optim.schedule, c.optim.warmup_epochs, c.optim.end_lr = args.lr, "cosine", 1.0, 0.0
    c.epochs, c.batch_size, c.compute_dtype = args.epochs, args.batch_size, "float32"
    return c


def _peft(args) -> dict:
    """LoRA / BitFit through the main trainer (checkpoints and exact resume in WORKDIR/peft_<method>, metrics.json)."""
    config = peft_config(args)
    schema.validate(config)
    workdir = os.path.join(args.workdir, f"peft_{args.method}")
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress goes to stderr, the JSON to stdout
        trainer = train.Trainer(config, workdir)
        result = trainer.run()
    params = trainer.state.params
    out = {"method": args.method, "trainable_params": peft.count_trainable(params, trainer.engine.trainable),
           "total_params": models.count_params(params), "epochs": args.epochs, "lr": args.lr,
           "best_epoch": result["best_step"] / result["steps_per_epoch"], "history": result["history"],
           "val": result["val"], "target_metric": result["target_metric"], "workdir": workdir,
           "metrics_file": rundir.path(workdir, rundir.METRICS)}
    if args.method == "lora":
        out |= {"rank": args.rank, "alpha": args.alpha}
    if "test" in result:
        out |= {"test": result["test"], "test_target": metrics.target_metric(result["target_metric"], result["test"])}
    return out


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        result = _jsonable(run(args))
    except (FileNotFoundError, ValueError) as e:  # DataError, ConfigError, RunError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_write(os.path.join(args.workdir, f"{args.command}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
