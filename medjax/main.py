"""python -m medjax.main --config=configs/<name>.py --workdir=DIR [--config.x=y ...]

Fine-tunes a backbone on a dataset as the config says, resuming from DIR if it holds a checkpoint. For several
hosts, pass --distributed (or run under a launcher that sets the JAX coordinator environment).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/demo.py", lock_config=False)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics.json and TensorBoard logs go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def prepare(config, workdir: str):
    """Things a config may ask for on first use: synthetic data, a bundled checkpoint to convert."""
    if config.get("fake_data") and not os.path.exists(config.data_root):
        from medjax.data import fake

        print(f"Writing {config.fake_data} synthetic {config.dataset} images to {config.data_root}")
        fake.write(config.dataset, config.data_root, config.fake_data, seed=config.seed)
    if not os.path.exists(config.data_root):
        raise SystemExit(f"error: data_root {config.data_root!r} does not exist. Point --config.data_root at the "
                         f"{config.dataset} folder in its public layout (README, Data), or write a synthetic one "
                         f"with `python -m medjax.data fake --dataset {config.dataset} --root DIR --num N`.")
    convert = config.model.get("convert_from")
    if convert and not config.model.get("pretrained"):
        import converters

        target = os.path.join(workdir, "backbone")
        if not os.path.exists(os.path.join(target, "medjax.json")):
            converters.convert(convert.checkpoint, target, convert.model, convert.get("config"))
        config.model.pretrained = target
    if config.model.get("pretrained") and not os.path.exists(os.path.join(config.model.pretrained, "medjax.json")):
        raise SystemExit(f"error: model.pretrained {config.model.pretrained!r} holds no converted backbone. Convert "
                         "the official checkpoint once: `python -m converters CHECKPOINT "
                         f"{config.model.pretrained} --model NAME` (README, Converting checkpoints).")


def main(argv):
    del argv
    import jax
    from absl import logging

    if not FLAGS["verbosity"].present:  # orbax and grain log every save at INFO; keep the console for the summary
        logging.set_verbosity(logging.WARNING)

    if FLAGS.distributed:
        jax.distributed.initialize()
    from medjax import train

    config = FLAGS.config
    prepare(config, FLAGS.workdir)
    try:
        result = train.Trainer(config, FLAGS.workdir).run()
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"metrics written to {os.path.join(FLAGS.workdir, 'metrics.json')}")
    return 0 if result else 1


if __name__ == "__main__":
    app.run(main)
