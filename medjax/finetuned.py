"""Fine-tuned PyTorch models in: a trained classification head read beside the backbone, kept with it.

The converter (`python -m converters CKPT OUT --model FAMILY`) recognises three layouts of a fine-tuned model:

- the reference study's `Trainer.save_session` file (sajjad-sh33/Medical-Transfer-Learning; `torch.save` of
  `{'iters', 'state_dict', 'original_state', 'optimizer', 'epoch', 'parameters': EasyDict, 'scaler'}`, no extension):
  `state_dict` holds the backbone under `backbone.*`, its blocks a second time as `blocks.*` (the same tensors), and
  the trained head `fc.*` on the family's pooled feature (`x_norm_clstoken` for DINOv2); the EasyDict is read as
  plain data (`medjax.conversion.PlainData`) and names the dataset;
- timm naming: the backbone's own keys plus `head.*` on the final-normed CLS token (DINOv2);
- transformers `Dinov2ForImageClassification` / `Dinov2WithRegistersForImageClassification`: `classifier.*` on
  `cat(CLS, mean of the patch tokens)`, which is the DINOv2 hub linear head with one layer (`lc_head`, lc_layers 1).

A linear head on the pooled feature is written as `medjax.export` writes a fine-tuned run (`head.safetensors` beside
the converted backbone, the facts under `export` in medjax.json), so `medjax.embed` gives its `logits`,
`medjax.predict` applies it to image files, and `model.pretrained=OUT` starts a run with the head kept when the
run's head and class count fit. The transformers head lives in the backbone (`lc_head`); `logits` = `lc_logits`.
"""

from __future__ import annotations

import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from medjax.conversion import CheckpointError
from medjax.data import aptos2019, chexpert, ddsm, isic2019
from medjax.pretrained import PretrainedError, write_safetensors
from medjax.tree import tensor_digest

HEAD_FILE = "head.safetensors"  # as medjax.export names it
EXPORT_KEY = "export"
TRAINED_HEAD_KEY = "trained_head"

