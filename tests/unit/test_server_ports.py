"""Two services never share a gRPC port by accident (the cause of a CI failure: gRPC's default
SO_REUSEPORT let the clusterer's health server take the search service's port, and the search
client got UNIMPLEMENTED from the clusterer)."""

from __future__ import annotations

import pytest

from maskprop.errors import MaskpropError
from maskprop_runtime.server import build_server, free_port, listen


def test_a_taken_port_is_a_clear_error_not_a_shared_port():
    first, _ = build_server(lambda _s: None, ["a"], workers=1)
    port = listen(first, "127.0.0.1", 0)
    first.start()
    second, _ = build_server(lambda _s: None, ["b"], workers=1)
    try:
        with pytest.raises(MaskpropError, match=f"127.0.0.1:{port}.*taken"):
            listen(second, "127.0.0.1", port)
    finally:
        first.stop(0).wait()


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
