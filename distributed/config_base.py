"""The config's base: what every section of it shares (distributed/config.py assembles them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default);
    # assignment is validated too, so overrides cannot smuggle in a wrong type.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
