"""kNN on frozen features (SPEC section 8): the train split is the memory bank, features are the L2-normalised CLS of
the last block (`x_norm_clstoken` for DINOv2), neighbours by cosine similarity.

- Single-label sets: DINOv2's weighted vote. The k most similar bank images vote for their class with weight
  softmax(similarity / T) over the k (k = 20, T = 0.07), which gives class probabilities.
- Multi-label sets: ML-kNN (Zhang & Zhou, "ML-KNN: A lazy learning approach to multi-label learning", 2007). For
  each label l: prior P(H1) = (s + #positives) / (2 s + m); for each bank image, C(l) = how many of its k
  neighbours (itself excluded) carry l; P(E_j | H1) = (s + c[j]) / (s (k + 1) + sum_p c[p]) with c[j] the number
  of positive bank images with C(l) = j (and c' for the negatives, P(E_j | H0)); a query with C(l) = j gets the
  posterior P(H1) P(E_j | H1) / (P(H1) P(E_j | H1) + P(H0) P(E_j | H0)), whose argmax is the paper's MAP rule
  (posterior > 0.5). Smoothing s = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, schema

K, TEMPERATURE = schema.study_config().knn.k, schema.study_config().knn.temperature  # the declared defaults


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def neighbours(bank: np.ndarray, query: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 2048):
    """(similarities (Nq, k), indices (Nq, k)) of the k most cosine-similar bank rows, most similar first. Inputs are
    L2-normalised here. exclude_self: query row i is bank row i and is not its own neighbour."""
    bank = jnp.asarray(l2_normalize(bank))
    query = l2_normalize(query)
    if k > bank.shape[0] - int(exclude_self):
        raise ValueError(f"k={k} neighbours requested from a bank of {bank.shape[0]} images")

    @jax.jit
    def top(bank, q, start):
        sims = jnp.dot(q, bank.T, precision=jax.lax.Precision.HIGHEST)
        if exclude_self:
            rows = start + jnp.arange(q.shape[0])
            sims = jnp.where(jnp.arange(bank.shape[0])[None] == rows[:, None], -jnp.inf, sims)
        return jax.lax.top_k(sims, k)

    sims, idx = [], []
    for start in range(0, len(query), chunk):
        s, i = top(bank, jnp.asarray(query[start:start + chunk]), start)
        sims.append(np.asarray(s))
        idx.append(np.asarray(i))
    return np.concatenate(sims), np.concatenate(idx)


def weighted_knn_probs(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray, num_classes: int, k: int = K,
                       temperature: float = TEMPERATURE) -> np.ndarray:
    """(Nq, K) class probabilities of DINOv2's weighted kNN vote."""
    sims, idx = neighbours(bank, query, k)
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    w /= w.sum(axis=1, keepdims=True)
    onehot = np.eye(num_classes)[np.asarray(bank_labels)[idx]]  # (Nq, k, K)
    return np.einsum("qk,qkc->qc", w, onehot)


def mlknn_fit(bank: np.ndarray, bank_labels: np.ndarray, k: int = K, s: float = 1.0) -> dict:
    """The ML-kNN model of a bank: prior (K,), P(E_j | H1) and P(E_j | H0) as (K, k + 1)."""
    y = np.asarray(bank_labels, np.float64)
    m, num_labels = y.shape
    _, idx = neighbours(bank, bank, k, exclude_self=True)
    counts = y[idx].sum(axis=1).astype(np.int64)  # (m, K): neighbours carrying each label
    prior = (s + y.sum(axis=0)) / (2 * s + m)
    c_pos = np.zeros((num_labels, k + 1))
    c_neg = np.zeros((num_labels, k + 1))
    for lab in range(num_labels):
        c_pos[lab] = np.bincount(counts[y[:, lab] == 1, lab], minlength=k + 1)
        c_neg[lab] = np.bincount(counts[y[:, lab] == 0, lab], minlength=k + 1)
    cond_pos = (s + c_pos) / (s * (k + 1) + c_pos.sum(axis=1, keepdims=True))
    cond_neg = (s + c_neg) / (s * (k + 1) + c_neg.sum(axis=1, keepdims=True))
    return {"k": k, "s": s, "prior": prior, "cond_pos": cond_pos, "cond_neg": cond_neg}


def mlknn_predict(model: dict, bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(Nq, K) posterior P(H1 | E) per label; the MAP prediction is posterior > 0.5."""
    k = model["k"]
    _, idx = neighbours(bank, query, k)
    counts = np.asarray(bank_labels, np.float64)[idx].sum(axis=1).astype(np.int64)  # (Nq, K)
    labs = np.arange(counts.shape[1])[None]
    pos = model["prior"][None] * model["cond_pos"][labs, counts]
    neg = (1 - model["prior"][None]) * model["cond_neg"][labs, counts]
    return pos / (pos + neg)


def knn_protocol(train, evals: dict, *, task: str, class_names, target_metric: str, k: int = K,
                 temperature: float = TEMPERATURE) -> dict:
    """kNN (multi-class) or ML-kNN (multi-label) with `train` as the bank, scored on each of `evals`
    ({split: SplitFeatures})."""
    bank = train.cls[:, -1]
    result = {"method": "weighted_knn" if task == "multiclass" else "ml_knn", "k": k, "num_bank": len(train),
              "target_metric": target_metric}
    if task == "multiclass":
        result["temperature"] = temperature
        predict = lambda q: weighted_knn_probs(bank, train.labels, q, len(class_names), k, temperature)  # noqa: E731
    else:
        model = mlknn_fit(bank, train.labels, k)
        predict = lambda q: mlknn_predict(model, bank, train.labels, q)  # noqa: E731
    for split, feats in evals.items():
        m = metrics.compute_metrics(task, predict(feats.cls[:, -1]), feats.labels, class_names)
        result[split] = m
        result[f"{split}_target"] = metrics.target_metric(target_metric, m)
    return result
