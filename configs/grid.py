"""The benchmark grid as a recipe: one cell of the three studies' tables (medjax/studies.py) per run.

    python -m medjax.main --config=grid:model=dinov2_b,dataset=chexpert,head=linear,freeze=frozen \
        --workdir=runs/dinov2_b/chexpert/linear_frozen [--config.weights_dir=DIR] [--config.data_dir=DIR]
    python -m medjax.grid list --filter dataset=chexpert      # the cells; `run` runs them one by one
"""

from medjax.studies import get_config  # noqa: F401 (the recipe's entry point)
