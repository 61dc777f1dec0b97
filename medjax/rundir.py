"""The one owner of a run folder's layout (the trainer's work directory).

    WORKDIR/
      run_config.json          the flattened config the run started with (recorded once every start-up check passed)
      metrics.json             the finished run's metrics (its presence marks the run done)
      checkpoints/step_N/      orbax checkpoints of the train state (the latest few)
      best/step_N/             the best model by the validation metric
      splits/                  the frozen train/val/test record lists
      test_predictions.npz     the best model's test-split probabilities
      tensorboard/             event files

Every module that reads or writes a run folder takes the names from here.
"""

from __future__ import annotations

import os

RUN_CONFIG = "run_config.json"
METRICS = "metrics.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
SPLITS = "splits"
TEST_PREDICTIONS = "test_predictions.npz"
TENSORBOARD = "tensorboard"


def path(workdir: str, *names: str) -> str:
    return os.path.join(workdir, *names)
