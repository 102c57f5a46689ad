"""The gateway's domain errors (no HTTP here): :mod:`maskprop_gateway.api.errors` maps each to
its status."""

from __future__ import annotations


class NotFound(Exception):
    """No such lease or question for this vendor (404: another vendor's lease looks absent)."""


class Forbidden(Exception):
    """The worker may not do this: suspended, failed qualification, another worker's lease."""


class Gone(Exception):
    """The lease expired; its questions went back to the pool."""


class Invalid(Exception):
    """A request the gateway cannot serve as asked (unknown questions, no gold to qualify)."""
