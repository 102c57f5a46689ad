"""The campaign must-show of issue #16, distributed: a user's image folder through every service
as its own process on the real Kafka broker and Redis, a simulated crowd answering over the
verify gateway's HTTP API, two rounds with a retrain between, then the same spec embedded and
the labels compared.

    source .cache/dev-infra/env     # KAFKA_BOOTSTRAP, REDIS_URL (scripts/dev-infra.sh up)
    .venv/bin/python scripts/campaign_demo_distributed.py --out out/campaign-demo

Steps (each a ``maskprop`` command, as an operator would type it):

1. ``maskprop data synth`` renders the pool (train/pool/val splits, exact masks) and
   ``maskprop detector train`` trains the detector on the train split;
2. a spec (``spec.toml``) names ``images/pool`` as the user's folder, the detector, the train
   split as the labelled set, the paper's parameters and a question budget over two rounds;
3. ``maskprop serve detector|clusterer|search|sink|controller`` and the gateway
   (``python -m maskprop_gateway``) start as processes; ``maskprop vendor create`` and
   ``maskprop gold import`` (gold questions made from the pool's ground truth) set up the crowd;
4. ``maskprop campaign create`` (through the controller) and ``add-images``; the crowd
   (:class:`HttpCrowd`) leases and answers over HTTP until search has nothing more to ask or
   the budget is spent; ``campaign export`` (round 1), ``campaign retrain``,
   ``campaign next-round``, the crowd again (round 2), ``campaign status`` and ``export``;
5. ``maskprop campaign run --spec spec.toml --simulated-crowd pool.json`` (embedded) and a
   comparison of every round's accepted masks (image, class, RLE).

The crowd is honest and noise-free: it sees what a vendor's worker sees (the image bytes, the
mask's RLE, the class) and answers whether the mask's IoU with the best ground-truth mask of its
class in that image reaches K_iou, the rule of ``campaign run``'s simulated crowd.  It
identifies an image by the sha256 of its bytes among the pool's files.  Answers settle
asynchronously (the gateway forwards them to search after the response), so the crowd never
assumes an answer's effect: an empty lease means "wait", and a round ends when the gateway's
progress says done, or when the budget is spent and every question search handed out has been
applied there.

``--budget exact`` (default) first runs the spec embedded without a binding budget and sets the
budget to the questions that run asked: both runs spend it to the last question and must label
the same masks the same way.  ``--budget auto`` sets it to round 1's questions plus half of
round 2's, so it runs out mid-round 2 (which clusters the last questions reach then depends on
the order of the leases, so the two runs may decide different masks at that frontier).
Writes ``report.json`` (the figures) under ``--out``; nothing in the Redis is flushed (names
are unique per run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskprop_runtime.server import free_port

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the crowd
class GroundTruthCrowd:
    """A noise-free worker who knows the ground truth (COCO instances of the campaign's
    folder): ``answer(image bytes, class name, {"size", "counts"})`` is "does this mask's IoU
    with the best ground-truth mask of its class in the image reach K_iou"."""

    def __init__(self, gt_coco: Path, images_root: Path, iou_threshold: float) -> None:
        from maskprop.data.coco import load_coco_instances

        images, anns, cats = load_coco_instances(gt_coco)
        self.class_of = {str(c["name"]): int(c["id"]) for c in cats}
        self.iou_threshold = iou_threshold
        self.file_of = {int(im["id"]): str(im["file_name"]) for im in images}
        self.by_sha: dict[str, int] = {}
        for gid, name in self.file_of.items():
            path = images_root / name
            if not path.is_file():
                path = images_root / Path(name).name
            if path.is_file():
                self.by_sha[hashlib.sha256(path.read_bytes()).hexdigest()] = gid
        self.gt = [
            {
                "image_id": int(a["image_id"]),
                "class_id": int(a["category_id"]),
                "segmentation": a["segmentation"],
            }
            for a in anns
        ]

    def iou(self, image_id: int, class_name: str, mask: dict[str, Any]) -> float:
        from maskprop.data.instances import true_ious

        cls = self.class_of.get(class_name, -1)
        return float(true_ious(np.array([image_id]), np.array([cls]), [mask], self.gt)[0])

    def answer(self, image: bytes, class_name: str, mask: dict[str, Any]) -> bool:
        gid = self.by_sha.get(hashlib.sha256(image).hexdigest())
        if gid is None:
            return False  # an image the ground truth does not hold: no object to match
        from maskprop.data.instances import true_ious

        cls = self.class_of.get(class_name, -1)
        ious = true_ious(np.array([gid]), np.array([cls]), [mask], self.gt)  # float32[1]
        # the same comparison as the embedded crowd (float32 IoUs against K_iou)
        return bool((ious >= self.iou_threshold)[0])


