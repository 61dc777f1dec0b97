"""The radiology-study protocols (SPEC section 8): n-last-block features and their cache, the linear-probe grid and its
selection, kNN and ML-kNN against numpy references, few-shot subsets, and the CLI."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import converters
from medjax import models
from medjax.data import Record, fake, get_dataset
from medjax.protocols import features, few_shot, knn, linear_probe
from medjax.protocols.__main__ import main as cli_main
from medjax.protocols.features import SplitFeatures
from medjax.testing import fixture_path, run_cli


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    converters.convert(fixture_path("dinov2", "checkpoint.pth"), str(out), "dinov2",
                       fixture_path("dinov2", "config.json"))
    return str(out)


@pytest.fixture(scope="module")
def aptos(tmp_path_factory):
    return fake.write("aptos2019", str(tmp_path_factory.mktemp("aptos")), 40, seed=0, size=32)["root"]


# ------------------------------------------------------------------------------------------------ features


def test_last_blocks_cls_is_the_normed_cls_of_each_block(dino_dir, matmul_f32):
    """cls[:, -1] and patch_mean are the model's own normed outputs; cls[:, 0] (block 0) equals the CLS of the same
    model cut after block 0, through the final norm."""
    import dataclasses

    config, params_vars, _ = models.load_pretrained(dino_dir)

    params = params_vars["params"]
    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 56, 56, 3)), jnp.float32)
    feats = jax.jit(features.make_feature_fn(config, 2))({"params": params}, images)
    assert feats["cls"].shape == (3, 2, 48) and feats["patch_mean"].shape == (3, 48)
    out = jax.jit(models.build_backbone(config).apply)({"params": params}, images)
    np.testing.assert_allclose(feats["cls"][:, 1], out["x_norm_clstoken"], atol=1e-6)
    np.testing.assert_allclose(feats["patch_mean"], out["x_norm_patchtokens"].mean(axis=1), atol=1e-6)
    cut = dataclasses.replace(config, depth=1)
    cut_params = {k: v for k, v in params.items() if k != "blocks_1"}
    first = jax.jit(models.build_backbone(cut).apply)({"params": cut_params}, images)["x_norm_clstoken"]
    np.testing.assert_allclose(feats["cls"][:, 0], first, atol=1e-5)
    with pytest.raises(ValueError, match="offers 1..2"):
        features.make_feature_fn(config, 3)


def test_features_cost_one_backbone_pass_per_split(dino_dir, aptos, tmp_path, monkeypatch):
    ds = get_dataset("aptos2019", aptos)
    calls = []
    real = features.extract
    monkeypatch.setattr(features, "extract", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    kw = dict(image_size=28, num_blocks=4, batch_size=16, log=None)
    first, info = features.cached_features(dino_dir, ds, ("train", "val", "test"), str(tmp_path), **kw)
    assert calls == ["train", "val", "test"] and info["extracted"] == calls and info["num_blocks"] == 2
    again, info2 = features.cached_features(dino_dir, ds, ("train", "val", "test"), str(tmp_path), **kw)
    assert calls == ["train", "val", "test"] and info2["cached"] == ["train", "val", "test"]  # no new pass
    for split in ("train", "val", "test"):
        a, b = first[split], again[split]
        assert np.array_equal(a.cls, b.cls) and np.array_equal(a.labels, b.labels)
        assert list(a.paths) == [r.path for r in ds.splits[split]]
        assert list(a.labels) == [r.label for r in ds.splits[split]] and a.cls.shape[1:] == (2, 48)
    # another image size is another cache entry
    features.cached_features(dino_dir, ds, ("val",), str(tmp_path), **(kw | {"image_size": 42}))
    assert calls[-1] == "val"


# ------------------------------------------------------------------------------------------------ linear probe


def _synthetic(rng, n, where, k=3, d=8):
    """Labels carried only by the CLS of block L-1 (`where='block'`), only by the patch mean ('avgpool'), or split
    between them ('both': block L-1 tells class 0 from the rest, the patch mean tells 1 from 2 but makes 0 look like
    1 or 2), so that only the heads reading those inputs can separate the classes."""
    y = rng.integers(0, k, n)
    cls = rng.standard_normal((n, 2, d))
    pm = rng.standard_normal((n, d))
    signal = 3.0 * np.eye(k, d)[y]
    if where == "block":
        cls[:, 0] += signal
    elif where == "avgpool":
        pm += signal
    else:
        cls[:, 0, 0] += 3.0 * (y == 0)
        look = np.where(y == 0, rng.integers(1, 3, n), y)
        pm[:, 1] += 3.0 * (look == 1)
        pm[:, 2] += 3.0 * (look == 2)
    return SplitFeatures(cls.astype(np.float32), pm.astype(np.float32), y, np.asarray([f"{i}" for i in range(n)]))


@pytest.mark.parametrize("where, wins", [("block", lambda h: h["n_last_blocks"] == 2),
                                         ("avgpool", lambda h: h["avgpool"]),
                                         ("both", lambda h: h["n_last_blocks"] == 2 and h["avgpool"])])
def test_probe_selects_the_head_with_the_best_validation_metric(where, wins):
    rng = np.random.default_rng(0)
    train, val, test = (_synthetic(rng, n, where) for n in (300, 120, 120))
    heads, skipped = linear_probe.head_grid((1, 2, 4), max_blocks=2)
    assert len(heads) == 16 and len(skipped) == 8
    r = linear_probe.linear_probe(train, val, test, task="multiclass", class_names=["a", "b", "c"],
                                  target_metric="roc_auc", heads=heads)
    values = [g["val"] for g in r["grid"]]
    assert r["selected"] == r["grid"][int(np.argmax(values))] and r["selected"]["val"] == max(values)
    assert wins(r["selected"])
    # the known answer: exactly the heads that read the signal score high, every other head clearly lower
    assert min(g["val"] for g in r["grid"] if wins(g)) > 0.9 > 0.85 > max(g["val"] for g in r["grid"] if not wins(g))
    assert r["retrained_on"] == "train+val" and r["num_retrain"] == 420 and r["test_target"] > 0.9
    assert r["head_params"]["w"].shape == (1, 3 * 8, 3)


def test_multilabel_probe_and_mlknn_protocols():
    """Multi-label sets: BCE heads selected by mean AUC; kNN becomes ML-kNN."""
    rng = np.random.default_rng(6)

    def split(n):
        y = (rng.random((n, 4)) < 0.4).astype(np.float32)
        cls = rng.standard_normal((n, 1, 8)).astype(np.float32)
        cls[:, 0, :4] += 3 * y
        return SplitFeatures(cls, rng.standard_normal((n, 8)).astype(np.float32), y, np.arange(n).astype(str))

    train, val, test = split(200), split(80), split(80)
    names = ["w", "x", "y", "z"]
    r = linear_probe.linear_probe(train, val, test, task="multilabel", class_names=names, target_metric="mean_auc")
    assert len(r["grid"]) == 8 and r["selected"]["val"] == max(g["val"] for g in r["grid"])
    assert r["test"]["task"] == "multilabel" and r["test_target"] > 0.9
    k = knn.knn_protocol(train, {"test": test}, task="multilabel", class_names=names, target_metric="mean_auc")
    assert k["method"] == "ml_knn" and k["test_target"] > 0.9


def test_select_head_ranks_undefined_last_and_keeps_the_first_tie():
    assert linear_probe.select_head([0.5, None, 0.9, 0.9, float("nan")]) == 2
    with pytest.raises(ValueError, match="undefined"):
        linear_probe.select_head([None, None])


def _reference_sgd(x, y, w, b, lr, epochs, batch_size, seed, k):
    """One linear head, float64 numpy: cross-entropy, SGD momentum 0.9 (PyTorch form), cosine to 0 per step."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    per_epoch = math.ceil(len(x) / batch_size)
    total, t = epochs * per_epoch, 0
    for e in range(epochs):
        perm = np.random.default_rng((seed, e)).permutation(len(x))
        for j in range(per_epoch):
            i = perm[j * batch_size:(j + 1) * batch_size]
            logits = x[i] @ w + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - np.eye(k)[y[i]]) / len(i)
            mw, mb = 0.9 * mw + x[i].T @ g, 0.9 * mb + g.sum(0)
            rate = lr * 0.5 * (1 + math.cos(math.pi * t / total))
            w, b, t = w - rate * mw, b - rate * mb, t + 1
    return w, b