# The study's dataset names (defaults/datasets.py classes) -> (medjax dataset, task, class names, mean, std).
STUDY_DATASETS = {
    "CheXpert": ("chexpert", "multilabel", list(chexpert.CLASS_NAMES), chexpert.MEAN, chexpert.STD),
    "DDSM": ("ddsm", "multiclass", ["normal", "benign_or_cancer"], ddsm.MEAN, ddsm.STD),
    "ISIC2019": ("isic2019", "multiclass", list(isic2019.CLASS_NAMES), isic2019.MEAN, isic2019.STD),
    "APTOS2019": ("aptos2019", "multiclass", list(aptos2019.CLASS_NAMES), aptos2019.MEAN, aptos2019.STD),
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _strip_ddp(state: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def split_head(state: dict, family: str, checkpoint: str) -> tuple[dict, dict | None]:
    """(backbone state, trained head or None). The head: {'layout', 'keys', 'weight' (C, D), 'bias' (C,),
    'kind': 'linear' (on linear_head_input) | 'lc' (the DINOv2 lc_head, cat(CLS, patch mean))}."""
    state = _strip_ddp(state)
    if "fc.weight" in state and any(k.startswith("backbone.") for k in state):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        for k, v in state.items():
            if k.startswith("blocks."):  # `self.blocks = self.backbone.blocks`: the same tensors again
                twin = backbone.get(k)
                if twin is None or twin.shape != v.shape or not np.array_equal(twin, v):
                    raise CheckpointError(f"{checkpoint}: {k} differs from backbone.{k}; in the study's checkpoints "
                                          "`blocks.*` repeats `backbone.blocks.*`")
        other = sorted(k for k in state if not k.startswith(("backbone.", "blocks.", "fc.")))
        if other:
            raise CheckpointError(f"{checkpoint}: keys beside backbone.*, blocks.* and fc.* ({', '.join(other[:6])}): "
                                  "not the study's linear-head model (its attention-head and MLP-head models are "
                                  "not read yet)")
        return backbone, _head(state, "fc", "linear", "medical_transfer_learning", checkpoint)
    if "head.weight" in state and family == "dinov2":
        if "fc_norm.weight" in state:
            raise CheckpointError(f"{checkpoint}: a timm head on `fc_norm` (global average pooling) is not read; "
                                  "medjax reads `head.*` on the final-normed CLS token")
        backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
        return backbone, _head(state, "head", "linear", "timm", checkpoint)
    if "classifier.weight" in state and any(k.startswith(("dinov2.", "dinov2_with_registers.")) for k in state):
        backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        return backbone, _head(state, "classifier", "lc", "transformers_dinov2_classification", checkpoint)
    return state, None


def _head(state: dict, prefix: str, kind: str, layout: str, checkpoint: str) -> dict:
    weight, bias = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(f"{checkpoint}: {prefix}.weight / {prefix}.bias are not one nn.Linear's (got "
                              f"{None if weight is None else tuple(weight.shape)} and "
                              f"{None if bias is None else tuple(bias.shape)})")
    return {"layout": layout, "kind": kind, "keys": f"{prefix}.weight, {prefix}.bias", "weight": weight,
            "bias": bias}


def study_facts(checkpoint_obj: dict | None) -> dict:
    """What the study's `parameters` EasyDict says about the run: the dataset and the image size."""
    params = (checkpoint_obj or {}).get("parameters") if isinstance(checkpoint_obj, dict) else None
    if not isinstance(params, dict):
        return {}
    dataset = (params.get("dataset_params") or {}).get("dataset")
    size = (params.get("foundation_params") or {}).get("img_size") or 224
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {"dataset": dataset, "image_size": int(size)}


def export_facts(family: str, head: dict, channels: int, facts: dict, checkpoint: str) -> tuple[dict, dict]:
    """(medjax.json `export` facts, head tensors {'kernel', 'bias'}) for a linear head: the facts
    `medjax.predict` reads (a run config, class names, task, statistics)."""
    num_classes = int(head["weight"].shape[0])
    dataset = STUDY_DATASETS.get(facts.get("dataset") or "")
    if dataset and len(dataset[2]) == num_classes and len(dataset[3]) == channels:
        name, task, class_names, mean, std = dataset
    else:
        name, task, class_names = "folder", "multiclass", [f"class_{i}" for i in range(num_classes)]
        mean, std = (IMAGENET if channels == 3 else ((0.5,), (0.25,)))
    # float32 compute: medjax.predict then reproduces the PyTorch model's float32 outputs
    run_config = {"dataset": name, "model.family": family, "model.head": "linear",
                  "image_size": int(facts.get("image_size") or 224), "normalization": "dataset",
                  "compute_dtype": "float32"}
    tensors = {"kernel": np.ascontiguousarray(head["weight"].T, np.float32),
               "bias": np.ascontiguousarray(head["bias"], np.float32)}
    return {"source": os.path.abspath(checkpoint), "best_step": None, "run_config": run_config,
            "class_names": class_names, "task": task, "channels": channels, "mean": list(mean), "std": list(std),
            "target_metric": None, "thresholds": None, "head": {"kind": "linear", "num_classes": num_classes},
            "head_digests": {k: tensor_digest(v) for k, v in sorted(tensors.items())},
            "imported": {"layout": head["layout"], "keys": head["keys"],
                         "dataset": facts.get("dataset")}}, tensors


def write_head(output_dir: str, tensors: dict) -> None:
    """head.safetensors, written before medjax.json (which names it) so a killed conversion leaves no folder that
    loads."""
    os.makedirs(output_dir, exist_ok=True)
    write_safetensors(os.path.join(output_dir, HEAD_FILE), tensors)


def read_head(folder: str, meta: dict) -> tuple[dict, dict] | None:
    """(export facts, flat head tensors) of a folder with a fine-tuned head (imported or exported), checked
    against the recorded digests; None for a plain backbone."""
    facts = meta.get(EXPORT_KEY)
    path = os.path.join(folder, HEAD_FILE)
    if not isinstance(facts, dict) or not os.path.isfile(path):
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{path}: damaged ({e}); convert or export the model again") from None
    bad = sorted(k for k, v in tensors.items() if facts.get("head_digests", {}).get(k) != tensor_digest(v))
    if bad:
        raise PretrainedError(f"{path}: {len(bad)} tensor(s) differ from the digests in medjax.json (first: {bad[0]});"
                              " the file is damaged; convert or export the model again")
    return facts, tensors


def head_logits(folder: str, meta: dict, outputs: dict) -> np.ndarray | None:
    """The trained head's outputs for the backbone `outputs` of a converted folder, or None when it has none."""
    if (meta.get(TRAINED_HEAD_KEY) or {}).get("kind") == "lc" and "lc_logits" in outputs:
        return np.asarray(outputs["lc_logits"])
    found = read_head(folder, meta)
    if found is None:
        return None
    facts, tensors = found
    kind = facts.get("head", {}).get("kind")
    x = np.asarray(outputs["linear_head_input"], np.float64)
    if kind == "linear" and set(tensors) == {"kernel", "bias"}:
        return (x @ tensors["kernel"].astype(np.float64) + tensors["bias"]).astype(np.float32)
    if kind == "mlp" and set(tensors) == {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"}:
        if "lc_logits" in outputs:
            x = np.asarray(outputs["lc_logits"], np.float64)
        hidden = np.maximum(x @ tensors["fc1/kernel"] + tensors["fc1/bias"], 0)
        return (hidden @ tensors["fc2/kernel"] + tensors["fc2/bias"]).astype(np.float32)
    return None  # an attention head runs through the classifier (medjax.predict), not here
