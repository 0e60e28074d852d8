"""Names of the embedded default models and where their converted weights are cached.

Shared by `actors/models.py` (which resolves model ids) and `actors/setup_models.py`
(which fills the cache at install time), so neither imports the other's module for them.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
EMBEDDED_MODELS = (SMOLLM2, MINILM)


class ModelUnavailableError(RuntimeError):
    """Neither the Hub, a local folder nor an installed wheel provides the model."""


def model_cache_dir() -> Path:
    """Where converted models live: `$RLHI_MODEL_CACHE`, else `.cache/models` in the repo."""
    return Path(os.environ.get("RLHI_MODEL_CACHE") or REPO / ".cache" / "models")