def test_grid_heads_equal_each_head_trained_alone_and_a_numpy_reference():
    rng = np.random.default_rng(1)
    feats = _synthetic(rng, 150, "block")  # 150 = 128 + a short batch of 22 each epoch
    x = linear_probe.full_input(feats)
    heads, _ = linear_probe.head_grid((1, 2), (False, True), (1e-2, 5e-2))
    grid = linear_probe.train_heads(x, feats.labels, "multiclass", 3, heads, 2, 8, epochs=3)
    for h, head in enumerate(heads):
        alone = linear_probe.train_heads(x, feats.labels, "multiclass", 3, [head], 2, 8, epochs=3)
        np.testing.assert_allclose(grid["w"][h], alone["w"][0], atol=1e-6)
        rows = grid["masks"][h] > 0
        assert np.all(grid["w"][h][~rows] == 0)  # rows a head does not read stay exactly zero
        init = linear_probe.init_heads([head], grid["masks"][h:h + 1], 3, 0)["w"][0][rows]
        ref_w, ref_b = _reference_sgd(linear_probe.head_input(feats, head.n_blocks, head.avgpool), feats.labels,
                                      init, np.zeros(3), head.lr, 3, 128, 0, 3)
        np.testing.assert_allclose(grid["w"][h][rows], ref_w, atol=2e-5)
        np.testing.assert_allclose(grid["b"][h], ref_b, atol=2e-5)


