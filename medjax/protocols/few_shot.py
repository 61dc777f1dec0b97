"""Few-shot linear probe (SPEC section 8): the linear probe trained on k in {1, 2, 4, 8, 16} examples per class.

Subsets are drawn from the train split, per seed:
- the unit is the patient where the dataset has patient ids (else the image); every patient is used at most once,
  for one class, and contributes one image, so the subset is patient-disjoint across classes and has exactly k
  distinct patients per class;
- for each class the candidate patients (those with an image of that class; for multi-label sets, an image positive
  for it) are put in an order drawn from `numpy.random.default_rng(seed)`; classes then take turns, rarest first,
  each taking its next unused candidate, k rounds. The subset for k is therefore a prefix of the one for k + 1
  (nested) and a pure function of (records, seed);
- a class with fewer than k candidates left gets what there is; the shortfall is reported, never hidden.
For multi-label sets an image drawn for one class may also be positive for others: "k per class" counts the images
drawn for each class.

Protocol per (k, seed): the head grid is trained on the subset, selected on the full validation split and tested once,
without retraining on train + val (which would add the whole validation split to a k-shot training set).
"""

from __future__ import annotations

import numpy as np

from medjax.protocols import linear_probe

SHOTS = (1, 2, 4, 8, 16)


def _candidates(records, task: str, num_classes: int):
    """{class: {unit: [record indices of that class]}}; unit = patient, or the image path without patient ids."""
    out = {c: {} for c in range(num_classes)}
    for i, r in enumerate(records):
        classes = [r.label] if task == "multiclass" else [c for c, v in enumerate(r.label) if v]
        unit = r.patient if r.patient is not None else r.path
        for c in classes:
            out[c].setdefault(unit, []).append(i)
    return out


def few_shot_subset(records, task: str, num_classes: int, k: int, seed: int):
    """(indices into records (sorted), {class: [indices drawn for it]}, {class: shortfall}) for k shots per class."""
    rng = np.random.default_rng(seed)
    cands = _candidates(records, task, num_classes)
    order, pick = {}, {}
    for c in range(num_classes):  # per-class candidate order and per-unit image choice, drawn in a fixed sequence
        units = sorted(cands[c])
        order[c] = [units[j] for j in rng.permutation(len(units))]
        pick[c] = {u: cands[c][u][int(rng.integers(len(cands[c][u])))] for u in units}
    used, drawn, pos = set(), {c: [] for c in range(num_classes)}, {c: 0 for c in range(num_classes)}
    classes = sorted(range(num_classes), key=lambda c: (len(order[c]), c))  # rarest first
    for _ in range(k):
        for c in classes:
            while pos[c] < len(order[c]) and order[c][pos[c]] in used:
                pos[c] += 1
            if pos[c] < len(order[c]):
                unit = order[c][pos[c]]
                used.add(unit)
                drawn[c].append(pick[c][unit])
    shortfall = {c: k - len(v) for c, v in drawn.items() if len(v) < k}
    return np.asarray(sorted(i for v in drawn.values() for i in v), np.int64), drawn, shortfall


def few_shot(train, val, test, train_records, *, task: str, class_names, target_metric: str, shots=SHOTS,
             seeds=(0, 1, 2), heads=None, epochs: int = 10, batch_size: int = 128) -> dict:
    """{'shots': {k: {'seeds': {seed: ...}, 'test_mean', 'test_std'}}} on SplitFeatures of train / val / test."""
    out = {"target_metric": target_metric, "epochs": epochs, "batch_size": batch_size, "seeds": list(seeds),
           "selection": "full validation split; no retraining on train+val", "shots": {}}
    for k in shots:
        runs = {}
        for seed in seeds:
            idx, drawn, short = few_shot_subset(train_records, task, len(class_names), k, seed)
            r = linear_probe.linear_probe(train.subset(idx), val, test, task=task, class_names=class_names,
                                          target_metric=target_metric, heads=heads, epochs=epochs,
                                          batch_size=batch_size, seed=seed, retrain=False)
            runs[seed] = {"num_train": len(idx), "selected": r["selected"], "test_target": r.get("test_target"),
                          "shortfall": {class_names[c]: n for c, n in short.items()}}
        values = [v["test_target"] for v in runs.values() if v["test_target"] is not None]
        out["shots"][k] = {"seeds": runs, "test_mean": float(np.mean(values)) if values else None,
                           "test_std": float(np.std(values)) if values else None}
    return out
