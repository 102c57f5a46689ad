"""Process-wide settings every service applies at start (maskprop_runtime)."""

from __future__ import annotations

import gc
import sys

import pytest

from maskprop_runtime.server import tune_interpreter
from maskprop_runtime.settings import RuntimeSettings


@pytest.fixture
def restore_interpreter():
    before, switch = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.set_threshold(*before)
    sys.setswitchinterval(switch)


def test_the_young_generation_is_collected_at_the_configured_pace(restore_interpreter, monkeypatch):
    _, older, oldest = gc.get_threshold()
    monkeypatch.setenv("MASKPROP_GC_THRESHOLD", "12345")
    tune_interpreter(RuntimeSettings())
    assert gc.get_threshold() == (12345, older, oldest)  # older generations keep their ratios


def test_zero_keeps_cpythons_pace(restore_interpreter):
    gc.set_threshold(700, 10, 10)
    tune_interpreter(RuntimeSettings(gc_threshold=0))
    assert gc.get_threshold() == (700, 10, 10)
    assert RuntimeSettings().gc_threshold == 50_000  # the services' default


def test_the_gil_is_handed_over_at_the_configured_interval(restore_interpreter, monkeypatch):
    monkeypatch.setenv("MASKPROP_SWITCH_INTERVAL_S", "0.05")
    tune_interpreter(RuntimeSettings())
    assert sys.getswitchinterval() == pytest.approx(0.05)
    tune_interpreter(RuntimeSettings(switch_interval_s=0.02))  # the services' default
    assert sys.getswitchinterval() == pytest.approx(0.02)