# ------------------------------------------------------------------------------------------------ kNN


def test_weighted_knn_matches_brute_force_numpy():
    rng = np.random.default_rng(2)
    bank, query = rng.standard_normal((200, 16)), rng.standard_normal((30, 16))
    labels = rng.integers(0, 5, 200)
    probs = knn.weighted_knn_probs(bank, labels, query, 5, k=20, temperature=0.07)
    for q in range(30):
        a = query[q] / np.linalg.norm(query[q])
        sims = np.array([a @ (v / np.linalg.norm(v)) for v in bank])
        top = np.argsort(-sims)[:20]
        weights = np.exp(sims[top] / 0.07)
        weights /= weights.sum()
        expected = np.zeros(5)
        for i, wgt in zip(top, weights):
            expected[labels[i]] += wgt
        np.testing.assert_allclose(probs[q], expected, atol=1e-5)


def _mlknn_reference(bank, y, query, k, s=1.0):
    """Zhang & Zhou (2007), Fig. 1, written out with loops: returns (posteriors, MAP predictions)."""
    def nn(v, exclude=None):
        sims = [(v / np.linalg.norm(v)) @ (b / np.linalg.norm(b)) if i != exclude else -np.inf
                for i, b in enumerate(bank)]
        return np.argsort(sims)[::-1][:k]

    m, q = y.shape
    post, pred = np.zeros((len(query), q)), np.zeros((len(query), q), int)
    counts_train = np.array([[y[nn(bank[i], exclude=i), lab].sum() for lab in range(q)] for i in range(m)])
    for lab in range(q):
        p1 = (s + y[:, lab].sum()) / (2 * s + m)
        c = np.zeros(k + 1)
        c_ = np.zeros(k + 1)
        for i in range(m):
            (c if y[i, lab] == 1 else c_)[int(counts_train[i, lab])] += 1
        for t, v in enumerate(query):
            j = int(y[nn(v), lab].sum())
            e1 = (s + c[j]) / (s * (k + 1) + c.sum())
            e0 = (s + c_[j]) / (s * (k + 1) + c_.sum())
            pred[t, lab] = int(p1 * e1 > (1 - p1) * e0)
            post[t, lab] = p1 * e1 / (p1 * e1 + (1 - p1) * e0)
    return post, pred


def test_mlknn_matches_the_papers_map_rule():
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((4, 12)) * 2
    y = (rng.random((90, 4)) < 0.35).astype(int)
    bank = y @ centers + rng.standard_normal((90, 12))
    yq = (rng.random((25, 4)) < 0.35).astype(int)
    query = yq @ centers + rng.standard_normal((25, 12))
    model = knn.mlknn_fit(bank, y, k=20)
    post = knn.mlknn_predict(model, bank, y, query)
    ref_post, ref_pred = _mlknn_reference(bank, y, query, 20)
    np.testing.assert_allclose(post, ref_post, atol=1e-10)
    assert np.array_equal((post > 0.5).astype(int), ref_pred)
    assert (ref_pred == yq).mean() > 0.7  # and it has learnt something


