"""python -m medjax.explain --workdir RUN --images PATH... --output DIR [--method attention|gradcam|occlusion]

Shows where a fine-tuned model looked: one PNG per image with the image (as the model saw it: the run's eval
transform), the heat map of the explained class overlaid, and the top classes with their probabilities. The default
method is the one the backbone family declares (`Family.explain_method`):

- `attention`: attention rollout (Abnar & Zuidema 2020) for the ViT families. Every block's attention probabilities,
  averaged over heads, get the residual connection (A' = (A + I) / 2, rows renormalised) and are multiplied through
  the blocks, R = A'_L ... A'_1; the map is the row of the token the linear head reads (CLS, or the mean of the
  patch rows for MAE / AIMv2) over the patch tokens. With the attention head (the DeiT "Y-model") the head's own
  rollout is chained on: its CLS row over its input tokens times the backbone's patch rows. The rollout explains the
  model, not one class: the map is the same for every class.
- `gradcam`: Grad-CAM (Selvaraju et al. 2017) on the last feature map A the family names (`Family.gradcam_layer`:
  the CNNs' last block, the SAM 2 Hiera FPN level, VMamba's last stage): weights a_k = mean over positions of
  d logit_c / d A_k, map = ReLU(sum_k a_k A_k), at the feature map's resolution, upsampled.
- `occlusion`: occlusion sensitivity for any model: a window of the normalised image is set to 0 (the dataset mean),
  slid with a stride; the map at a pixel is the mean drop of the class probability over the windows covering it.

Every method runs batched and jitted; `--class NAME` explains that class instead of each image's top class.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from medjax import engine, models, outputs, pretrained, rundir, trained
from medjax import predict as predict_lib
from medjax.data import DataError
from medjax.errors import UserError, cli_main
from medjax.models.layers import Attention
from medjax.trained import PredictError

METHODS = ("attention", "gradcam", "occlusion")
INDEX_FILE = "explanations.csv"  # in the output folder: which PNG explains which image


# ------------------------------------------------------------------------------------------------ the methods


def _family(model):
    return models.family(model.backbone.family)


def attention_matrices(model, variables, images) -> tuple[list, list]:
    """(backbone, head) lists of every `layers.Attention` call's attention probabilities averaged over heads,
    (B, T, T) float32, in the order the model runs them. Read from the call's input and its own qkv parameters (the
    math of `layers.Attention`: fused qkv rows q, k, v, head-major inside each; softmax(q k^T / sqrt(d))), or from
    the module's `attention_probabilities(*args)` where it has one (an attention with its own math, e.g. RoPE)."""
    found = {"backbone": [], "head": []}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if hasattr(module, "attention_probabilities") and context.method_name == "__call__":
            # a family's own attention (e.g. DINOv3's, with RoPE) states its probabilities for the same arguments
            probs = module.attention_probabilities(*args, **kwargs).astype(jnp.float32)
            found[module.path[0]].append(probs)
        elif isinstance(module, Attention) and context.method_name == "__call__":
            x = args[0].astype(jnp.float32)
            qkv_params = module.variables["params"]["qkv"]
            qkv = jnp.dot(x, qkv_params["kernel"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
            if "bias" in qkv_params:
                qkv = qkv + qkv_params["bias"].astype(jnp.float32)
            batch, tokens, dim = x.shape
            heads = module.num_heads
            qkv = qkv.reshape(batch, tokens, 3, heads, dim // heads)
            scores = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1], precision=jax.lax.Precision.HIGHEST)
            probs = jax.nn.softmax(scores * (dim // heads) ** -0.5, axis=-1)
            found[module.path[0]].append(probs.mean(axis=1))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images)
    return found["backbone"], found["head"]


def rollout(attentions: list):
    """R = A'_L ... A'_1 with A' = (A + I) / 2, rows renormalised; attentions (B, T, T) in block order."""
    eye = jnp.eye(attentions[0].shape[-1], dtype=jnp.float32)
    result = jnp.broadcast_to(eye, attentions[0].shape)
    for a in attentions:
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(axis=-1, keepdims=True)
        result = jnp.einsum("bij,bjk->bik", a, result, precision="highest")
    return result


def method_problem(method: str, family, backbone) -> str | None:
    """Why `method` cannot explain a model of this family and backbone config (None: it can)."""
    if method not in METHODS:
        return f"--method {method!r}: expected one of {', '.join(METHODS)}"
    other = family.explain_method(backbone)
    if method == "attention" and (family.rollout_tokens is None or family.rollout_tokens(backbone) is None):
        return (f"--method attention: the {family.name} family has no attention rollout (it needs global "
                f"self-attention over the patch tokens); use --method {other}"
                + (" or occlusion" if other != "occlusion" else ""))
    if method == "gradcam" and family.gradcam_layer is None:
        return (f"--method gradcam: the {family.name} family names no feature map for Grad-CAM; use --method "
                f"{other}" + (" or occlusion" if other != "occlusion" else ""))
    return None


def attention_rollout(model, variables, images):
    """(B, gh, gw) relevance of the patches (see the module docstring); raises PredictError where the family has no
    rollout."""
    family = _family(model)
    problem = method_problem("attention", family, model.backbone)
    if problem:
        raise PredictError(problem)
    first_patch, cls_pooled = family.rollout_tokens(model.backbone)
    backbone, head = attention_matrices(model, variables, images)
    relevance = rollout(backbone)
    patches = relevance[:, first_patch:, first_patch:]
    if model.head == "attention":  # the head's CLS row over its tokens, which are the backbone's patch tokens
        head_rows = rollout(head)[:, 0, 1:]
        flat = (head_rows[:, :, None] * patches).sum(axis=1)
    elif cls_pooled:
        flat = relevance[:, 0, first_patch:]
    else:
        flat = patches.mean(axis=1)
    patch = model.backbone.patch_size
    return flat.reshape(images.shape[0], images.shape[1] // patch, images.shape[2] // patch)


def _gradcam_target(model) -> tuple[tuple, int | None]:
    family = _family(model)
    problem = method_problem("gradcam", family, model.backbone)
    if problem:
        raise PredictError(problem)
    path, _, index = family.gradcam_layer(model.backbone).partition("#")
    return ("backbone", *path.split("/")), int(index) if index else None


def gradcam(model, variables, images, classes):
    """(B, h, w) Grad-CAM of class `classes[b]` (logit) on the family's last feature map, at its resolution."""
    target, index = _gradcam_target(model)

    def forward(delta):
        captured = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__" or tuple(context.module.path) != target or captured:
                return out
            feature = out if index is None else out[index]
            captured.append(feature)
            if delta is None:
                return out
            if index is None:
                return out + delta
            return type(out)(o + delta if i == index else o for i, o in enumerate(out))

        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, images)
        if not captured:
            raise PredictError(f"Grad-CAM: the model has no module {'/'.join(target)} (the family's gradcam_layer)")
        return logits, captured[0]

    feature_shape = jax.eval_shape(lambda: forward(None)[1])
    if len(feature_shape.shape) != 4:
        raise PredictError(f"Grad-CAM: {'/'.join(target)} gives shape {feature_shape.shape}, not an NHWC map")

    def score(delta):
        logits, feature = forward(delta)
        return jnp.take_along_axis(logits, classes[:, None], axis=1).sum(), feature

    grads, feature = jax.grad(score, has_aux=True)(jnp.zeros(feature_shape.shape, feature_shape.dtype))
    weights = grads.astype(jnp.float32).mean(axis=(1, 2))  # (B, C): a_k
    return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feature.astype(jnp.float32), weights, precision="highest"))


