"""A campaign's budget and state at the moment search hands out questions (issue #16 item 4).

Before a lease returns, :meth:`CampaignGate.reserve` takes the questions it may hand out from
the campaign's counter in one Lua script (atomic across replicas): no more than the budget's
``question_cap`` (:meth:`maskprop.campaign_spec.CampaignSpec.question_cap`, stored by the
registry beside the spec) minus what was handed out before, and none while the campaign is paused or
stopped.  The lease then hands out at most that many, and :meth:`CampaignGate.refund` gives
back what it did not use, so the counter is exactly the questions handed out.  At any moment
the counter is at most the cap: no question is ever handed out beyond the budget, whatever
the number of replicas or concurrent leases.

A question handed out again after its lease expired counts again (it was handed out twice;
a crowd is paid for the work it was given).  A campaign the registry does not know (e.g. a
``maskprop feed-simulated`` pool) has no budget and no state: nothing is reserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskprop_runtime.campaigns import campaign_key, leased_key

# KEYS: campaign hash, leased counter.  ARGV: questions wanted.
# {granted, code}: code 0 open, 1 paused, 2 stopped, 3 budget spent, 4 open and this grant
# takes the budget's last questions, -1 not a registered campaign (granted = wanted, nothing
# counted).
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {tonumber(ARGV[1]), -1} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'paused' then return {0, 1} end
if state == 'stopped' then return {0, 2} end
local want = tonumber(ARGV[1])
local cap = redis.call('HGET', KEYS[1], 'question_cap')
if cap then
  local left = tonumber(cap) - tonumber(redis.call('GET', KEYS[2]) or '0')
  if left <= 0 then return {0, 3} end
  if want > left then want = left end
end
if want > 0 then
  local used = redis.call('INCRBY', KEYS[2], want)
  if cap and used >= tonumber(cap) then return {want, 4} end
end
return {want, 0}
"""

# KEYS: campaign hash, leased counter.  1 when the campaign has a cap and it is all handed out.
_SPENT = """
local cap = redis.call('HGET', KEYS[1], 'question_cap')
if not cap then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(cap) then return 1 end
return 0
"""

OPEN, PAUSED, STOPPED, SPENT, LAST, UNREGISTERED = 0, 1, 2, 3, 4, -1


@dataclass(frozen=True)
class Grant:
    """Questions a lease may hand out (``questions``) and why not more (``code``)."""

    campaign: str
    questions: int
    code: int

    def spends_budget(self, handed_out: int) -> bool:
        """Whether a lease that handed out ``handed_out`` of this grant spent the budget (it
        took the last questions and gave none back)."""
        return self.code == LAST and handed_out >= self.questions

    @property
    def finished(self) -> bool:
        """Nothing will ever be handed out again: stopped, or the budget spent."""
        return self.code in (STOPPED, SPENT)


class CampaignGate:
    """The budget counter and state check search runs around each lease."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._spent = redis.register_script(_SPENT)

    def reserve(self, campaign: str, want: int) -> Grant:
        """Reserve up to ``want`` questions of ``campaign``'s budget (one round trip)."""
        got, code = self._reserve(
            keys=[campaign_key(campaign), leased_key(campaign)], args=[max(int(want), 0)]
        )
        return Grant(campaign, int(got), int(code))

    def refund(self, grant: Grant, handed_out: int) -> None:
        """Give back the reserved questions a lease did not hand out."""
        unused = grant.questions - handed_out
        if grant.code in (OPEN, LAST) and unused > 0:
            self.redis.decrby(leased_key(grant.campaign), unused)

    def spent(self, campaign: str) -> bool:
        """Whether ``campaign``'s budget is all handed out (one round trip; False for a
        campaign without a budget)."""
        return bool(self._spent(keys=[campaign_key(campaign), leased_key(campaign)]))

    def leased(self, campaign: str) -> int:
        """Questions of ``campaign`` handed out so far."""
        return int(self.redis.get(leased_key(campaign)) or 0)