# ------------------------------------------------------------------------------------------------ few-shot


def _records(multilabel=False, patients=True, n=120, k=3, seed=4):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = tuple(int(v) for v in rng.random(k) < 0.4) if multilabel else int(rng.integers(0, k))
        out.append(Record(f"/img/{i}.png", label, f"p{i // 3}" if patients else None))  # 3 images per patient
    return out


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("patients", [True, False])
def test_few_shot_subsets(multilabel, patients):
    recs = _records(multilabel, patients)
    task = "multilabel" if multilabel else "multiclass"
    previous = set()
    for k in (1, 2, 4, 8):
        idx, drawn, short = few_shot.few_shot_subset(recs, task, 3, k, seed=7)
        assert not short and all(len(v) == k for v in drawn.values())  # k per class
        assert len(idx) == 3 * k == len(set(idx))
        for c, chosen in drawn.items():  # each drawn image carries its class
            assert all((recs[i].label[c] if multilabel else recs[i].label == c) for i in chosen)
        units = [recs[i].patient or recs[i].path for i in idx]
        assert len(set(units)) == len(units)  # one image per patient, no patient in two classes
        assert previous <= set(idx.tolist())  # nested in k
        previous = set(idx.tolist())
        again, _, _ = few_shot.few_shot_subset(recs, task, 3, k, seed=7)
        assert np.array_equal(idx, again)  # deterministic from the seed
    other, _, _ = few_shot.few_shot_subset(recs, task, 3, 8, seed=8)
    assert not np.array_equal(other, idx)


def test_few_shot_reports_shortfall_and_runs_the_probe():
    recs = [Record(f"/i{i}", i % 2, f"p{i}") for i in range(10)] + [Record("/rare", 2, "p99")]
    _, drawn, short = few_shot.few_shot_subset(recs, "multiclass", 3, 4, seed=0)
    assert short == {2: 3} and len(drawn[0]) == len(drawn[1]) == 4
    rng = np.random.default_rng(5)
    train, val, test = (_synthetic(rng, n, "block") for n in (60, 40, 40))
    train_recs = [Record(str(i), int(train.labels[i]), f"p{i}") for i in range(60)]
    heads, _ = linear_probe.head_grid((1, 2), lrs=(5e-2,))
    r = few_shot.few_shot(train, val, test, train_recs, task="multiclass", class_names=["a", "b", "c"],
                          target_metric="roc_auc", shots=(2,), seeds=(0, 1), heads=heads)
    runs = r["shots"][2]["seeds"]
    assert set(runs) == {0, 1} and all(v["num_train"] == 6 for v in runs.values())
    assert r["shots"][2]["test_mean"] == pytest.approx(np.mean([v["test_target"] for v in runs.values()]))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_probe_then_knn_share_one_backbone_pass(dino_dir, aptos, tmp_path, capsys):
    args = ["--params", dino_dir, "--dataset", "aptos2019", "--root", aptos, "--workdir", str(tmp_path),
            "--image-size", "28", "--extract-batch-size", "16"]
    assert cli_main(["probe", *args, "--blocks", "1,4", "--lrs", "0.01,0.05", "--epochs", "2"]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert probe["features"]["extracted"] == ["train", "val", "test"]
    assert len(probe["grid"]) == 4 and len(probe["skipped_heads"]) == 4  # the tiny model has 2 blocks, not 4
    assert probe["selected"]["val"] == max(g["val"] for g in probe["grid"] if g["val"] is not None)
    assert probe["target_metric"] == "quadratic_kappa" and "quadratic_kappa" in probe["test"]
    assert json.load(open(tmp_path / "probe.json")) == probe
    proc = run_cli("medjax.protocols", "knn", *args)  # as a user runs it: reads the cache, no backbone pass
    result = json.loads(proc.stdout)
    assert result["features"]["extracted"] == [] and result["features"]["cached"] == ["train", "val", "test"]
    assert result["method"] == "weighted_knn" and result["k"] == 20 and result["num_bank"] == probe["num_train"]
    assert result["test"]["num_samples"] == probe["num_test"]
