"""The campaign registry (issue #16): every campaign's spec and state, stored once in Redis and
read by every service, so campaigns with different parameters share the same services.

Key schema (the whole of it; this module is its only writer):

* ``maskprop:campaigns``  zset  campaign name -> creation time (unix seconds): the listing
* ``maskprop:campaign:{name}``  hash  ``version`` (current, 1, 2, ...), ``spec:<v>`` (the
  serialized ``campaign.v1.CampaignSpec`` of every version, kept: sessions opened under an
  older version keep deciding by it), ``state`` (created | running | paused | stopped),
  ``created``, ``updated`` (unix seconds), ``question_cap`` (the current version's
  :meth:`~maskprop.campaign_spec.CampaignSpec.question_cap`: search's budget script reads it)
* ``maskprop:campaign:{name}:leased``  string  questions search handed out (its budget script,
  ``maskprop_search.budget``, is the only writer: reserved atomically against
  ``question_cap`` before a lease returns)
* ``maskprop:campaign:{name}:images``  hash  sha256 of an accepted image's bytes -> its
  ``image_id`` and path (de-duplication across ``add-images`` calls)
* ``maskprop:campaign:{name}:plan``  list  ``image_id\\tpath`` of the accepted images in
  publishing order; batch ``b`` is the slice ``[b * batch_size, (b + 1) * batch_size)``
* ``maskprop:campaign:{name}:ingest``  hash  ``batch_size``, ``batch_count``, ``published``
  (batches the broker acknowledged), ``accepted``, ``refused:<reason>`` counts

A campaign's round r > 1 travels as ``<name>.r<r>`` (:func:`round_campaign`) and every key
above maps it to ``<name>``'s; ``:ingest`` counts round r's published batches in
``published:r<r>``.

Every change is one Lua script or one MULTI, so a reader sees a campaign whole or not at all,
and two writers cannot both create a name or both revise a version.

A revision (:meth:`CampaignRegistry.revise`) is explicit: the stored version + 1, same
classes.  Sessions opened before it keep the parameters they were opened with (they are in
their snapshots); classes whose trees arrive later use the new version.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskprop.campaign_spec import Budget, CampaignSpec
from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2
from maskprop_runtime.treestore import check_name

LIST_KEY = "maskprop:campaigns"
STATES = ("created", "running", "paused", "stopped")
STATE_PB = {
    "created": campaign_pb2.CAMPAIGN_STATE_CREATED,
    "running": campaign_pb2.CAMPAIGN_STATE_RUNNING,
    "paused": campaign_pb2.CAMPAIGN_STATE_PAUSED,
    "stopped": campaign_pb2.CAMPAIGN_STATE_STOPPED,
}
STATE_NAME = {v: k for k, v in STATE_PB.items()}
# state -> the states it may be reached from (the same state is a no-op, so retries are safe)
TRANSITIONS = {
    "running": ("created", "paused"),
    "paused": ("created", "running"),
    "stopped": ("created", "running", "paused"),
}


# Round r > 1 of campaign ``name`` travels as the campaign ``<name>.r<r>`` (event ids, trees,
# search sessions, the sink's dataset folder): a class's mask indexes restart with every round's
# tree, so the round must be part of every key that names a class.  A user campaign's name
# cannot end like that (``create`` refuses it), so the mapping is one-to-one.  The registry's
# keys below name the campaign, not the round: ``<name>.r<r>`` reads ``<name>``'s spec, state,
# images and budget, so search opens round r's sessions with the campaign's parameters, its
# leases count against the one budget of every round, and the gateway serves its folder.
_ROUND_NAME = re.compile(r"^(?P<name>.+)\.r(?P<round>[1-9][0-9]*)$")


def round_campaign(name: str, round_: int) -> str:
    """The campaign name round ``round_`` of ``name`` travels under: ``name`` itself for round
    1, ``<name>.r<round>`` after it."""
    if round_ < 1:
        raise CampaignError(f"rounds count from 1, not {round_}")
    return name if round_ == 1 else check_name("campaign", f"{name}.r{round_}")


def campaign_round(internal: str) -> tuple[str, int]:
    """``(name, round)`` of a campaign name as it travels (inverse of :func:`round_campaign`)."""
    m = _ROUND_NAME.match(internal)
    if m is None or int(m["round"]) < 2:
        return internal, 1
    return m["name"], int(m["round"])


def campaign_key(name: str) -> str:
    return f"maskprop:campaign:{campaign_round(name)[0]}"


def images_key(name: str) -> str:
    return f"maskprop:campaign:{campaign_round(name)[0]}:images"


def plan_key(name: str) -> str:
    return f"maskprop:campaign:{campaign_round(name)[0]}:plan"


def ingest_key(name: str) -> str:
    return f"maskprop:campaign:{campaign_round(name)[0]}:ingest"


def leased_key(name: str) -> str:
    return f"maskprop:campaign:{campaign_round(name)[0]}:leased"


class CampaignError(MaskpropError):
    """A refused registry operation (taken name, unknown campaign, bad transition or
    version); the message says what to do."""


class CampaignNotFound(CampaignError):
    """No campaign has that name."""


class CampaignExists(CampaignError):
    """The name is taken."""


class CampaignConflict(CampaignError):
    """The campaign's state or version does not allow the change."""


