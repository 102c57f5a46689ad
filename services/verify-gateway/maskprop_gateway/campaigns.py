"""What the gateway reads of a registered campaign (issue #16): its images folder and its
redundancy, from the campaign registry, cached ``ttl_s`` seconds per campaign.

A campaign in the registry is answered by exactly its spec's ``redundancy`` counted answers a
question (no dynamic overlap: the budget counts ``redundancy`` answers a question, so the
gateway may not ask for more); campaigns the registry does not know (``feed-simulated`` pools)
keep the gateway's own policy (``MASKPROP_REDUNDANCY``, ``MASKPROP_MAX_REDUNDANCY``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from maskprop_gateway.qc_rules import QualityPolicy
from maskprop_runtime.campaigns import CampaignError, CampaignRegistry
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2


class CampaignSpecs:
    """Each campaign's current spec from the registry (``None`` for a campaign the registry
    does not know) and the quality policy derived from it, kept ``ttl_s`` seconds (a revision
    may change them); read on every lease and every applied answer, so the policy is derived
    once per read of the registry, not per call."""

    def __init__(
        self,
        redis: Any,
        policy: QualityPolicy,
        *,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CampaignRegistry(redis)
        self.policy_default = policy
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, campaign_pb2.CampaignSpec | None, QualityPolicy]] = {}
        self._lock = threading.Lock()

    def _entry(self, campaign: str) -> tuple[campaign_pb2.CampaignSpec | None, QualityPolicy]:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(campaign)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1], hit[2]
        try:
            found: campaign_pb2.CampaignSpec | None = self.registry.get(campaign).spec
        except CampaignError:  # not registered (or not a campaign name)
            found = None
        policy = self._policy(found)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[campaign] = (now, found, policy)
        return found, policy

    def _policy(self, spec: campaign_pb2.CampaignSpec | None) -> QualityPolicy:
        base = self.policy_default
        if spec is None:
            return base
        r = max(1, int(spec.annotation.redundancy))
        if (base.redundancy, base.vote_cap) == (r, r):
            return base
        return replace(base, redundancy=r, max_redundancy=r)

    def spec(self, campaign: str) -> campaign_pb2.CampaignSpec | None:
        return self._entry(campaign)[0]

    def root(self, campaign: str) -> Path | None:
        """The campaign's images folder; ``None``: the gateway's own store."""
        spec = self.spec(campaign)
        return None if spec is None else Path(spec.images_root)

    def policy(self, campaign: str) -> QualityPolicy:
        """The quality policy of ``campaign``'s questions: the gateway's, with a registered
        campaign's redundancy as both the votes asked for and the cap."""
        return self._entry(campaign)[1]
