"""Checkpoint conversion, the command line: official PyTorch / transformers / open_clip files -> medjax Flax
parameters.

    python -m converters CHECKPOINT OUTPUT_DIR --model NAME [--config CONFIG.json] [--linear-head HEAD.pth]
    python -m converters fetch NAME...      (official weights by name: download, verify, convert, cache)
    python -m converters list

A thin command line over the library: the engine is `medjax.conversion`, `convert` is `medjax.convert.convert`,
each family's key tables and variants live with the family (`medjax/models/<family>/convert.py`, one registry:
`medjax.models.FAMILIES`), and the weights registry and cache are `medjax.weights`.
"""

from __future__ import annotations

from medjax.convert import CONVERTER_VERSION, CONVERTERS, CheckpointError, ConversionError, convert

__all__ = ["convert", "CheckpointError", "ConversionError", "CONVERTER_VERSION", "CONVERTERS"]
