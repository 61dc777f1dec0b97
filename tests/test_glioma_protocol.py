"""The glioma study's protocol switches: training without augmentation (the eval transform in the train order) and
the configs that carry the protocol (medjax.studies.glioma_protocol)."""

import numpy as np

from medjax import schema, studies
from medjax.data import fake, get_dataset, make_loader
from medjax.data.pipeline import TrainOrder


def test_train_without_augmentation_is_the_eval_transform_in_train_order(tmp_path):
    root = fake.write("chest_xray_pneumonia", str(tmp_path / "cxr"), 40, seed=0, size=48)["root"]
    ds = get_dataset("chest_xray_pneumonia", root, check_images="none")
    kw = dict(batch_size=4, image_size=32, seed=3, shard_index=0, shard_count=1, worker_count=0)
    n = len(ds.splits["train"])
    plain = np.concatenate([b["image"] for b in make_loader(ds, "train", train=True, augment=False, num_epochs=1,
                                                             **kw)])
    augmented = np.concatenate([b["image"] for b in make_loader(ds, "train", train=True, num_epochs=1, **kw)])
    evaluated = np.concatenate([b["image"][b["mask"]] for b in make_loader(ds, "train", train=False, **kw)])
    order = TrainOrder(n, 4, 3, 0, 1, 1).permutation(0)[:len(plain)]
    assert len(plain) == n // 4 * 4 and np.array_equal(plain, evaluated[order])
    assert not np.array_equal(augmented, plain)  # the switch is what turns augmentation off


def test_the_recipe_is_the_studys():
    c = studies.glioma_protocol(schema.study_config())
    schema.validate(c)
    assert (c.optim.name, c.optim.lr, c.optim.schedule, c.optim.clip) == ("adam", 1e-4, "constant", 0.0)
    assert (c.batch_size, c.epochs, c.seed, c.image_size, c.normalization) == (32, 100, 1, 224, "imagenet")
    assert (c.train_augment, c.selection_metric, c.bootstrap.resamples) == (False, "accuracy", 5000)
    # the defaults of the reference recipe are untouched
    d = schema.study_config()
    assert (d.train_augment, d.selection_metric, d.bootstrap.resamples, d.bootstrap.seed) == (True, "", 1000, 0)