def write_gold(
    crowd: GroundTruthCrowd, campaigns: Iterable[str], path: Path, n: int = 40, seed: int = 0
) -> int:
    """Gold questions for the gateway (``maskprop gold import``) from the ground truth: half
    exact ground-truth masks, half the same masks shifted by their width; each answer by
    the crowd's rule.  Images are pool images (paths under the campaign's folder)."""
    from maskprop.data.coco import decode_rle, encode_masks

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(crowd.gt), size=min(n, len(crowd.gt)), replace=False)
    names = {cid: name for name, cid in crowd.class_of.items()}
    lines = []
    for j, i in enumerate(picks.tolist()):
        g = crowd.gt[i]
        seg = g["segmentation"]
        h, w = (int(x) for x in seg["size"])
        mask = decode_rle(h, w, seg["counts"])
        if j % 2:
            cols = np.flatnonzero(mask.any(axis=0))
            shift = int(cols.max()) - int(cols.min()) + 1 if cols.size else 1
            mask = np.roll(mask, shift, axis=1)
        counts = encode_masks(mask[None])[0].decode("ascii")
        rle = {"size": [h, w], "counts": counts}
        answer = crowd.iou(g["image_id"], names[g["class_id"]], rle) >= crowd.iou_threshold
        for c in campaigns:
            lines.append(
                json.dumps(
                    {
                        "gold_id": f"g{seed}-{j:04d}-{c}"[:64],
                        "campaign": c,
                        "class_name": names[g["class_id"]],
                        "image": crowd.file_of[g["image_id"]],
                        "mask": rle,
                        "answer": bool(answer),
                    }
                )
            )
    path.write_text("\n".join(lines) + "\n")
    return len(picks)


@dataclass
class RoundStats:
    leases: int = 0
    questions: int = 0  # real and hidden gold alike: the crowd cannot tell them apart
    qualification: int = 0
    empty_leases: int = 0
    waits: float = 0.0


@dataclass
class HttpCrowd:
    """One worker of one vendor answering over the gateway's HTTP API (``POST /v1/leases``,
    the question's image URL, ``POST /v1/answers`` with an ``Idempotency-Key``)."""

    base_url: str
    api_key: str
    crowd: GroundTruthCrowd
    worker_id: str = "sim-worker-1"
    batch: int = 20
    http: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=60,
        )

    def close(self) -> None:
        self.http.close()

    def progress(self, campaign: str) -> dict[str, Any]:
        resp = self.http.get("/v1/progress", params={"campaign": campaign})
        resp.raise_for_status()
        return dict(resp.json())

    def answer_round(
        self, campaign: str, finished: Callable[[], bool], timeout_s: float = 900
    ) -> RoundStats:
        """Lease and answer ``campaign``'s questions until a lease comes back empty and
        ``finished()`` holds (answers settle after the response: an empty lease alone
        means nothing)."""
        stats = RoundStats()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            resp = self.http.post(
                "/v1/leases",
                json={
                    "worker_id": self.worker_id,
                    "campaign": campaign,
                    "max_questions": self.batch,
                },
            )
            if resp.status_code != 201:
                raise RuntimeError(f"lease refused: {resp.status_code} {resp.text}")
            lease = resp.json()
            questions = lease["questions"]
            if not questions:
                stats.empty_leases += 1
                if finished():
                    return stats
                t0 = time.monotonic()
                time.sleep(0.3)
                stats.waits += time.monotonic() - t0
                continue
            stats.leases += 1
            answers = []
            for q in questions:
                image = self.http.get(q["image_url"])
                image.raise_for_status()
                ok = self.crowd.answer(image.content, q["class_name"], q["mask"])
                answers.append({"question_id": q["question_id"], "answer": ok, "elapsed_ms": 1500})
            if lease["kind"] == "qualification":
                stats.qualification += len(answers)
            else:
                stats.questions += len(answers)
            done = self.http.post(
                "/v1/answers",
                json={
                    "lease_id": lease["lease_id"],
                    "worker_id": self.worker_id,
                    "answers": answers,
                },
                headers={"Idempotency-Key": lease["lease_id"]},
            )
            if done.status_code != 200:
                raise RuntimeError(f"answers refused: {done.status_code} {done.text}")
        raise RuntimeError(f"campaign {campaign} did not finish within {timeout_s:.0f} s")


