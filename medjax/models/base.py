"""What every backbone config shares: a frozen dataclass that round-trips through medjax.json."""

from __future__ import annotations

import dataclasses


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
