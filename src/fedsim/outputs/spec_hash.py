"""The hash of what decides a benchmark grid's numbers, recorded beside its results.

A results file records ``spec_hash``: the SHA-256 of the spec's run fields (:data:`RUN_FIELDS`:
the configs, variants, axes, seeds, shared overrides, target and tuning stage; not the checks,
notes or figures, which a re-render may change) and the text of every config file the spec
names. A result whose hash differs from its spec's is stale: the spec or a config changed
after the runs. Defaults that live in code (``fedsim.config``) are not covered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_FIELDS = ("configs", "variants", "axes", "seeds", "common", "target_accuracy", "tuning")
"""The spec fields whose change makes other runs (and so another hash)."""


def spec_hash(spec: Mapping[str, Any], config_files: Mapping[str, Path]) -> str:
    """``sha256(json({"spec": run fields of spec, "configs": {name: file text}}))``, hex.

    Parameters
    ----------
    spec : mapping
        The spec as JSON-able data (``BenchSpec.model_dump(mode="json")``, overrides applied).
    config_files : mapping of str to Path
        Each config as the spec names it -> the file it resolves to.
    """
    payload = {"spec": {k: spec.get(k) for k in RUN_FIELDS},
               "configs": {name: Path(path).read_text() for name, path in sorted(config_files.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