def occlusion_windows(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) edges of the windows along one side; the last window ends at the border."""
    if not 0 < window <= size or stride < 1:
        raise PredictError(f"occlusion window {window} / stride {stride} do not fit a {size}-px image")
    starts = list(range(0, size - window + 1, stride))
    return starts + ([size - window] if starts[-1] != size - window else [])


def occlusion(model, variables, images, classes, task: str, window: int | None = None, stride: int | None = None,
              batch_size: int = 64):
    """(B, S, S) occlusion sensitivity of class `classes[b]`'s probability (see the module docstring)."""
    size = images.shape[1]
    window = window or max(size // 7, 1)
    stride = stride or max(window // 2, 1)
    starts = occlusion_windows(size, window, stride)
    grid = np.zeros((len(starts) ** 2, size, size, 1), np.float32)
    for n, (top, left) in enumerate((t, s) for t in starts for s in starts):
        grid[n, top:top + window, left:left + window] = 1.0
    masks = jnp.asarray(grid)
    coverage = masks.sum(axis=0)[..., 0]
    probability = engine.make_eval_step(model, task)

    def one(image, cls):
        base = probability(variables, image[None])[0, cls]
        occluded = jax.lax.map(lambda m: probability(variables, (image * (1 - m))[None])[0, cls], masks,
                               batch_size=min(batch_size, len(grid)))
        drop = base - occluded
        return jnp.einsum("n,nhw->hw", drop, masks[..., 0]) / coverage

    return jax.lax.map(lambda xc: one(*xc), (images, classes))


def make_explainer(method: str, model, task: str):
    """jit(fn(variables, images, classes) -> (B, h, w) maps at the method's own resolution)."""
    fns = {"attention": lambda v, x, c: attention_rollout(model, v, x),
           "gradcam": lambda v, x, c: gradcam(model, v, x, c),
           "occlusion": lambda v, x, c: occlusion(model, v, x, c, task)}
    if method not in fns:
        raise PredictError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    return jax.jit(fns[method])


# ------------------------------------------------------------------------------------------------ pictures


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    """A (h, w) map -> (size, size), bilinear over the cells' centres (half-pixel, as PIL and torch)."""
    return np.asarray(jax.image.resize(jnp.asarray(heat, jnp.float32), (size, size), "linear", antialias=False))


SCALE_LABELS = {"attention": "relevance", "gradcam": "Grad-CAM", "occlusion": "probability drop"}


def render(image01: np.ndarray, heat: np.ndarray, lines: list[str], title: str, scale: int = 0,
           scale_label: str = "map value"):
    """A PIL image: the image, the heat map (min-max normalised) over it with its colour scale (a bar from the map's
    minimum at the bottom to its maximum at the top, both values written beside it), and a text column."""
    size = image01.shape[0]
    scale = scale or max(1, -(-224 // size))
    gray = image01[..., 0] if image01.shape[-1] == 1 else None
    rgb = np.repeat(gray[..., None], 3, axis=-1) if gray is not None else image01
    rgb = np.clip(rgb, 0, 1)
    h = upsample(heat, size) if heat.shape[0] != size else heat
    low, high = float(h.min()), float(h.max())
    span = high - low
    h = (h - low) / span if span > 0 else np.zeros_like(h)
    colored = colormaps["jet"](h)[..., :3]
    overlay = 0.55 * rgb + 0.45 * colored
    panel = lambda a: Image.fromarray((a * 255).round().astype(np.uint8)).resize(  # noqa: E731
        (size * scale, size * scale), Image.Resampling.BILINEAR)
    font = ImageFont.load_default(size=max(11, 6 * scale // 2 + 8))
    side, pad, bar_w = size * scale, 8, 14
    top = font.size + 10  # the title line
    ticks = [f"{high:.3g}", f"{(low + high) / 2:.3g}", f"{low:.3g}"]
    tick_w = font.size * max(len(t) for t in ticks + [scale_label]) * 3 // 5
    text_x = 3 * pad + 2 * side + bar_w + 4 + tick_w + pad
    text_w = font.size * max(12, max(len(t) for t in lines)) // 2 + 2 * pad
    canvas = Image.new("RGB", (max(text_x + text_w, font.size * len(title) * 3 // 5 + 2 * pad),
                               side + 2 * pad + top + font.size + 6), "white")
    canvas.paste(panel(rgb), (pad, pad + top))
    canvas.paste(panel(overlay), (2 * pad + side, pad + top))
    bar_x = 3 * pad + 2 * side
    gradient = colormaps["jet"](np.linspace(1.0, 0.0, side))[:, :3]  # top: the maximum
    bar = np.repeat(gradient[:, None, :], bar_w, axis=1)
    canvas.paste(Image.fromarray((bar * 255).round().astype(np.uint8)), (bar_x, pad + top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((bar_x - 1, pad + top - 1, bar_x + bar_w, pad + top + side), outline="black")
    draw.text((pad, pad), title, fill="black", font=font)
    for tick, y in zip(ticks, (pad + top, pad + top + side // 2, pad + top + side)):
        draw.line((bar_x + bar_w, y, bar_x + bar_w + 3, y), fill="black")
        draw.text((bar_x + bar_w + 5, y), tick, fill="black", font=font, anchor="lm")
    draw.text((bar_x, pad + top + side + 4), scale_label, fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((text_x, pad + top + i * (font.size + 6)), line, fill="black", font=font)
    return canvas


def describe(probs: np.ndarray, class_names, task: str, explained: int, cut=None, top: int = 3) -> list[str]:
    """The top classes with probabilities; the explained class marked; multi-label: + where over its threshold."""
    order = np.argsort(-probs, kind="stable")[:top]
    if explained not in order:
        order = np.r_[order, explained]
    lines = ["top classes" + (" (+: over its threshold)" if task == "multilabel" and cut is not None else "")]
    for c in order:
        mark = " +" if task == "multilabel" and cut is not None and probs[c] >= cut[c] else ""
        lines.append(f"{'>' if c == explained else ' '} {class_names[c]}: {probs[c]:.3f}{mark}")
    return lines


# ------------------------------------------------------------------------------------------------ command line


def relative_paths(paths: list[str], roots: list[str]) -> list[str]:
    """Each image's path relative to its root (the folder given on the command line that it was found in; a file's
    own folder), e.g. `patient00001/study1/view1_frontal.jpg`; where two images give the same one (two roots, or two
    files of one name in different folders), the paths relative to the roots' common folder instead."""
    relative = [os.path.relpath(os.path.abspath(p), os.path.abspath(r)) for p, r in zip(paths, roots)]
    if len(set(relative)) < len(relative):
        common = os.path.commonpath([os.path.abspath(r) for r in roots])
        relative = [os.path.relpath(os.path.abspath(p), common) for p in paths]
    return [r.replace(os.sep, "/") for r in relative]


def png_names(relative: list[str]) -> list[str]:
    """The PNG of each image, relative to the output folder: its relative path with .png for its extension
    (`patient00001/study1/view1_frontal.png`); an image with a twin of another extension keeps its own
    (`view1.jpg.png`); a file given twice gets `_2`."""
    stems = [os.path.splitext(r)[0] for r in relative]
    out, used = [], set()
    for r, stem in zip(relative, stems):
        name = (r if stems.count(stem) > 1 else stem) + ".png"
        candidate, k = name, 1
        while candidate in used:
            k += 1
            candidate = f"{name[:-4]}_{k}.png"
        used.add(candidate)
        out.append(candidate)
    return out


def explain_files(model: trained.FineTuned, records, output: str, method: str | None = None,
                  class_name: str | None = None, batch_size: int = 8, top: int = 3,
                  relative: list[str] | None = None) -> tuple[list, list]:
    """Writes one PNG per readable image into `output`, named and titled by the image's path relative to its root
    (`relative[i]`, see `relative_paths`; default: relative to the images' common folder), and `explanations.csv`
    (PNG, image, method, explained class and its probability); returns (written paths, failures)."""
    classifier, variables = model.plain()
    method = method or _family(classifier).explain_method(classifier.backbone)
    if class_name is not None and class_name not in model.class_names:
        raise PredictError(f"--class {class_name!r} is not a class of the model ({', '.join(model.class_names)})")
    if relative is None:
        common = os.path.commonpath([os.path.dirname(os.path.abspath(r.path)) for r in records]) if records else ""
        relative = relative_paths([r.path for r in records], [common] * len(records))
    names = png_names(relative)
    loader, failures = model.loader(records, batch_size, "explain")
    mean, std = (np.asarray(s, np.float32) for s in model.normalization_stats())
    probability = jax.jit(engine.make_eval_step(classifier, model.task))
    explainer = make_explainer(method, classifier, model.task)
    os.makedirs(output, exist_ok=True)
    written, index, n = [], [], 0
    cut = model.threshold_array() if model.task == "multilabel" else None
    for batch in loader:
        keep = np.flatnonzero(batch["mask"])
        batch_at = [n + i for i in keep]
        n += len(batch["mask"])
        if not len(keep):
            continue
        images = jnp.asarray(batch["image"][keep])
        probs = np.asarray(probability(variables, images))
        classes = np.full(len(keep), model.class_names.index(class_name)) if class_name else probs.argmax(axis=1)
        maps = np.asarray(explainer(variables, images, jnp.asarray(classes, jnp.int32)))
        for i, at in enumerate(batch_at):
            name = names[at]
            image01 = np.asarray(batch["image"][keep[i]]) * std + mean
            what = "attention rollout" if method == "attention" else \
                f"{method} for {model.class_names[classes[i]]}"
            target = os.path.join(output, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            render(image01, maps[i], describe(probs[i], model.class_names, model.task, int(classes[i]), cut, top),
                   f"{relative[at]}: {what}", scale_label=SCALE_LABELS.get(method, "map value")).save(target)
            written.append(target)
            index.append([name, records[at].path, method, model.class_names[classes[i]],
                          repr(float(probs[i][classes[i]]))])
    if index:
        predict_lib.write_csv(os.path.join(output, INDEX_FILE),
                              ["png", "image", "method", "explained_class", "probability"], index)
    return written, list(failures)


def peek_backbone(source: str):
    """(family, backbone config) of the model at `source` (a run's work directory or an exported folder), read from
    its metadata alone (no weights read, nothing built), so that a --method the family cannot run is refused before
    the model loads; None when it cannot be told so cheaply (the full load then reports any problem)."""
    try:
        if trained.is_run(source):
            flat = trained.run_config(source)
            folders = [flat.get("model.pretrained") or "", rundir.path(source, rundir.BACKBONE)]
            folder = next((f for f in folders if f and os.path.isfile(os.path.join(f, pretrained.METADATA_FILE))),
                          None)
            if folder is None:
                prefix = "model.architecture."
                arch = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
                family = flat.get("model.family")
                return (models.family(family), models.config_from_dict(family, arch)) if family and arch else None
        else:
            folder = source
        meta = pretrained.read_metadata(folder)
        return models.family(meta["family"]), models.config_from_dict(meta["family"], meta["architecture"])
    except (UserError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def peek_class_names(source: str) -> list | None:
    """The model's class names from the run's split file or the exported folder's metadata (no model loaded), or None
    when they cannot be read so (the full load then reports the problem)."""
    try:
        return trained.class_names(source)
    except (UserError, OSError, KeyError, TypeError):
        return None


@cli_main
def main(argv=None) -> int:
    p = predict_lib.CliParser(prog="python -m medjax.explain", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--workdir", required=True, help="a run's work directory, or a folder of medjax.export")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    p.add_argument("--output", required=True, help="the folder for the PNGs (named by each image's path relative "
                                                   "to the folder given in --images)")
    p.add_argument("--method", choices=METHODS, help="default: the family's (attention for ViTs, else gradcam)")
    p.add_argument("--class", dest="class_name", help="explain this class (default: each image's top class)")
    p.add_argument("--top", type=int, default=3, help="classes listed beside the image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--strict", action="store_true", help="stop (exit 2) on an unreadable image instead of skipping")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.top < 1:
        p.error(f"--batch-size {args.batch_size} / --top {args.top}: expected positive numbers")
    try:
        outputs.check_folder(args.output)
        missing = [x for x in args.images if not os.path.exists(x)]
        if missing and len(missing) == len(args.images):
            raise PredictError(f"--images {missing[0]}: no such file or folder")
        if args.method:
            peek = peek_backbone(args.workdir)
            problem = method_problem(args.method, *peek) if peek else None
            if problem:
                raise PredictError(problem)
        names = peek_class_names(args.workdir) if args.class_name is not None else None
        if names and args.class_name not in names:
            raise PredictError(f"--class {args.class_name!r} is not a class of the model ({', '.join(names)})")
        predict_lib.say(f"loading the model from {args.workdir} ...")
        model = trained.load_model(args.workdir)
        records, roots = [], []
        for path in args.images:
            found = predict_lib.image_records([path], model)
            records += found
            roots += [path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))] * len(found)
        if args.strict:
            predict_lib.check_strict(records, model.channels)
        predict_lib.say(f"reading {len(records)} image(s) and explaining them ...")
        relative = relative_paths([r.path for r in records], roots)
        with predict_lib.quiet_load_warnings():
            written, failures = explain_files(model, records, args.output, args.method, args.class_name,
                                              args.batch_size, args.top, relative)
        if args.strict and failures:
            raise PredictError(f"{failures[0][0]}: {failures[0][2]} (--strict)")
    except (UserError, DataError, pretrained.PretrainedError, OSError) as e:
        print(predict_lib.error_line(e), file=sys.stderr)
        return 2
    predict_lib.report_failures(failures, args.output)
    print(f"{len(written)} explanation(s) written to {args.output}" + (f" (index: {INDEX_FILE})" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
