"""The one hours/cost formula of the project (maskprop.metrics), used by the simulation's
report, the embedded runner and the gateway's progress route."""

import numpy as np
import pytest

from maskprop.metrics import (
    SECONDS_PER_HOUR,
    cost_usd,
    human_hours,
    human_seconds,
    speedup_vs_manual,
    summarize,
)
from maskprop.params import AnnotationParams
from maskprop.simulate.result import MethodResult, sample_curve


def test_human_time_charges_questions_and_polygons():
    assert human_seconds(10, 2.0) == 20.0
    assert human_seconds(10, 2.0, polygons=3, seconds_per_polygon=80.0) == 260.0
    assert human_hours(1800, 2.0) == 1.0
    assert human_hours(0, 2.0, polygons=45, seconds_per_polygon=80.0) == 1.0
    assert human_hours(7, 2.0, 2, 80.0) == pytest.approx(human_seconds(7, 2.0, 2, 80.0) / 3600)


def test_cost_and_speedup():
    assert cost_usd(2.5, 12.0) == 30.0
    assert speedup_vs_manual(10, 20.0, 80.0) == 40.0
    assert speedup_vs_manual(10, 0.0, 80.0) is None


def test_summarize_and_curve_use_the_same_hours():
    params = AnnotationParams()
    seconds = np.array([2.0, 4.0, 84.0])
    curve = sample_curve(seconds, np.array([0.9, np.nan, 0.8]))
    result = MethodResult("m", np.array([0.9, 0.8], np.float32), 2, 1, 1, curve)
    report = summarize(result, params)
    expected = human_hours(2, params.seconds_per_question, 1, params.seconds_per_polygon)
    assert report["hours"] == expected == curve.hours[-1]
    assert report["cost_usd"] == cost_usd(expected, params.hourly_wage)
    assert curve.hours[-1] == seconds[-1] / SECONDS_PER_HOUR
