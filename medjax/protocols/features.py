"""Frozen features, extracted once and cached: what the frozen protocols (linear probe, kNN, few-shot) train on.

For a ViT-family backbone with a CLS token (DINOv2, DeiT, MAE, CLIP) a split is stored as
- `cls`: (N, n, D) the CLS token of each of the last n blocks, passed through the backbone's final norm (the normed
  CLS of DINOv2's `get_intermediate_layers(n, norm=True)`), in block order (the last block last; `cls[:, -1]` is
  `x_norm_clstoken`);
- `patch_mean`: (N, D) the mean of the last block's normed patch tokens (registers excluded);
- `labels`: (N,) class indices or (N, K) multi-hot; `paths`: (N,) image paths, to check the alignment.

What "the normed CLS of the last n blocks" is comes from the backbone family's contract (`Family.taps`; the ViT family
captures its block outputs with flax's `capture_intermediates` and norms them with the final norm's own parameters).
Families without taps give n = 1 with their `linear_head_input` as the "CLS" and the mean of their
`attention_head_input` tokens as `patch_mean`.

3-D studies (the `volumes` dataset, one record per volume): every kept slice goes through the eval transform and the
backbone on its own row of a batch, and the volume's features are the mean of its slices' features (`cls` and
`patch_mean` alike, averaged in float64), so the frozen protocols see one row per volume.

Each split costs exactly one backbone pass (eval transforms, in split order, padding dropped); the arrays go to
`<workdir>/features/<dataset>_<split>_<key>.npz`, where the key hashes everything the numbers depend on (the
converted parameters, the split's records, image size, normalisation, n), so a changed input never reads a stale file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np

from medjax import classifier, models, pretrained
from medjax.data import make_loader, volumes
from medjax.data.pipeline import normalization_stats
from medjax.schema import study_config

FEATURES_VERSION = 1


@dataclasses.dataclass
class SplitFeatures:
    cls: np.ndarray  # (N, n, D) float32
    patch_mean: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int or (N, K) float
    paths: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_blocks(self) -> int:
        return self.cls.shape[1]

    @property
    def dim(self) -> int:
        return self.cls.shape[2]

    def subset(self, idx) -> "SplitFeatures":
        idx = np.asarray(idx)
        return SplitFeatures(self.cls[idx], self.patch_mean[idx], self.labels[idx], self.paths[idx])

    def concat(self, other: "SplitFeatures") -> "SplitFeatures":
        return SplitFeatures(*(np.concatenate([a, b]) for a, b in zip(dataclasses.astuple(self),
                                                                        dataclasses.astuple(other))))


def blocks_available(config) -> int:
    """How many "last blocks" a backbone offers (its family's contract: the depth for a ViT with a CLS token, else
    1)."""
    return models.family(config.family).max_taps(config)


def make_feature_fn(config, num_blocks: int, dtype=None):
    """(variables, images NHWC) -> {'cls': (B, n, D), 'patch_mean': (B, D)}, for jax.jit: the family's feature taps."""
    return models.family(config.family).feature_fn(config, num_blocks, dtype)


def _label_array(dataset, records) -> np.ndarray:
    if dataset.task == "multilabel":
        return np.asarray([r.label for r in records], np.float32).reshape(len(records), dataset.num_classes)
    return np.asarray([r.label for r in records], np.int64)


def extract(feature_fn, variables, dataset, split: str, *, image_size: int, batch_size: int = 64,
            normalization="dataset", worker_count: int = 0) -> SplitFeatures:
    """One backbone pass over `split` with eval transforms, in split order (padding rows dropped)."""
    if dataset.name == "volumes":
        return extract_volumes(feature_fn, variables, dataset, split, image_size=image_size, batch_size=batch_size,
                               normalization=normalization)

    fn = jax.jit(feature_fn)
    loader = make_loader(dataset, split, batch_size=batch_size, image_size=image_size, train=False, seed=0,
                         normalization=normalization, shard_index=0, shard_count=1, worker_count=worker_count)
    cls, pooled, labels = [], [], []
    for batch in loader:
        mask = np.asarray(batch["mask"])
        out = jax.device_get(fn(variables, batch["image"]))
        cls.append(out["cls"][mask])
        pooled.append(out["patch_mean"][mask])
        labels.append(np.asarray(batch["label"])[mask])
    records = dataset.splits[split]
    feats = SplitFeatures(np.concatenate(cls), np.concatenate(pooled), np.concatenate(labels),
                          np.asarray([r.path for r in records]))
    if len(feats.cls) != len(records):
        # an unreadable image (skip_bad_images) comes back as a masked row: keep the arrays aligned with the records
        raise ValueError(f"{dataset.name}/{split}: {len(feats.cls)} feature rows for {len(records)} records; "
                         "rerun with check_images='decode' and skip_bad_images=True to drop unreadable images first")
    expected = _label_array(dataset, records)
    if not np.array_equal(np.asarray(feats.labels, expected.dtype), expected):
        raise AssertionError(f"{dataset.name}/{split}: loader order does not match the split's records")
    feats.labels = expected
    return feats


