"""Checkpoint conversion, the command line: official PyTorch / transformers / open_clip files -> medjax Flax
parameters.

    python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json] [--linear-head HEAD.pth]

A thin layer over the library: the engine is `medjax.conversion`, `convert` is `medjax.convert.convert`, and each
family's key tables and variants live with the family (`medjax/models/<family>/convert.py`, one registry:
`medjax.models.FAMILIES`).
"""

from __future__ import annotations

from medjax.convert import CONVERTER_VERSION, CONVERTERS, CheckpointError, ConversionError, convert


__all__ = ["convert", "CheckpointError", "ConversionError", "CONVERTER_VERSION", "CONVERTERS"]
