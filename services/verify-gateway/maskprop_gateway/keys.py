"""The verify gateway's whole Redis key schema: every key it reads or writes is built here.

The prefix ``maskprop:gw:`` is declared once (:data:`PREFIX`).  Lua scripts that build
per-question keys themselves receive the prefix of those keys from here (:data:`ITEM`,
:data:`VOTES`) and append ``<question id>:workers`` / ``<question id>`` exactly as
:func:`workers` and :func:`votes` do.  The gateway needs a
standalone Redis (or a cluster with every key on one slot), like the rest of the project.

Each key has one owner module, which defines its layout; "also written by" lists the
explicit cross-module writes (all inside one atomic script, for the reason given).

======================================  =====  ===============  ===============================
key (after the prefix)                  type   owner            also written by
======================================  =====  ===============  ===============================
``vendor:{vendor}``                     hash   auth.KeyStore    (webhooks only checks it exists)
``rate:{vendor}``                       hash   limits           -
``idem:{vendor}:{key}``                 str    idempotency      -
``lease:{id}``                          hash   leases           -
``lease:{id}:views``                    hash   leases           -
``lease:{id}:answered``                 hash   leases           -
``lease:{id}:qual``                     hash   leases           -
``inbox:answers``                       stream settler          leases' answered script appends
                                                                a request's new answers in the
                                                                step that marks them
``inbox:answers:dead``                  stream settler          -
``leases``                              zset   leases           -
``stats:{campaign}``                    hash   leases           quality's score script counts
                                                                ``gold_answers`` in the step
                                                                that scores a new gold answer
``campaigns``                           set    pool             -
``{campaign}:items``                    hash   pool             -
``{campaign}:open``                     zset   pool             -
``{campaign}:ready``                    zset   pool             -
``want``                                hash   pool             -
``item:{q}:workers``                    hash   pool             -
``outbox:labels``                       stream forwarder        pool's settle script appends a
                                                                decided label in the step that
                                                                decides it (once per question)
``outbox:labels:dead``                  stream forwarder
``qc:gold``                             hash   quality          -
``qc:campaign:{campaign}:gold``         set    quality          -
``qc:campaign:{campaign}:gold:hidden``  zset   quality          -
``qc:campaign:{campaign}:gold:qual``    set    quality          -
``qc:worker:{worker}[:{what}]``         mixed  quality          leases' answered script pushes
                                                                a new answer's time on ``:times``
                                                                in the step that marks it
``qc:medians``                          hash   quality          -
``qc:votes:{q}``                        hash   quality          pool's done script deletes it
                                                                with the question's other keys
``webhook:{vendor}``                    hash   webhooks         -
``webhooks:queue`` / ``webhooks:dead``  zset   webhooks         -
``webhooks:msg:{id}``                   hash   webhooks         -
``webhooks:sent:{lease}``               str    webhooks         -
======================================  =====  ===============  ===============================

``{q}`` is a search question id (it starts with its campaign: ``<campaign>:...``); ``{worker}``
is ``"<vendor>:<worker>"``.  The modules' docstrings say what the values hold.
"""

from __future__ import annotations

#: Every gateway key starts with this.
PREFIX = "maskprop:gw:"


# ---------------------------------------------------------------- vendors (auth, limits, ...)
def vendor(vendor_id: str) -> str:
    return f"{PREFIX}vendor:{vendor_id}"


def rate(vendor_id: str) -> str:
    return f"{PREFIX}rate:{vendor_id}"


def idempotency(vendor_id: str, key: str) -> str:
    return f"{PREFIX}idem:{vendor_id}:{key}"


# ---------------------------------------------------------------- leases
#: zset lease id -> deadline (unix s): the expiry index.
LEASES = PREFIX + "leases"


def lease(lease_id: str) -> str:
    return f"{PREFIX}lease:{lease_id}"


def lease_views(lease_id: str) -> str:
    return f"{PREFIX}lease:{lease_id}:views"


def lease_answered(lease_id: str) -> str:
    return f"{PREFIX}lease:{lease_id}:answered"


def lease_qualification(lease_id: str) -> str:
    return f"{PREFIX}lease:{lease_id}:qual"


