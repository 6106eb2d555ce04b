"""Engine selection; concrete engines are imported lazily so the HTTP layer needs no torch."""

from __future__ import annotations

from shardbento.catalog import ModelSpec
from shardbento.engine.base import Engine


def create_engine(spec: ModelSpec) -> Engine:
    """Load the engine the spec asks for; heavy imports happen here, not at import time."""
    from shardbento.engine.hf import HFEngine

    return HFEngine.load(spec)
