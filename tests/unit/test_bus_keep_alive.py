"""The Kafka consumer's keep-alive (a poll while a long handler runs) consumes nothing: every
assigned partition is paused for the poll, and records a rebalance hands over meanwhile (a
partition assigned during the poll is not paused) are sought back, so none is skipped.

The broker itself is exercised by tests/integration/test_clusterer_distributed.py; here a
stand-in with kafka-python's consumer methods records the calls."""

from __future__ import annotations

from collections import namedtuple

from kafka import TopicPartition

from maskprop_runtime.bus import KafkaConsumerAdapter

Msg = namedtuple("Msg", "offset key value")


class Consumer:
    def __init__(self, assigned, after_poll, records):
        self.assigned, self.after_poll, self.records = set(assigned), set(after_poll), records
        self.paused: set[TopicPartition] = set()
        self.calls: list[tuple] = []

    def assignment(self):
        return set(self.assigned)

    def pause(self, *tps):
        self.paused.update(tps)
        self.calls.append(("pause", set(tps)))

    def resume(self, *tps):
        self.paused.difference_update(tps)
        self.calls.append(("resume", set(tps)))

    def poll(self, timeout_ms=0, max_records=None):
        self.calls.append(("poll", timeout_ms))
        self.assigned = self.after_poll  # a rebalance completed inside this poll
        return {tp: msgs for tp, msgs in self.records.items() if tp not in self.paused}

    def seek(self, tp, offset):
        self.calls.append(("seek", tp, offset))


def test_keep_alive_pauses_polls_and_seeks_back_what_a_rebalance_delivered():
    a, b, c = TopicPartition("t", 0), TopicPartition("t", 1), TopicPartition("t", 2)
    fresh = [Msg(7, b"k", b"v"), Msg(8, b"k", b"v")]
    consumer = Consumer([a, b], [b, c], {b: [Msg(3, b"k", b"v")], c: fresh})
    KafkaConsumerAdapter(consumer, lambda t: t).keep_alive()
    assert consumer.calls == [
        ("pause", {a, b}),
        ("poll", 0),
        ("seek", c, 7),  # c came with the rebalance, unpaused: its records go back
        ("resume", {b, c}),
    ]
