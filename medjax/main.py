"""python -m medjax.main --config=RECIPE --workdir=DIR [--config.x=y ...]

Fine-tunes a backbone on a dataset as the config says, resuming from DIR if it holds a checkpoint. For several
hosts, pass --distributed (or run under a launcher that sets the JAX coordinator environment).

User errors (bad config, data, weights, work directory) end with one `error:` line and exit status 2; a non-finite
loss ends with exit status 3. SIGTERM / Ctrl-C save a checkpoint at the current step and end with one line, exit
status 143 / 130 (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from medjax import cli, pretrained, rundir, schema, train
from medjax.convert import convert
from medjax.data import fake
from medjax.errors import UserError, cli_main
from medjax.weights import fetch as weights

config_flags.DEFINE_config_file("config", None, cli.RECIPE_HELP, lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics.json and TensorBoard logs go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
FLAGS = flags.FLAGS


def _parse_flags(argv):
    return cli.parse_recipe_flags(argv, __doc__, ["config", "workdir", "distributed"], ["config", "workdir"],
                                  "python -m medjax.main --config=demo --workdir=DIR")


def check_workdir(workdir: str) -> None:
    """The work directory must be a folder this process can write (created if missing), before anything is read."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: exists and is not a folder; expected a folder for the run")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot create it ({e.strerror or e}); expected a writable folder") \
            from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir}: not writable by this user; expected a writable folder")


def prepare(config, workdir: str):
    """Things a config may ask for on first use: synthetic data (under the work directory when data_root is unset,
    so that two runs never share it), a bundled checkpoint to convert."""
    if config.fake_data and not config.data_root:
        config.data_root = os.path.join(workdir, "data", config.dataset)
    if config.fake_data and not os.path.exists(config.data_root):
        print(f"Writing {config.fake_data} synthetic {config.dataset} images to {config.data_root}", flush=True)
        fake.write_once(config.dataset, config.data_root, config.fake_data, seed=config.seed)  # a kill leaves none
    if not os.path.exists(config.data_root):
        raise UserError(f"data_root {config.data_root!r} does not exist. Point --config.data_root at the "
                        f"{config.dataset} folder in its public layout (docs: Data), or write a synthetic one "
                        f"with `python -m medjax.data fake --dataset {config.dataset} --root DIR --num N`.")
    source = config.model.convert_from
    grid = bool(config.grid_cell.arg)  # a grid cell: a never-converted {weights_dir}/{folder} is fetched by its name
    if source.checkpoint and not config.model.pretrained:
        target = rundir.path(workdir, rundir.BACKBONE)
        if not os.path.exists(os.path.join(target, pretrained.METADATA_FILE)):
            print(f"Converting {source.checkpoint} ({source.model}) into {target}", flush=True)
            convert(source.checkpoint, target, source.model, source.config or None)
        config.model.pretrained = target
    elif config.model.pretrained:  # a registry name: fetched (or found in the cache) before anything starts
        config.model.pretrained = weights.resolve(config.model.pretrained, grid_folder=grid)
    if config.model.attention_head.deit_params:  # the attention head's DeiT-B body, likewise
        config.model.attention_head.deit_params = weights.resolve(config.model.attention_head.deit_params,
                                                                  grid_folder=grid)


@cli_main
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # orbax and grain log every save at INFO; keep the console for the summary
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    workdir = FLAGS.workdir
    fresh = not os.path.exists(workdir)  # a refused first start leaves no folder behind
    try:
        schema.validate(config)
        check_workdir(FLAGS.workdir)
        train.check_config(config)
        if FLAGS.distributed:
            jax.distributed.initialize()
        with rundir.locked(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            prepare(config, workdir)
            result = train.Trainer(config, workdir).run()
    except train.Stopped as e:  # SIGTERM / Ctrl-C: the step finished and was saved
        print(e, file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C before training, or a second one
        print("interrupted: stopped at once; the run resumes from its last complete checkpoint (run the same "
              "command)", file=sys.stderr)
        return 130
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except rundir.WorkdirBusy as e:  # another process's folder: nothing of it is touched
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        if fresh and not os.path.exists(rundir.path(workdir, rundir.RUN_CONFIG)) and jax.process_index() == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"error: {str(e).strip()}", file=sys.stderr)
        return 2
    print(f"metrics written to {rundir.path(FLAGS.workdir, rundir.METRICS)}")
    return 0 if result else 1


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
