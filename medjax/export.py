"""python -m medjax.export --workdir RUN --output DIR [--format safetensors|stablehlo]

Exports a run's best model (or re-exports an exported folder) for other programs:

- `safetensors` (default): the fine-tuned backbone as a converted folder (`params.safetensors` + `medjax.json`, the
  format `python -m converters` writes), so `model.pretrained=DIR` starts another run from it and `medjax.embed
  --params DIR` embeds with it; beside it `head.safetensors` (the classification head) and, in `medjax.json` under
  `export`, the run's config, class names, task, statistics and operating points, so `medjax.predict`,
  `medjax.explain` and `--format stablehlo` read the folder as they read the run. LoRA adapters are merged into their
  kernels; scanned ViT blocks are stored unrolled (the converters' layout).
- `stablehlo`: the inference function `probabilities = f(weights, images)` serialized with `jax.export` (the batch
  dimension symbolic), in `model.stablehlo`, with its weights in `weights.safetensors` and its facts in `model.json`.
  It runs with jax alone, no medjax:

      import jax, numpy as np
      from safetensors.numpy import load_file
      f = jax.export.deserialize(open("DIR/model.stablehlo", "rb").read())
      probs = f.call(load_file("DIR/weights.safetensors"), images)  # images: float32 (N, S, S, C), normalised

  `images` are what the model sees: resized to round(S * 256 / 224) px (square, or the shorter side with the run's
  `resize=shorter`; Pillow's antialiased bilinear), center-cropped to S px, scaled to [0, 1] and normalised with the
  statistics in `model.json` (`input`: every step and number, also written out in the folder's `README.md`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

import jax
import numpy as np

from medjax import engine, outputs, pretrained, trained
from medjax import predict as predict_lib
from medjax.data import DataError
from medjax.data.transforms import resize_size
from medjax.errors import UserError, atomic_write, cli_main
from medjax.finetuned import EXPORT_KEY, HEAD_FILE
from medjax.trained import PredictError

FORMATS = ("safetensors", "stablehlo")
STABLEHLO_FILE, WEIGHTS_FILE, FACTS_FILE = "model.stablehlo", "weights.safetensors", "model.json"
README_FILE = "README.md"  # beside a StableHLO export: how to call it and its input's preprocessing


def facts(model: trained.FineTuned) -> dict:
    """What a reader needs beside the weights: the run's config and its data facts."""
    return {"source": os.path.abspath(model.source), "best_step": model.best_step,
            "run_config": trained.run_config(model.source),
            "class_names": list(model.class_names), "task": model.task, "channels": model.channels,
            "mean": list(model.mean), "std": list(model.std), "target_metric": model.target_metric,
            "thresholds": model.thresholds, "input": preprocessing(model)}


def preprocessing(model: trained.FineTuned) -> dict:
    """What turns an image file into the model's input, in the order it is done (the run's eval transform,
    `medjax.data.transforms.eval_transform` then the normalisation): every number a reader needs to redo it."""
    mean, std = model.normalization_stats()
    size, resized = model.image_size, resize_size(model.image_size)
    square = model.config.resize == "square"
    return {
        "layout": "NHWC", "size": size, "channels": model.channels, "dtype": "float32",
        "color": "grayscale (L)" if model.channels == 1 else "RGB",
        "resize": resized, "resize_mode": model.config.resize,
        "resize_interpolation": "bilinear, antialiased (Pillow Image.resize with Resampling.BILINEAR)",
        "center_crop": size,
        "scale": "uint8 / 255 (values 0-1)",
        "mean": list(mean), "std": list(std), "normalization": model.config.normalization,
        "steps": [
            "decode the image to 8 bits per channel" + (" grayscale" if model.channels == 1 else " RGB")
            + " (16-bit images divided by 257; DICOM windowed as medjax.data.transforms.decode does)",
            (f"resize to {resized} x {resized} px (aspect not kept)" if square else
             f"resize the shorter side to {resized} px (aspect kept; the longer side int({resized} * long / short))")
            + ", bilinear with antialiasing (Pillow BILINEAR)",
            f"center crop {size} x {size} px (offsets round((H - {size}) / 2), round((W - {size}) / 2))",
            "divide by 255 (float32 in 0-1)",
            f"subtract mean {_fmt(mean)} and divide by std {_fmt(std)} per channel",
            f"stack as float32 (N, {size}, {size}, {model.channels}) (NHWC)"]}


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def readme(info: dict) -> str:
    """README.md of a StableHLO export: how to call it and the preprocessing its input needs."""
    pre = info["input"]
    names = ", ".join(info["class_names"])
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(pre["steps"], 1))
    return f"""# A medjax model exported as StableHLO

`probabilities = f(weights, images)`, serialized with `jax.export` for {', '.join(info['platforms'])}; it runs with
jax alone:

    import jax, numpy as np
    from safetensors.numpy import load_file
    f = jax.export.deserialize(open("{STABLEHLO_FILE}", "rb").read())
    probs = f.call(load_file("{WEIGHTS_FILE}"), images)

Output: {info['outputs']}.
Classes ({info['task']}): {names}.

## Input: preprocessing

`images` is float32 `(N, {pre['size']}, {pre['size']}, {pre['channels']})` ({pre['layout']}, any N), made from each
image file as the run evaluated its images:

{steps}

The same facts are in `{FACTS_FILE}` under `input` (`resize`, `resize_mode`, `resize_interpolation`, `center_crop`,
`scale`, `mean`, `std`, `layout`). Source: {info['source']} (best step {info['best_step']}).
"""