def extract_volumes(feature_fn, variables, dataset, split: str, *, image_size: int, batch_size: int = 64,
                    normalization="dataset") -> SplitFeatures:
    """The volumes of `split`: every kept slice embedded (eval transform, batches of `batch_size` slices across
    volumes, the last one padded), then the features of each volume's slices averaged."""
    mean, std = normalization_stats(dataset, normalization)
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    offset = (-np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    fn = jax.jit(feature_fn)
    records = dataset.splits[split]
    cls, pooled, counts, pending = [], [], [], []

    def run(rows):
        batch = np.zeros((batch_size, *rows[0].shape), np.float32)
        batch[:len(rows)] = np.stack(rows)
        out = jax.device_get(fn(variables, batch))
        cls.append(np.asarray(out["cls"][:len(rows)]))
        pooled.append(np.asarray(out["patch_mean"][:len(rows)]))

    for r in records:
        images = volumes.slice_images(volumes.load_volume(r.path, dataset.options, r.origin), image_size)
        counts.append(len(images))
        pending.extend(images.astype(np.float32) * scale + offset)
        while len(pending) >= batch_size:
            run(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        run(pending)
    return SplitFeatures(volume_means(np.concatenate(cls), counts), volume_means(np.concatenate(pooled), counts),
                         _label_array(dataset, records), np.asarray([r.path for r in records]))


def volume_means(per_slice: np.ndarray, counts) -> np.ndarray:
    """(sum(counts), ...) per-slice features -> (len(counts), ...) means per volume (float64 sums, float32 out)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sums = np.add.reduceat(per_slice.astype(np.float64), starts, axis=0)
    return (sums / np.asarray(counts, np.float64).reshape(-1, *([1] * (per_slice.ndim - 1)))).astype(np.float32)


def _params_fingerprint(params_dir: str) -> dict:
    path = os.path.join(params_dir, pretrained.PARAMS_FILE)
    st = os.stat(path)
    with open(os.path.join(params_dir, pretrained.METADATA_FILE), "rb") as f:
        meta = hashlib.sha256(f.read()).hexdigest()
    return {"dir": os.path.abspath(params_dir), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "meta": meta}


def cache_key(params_dir: str, dataset, split: str, *, image_size: int, num_blocks: int, normalization,
              grayscale: str) -> str:
    records = [(r.path, r.label) for r in dataset.splits[split]]
    desc = {"version": FEATURES_VERSION, "params": _params_fingerprint(params_dir), "dataset": dataset.name,
            "split": split, "records": hashlib.sha256(json.dumps(records).encode()).hexdigest(),
            "image_size": image_size, "num_blocks": num_blocks, "normalization": normalization,
            "grayscale": grayscale}
    if dataset.name == "volumes":  # which slices and their intensity mapping change the features
        desc["volume_options"] = {k: dataset.options.get(k) for k in ("max_slices", "slice_sampling", "window",
                                                                      "series")}
        desc["volume_reader"] = volumes.READER_VERSION
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_backbone_for(params_dir: str, dataset, grayscale: str = "red"):
    """(config, variables) of a converted backbone, its stem reduced to 1 channel for grayscale data."""
    cfg = study_config().model
    cfg.pretrained, cfg.grayscale = params_dir, grayscale
    return classifier.load_backbone(cfg, dataset.channels)


def cached_features(params_dir: str, dataset, splits, workdir: str, *, image_size: int = 224, num_blocks: int = 4,
                    batch_size: int = 64, normalization="dataset", grayscale: str = "red", worker_count: int = 0,
                    log=print) -> tuple[dict[str, SplitFeatures], dict]:
    """({split: SplitFeatures}, info) for the requested splits, extracting only those not cached yet. num_blocks is
    clipped to what the backbone offers (`info['num_blocks']`). info['extracted'] lists the splits that cost a backbone
    pass in this call, info['cached'] those read from disk, info['extract_seconds'] the time spent."""
    config, variables = load_backbone_for(params_dir, dataset, grayscale)
    num_blocks = min(num_blocks, blocks_available(config))
    out, info = {}, {"num_blocks": num_blocks, "extracted": [], "cached": [], "extract_seconds": 0.0, "files": {}}
    feature_fn = None
    os.makedirs(os.path.join(workdir, "features"), exist_ok=True)
    for split in splits:
        key = cache_key(params_dir, dataset, split, image_size=image_size, num_blocks=num_blocks,
                        normalization=normalization, grayscale=grayscale)
        path = os.path.join(workdir, "features", f"{dataset.name}_{split}_{key}.npz")
        info["files"][split] = path
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                out[split] = SplitFeatures(z["cls"], z["patch_mean"], z["labels"], z["paths"])
            info["cached"].append(split)
            continue
        if feature_fn is None:
            feature_fn = make_feature_fn(config, num_blocks)
        t0 = time.perf_counter()
        feats = extract(feature_fn, variables, dataset, split, image_size=image_size, batch_size=batch_size,
                        normalization=normalization, worker_count=worker_count)
        info["extract_seconds"] += time.perf_counter() - t0
        tmp = path + ".tmp.npz"
        np.savez(tmp, **dataclasses.asdict(feats))
        os.replace(tmp, path)
        if log:
            log(f"extracted {dataset.name}/{split}: {len(feats)} images -> {path}")
        out[split] = feats
        info["extracted"].append(split)
    return out, info
