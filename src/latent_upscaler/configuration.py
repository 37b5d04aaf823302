"""Model configs: small dataclasses read from (and written back to) diffusers' ``config.json``.

Each model module defines a dataclass that subclasses :class:`ModelConfig`. Its fields are the
diffusers config fields that change what the model computes; :attr:`ModelConfig.NEUTRAL` lists the
diffusers fields that we accept only at the value that leaves the computation unchanged (a folder
written by any diffusers version carries them), and :attr:`ModelConfig.IGNORED` lists fields that
have no effect on this model at all. Anything else is an error that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Dict, Mapping, Tuple


class ConfigError(ValueError):
    """A config.json that this library cannot run faithfully."""


@dataclasses.dataclass
class ModelConfig:
    #: name written as ``_class_name`` so that diffusers loads our folders
    CLASS_NAME: ClassVar[str] = ""
    #: diffusers field -> the only value we accept (the one that changes nothing)
    NEUTRAL: ClassVar[Dict[str, Any]] = {}
    #: diffusers fields without any effect on this architecture
    IGNORED: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "ModelConfig":
        """Build a config from a diffusers config dict, refusing what we cannot compute.

        ``source`` names the file in error messages.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values: Dict[str, Any] = {}
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key in fields:
                values[key] = list(value) if isinstance(value, tuple) else value
            elif key in cls.NEUTRAL:
                allowed = cls.NEUTRAL[key]
                if _normalise(value) != _normalise(allowed):
                    raise ConfigError(
                        f"{source}: field {key!r} = {value!r} is not supported by this "
                        f"{cls.CLASS_NAME}; only {allowed!r} is (the sd-x2-latent-upscaler value)"
                    )
            elif key in cls.IGNORED:
                continue
            else:
                raise ConfigError(
                    f"{source}: unknown field {key!r} for {cls.CLASS_NAME}; "
                    "this file was not written for the SD x2 latent upscaler's architecture"
                )
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Raise :class:`ConfigError` naming the field for values the model cannot compute."""

    def to_dict(self) -> Dict[str, Any]:
        """The diffusers config dict (``_class_name`` first, then our fields and the neutral ones)."""
        out: Dict[str, Any] = {"_class_name": self.CLASS_NAME, "_diffusers_version": DIFFUSERS_FORMAT}
        out.update(dataclasses.asdict(self))
        for key, value in self.NEUTRAL.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw, source=str(path))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # diffusers-style attribute access: ``unet.config.in_channels`` works, and so does
    # ``unet.config["in_channels"]`` as with diffusers' FrozenDict.
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


#: the diffusers version whose folder format we write
DIFFUSERS_FORMAT = "0.31.0"


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