#: Stream of marked answers waiting to be applied (scored, voted, tallied) by a settler
#: (:mod:`maskprop_gateway.settler`), one entry per answer request with new answers: ``l``
#: lease id, ``v`` vendor, ``w`` worker, ``c`` campaign, ``t`` unix s, ``a`` the answers as
#: ``<question id>:<0|1>:<ms>`` joined by commas.  Read by the consumer group
#: :data:`SETTLERS`; an entry is deleted once applied.
ANSWER_INBOX = PREFIX + "inbox:answers"
SETTLERS = "settlers"
#: Stream of inbox entries no settler could apply (for operators); capped.
ANSWER_DEAD = PREFIX + "inbox:answers:dead"
ANSWER_DEAD_MAXLEN = 100_000
#: Pub/sub channel on which a background process (``MASKPROP_BACKGROUND=process``,
#: :mod:`maskprop_gateway.background`) says which campaigns' answers it applied or forwarded
#: (a message: campaign names joined by newlines): its gateway's leases waiting for questions
#: look again.
ARRIVALS = PREFIX + "arrivals"


def stats(campaign: str) -> str:
    return f"{PREFIX}stats:{campaign}"


# ---------------------------------------------------------------- question pool
CAMPAIGNS = PREFIX + "campaigns"
WANT = PREFIX + "want"
#: Prefix of the per-question pool keys (the pool's Lua scripts append ``{q}:workers``).
ITEM = PREFIX + "item:"


def items(campaign: str) -> str:
    return f"{PREFIX}{campaign}:items"


def retired(campaign: str) -> str:
    """zset question id -> unix s after which its view leaves ``items`` (:meth:`QuestionPool.done`
    keeps it for the image and overlay routes while a lease may still show it)."""
    return f"{PREFIX}{campaign}:retired"


def open_questions(campaign: str) -> str:
    return f"{PREFIX}{campaign}:open"


def ready(campaign: str) -> str:
    return f"{PREFIX}{campaign}:ready"


def workers(qid: str) -> str:
    """hash worker -> lease deadline while it holds question ``qid``, ``0`` after (it saw it):
    :mod:`maskprop_gateway.pool`'s seen-by and holders in one key."""
    return f"{ITEM}{qid}:workers"


# ---------------------------------------------------------------- forwarding
#: Stream of decided labels on their way to search (a maskprop_runtime.outbox.Outbox):
#: entry ``k`` question id, ``v`` ``"0"``/``"1"``.
LABEL_OUTBOX = PREFIX + "outbox:labels"
#: Stream of labels search refused one by one (an unknown campaign or class): entry ``k``
#: question id, ``v`` label, ``reason``; capped (``LABEL_DEAD_MAXLEN``), for operators.
LABEL_DEAD = PREFIX + "outbox:labels:dead"
LABEL_DEAD_MAXLEN = 100_000


# ---------------------------------------------------------------- quality control
QC = PREFIX + "qc:"
GOLD = QC + "gold"
MEDIANS = QC + "medians"
#: Prefix of the per-question vote hashes (the votes and done scripts append ``{q}``).
VOTES = QC + "votes:"


def campaign_gold(campaign: str) -> str:
    return f"{QC}campaign:{campaign}:gold"


def gold_hidden(campaign: str) -> str:
    """zset gold id -> workers it was shown to as hidden gold: the hidden-gold candidates."""
    return f"{QC}campaign:{campaign}:gold:hidden"


def gold_qualification(campaign: str) -> str:
    """set of gold ids used in qualification tests: never hidden gold afterwards."""
    return f"{QC}campaign:{campaign}:gold:qual"


def worker(worker_id: str, what: str = "") -> str:
    """``qc:worker:{worker}`` (a hash), or its ``:{what}`` companion (seen, scored, gold,
    times)."""
    return f"{QC}worker:{worker_id}" + (f":{what}" if what else "")


def votes(qid: str) -> str:
    return VOTES + qid


# ---------------------------------------------------------------- webhooks
WEBHOOK_QUEUE = PREFIX + "webhooks:queue"
WEBHOOK_DEAD = PREFIX + "webhooks:dead"


def webhook(vendor_id: str) -> str:
    return f"{PREFIX}webhook:{vendor_id}"


def webhook_message(message_id: str) -> str:
    return f"{PREFIX}webhooks:msg:{message_id}"


def webhook_expired_sent(lease_id: str) -> str:
    """Once-marker of a lease's ``lease.expired`` callback: an expiry re-run after a crash
    (:meth:`~maskprop_gateway.leases.Leases.take_expired`) queues it once."""
    return f"{PREFIX}webhooks:expired:{lease_id}"


def webhook_sent(lease_id: str) -> str:
    return f"{PREFIX}webhooks:sent:{lease_id}"
