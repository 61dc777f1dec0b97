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

import numpy as np

from medjax import predict as predict_lib
from medjax.predict import PredictError

METHODS = ("attention", "gradcam", "occlusion")


# ------------------------------------------------------------------------------------------------ the methods


def _family(model):
    from medjax import models

    return models.family(model.backbone.family)


def attention_matrices(model, variables, images) -> tuple[list, list]:
    """(backbone, head) lists of every `layers.Attention` call's attention probabilities averaged over heads,
    (B, T, T) float32, in the order the model runs them. Read from the call's input and its own qkv parameters (the
    math of `layers.Attention`: fused qkv rows q, k, v, head-major inside each; softmax(q k^T / sqrt(d))), or from
    the module's `attention_probabilities(*args)` where it has one (an attention with its own math, e.g. RoPE)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from medjax.models.layers import Attention

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
    import jax.numpy as jnp

    eye = jnp.eye(attentions[0].shape[-1], dtype=jnp.float32)
    result = jnp.broadcast_to(eye, attentions[0].shape)
    for a in attentions:
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(axis=-1, keepdims=True)
        result = jnp.einsum("bij,bjk->bik", a, result, precision="highest")
    return result


def attention_rollout(model, variables, images):
    """(B, gh, gw) relevance of the patches (see the module docstring); raises PredictError where the family has no
    rollout."""
    family = _family(model)
    spec = family.rollout_tokens(model.backbone) if family.rollout_tokens is not None else None
    if spec is None:
        other = family.explain_method(model.backbone)
        raise PredictError(f"--method attention: the {family.name} family has no attention rollout (it needs "
                           f"global self-attention over the patch tokens); use --method {other}"
                           + (" or occlusion" if other != "occlusion" else ""))
    first_patch, cls_pooled = spec
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
    if family.gradcam_layer is None:
        raise PredictError(f"--method gradcam: the {family.name} family names no feature map for Grad-CAM; use "
                           f"--method {family.explain_method(model.backbone)} or occlusion")
    path, _, index = family.gradcam_layer(model.backbone).partition("#")
    return ("backbone", *path.split("/")), int(index) if index else None


def gradcam(model, variables, images, classes):
    """(B, h, w) Grad-CAM of class `classes[b]` (logit) on the family's last feature map, at its resolution."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

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
    import jax
    import jax.numpy as jnp

    from medjax import engine

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
    import jax

    fns = {"attention": lambda v, x, c: attention_rollout(model, v, x),
           "gradcam": lambda v, x, c: gradcam(model, v, x, c),
           "occlusion": lambda v, x, c: occlusion(model, v, x, c, task)}
    if method not in fns:
        raise PredictError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    return jax.jit(fns[method])


# ------------------------------------------------------------------------------------------------ pictures


def upsample(heat: np.ndarray, size: int) -> np.ndarray:
    """A (h, w) map -> (size, size), bilinear over the cells' centres (half-pixel, as PIL and torch)."""
    import jax
    import jax.numpy as jnp

    return np.asarray(jax.image.resize(jnp.asarray(heat, jnp.float32), (size, size), "linear", antialias=False))


