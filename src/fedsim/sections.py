"""The base of every config section, and the error a configuration that cannot run raises.

Kept apart from :mod:`fedsim.config` so that the sections an algorithm plug-in defines
(:mod:`fedsim.algorithms.api`) and the experiment that holds them import the same base
without importing each other.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad key."""


def admits_bool(annotation: Any) -> bool:
    """Whether a field of type ``annotation`` takes ``true``/``false`` (bool, a Literal of
    bools, Any, or a union holding one of them)."""
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(arg, bool) for arg in get_args(annotation))
    if origin is Annotated:
        return admits_bool(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(admits_bool(arg) for arg in get_args(annotation))
    return False


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated.

    Every float field of every section is finite (``inf`` and ``nan`` are refused: JSON
    writes them as null, and no field means anything by them); a field where infinity has
    a meaning opts in with ``Field(..., allow_inf_nan=True)``. A boolean is refused where a
    number is meant (``rounds: true`` is not 1 round).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if field is None:
                continue
            annotation = field.annotation
            if get_origin(annotation) is list and isinstance(value, list):
                annotation, value = get_args(annotation)[0], next((v for v in value if isinstance(v, bool)), None)
            if isinstance(value, bool) and not admits_bool(annotation):
                raise PydanticCustomError("bool_for_number", "{key}: {value} is a boolean; expected {kind}",
                                          {"key": key, "value": str(value).lower(), "kind": _kind(annotation)})
        return data


def _kind(annotation: Any) -> str:
    """What a field of type ``annotation`` holds, in words: an integer, a number, text."""
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(arg) for arg in get_args(annotation))
    members = get_args(annotation) or (annotation,)
    if float in members:
        return "a number"
    return "an integer" if int in members else "text"