# KEYS: campaign hash, list zset.  ARGV: spec bytes, now, name, question cap.
# 1 created, 0 name taken.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'version', '1', 'spec:1', ARGV[1], 'state', 'created',
           'created', ARGV[2], 'updated', ARGV[2], 'question_cap', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: campaign hash.  ARGV: new version, spec bytes, now, question cap.
# {1, old} revised; {0, ''} unknown; {2, current} version is not current + 1; {3, state} stopped
_REVISE = """
local cur = redis.call('HGET', KEYS[1], 'version')
if not cur then return {0, ''} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'stopped' then return {3, state} end
if tonumber(cur) + 1 ~= tonumber(ARGV[1]) then return {2, cur} end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'spec:' .. ARGV[1], ARGV[2], 'updated', ARGV[3],
           'question_cap', ARGV[4])
return {1, cur}
"""

# KEYS: campaign hash.  ARGV: new state, now, allowed previous states...
# {1, previous} done (or already there); {0, ''} unknown; {2, current} not allowed from there
_SET_STATE = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if cur == ARGV[1] then return {1, cur} end
for i = 3, #ARGV do
  if ARGV[i] == cur then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
    return {1, cur}
  end
end
return {2, cur}
"""


# ---------------------------------------------------------------------------- proto mapping
def spec_to_proto(spec: CampaignSpec) -> campaign_pb2.CampaignSpec:
    """The wire/storage form of a validated spec."""
    p = spec.params
    return campaign_pb2.CampaignSpec(
        name=spec.name,
        classes=list(spec.classes),
        images_root=str(spec.images_root),
        manifest=str(spec.manifest) if spec.manifest is not None else "",
        detector_weights=str(spec.detector_weights),
        annotation=campaign_pb2.AnnotationSpec(
            samples_per_cluster=p.samples_per_cluster,
            accept_threshold=p.accept_threshold,
            iou_threshold=p.iou_threshold,
            prior_accept_threshold=p.prior_accept_threshold,
            prior_reject_threshold=p.prior_reject_threshold,
            reject_action=p.reject_action,
            reuse_answers=p.reuse_answers,
            sequential=p.sequential,
            sequential_batch=p.sequential_batch,
            sequential_confidence=p.sequential_confidence,
            seconds_per_question=p.seconds_per_question,
            seconds_per_polygon=p.seconds_per_polygon,
            redundancy=spec.redundancy,
            strategy=spec.strategy,
            seed=spec.seed,
        ),
        budget=campaign_pb2.Budget(
            questions=spec.budget.questions,
            hours=spec.budget.hours,
            dollars=spec.budget.dollars,
            hourly_wage=spec.budget.hourly_wage,
            rounds=spec.budget.rounds,
        ),
        version=spec.version,
        labelled=str(spec.labelled) if spec.labelled is not None else "",
        labelled_images=str(spec.labelled_images) if spec.labelled_images is not None else "",
    )


def spec_from_proto(msg: campaign_pb2.CampaignSpec) -> CampaignSpec:
    """A validated :class:`CampaignSpec` from its proto (ranges checked again: a message may
    come from outside); files are not checked (they may live on another machine)."""
    a, b = msg.annotation, msg.budget
    params = AnnotationParams(
        samples_per_cluster=a.samples_per_cluster,
        accept_threshold=a.accept_threshold,
        iou_threshold=a.iou_threshold,
        prior_accept_threshold=(
            a.prior_accept_threshold if a.HasField("prior_accept_threshold") else None
        ),
        prior_reject_threshold=(
            a.prior_reject_threshold if a.HasField("prior_reject_threshold") else None
        ),
        reject_action=a.reject_action,  # type: ignore[arg-type]  # validated by AnnotationParams
        reuse_answers=a.reuse_answers,
        sequential=a.sequential,  # type: ignore[arg-type]
        sequential_batch=a.sequential_batch,
        sequential_confidence=a.sequential_confidence,
        seconds_per_question=a.seconds_per_question,
        seconds_per_polygon=a.seconds_per_polygon,
        hourly_wage=b.hourly_wage,
    )
    return CampaignSpec(
        name=msg.name,
        classes=tuple(msg.classes),
        images_root=Path(msg.images_root),
        manifest=Path(msg.manifest) if msg.manifest else None,
        detector_weights=Path(msg.detector_weights),
        params=params,
        budget=Budget(
            questions=b.questions,
            hours=b.hours,
            dollars=b.dollars,
            hourly_wage=b.hourly_wage,
            rounds=b.rounds,
        ),
        redundancy=a.redundancy,
        strategy=a.strategy,
        seed=a.seed,
        version=msg.version,
        labelled=Path(msg.labelled) if msg.labelled else None,
        labelled_images=Path(msg.labelled_images) if msg.labelled_images else None,
    )


# ---------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class SessionParams:
    """What search needs to open a class's session for a campaign."""

    params: AnnotationParams
    selection: Selection
    strategy: str
    seed: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CampaignRegistry:
    """Campaign specs (versioned) and states in Redis; see the module docstring for keys."""

    def __init__(self, redis: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.clock = clock
        self._create = redis.register_script(_CREATE)
        self._revise = redis.register_script(_REVISE)
        self._set_state = redis.register_script(_SET_STATE)

    def create(self, spec: CampaignSpec) -> campaign_pb2.Campaign:
        """Store a new campaign (version 1, state created); a taken name is refused."""
        name = self._name(spec.name)
        if _ROUND_NAME.match(name):
            raise CampaignError(
                f"campaign name {name!r} ends like a later round's (<name>.r<round>): "
                "choose another name"
            )
        if spec.version != 1:
            raise CampaignError(f"a new campaign starts at version 1, not {spec.version}")
        blob = spec_to_proto(spec).SerializeToString()
        created = self._create(
            keys=[campaign_key(name), LIST_KEY],
            args=[blob, self.clock(), name, spec.question_cap()],
        )
        if not created:
            current = self.get(name)
            raise CampaignExists(
                f"campaign {name!r} exists (version {current.spec.version}, "
                f"{STATE_NAME[current.state]}): choose another name, or revise it with "
                "version = current + 1"
            )
        return self.get(name)

    def revise(self, spec: CampaignSpec) -> campaign_pb2.Campaign:
        """Store a new version of a campaign's spec: ``spec.version`` must be the stored
        version + 1 and the classes unchanged (the detector's model names them).  The same spec
        again at the current version is a no-op; any other change at it is refused."""
        name = self._name(spec.name)
        if _ROUND_NAME.match(name):
            raise CampaignError(f"{name!r} is a round's name: revise the campaign itself")
        current = self.spec(name)
        if spec.version == current.version:
            if spec_to_proto(spec) == spec_to_proto(current):
                return self.get(name)
            raise CampaignConflict(
                f"campaign {name!r} is at version {current.version}: a change mid-campaign "
                f"must say version = {current.version + 1}"
            )
        if spec.classes != current.classes:
            raise CampaignConflict(
                f"campaign {name!r} has classes {list(current.classes)}; a revision cannot "
                "change them (create a new campaign)"
            )
        blob = spec_to_proto(spec).SerializeToString()
        code, got = self._revise(
            keys=[campaign_key(name)], args=[spec.version, blob, self.clock(), spec.question_cap()]
        )
        if code == 0:
            raise CampaignNotFound(f"no campaign named {name!r}")
        if code == 2:
            raise CampaignConflict(
                f"campaign {name!r} is at version {_text(got)}: a revision must say "
                f"version = {int(_text(got)) + 1}, not {spec.version}"
            )
        if code == 3:
            raise CampaignConflict(f"campaign {name!r} is stopped: it cannot be revised")
        return self.get(name)

    def get(self, name: str) -> campaign_pb2.Campaign:
        """The campaign's current spec and state; :class:`CampaignError` when unknown."""
        name = self._name(name)
        raw = self.redis.hgetall(campaign_key(name))
        if not raw:
            raise CampaignNotFound(f"no campaign named {name!r} (see `maskprop campaign list`)")
        fields = {_text(k): v for k, v in raw.items()}
        version = _text(fields["version"])
        spec = campaign_pb2.CampaignSpec.FromString(fields[f"spec:{version}"])
        return campaign_pb2.Campaign(
            spec=spec,
            state=STATE_PB[_text(fields["state"])],
            created_unix=float(_text(fields["created"])),
            updated_unix=float(_text(fields["updated"])),
        )

    def spec(self, name: str, version: int | None = None) -> CampaignSpec:
        """The campaign's spec: the current version, or ``version`` (kept for every one)."""
        if version is None:
            return spec_from_proto(self.get(name).spec)
        blob = self.redis.hget(campaign_key(self._name(name)), f"spec:{version}")
        if blob is None:
            raise CampaignNotFound(f"campaign {name!r} has no version {version}")
        return spec_from_proto(campaign_pb2.CampaignSpec.FromString(blob))

    def state(self, name: str) -> str:
        return STATE_NAME[self.get(name).state]

    def exists(self, name: str) -> bool:
        return bool(self.redis.exists(campaign_key(self._name(name))))

    def names(self) -> list[str]:
        """Campaign names, oldest first."""
        return [_text(n) for n in self.redis.zrange(LIST_KEY, 0, -1)]

    def list(self) -> list[campaign_pb2.Campaign]:
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except CampaignError:
                continue  # listed but gone: nothing else deletes campaigns, so never in practice
        return out

    def set_state(self, name: str, state: str) -> campaign_pb2.Campaign:
        """Move a campaign to ``state`` (running, paused or stopped).  Stopped is terminal;
        asking for the state it is in is a no-op."""
        name = self._name(name)
        if state not in TRANSITIONS:
            raise CampaignError(f"a campaign cannot be set {state!r}")
        code, got = self._set_state(
            keys=[campaign_key(name)], args=[state, self.clock(), *TRANSITIONS[state]]
        )
        if code == 0:
            raise CampaignNotFound(f"no campaign named {name!r} (see `maskprop campaign list`)")
        if code == 2:
            raise CampaignConflict(f"campaign {name!r} is {_text(got)}: it cannot become {state}")
        return self.get(name)

    def session_params(self, name: str) -> SessionParams | None:
        """The parameters search opens a class's session with: the campaign's current
        version, or ``None`` for a campaign the registry does not know (search then uses its
        own settings, e.g. ``maskprop feed-simulated`` pools).  K_pr/K_pa must be set (learning
        them inside a campaign is not built yet)."""
        if not self.exists(name):
            return None
        spec = self.spec(name)
        p = spec.params
        if p.prior_reject_threshold is None or p.prior_accept_threshold is None:
            raise CampaignError(f"campaign {name!r} has no K_pr/K_pa to open sessions with")
        return SessionParams(
            params=p,
            selection=Selection(p.prior_reject_threshold, p.prior_accept_threshold),
            strategy=spec.strategy,
            seed=spec.seed,
        )

    @staticmethod
    def _name(name: str) -> str:
        try:
            return check_name("campaign", name)
        except ValueError as exc:
            raise CampaignError(str(exc)) from None
