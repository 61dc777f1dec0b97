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

    def check_family(self, family: str) -> None:
        """A config of another family (a converted folder's `family` field edited) is refused by name."""
        if self.family != family:
            raise ValueError(f"{type(self).__name__}.family must be {family!r}, got {self.family!r}")