def export_safetensors(model: trained.FineTuned, output: str) -> str:
    classifier, variables = model.plain()
    backbone = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
    head = {c: v["head"] for c, v in variables.items() if "head" in v}
    flat_head = {k: np.ascontiguousarray(v) for k, v in pretrained.flatten_variables(head).items()}
    info = facts(model)
    info["head"] = {"kind": classifier.head, "num_classes": classifier.num_classes}
    info["head_digests"] = {k: pretrained.tensor_digest(v) for k, v in sorted(flat_head.items())}
    config = classifier.backbone
    os.makedirs(output, exist_ok=True)
    pretrained.write_safetensors(os.path.join(output, HEAD_FILE), flat_head)
    # medjax.json is written last (pretrained.save): a killed export never leaves a folder that loads
    pretrained.save(output, backbone, {
        "family": config.family, "model": f"fine-tuned {config.family}", "architecture": config.to_dict(),
        "source": {"file": os.path.abspath(model.source), "format": "medjax run", "best_step": model.best_step},
        "num_params": int(sum(np.size(v) for v in pretrained.flatten(backbone.get("params", {})).values())),
        EXPORT_KEY: info})
    return output


def inference_function(model: trained.FineTuned):
    """(fn(weights, images) -> probabilities, weights): `weights` flat {name: array} as pretrained.flatten_variables
    names them, so that a reader passes the safetensors dict as it loads it."""
    classifier, variables = model.plain()
    eval_step = engine.make_eval_step(classifier, model.task)
    weights = {k: np.ascontiguousarray(v) for k, v in pretrained.flatten_variables(variables).items()}
    return (lambda w, images: eval_step(pretrained.unflatten_variables(w), images)), weights


def export_stablehlo(model: trained.FineTuned, output: str, platforms: tuple[str, ...]) -> str:
    fn, weights = inference_function(model)
    (batch,) = jax.export.symbolic_shape("batch")
    size = model.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, model.channels), np.float32)
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    try:
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(specs, images)
    except (ValueError, NotImplementedError, TypeError) as e:
        raise PredictError(f"jax.export cannot serialize this model for {', '.join(platforms)}: {e}") from None
    os.makedirs(output, exist_ok=True)
    info = facts(model) | {"platforms": list(platforms), "outputs": "probabilities (N, K): softmax (multi-class) "
                           "or sigmoid (multi-label) over class_names",
                           "call": "jax.export.deserialize(bytes).call(weights_dict, images)"}
    pretrained.write_safetensors(os.path.join(output, WEIGHTS_FILE), weights)
    _write_atomic(os.path.join(output, STABLEHLO_FILE), exported.serialize())
    _write_atomic(os.path.join(output, README_FILE), readme(info).encode())
    _write_atomic(os.path.join(output, FACTS_FILE), json.dumps(info, indent=1).encode())
    return output


def _write_atomic(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def is_export(folder: str) -> bool:
    """True for a folder medjax.export wrote (either format)."""
    meta, facts_path = os.path.join(folder, "medjax.json"), os.path.join(folder, FACTS_FILE)
    for path in (meta, facts_path):
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and (EXPORT_KEY in info or "call" in info and "run_config" in info):
            return True
    return False


def check_output(output: str, overwrite: bool) -> None:
    """An export never replaces what it did not write: --output must be new, empty, or (with --overwrite) an earlier
    export."""
    if not os.path.isdir(output) or not os.listdir(output):
        return
    if not is_export(output):
        raise PredictError(f"--output {output}: not empty and not a medjax export; export writes a new or empty "
                           "folder and never replaces files it did not write; choose another --output")
    if not overwrite:
        raise PredictError(f"--output {output}: holds an earlier export; pass --overwrite to replace it (the old "
                           "export is kept until the new one is complete), or choose another --output")


@contextlib.contextmanager
def staging(output: str):
    """A temporary folder beside `output` to export into, moved onto `output` when the block succeeds: the old
    export is replaced only by a complete new one (a full disk or a kill leaves the old one; a kill between the two
    renames leaves it as `.NAME.old-PID` beside it). On failure the temporary folder is removed."""
    output = os.path.abspath(output)
    parent, base = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.export-{os.getpid()}")
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.isdir(output) and os.listdir(output):
            os.rename(output, old)
        elif os.path.isdir(output):
            os.rmdir(output)
        try:
            os.rename(tmp, output)
        except OSError:
            if os.path.isdir(old):
                os.rename(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@cli_main
def main(argv=None) -> int:
    p = predict_lib.CliParser(prog="python -m medjax.export", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--workdir", required=True, help="a run's work directory (or an exported folder)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--format", default="safetensors", choices=FORMATS)
    p.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="stablehlo: comma-separated platforms the serialized function runs on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --output (atomically: it survives a failed export)")
    args = p.parse_args(argv)
    platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
    if not platforms or any(x not in ("cpu", "cuda", "rocm", "tpu") for x in platforms):
        p.error(f"--platforms {args.platforms!r}: expected a comma-separated subset of cpu, cuda, rocm, tpu")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        p.error(f"--output {args.output}: exists and is not a folder")
    try:
        outputs.check_folder(args.output)
        check_output(args.output, args.overwrite)
        predict_lib.say(f"loading the model from {args.workdir} ...")
        model = trained.load_model(args.workdir)
        predict_lib.say(f"writing the {args.format} export to {args.output} ...")
        with staging(args.output) as tmp:
            if args.format == "safetensors":
                export_safetensors(model, tmp)
            else:
                export_stablehlo(model, tmp, platforms)
    except (UserError, PredictError, pretrained.PretrainedError, DataError, OSError) as e:
        print(predict_lib.error_line(e), file=sys.stderr)
        return 2
    print(f"{args.format} export of {args.workdir} (best step {model.best_step}) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
