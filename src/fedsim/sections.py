"""The base of every config section, and the error a configuration that cannot run raises.

Kept apart from :mod:`fedsim.config` so that the sections an algorithm plug-in defines
(:mod:`fedsim.algorithms.api`) and the experiment that holds them import the same base
without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad key."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
