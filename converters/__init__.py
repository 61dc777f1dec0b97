"""Checkpoint conversion: official PyTorch / transformers / open_clip files -> medjax Flax parameters.

    python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json] [--linear-head HEAD.pth]
    python -m converters fetch NAME...      (official weights by name: download, verify, convert, cache)
    python -m converters list

A thin command line over the library: the conversion is `medjax.convert`, the weights registry and cache
`medjax.weights`.
"""

from __future__ import annotations

from medjax.convert import (CONVERTER_VERSION, FAMILIES, VARIANTS, CheckpointError, ConversionError,  # noqa: F401
                            convert)

__all__ = ["convert", "CheckpointError", "ConversionError", "FAMILIES", "VARIANTS"]
