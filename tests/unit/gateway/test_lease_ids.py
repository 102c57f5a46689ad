"""Opaque question ids of a lease (maskprop_gateway.leases.opaque_ids)."""

from __future__ import annotations

import re

from maskprop_gateway.leases import opaque_ids
from maskprop_gateway.schemas import QUESTION


def test_ids_are_unique_random_and_match_the_api_pattern():
    first, second = list(opaque_ids(500)), list(opaque_ids(500))
    assert len(set(first + second)) == 1000  # 72 random bits each, never repeated
    assert all(re.match(QUESTION, q) and len(q) == 14 for q in first + second)
    assert list(opaque_ids(0)) == []
