"""What every backbone shares: a config (a frozen dataclass that round-trips through medjax.json) and the module
contract of medjax/models/family.py, each stated once here."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from medjax.models.layers import image_shape


class ConfigMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def check_family(self, family: str, *int_tuples: str) -> None:
        """What every `__post_init__` starts with: a config of another family (a converted folder's `family` field
        edited) is refused by name, and the fields named in `int_tuples` (lists after a JSON round trip) become
        tuples of ints."""
        if self.family != family:
            raise ValueError(f"{type(self).__name__}.family must be {family!r}, got {self.family!r}")
        for name in int_tuples:
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the nominal input; square `img_size` unless the config says otherwise."""
        return self.img_size, self.img_size


class Part(nn.Module):
    """A module of a family's network, built from the family's config and computing in `dtype` (the parameters stay
    float32)."""

    config: Any
    dtype: jnp.dtype | None = None


class Backbone(Part):
    """A family's top-level module, the contract of medjax/models/family.py: built as `module(config, dtype)`,
    called as `module(images_nhwc, train=False)`. The images are checked against the config (`image_shape`), then
    `forward` (the subclass's @nn.compact method) returns the dict of named outputs; a backbone without dropout or
    batch statistics ignores `train`."""

    def __call__(self, images, train: bool = False):
        image_shape(images, self.config)
        return self.forward(images, train)

    def forward(self, images, train: bool):
        raise NotImplementedError