def render(image01: np.ndarray, heat: np.ndarray, lines: list[str], title: str, scale: int = 0):
    """A PIL image: the image, the heat map (min-max normalised) over it, and a text column."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    size = image01.shape[0]
    scale = scale or max(1, -(-224 // size))
    gray = image01[..., 0] if image01.shape[-1] == 1 else None
    rgb = np.repeat(gray[..., None], 3, axis=-1) if gray is not None else image01
    rgb = np.clip(rgb, 0, 1)
    h = upsample(heat, size) if heat.shape[0] != size else heat
    span = float(h.max() - h.min())
    h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
    colored = colormaps["jet"](h)[..., :3]
    overlay = 0.55 * rgb + 0.45 * colored
    panel = lambda a: Image.fromarray((a * 255).round().astype(np.uint8)).resize(  # noqa: E731
        (size * scale, size * scale), Image.Resampling.BILINEAR)
    font = ImageFont.load_default(size=max(11, 6 * scale // 2 + 8))
    side, pad = size * scale, 8
    text_w = font.size * max(12, max(len(t) for t in lines)) // 2 + 2 * pad
    canvas = Image.new("RGB", (max(2 * side + 3 * pad + text_w, font.size * len(title) * 3 // 5 + 2 * pad),
                               side + 2 * pad + 22), "white")
    canvas.paste(panel(rgb), (pad, pad + 22))
    canvas.paste(panel(overlay), (2 * pad + side, pad + 22))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((3 * pad + 2 * side, pad + 22 + i * (font.size + 6)), line, fill="black", font=font)
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


def explain_files(model: predict_lib.FineTuned, records, output: str, method: str | None = None,
                  class_name: str | None = None, batch_size: int = 8, top: int = 3) -> tuple[list, list]:
    """Writes one PNG per readable image into `output`; returns (written paths, failures)."""
    import jax
    import jax.numpy as jnp

    classifier, variables = model.plain()
    method = method or _family(classifier).explain_method(classifier.backbone)
    if class_name is not None and class_name not in model.class_names:
        raise PredictError(f"--class {class_name!r} is not a class of the model ({', '.join(model.class_names)})")
    loader, failures = model.loader(records, batch_size, "explain")
    mean, std = (np.asarray(s, np.float32) for s in model.normalization_stats())
    from medjax import engine

    probability = jax.jit(engine.make_eval_step(classifier, model.task))
    explainer = make_explainer(method, classifier, model.task)
    os.makedirs(output, exist_ok=True)
    written, used, n = [], set(), 0
    cut = model.threshold_array() if model.task == "multilabel" else None
    for batch in loader:
        keep = np.flatnonzero(batch["mask"])
        batch_records = [records[n + i] for i in keep]
        n += len(batch["mask"])
        if not len(keep):
            continue
        images = jnp.asarray(batch["image"][keep])
        probs = np.asarray(probability(variables, images))
        classes = np.full(len(keep), model.class_names.index(class_name)) if class_name else probs.argmax(axis=1)
        maps = np.asarray(explainer(variables, images, jnp.asarray(classes, jnp.int32)))
        for i, record in enumerate(batch_records):
            stem = os.path.splitext(os.path.basename(record.path))[0]
            name, k = f"{stem}.png", 1
            while name in used:
                k += 1
                name = f"{stem}_{k}.png"
            used.add(name)
            image01 = np.asarray(batch["image"][keep[i]]) * std + mean
            what = "attention rollout" if method == "attention" else \
                f"{method} for {model.class_names[classes[i]]}"
            title = f"{os.path.basename(record.path)}: {what}"
            render(image01, maps[i], describe(probs[i], model.class_names, model.task, int(classes[i]), cut, top),
                   title).save(os.path.join(output, name))
            written.append(os.path.join(output, name))
    return written, list(failures)


def main(argv=None) -> int:
    from medjax import pretrained
    from medjax.data import DataError

    p = predict_lib.CliParser(prog="python -m medjax.explain", description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--workdir", required=True, help="a run's work directory, or a folder of medjax.export")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    p.add_argument("--output", required=True, help="the folder for the PNGs")
    p.add_argument("--method", choices=METHODS, help="default: the family's (attention for ViTs, else gradcam)")
    p.add_argument("--class", dest="class_name", help="explain this class (default: each image's top class)")
    p.add_argument("--top", type=int, default=3, help="classes listed beside the image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--strict", action="store_true", help="stop (exit 2) on an unreadable image instead of skipping")
    args = p.parse_args(argv)
    try:
        model = predict_lib.load_model(args.workdir)
        records = predict_lib.image_records(args.images, model)
        if args.strict:
            predict_lib.check_strict(records, model.channels)
        written, failures = explain_files(model, records, args.output, args.method, args.class_name,
                                          args.batch_size, args.top)
    except (PredictError, pretrained.PretrainedError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predict_lib.report_failures(failures, args.output)
    print(f"{len(written)} explanation(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