# --------------------------------------------------------------------------- the services
class Stack:
    """detector, clusterer, search, sink and controller (``maskprop serve``) and the verify
    gateway as processes, one topic namespace, logs under ``logs``."""

    def __init__(
        self,
        *,
        kafka: str,
        redis_url: str,
        work: Path,
        image_root: Path,
        weights: Path,
        models_root: Path,
        tag: str,
    ) -> None:
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.search_port, self.http_port = free_port(), free_port()
        self.controller_port = free_port()
        self.admin_token = f"admin-{uuid.uuid4().hex}"
        self.pepper = f"pepper-{uuid.uuid4().hex}"
        self.data = work / "services"
        self.env = {
            **os.environ,
            "MASKPROP_ENV": "prod",
            "MASKPROP_KAFKA_BOOTSTRAP": kafka,
            "MASKPROP_REDIS_URL": redis_url,
            "MASKPROP_TOPIC_NAMESPACE": f"demo{tag}",
            "MASKPROP_DATA_DIR": str(self.data),
            "MASKPROP_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "MASKPROP_CONNECT_TIMEOUT_S": "120",
            "MASKPROP_CONTROLLER_ADDR": f"127.0.0.1:{self.controller_port}",
            "MASKPROP_CONTROLLER_ADMIN_TOKEN": self.admin_token,
            "MASKPROP_SINK_ADMIN_TOKEN": self.admin_token,
            "MASKPROP_KEY_PEPPER": self.pepper,
            "PYTHONUNBUFFERED": "1",
        }
        serve = [sys.executable, "-m", "maskprop", "serve"]
        self.specs: dict[str, tuple[list[str], dict[str, str]]] = {
            "detector": (
                [*serve, "detector"],
                {
                    "MASKPROP_GRPC_PORT": str(free_port()),
                    "MASKPROP_DETECTOR_WEIGHTS": str(weights),
                    "MASKPROP_IMAGE_ROOT": str(image_root),
                    "MASKPROP_MODELS_ROOT": str(models_root),
                    "MASKPROP_DEVICE": "cpu",
                },
            ),
            "clusterer": ([*serve, "clusterer"], {"MASKPROP_GRPC_PORT": str(free_port())}),
            "search": ([*serve, "search"], {"MASKPROP_GRPC_PORT": str(self.search_port)}),
            "sink": ([*serve, "sink"], {"MASKPROP_GRPC_PORT": str(free_port())}),
            "controller": (
                [*serve, "controller"],
                {"MASKPROP_GRPC_PORT": str(self.controller_port)},
            ),
            "gateway": (
                [sys.executable, "-m", "maskprop_gateway"],
                {
                    "MASKPROP_HTTP_PORT": str(self.http_port),
                    "MASKPROP_SEARCH_TARGET": f"127.0.0.1:{self.search_port}",
                    "MASKPROP_IMAGE_ROOT": str(image_root),
                    "MASKPROP_RATE_PER_S": "100000",
                    "MASKPROP_RATE_BURST": "100000",
                    # as deployed: the settler and forwarder in a child process
                    "MASKPROP_BACKGROUND": "process",
                },
            ),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Stack:
        for name, (argv, extra) in self.specs.items():
            log = open(self.logs / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(
                argv, env={**self.env, **extra}, stdout=log, stderr=log
            )
        import httpx

        def up() -> bool:
            self.check()
            try:
                return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait(up, 180, "the gateway", self)
        return self

    def check(self) -> None:
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited\n{self.tail()}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def tail(self, n: int = 15) -> str:
        out = []
        for f in sorted(self.logs.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)


def wait(cond: Callable[[], Any], timeout: float, what: str, stack: Stack | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise RuntimeError(
        f"timed out after {timeout:.0f} s waiting for {what}\n" + (stack.tail() if stack else "")
    )


def maskprop(env: dict[str, str], *args: str, timeout: float = 1800) -> str:
    """Run a ``maskprop`` command; its stdout (an error exits with its stderr)."""
    res = subprocess.run(
        [sys.executable, "-m", "maskprop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"maskprop {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def last_json(out: str) -> dict[str, Any]:
    text = out.strip()
    try:
        return dict(json.loads(text))
    except json.JSONDecodeError:
        return dict(json.loads(text.splitlines()[-1]))


# --------------------------------------------------------------------------- the campaign
SPEC = """[campaign]
name = "{name}"
classes = {classes}
images = "{images}"
[detector]
weights = "{weights}"
labelled = "{labelled}"
labelled_images = "{labelled_images}"
[annotation]
samples_per_cluster = {samples}
accept_threshold = {accept}
iou_threshold = {iou}
prior_accept_threshold = 0.0
prior_reject_threshold = 0.0
{extra}[budget]
questions = {budget}
rounds = 2
"""


def write_spec(path: Path, budget: int, extra: str = "", **kw: Any) -> Path:
    """The campaign's spec file; ``extra``: more ``[annotation]`` lines."""
    kw = {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}
    path.write_text(SPEC.format(budget=budget, extra=extra, **kw))
    return path


def accepted_keys(doc: dict[str, Any], round_: int | None = None) -> set[tuple[str, str, str]]:
    """(image file, class, RLE counts) of a COCO file's annotations (of one round)."""
    files = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
    cats = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
    return {
        (files[int(a["image_id"])], cats[int(a["category_id"])], str(a["segmentation"]["counts"]))
        for a in doc["annotations"]
        if round_ is None or int(a.get("maskprop_round", 1)) == round_
    }


def mean_iou(crowd: GroundTruthCrowd, doc: dict[str, Any], round_: int | None) -> float | None:
    """SQ (mean true IoU) of a COCO file's accepted masks against the ground truth."""
    from maskprop.metrics import segmentation_quality

    files = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
    cats = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
    by_name = {Path(v).name: k for k, v in crowd.file_of.items()}
    ious = [
        crowd.iou(
            by_name[Path(files[int(a["image_id"])]).name],
            cats[int(a["category_id"])],
            a["segmentation"],
        )
        for a in doc["annotations"]
        if round_ is None or int(a.get("maskprop_round", 1)) == round_
    ]
    return segmentation_quality(np.array(ious, dtype=np.float64)) if ious else None


def run_distributed(
    *,
    stack: Stack,
    spec: Path,
    name: str,
    crowd: GroundTruthCrowd,
    cap: int,
    work: Path,
    labelled: Path,
    labelled_images: Path,
    retrain_steps: int,
    seconds_per_question: float,
    retrain_batch: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The campaign through the stack's services: both rounds, the crowd over HTTP; returns
    per-round figures, the budget and the exported COCO (``work/export*.json``)."""
    from maskprop.metrics import human_hours
    from maskprop_runtime.campaigns import leased_key, round_campaign
    from maskprop_runtime.store import make_redis

    env = stack.env
    redis = make_redis(env["MASKPROP_REDIS_URL"], connect_timeout_s=10)
    dataset = stack.data / "dataset"
    key = maskprop(env, "vendor", "create", f"v{name}"[:32]).strip().splitlines()[0]
    gold = work / "gold.jsonl"
    write_gold(crowd, [name, round_campaign(name, 2)], gold)
    maskprop(env, "gold", "import", str(gold))
    http = HttpCrowd(stack.base_url, key, crowd)
    rounds = [name, round_campaign(name, 2)]

    def applied() -> int:  # questions search has applied, every round
        return sum(
            sum(c["questions_answered"] for c in http.progress(c_)["classes"]) for c_ in rounds
        )

    def finished(campaign: str) -> Callable[[], bool]:
        def check() -> bool:
            stack.check()
            if http.progress(campaign)["done"]:
                return True
            leased = int(redis.get(leased_key(name)) or 0)
            return leased >= cap and applied() == leased  # spent, every answer applied

        return check

    def in_search(prefix: str) -> dict[str, Any] | None:
        stack.check()
        status = json.loads(maskprop(env, "campaign", "status", name))
        stages = status.get("stages", {})
        batches = stages.get(f"{prefix}batches detected", {})
        done = stages.get(f"{prefix}classes in search", {})
        if batches and batches["done"] == batches["total"] > 0 and done and done["total"] == 0:
            raise RuntimeError(
                f"the detector found no mask in {prefix or 'round 1 '}: train it longer"
            )
        return status if done and done["done"] == done["total"] > 0 else None

    figures: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        maskprop(env, "campaign", "create", "--spec", str(spec))
        maskprop(env, "campaign", "add-images", name, "--no-progress")
        wait(lambda: in_search(""), 1200, "round 1's trees in search", stack)
        log(f"round 1 in search after {time.monotonic() - t0:.0f} s; the crowd answers")
        t1 = time.monotonic()
        s1 = http.answer_round(name, finished(name))
        log(f"round 1 answered in {time.monotonic() - t1:.0f} s: {s1}")
        r1 = work / "export-r1.json"

        def export(out: Path, *extra: str) -> dict[str, Any]:
            return last_json(
                maskprop(
                    env, "campaign", "export", name, "--out", str(out), "--dataset",
                    str(dataset), *extra,
                )
            )  # fmt: skip

        def in_sink(campaign: str) -> bool:
            """Every mask search decided is in the sink's dataset (labels arrive after the
            decisions, through search's outbox and the bus)."""
            from maskprop_sink.dataset import DatasetReader

            p = http.progress(campaign)
            decided = sum(c["masks"] - c["masks_undecided"] for c in p["classes"])
            if not (dataset / campaign).exists():
                return decided == 0
            return bool(DatasetReader(dataset).ledger_stats(campaign)["unique_masks"] >= decided)

        wait(lambda: in_sink(name), 300, "round 1's labels in the sink", stack)
        export(r1)
        models = Path(stack.specs["detector"][1]["MASKPROP_MODELS_ROOT"])
        t2 = time.monotonic()
        retrained = json.loads(
            maskprop(
                env,
                "campaign",
                "retrain",
                name,
                "--labelled",
                str(labelled),
                "--labelled-images",
                str(labelled_images),
                "--accepted",
                str(r1),
                "--out",
                str(models / "round2.pt"),
                "--round",
                "2",
                "--steps",
                str(retrain_steps),
                "--batch-size",
                str(retrain_batch),
                "--device",
                "cpu",
                "--no-progress",
            )
        )
        log(f"retrained in {time.monotonic() - t2:.0f} s on {retrained['accepted_masks']} masks")
        maskprop(env, "campaign", "next-round", name, "--weights", "round2.pt", "--no-progress")
        wait(lambda: in_search("round 2 "), 1200, "round 2's trees in search", stack)
        t3 = time.monotonic()
        s2 = http.answer_round(round_campaign(name, 2), finished(round_campaign(name, 2)))
        log(f"round 2 answered in {time.monotonic() - t3:.0f} s: {s2}")
        # every round's labels in the sink: as many accepted masks as search decided
        progress = [http.progress(c) for c in rounds]
        accepted = [sum(c["masks_obtained"] for c in p["classes"]) for p in progress]
        wait(lambda: in_sink(rounds[1]), 300, "round 2's labels in the sink", stack)
        raw = work / "export-rounds.json"
        export(raw, "--no-deduplicate")
        merged = work / "export.json"
        summary = export(merged)
        status = json.loads(maskprop(env, "campaign", "status", name))
        # nothing more is handed out: a lease now finds no question
        more = http.http.post(
            "/v1/leases",
            json={"worker_id": http.worker_id, "campaign": rounds[1], "max_questions": 5},
        ).json()["questions"]
        doc = json.loads(raw.read_text())
        for r, (p, s) in enumerate(zip(progress, (s1, s2), strict=True), start=1):
            q = sum(c["questions_answered"] for c in p["classes"])
            figures.append(
                {
                    "round": r,
                    "detected_masks": sum(c["masks"] for c in p["classes"]),
                    "masks": accepted[r - 1],
                    "sq": mean_iou(crowd, doc, r),
                    "questions": q,
                    "hours": human_hours(q, seconds_per_question),
                    "undecided_masks": sum(c["masks_undecided"] for c in p["classes"]),
                    "crowd_answers_over_http": s.questions,
                    "qualification_answers": s.qualification,
                    "done": p["done"],
                }
            )
        return {
            "rounds": figures,
            "budget": {"cap": cap, **status["spent"]},
            "leased_after_the_end": len(more),
            "retrain": {k: retrained[k] for k in ("accepted_masks", "duplicates_dropped")},
            "export": summary,
            "wall_seconds": round(time.monotonic() - t0, 1),
        }
    finally:
        http.close()


def compare_decided(embedded: Path, dataset: Path, name: str) -> dict[str, Any]:
    """Every decided mask's label (accepted and rejected) in the two runs' sink datasets, by
    mask id (both runs use the detector's ``<image id>.<k>`` ids): per round, masks decided in
    both, how many of them disagree, and masks decided in one run only (a binding budget
    stops the runs at different clusters)."""
    from maskprop_sink.dataset import DatasetReader

    from maskprop_runtime.campaigns import round_campaign

    out: dict[str, Any] = {}
    for r in (1, 2):
        travels = round_campaign(name, r)  # both runs store round r under this name
        if not (embedded / f"r{r}" / "dataset" / travels).exists():
            continue
        dist = {x["mask_id"]: int(x["accepted"]) for x in DatasetReader(dataset).labels(travels)}
        emb = {
            x["mask_id"]: int(x["accepted"])
            for x in DatasetReader(embedded / f"r{r}" / "dataset").labels(travels)
        }
        both = dist.keys() & emb.keys()
        out[f"round{r}"] = {
            "decided_in_both": len(both),
            "disagree": sum(dist[m] != emb[m] for m in both),
            "distributed_only": len(dist.keys() - emb.keys()),
            "distributed_only_accepted": sum(dist[m] for m in dist.keys() - emb.keys()),
            "embedded_only": len(emb.keys() - dist.keys()),
            "embedded_only_accepted": sum(emb[m] for m in emb.keys() - dist.keys()),
        }
    return out


def compare(embedded: Path, distributed_raw: Path, distributed_merged: Path) -> dict[str, Any]:
    """Accepted masks (image file, class, RLE) of each round and of the merged dataset."""
    out: dict[str, Any] = {}
    raw = json.loads(distributed_raw.read_text())
    for r in (1, 2):
        path = embedded / f"r{r}" / "accepted.json"
        emb = accepted_keys(json.loads(path.read_text())) if path.exists() else set()
        dist = accepted_keys(raw, r)
        out[f"round{r}"] = {
            "equal": emb == dist,
            "both": len(emb & dist),
            "embedded_only": len(emb - dist),
            "distributed_only": len(dist - emb),
        }
    emb = accepted_keys(json.loads((embedded / "annotations.json").read_text()))
    dist = accepted_keys(json.loads(distributed_merged.read_text()))
    out["merged"] = {
        "equal": emb == dist,
        "both": len(emb & dist),
        "embedded_only": len(emb - dist),
        "distributed_only": len(dist - emb),
    }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/campaign-demo"))
    ap.add_argument("--images", type=int, default=800, help="synth images (10%% train, 80%% pool)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--retrain-steps", type=int, default=40)
    ap.add_argument("--samples-per-cluster", type=int, default=5)
    ap.add_argument("--accept-threshold", type=float, default=0.85)
    ap.add_argument("--iou-threshold", type=float, default=0.75)
    ap.add_argument(
        "--budget",
        default="exact",
        help="questions; exact (what the campaign needs); auto (runs out mid-round 2)",
    )
    ap.add_argument(
        "--kafka",
        default=os.environ.get("MASKPROP_KAFKA_BOOTSTRAP") or os.environ.get("KAFKA_BOOTSTRAP"),
    )
    ap.add_argument(
        "--redis", default=os.environ.get("MASKPROP_REDIS_URL") or os.environ.get("REDIS_URL")
    )
    args = ap.parse_args(argv)
    if not (args.kafka and args.redis):
        ap.error(
            "needs a broker and Redis: `bash scripts/dev-infra.sh up && "
            "source .cache/dev-infra/env`, or --kafka and --redis"
        )
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    data, models = out / "data", out / "models"
    models.mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {msg}", flush=True)

    if not (data / "annotations" / "pool.json").exists():
        maskprop(
            env,
            "data",
            "synth",
            "--images",
            str(args.images),
            "--out",
            str(data),
            "--size",
            str(args.size),
            "--no-progress",
        )
    log("data synthesised")
    weights = models / "detector.pt"
    if not weights.exists():
        maskprop(
            env,
            "detector",
            "train",
            "--coco",
            str(data / "annotations" / "train.json"),
            "--images",
            str(data / "images" / "train"),
            "--out",
            str(weights),
            "--steps",
            str(args.train_steps),
            "--image-size",
            str(args.size),
            "--device",
            "cpu",
            "--no-progress",
        )
    log("detector trained")
    from maskprop_detector.train import read_checkpoint

    classes = list(read_checkpoint(weights)["config"]["classes"])
    tag = uuid.uuid4().hex[:8]
    name = f"shapes-{tag}"
    gt = data / "annotations" / "pool.json"
    pool = data / "images" / "pool"
    spec_kw = dict(
        name=name,
        classes=json.dumps(classes),
        images=pool,
        weights=weights,
        labelled=data / "annotations" / "train.json",
        labelled_images=data / "images" / "train",
        samples=args.samples_per_cluster,
        accept=args.accept_threshold,
        iou=args.iou_threshold,
    )
    embed_args = [
        "--simulated-crowd",
        str(gt),
        "--device",
        "cpu",
        "--retrain-steps",
        str(args.retrain_steps),
        "--no-progress",
    ]
    calibration = None
    if args.budget in ("auto", "exact"):
        spec = write_spec(out / "spec-calibration.toml", 1_000_000, **spec_kw)
        cal = out / f"calibration-{tag}"
        calibration = json.loads(
            maskprop(env, "campaign", "run", "--spec", str(spec), "--out", str(cal), *embed_args)
        )
        q1, q2 = (r["questions"] for r in calibration["rounds"])
        cap = q1 + (q2 if args.budget == "exact" else max(1, q2 // 2))
        log(f"calibration (embedded, no binding budget): round questions {q1}, {q2}; budget {cap}")
    else:
        cap = int(args.budget)
    spec = write_spec(out / "spec.toml", cap, **spec_kw)
    crowd = GroundTruthCrowd(gt, pool, args.iou_threshold)
    stack = Stack(
        kafka=args.kafka,
        redis_url=args.redis,
        work=out / f"distributed-{tag}",
        image_root=pool,
        weights=weights,
        models_root=models / f"rounds-{tag}",
        tag=tag,
    )
    Path(stack.specs["detector"][1]["MASKPROP_MODELS_ROOT"]).mkdir(parents=True)
    stack.start()
    log("services up")
    try:
        dist = run_distributed(
            stack=stack,
            spec=spec,
            name=name,
            crowd=crowd,
            cap=cap,
            work=out / f"distributed-{tag}",
            labelled=data / "annotations" / "train.json",
            labelled_images=data / "images" / "train",
            retrain_steps=args.retrain_steps,
            seconds_per_question=2.0,
            log=log,
        )
    finally:
        stack.stop()
    log("distributed run done")
    emb_dir = out / f"embedded-{tag}"
    embedded = json.loads(
        maskprop(env, "campaign", "run", "--spec", str(spec), "--out", str(emb_dir), *embed_args)
    )
    log("embedded run done")
    work = out / f"distributed-{tag}"
    report = {
        "campaign": name,
        "images": {"synth": args.images, "size": args.size, "pool": embedded["images_accepted"]},
        "distributed": dist,
        "embedded": {
            "rounds": embedded["rounds"],
            "budget": embedded["budget"],
            "total_masks": embedded["total_masks"],
        },
        "calibration_rounds": [
            {k: r[k] for k in ("masks", "questions")} for r in calibration["rounds"]
        ]
        if calibration
        else None,
        "labels": compare(emb_dir, work / "export-rounds.json", work / "export.json"),
        "decided_labels": compare_decided(emb_dir, stack.data / "dataset", name),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
