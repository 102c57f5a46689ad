"""Process-wide settings every service applies at start (maskprop_runtime)."""

from __future__ import annotations

import gc

import pytest

from maskprop_runtime.server import tune_gc
from maskprop_runtime.settings import RuntimeSettings


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_the_young_generation_is_collected_at_the_configured_pace(restore_gc, monkeypatch):
    _, older, oldest = gc.get_threshold()
    monkeypatch.setenv("MASKPROP_GC_THRESHOLD", "12345")
    tune_gc(RuntimeSettings())
    assert gc.get_threshold() == (12345, older, oldest)  # older generations keep their ratios


def test_zero_keeps_cpythons_pace(restore_gc):
    gc.set_threshold(700, 10, 10)
    tune_gc(RuntimeSettings(gc_threshold=0))
    assert gc.get_threshold() == (700, 10, 10)
    assert RuntimeSettings().gc_threshold == 50_000  # the services' default
