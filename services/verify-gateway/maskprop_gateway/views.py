"""What a worker sees of a question, rendered to JSON once.

A question's view (class name, mask, image file) enters the gateway when search hands the
question out (or when hidden gold is drawn) and leaves it in one lease response.  It used to be
encoded to JSON for the pool, decoded at the claim, encoded again into the lease record and
once more into the response: ~15 % of the gateway's CPU under load.  Now :func:`render` writes
it once, as the JSON members of the public question (``"class_name":...,"mask":{...}``)
followed by a newline and the image file, which stays internal (JSON text escapes newlines,
so the first one separates the two).  Lease responses are assembled around those members
(:class:`LeaseOffer`) without decoding them; only the image and overlay routes parse a view.

>>> v = render("cat", "img/1.png", 4, 5, "0g0")
>>> parse(v)
ItemView(class_name='cat', image_file='img/1.png', rle_h=4, rle_w=5, rle_counts=b'0g0')
>>> json.loads(question_json("l_x", "q_y", v))["mask"]
{'size': [4, 5], 'counts': '0g0'}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote
from typing import Any


@dataclass(frozen=True)
class ItemView:
    """What a worker may see of a question (real or gold alike)."""

    class_name: str
    image_file: str
    rle_h: int
    rle_w: int
    rle_counts: bytes


def render(class_name: str, image_file: str, rle_h: int, rle_w: int, counts: str) -> str:
    """A question's view: its public JSON members, a newline, its image file."""
    mask = f'{{"size":[{int(rle_h)},{int(rle_w)}],"counts":{_quote(counts)}}}'
    return f'"class_name":{_quote(class_name)},"mask":{mask}\n{image_file}'


def parse(view: str) -> ItemView:
    members, _, image_file = view.partition("\n")
    d = json.loads("{" + members + "}")
    h, w = d["mask"]["size"]
    return ItemView(d["class_name"], image_file, int(h), int(w), d["mask"]["counts"].encode())


def question_json(lease_id: str, oid: str, view: str, base: str = "/v1/leases") -> str:
    """One question of a lease response (``QuestionOut``) as JSON text.  ``lease_id`` and
    ``oid`` are the gateway's own URL-safe ids, so they need no escaping."""
    url = f"{base}/{lease_id}/questions/{oid}"
    members = view.partition("\n")[0]
    return (
        f'{{"question_id":"{oid}",{members},'
        f'"image_url":"{url}/image","overlay_url":"{url}/overlay"}}'
    )


@dataclass
class LeaseOffer:
    """A new lease as the vendor receives it (``LeaseOut``): ``questions`` are (opaque id,
    view) in serving order."""

    lease_id: str
    kind: str
    campaign: str
    worker_id: str
    expires_at: float
    questions: list[tuple[str, str]] = field(default_factory=list)
    worker_token: str | None = None

    def to_json(self, base: str = "/v1/leases") -> str:
        """The response body; ``base``: where its image and overlay URLs point (the vendor
        routes, or the annotator page's token-authenticated ones)."""
        head = json.dumps(
            {
                "lease_id": self.lease_id,
                "kind": self.kind,
                "campaign": self.campaign,
                "worker_id": self.worker_id,
                "expires_at": self.expires_at,
                "worker_token": self.worker_token,
            },
            separators=(",", ":"),
        )
        questions = ",".join(question_json(self.lease_id, o, v, base) for o, v in self.questions)
        return f'{head[:-1]},"questions":[{questions}]}}'

    def to_dict(self, base: str = "/v1/leases") -> dict[str, Any]:
        return dict(json.loads(self.to_json(base)))
