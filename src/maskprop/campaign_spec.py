"""A campaign's spec as people write it (TOML), read and validated (issue #16).

A campaign is one dataset team's image pool, its classes, a detector, the paper's parameters
and a budget.  The wire and storage format is the proto ``maskprop.campaign.v1.CampaignSpec``
(``maskprop_runtime.campaigns`` converts); this module is pure: it reads the TOML, checks every
field and returns a frozen :class:`CampaignSpec`.  Every mistake ends as one
:class:`~maskprop.errors.MaskpropError` that names the table and field::

    [campaign]
    name = "shapes"
    classes = ["circle", "square"]   # or categories = "categories.json" (COCO), or both
    images = "data/pool/images"      # a folder; manifest = "list.txt" names paths under it
    version = 1                      # a parameter change mid-campaign is version 2, ...
    [detector]
    weights = "models/detector.pt"
    labelled = "train.json"          # optional: COCO labelled set retrained on between rounds
    labelled_images = "images/train" # its images (default: the labelled file's folder)
    [annotation]                     # omitted keys: the paper's values (AnnotationParams)
    samples_per_cluster = 15
    accept_threshold = 0.85
    redundancy = 1
    strategy = "heuristic"
    seed = 0
    [budget]                         # at least one of questions, hours, dollars
    questions = 2000
    wage = 12.0                      # dollars per human hour
    rounds = 2

Relative paths are read from the spec file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskprop.errors import MaskpropError
from maskprop.metrics import SECONDS_PER_HOUR, human_hours
from maskprop.params import AnnotationParams
from maskprop.search import STRATEGIES

# Keys of [annotation] that are not AnnotationParams fields.
SEARCH_KEYS = ("redundancy", "strategy", "seed")
# AnnotationParams' wage comes from [budget] wage: a cost, not a parameter of the method.
_PARAM_FIELDS = {f.name: f for f in dataclasses.fields(AnnotationParams) if f.name != "hourly_wage"}
_TABLES = {
    "campaign": {"name", "classes", "categories", "images", "manifest", "version"},
    "detector": {"weights", "labelled", "labelled_images"},
    "annotation": set(_PARAM_FIELDS) | set(SEARCH_KEYS),
    "budget": {"questions", "hours", "dollars", "wage", "rounds"},
}
_REQUIRED_TABLES = ("campaign", "detector", "budget")


@dataclass(frozen=True)
class Budget:
    """What a campaign may spend; 0 means "no limit" for questions, hours and dollars, and at
    least one of them is positive.  ``hourly_wage`` in dollars per human hour."""

    questions: int = 0
    hours: float = 0.0
    dollars: float = 0.0
    hourly_wage: float = 12.0
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.questions < 0 or self.hours < 0 or self.dollars < 0:
            raise MaskpropError("[budget] questions, hours and dollars must not be negative")
        if not (self.questions or self.hours or self.dollars):
            raise MaskpropError(
                "[budget] is zero: give a positive questions, hours or dollars "
                "(a campaign with nothing to spend would ask nothing)"
            )
        if self.dollars and self.hourly_wage <= 0:
            raise MaskpropError("[budget] wage must be positive when dollars is the budget")
        if self.hourly_wage < 0:
            raise MaskpropError("[budget] wage must not be negative")
        if self.rounds < 1:
            raise MaskpropError("[budget] rounds must be at least 1")

    def question_cap(self, seconds_per_question: float, redundancy: int = 1) -> int:
        """The most questions the campaign may hand out: the smallest of ``questions``,
        ``hours`` and ``dollars`` converted with :func:`maskprop.metrics.human_hours` and
        :func:`~maskprop.metrics.cost_usd`'s formula (``q`` questions, each answered by
        ``redundancy`` people, cost ``q * redundancy * seconds_per_question / 3600`` hours,
        times ``hourly_wage`` dollars), rounded down so the spent hours and dollars never
        exceed theirs.  ``questions`` counts questions, not answers.  Limits that are 0 do not
        count.

        >>> Budget(questions=500, hours=0.25).question_cap(2.0)
        450
        >>> Budget(questions=500, hours=0.25).question_cap(2.0, redundancy=3)
        150
        """
        if seconds_per_question <= 0:
            raise MaskpropError("seconds_per_question must be positive")
        if redundancy < 1:
            raise MaskpropError("redundancy must be at least 1")
        per_question = seconds_per_question * redundancy
        caps = [self.questions] if self.questions else []
        # A relative 1e-9 forgives float error in the division (0.3 h at 2 s is 540, not 539).
        if self.hours:
            caps.append(math.floor(self.hours * SECONDS_PER_HOUR / per_question + 1e-9))
        if self.dollars:
            hours = self.dollars / self.hourly_wage
            caps.append(math.floor(hours * SECONDS_PER_HOUR / per_question + 1e-9))
        return max(0, min(caps))


@dataclass(frozen=True)
class CampaignSpec:
    """One campaign, validated.

    Attributes
    ----------
    name : the campaign's name (a path part and a Kafka key; the registry checks its alphabet).
    classes : the detector's class names, in its order, unique.
    images_root : absolute folder every image of the campaign lives under.
    manifest : optional absolute file of image paths (one a line) under ``images_root``.
    detector_weights : absolute path of the detector's weights.
    params : the paper's parameters (N_s, K_a, K_iou, K_pa, K_pr, ...); ``hourly_wage`` is the
        budget's wage.
    redundancy : answers collected per question (>= 1).
    strategy : search order, a key of :data:`maskprop.search.STRATEGIES`.
    seed : the search's sampling seed (>= 0).
    budget : :class:`Budget`.
    version : 1 for a new campaign; a parameter change is the next version.
    labelled, labelled_images : optional absolute COCO labelled set and its images folder,
        what ``campaign retrain`` trains on with the accepted masks (needed for rounds > 1 in
        ``campaign run``).
    """

    name: str
    classes: tuple[str, ...]
    images_root: Path
    detector_weights: Path
    params: AnnotationParams = field(default_factory=AnnotationParams)
    budget: Budget = field(default_factory=lambda: Budget(questions=1))
    manifest: Path | None = None
    redundancy: int = 1
    strategy: str = "heuristic"
    seed: int = 0
    version: int = 1
    labelled: Path | None = None
    labelled_images: Path | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise MaskpropError("[campaign] name must not be empty")
        if not self.classes:
            raise MaskpropError("[campaign] needs classes (or a categories file)")
        if len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise MaskpropError("[campaign] classes must be unique, non-empty names")
        if self.redundancy < 1:
            raise MaskpropError("[annotation] redundancy must be at least 1")
        if self.strategy not in STRATEGIES:
            names = ", ".join(sorted(STRATEGIES))
            raise MaskpropError(f"[annotation] strategy {self.strategy!r} is not one of: {names}")
        if self.seed < 0:
            raise MaskpropError("[annotation] seed must not be negative")
        if self.version < 1:
            raise MaskpropError("version must be at least 1")
        if self.params.hourly_wage != self.budget.hourly_wage:
            raise MaskpropError("params.hourly_wage must equal the budget's wage")
        if self.question_cap() < 1:
            raise MaskpropError(
                f"[budget] buys no question at {self.params.seconds_per_question} s a question "
                f"and {self.redundancy} answer(s) a question: raise questions, hours or dollars"
            )

    def question_cap(self) -> int:
        """The questions the budget buys at this spec's pace and redundancy
        (:meth:`Budget.question_cap`)."""
        return self.budget.question_cap(self.params.seconds_per_question, self.redundancy)

    def hours(self, questions: int) -> float:
        """Human hours ``questions`` cost: ``redundancy`` answers each."""
        return human_hours(questions * self.redundancy, self.params.seconds_per_question)

    def same_method(self, other: CampaignSpec) -> bool:
        """Whether ``other`` decides exactly as this spec (parameters, strategy, seed,
        redundancy, classes): a difference mid-campaign needs a new version."""
        return (
            self.params == other.params
            and self.classes == other.classes
            and (self.redundancy, self.strategy, self.seed)
            == (other.redundancy, other.strategy, other.seed)
        )


# ---------------------------------------------------------------------------- reading
def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _typed(table: str, key: str, value: Any, want: type) -> Any:
    """``value`` if it has type ``want`` (an int passes as a float; a bool never passes as
    a number), else the one clear error."""
    ok = (
        isinstance(value, bool)
        if want is bool
        else (isinstance(value, int | float) and not isinstance(value, bool))
        if want is float
        else (isinstance(value, int) and not isinstance(value, bool))
        if want is int
        else isinstance(value, want)
    )
    if not ok:
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
        raise MaskpropError(
            f"[{table}] {key} must be {names.get(want, want.__name__)}, got {_kind(value)} "
            f"{value!r}"
        )
    return float(value) if want is float else value


def _path(base: Path, table: str, key: str, value: Any) -> Path:
    text = _typed(table, key, value, str)
    if not text:
        raise MaskpropError(f"[{table}] {key} must not be empty")
    return (base / Path(text).expanduser()).resolve()


def _categories(path: Path) -> list[str]:
    """Class names of a COCO categories file: ``{"categories": [{"id", "name"}, ...]}`` (a
    whole COCO file) or the bare list, ordered by id."""
    if not path.is_file():
        raise MaskpropError(f"[campaign] categories file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskpropError(f"[campaign] cannot read categories file {path}: {exc}") from None
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list) or not cats:
        raise MaskpropError(f"[campaign] {path} has no categories list")
    try:
        ordered = sorted(cats, key=lambda c: int(c["id"]))
        names = [c["name"] for c in ordered]
    except (TypeError, KeyError, ValueError):
        raise MaskpropError(
            f"[campaign] every category in {path} needs an integer id and a name"
        ) from None
    if not all(isinstance(n, str) and n for n in names):
        raise MaskpropError(f"[campaign] category names in {path} must be non-empty strings")
    return names


def _classes(base: Path, table: dict[str, Any]) -> tuple[str, ...]:
    listed = table.get("classes")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
            raise MaskpropError(
                f"[campaign] classes must be a list of strings, got {_kind(listed)} {listed!r}"
            )
    known = None
    if "categories" in table:
        known = _categories(_path(base, "campaign", "categories", table["categories"]))
    if listed is None:
        if known is None:
            raise MaskpropError("[campaign] needs classes = [...] or categories = <COCO file>")
        return tuple(known)
    if known is not None:
        unknown = [c for c in listed if c not in known]
        if unknown:
            raise MaskpropError(
                f"[campaign] unknown class {unknown[0]!r}: not in the categories file "
                f"(known: {', '.join(known)})"
            )
    return tuple(listed)


def _annotation(table: dict[str, Any], wage: float) -> tuple[AnnotationParams, dict[str, Any]]:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in SEARCH_KEYS:
            continue
        default = _PARAM_FIELDS[key].default
        if key in ("prior_accept_threshold", "prior_reject_threshold"):
            # Learning K_pr/K_pa from a held-out set in a campaign is not built yet: a number.
            values[key] = _typed("annotation", key, value, float)
        else:
            values[key] = _typed("annotation", key, value, type(default))
    search = {
        "redundancy": _typed("annotation", "redundancy", table.get("redundancy", 1), int),
        "strategy": _typed("annotation", "strategy", table.get("strategy", "heuristic"), str),
        "seed": _typed("annotation", "seed", table.get("seed", 0), int),
    }
    try:
        params = AnnotationParams(**values, hourly_wage=wage)
    except MaskpropError as exc:
        raise MaskpropError(f"[annotation] {exc}") from None
    return params, search


def parse_spec(data: dict[str, Any], base: Path) -> CampaignSpec:
    """A :class:`CampaignSpec` from TOML data (``tomllib.loads``); relative paths are under
    ``base``.  Checks unknown tables and keys, types, ranges (via :class:`AnnotationParams`),
    the budget, and that the folders and files named exist."""
    for name in data:
        if name not in _TABLES:
            raise MaskpropError(f"unknown table [{name}] (expected: {', '.join(sorted(_TABLES))})")
    for name, keys in _TABLES.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise MaskpropError(f"[{name}] must be a table, got {_kind(table)}")
        for key in table:
            if key not in keys:
                raise MaskpropError(
                    f"[{name}] unknown key {key!r} (expected: {', '.join(sorted(keys))})"
                )
    for name in _REQUIRED_TABLES:
        if name not in data:
            raise MaskpropError(f"missing table [{name}]")
    camp, det, budget_t = data["campaign"], data["detector"], data["budget"]
    for table, key, t in (("campaign", "name", camp), ("campaign", "images", camp)):
        if key not in t:
            raise MaskpropError(f"[{table}] {key} is required")
    if "weights" not in det:
        raise MaskpropError("[detector] weights is required")

    name = _typed("campaign", "name", camp["name"], str)
    images = _path(base, "campaign", "images", camp["images"])
    if not images.is_dir():
        raise MaskpropError(f"[campaign] images folder {images} does not exist")
    manifest = None
    if "manifest" in camp:
        manifest = _path(base, "campaign", "manifest", camp["manifest"])
        if not manifest.is_file():
            raise MaskpropError(f"[campaign] manifest {manifest} does not exist")
    weights = _path(base, "detector", "weights", det["weights"])
    if not weights.is_file():
        raise MaskpropError(f"[detector] weights file {weights} does not exist")
    classes = _classes(base, camp)
    labelled = labelled_images = None
    if "labelled" in det:
        labelled = _path(base, "detector", "labelled", det["labelled"])
        if not labelled.is_file():
            raise MaskpropError(f"[detector] labelled set {labelled} does not exist")
        labelled_images = labelled.parent
    if "labelled_images" in det:
        if labelled is None:
            raise MaskpropError("[detector] labelled_images needs labelled")
        labelled_images = _path(base, "detector", "labelled_images", det["labelled_images"])
        if not labelled_images.is_dir():
            raise MaskpropError(f"[detector] labelled_images {labelled_images} does not exist")

    budget = Budget(
        questions=_typed("budget", "questions", budget_t.get("questions", 0), int),
        hours=_typed("budget", "hours", budget_t.get("hours", 0.0), float),
        dollars=_typed("budget", "dollars", budget_t.get("dollars", 0.0), float),
        hourly_wage=_typed("budget", "wage", budget_t.get("wage", 12.0), float),
        rounds=_typed("budget", "rounds", budget_t.get("rounds", 1), int),
    )
    params, search = _annotation(data.get("annotation", {}), budget.hourly_wage)
    version = _typed("campaign", "version", camp.get("version", 1), int)
    return CampaignSpec(
        name=name,
        classes=classes,
        images_root=images,
        manifest=manifest,
        detector_weights=weights,
        params=params,
        budget=budget,
        version=version,
        labelled=labelled,
        labelled_images=labelled_images,
        **search,
    )


def load_spec(path: Path) -> CampaignSpec:
    """Read and validate a campaign spec TOML file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MaskpropError(f"spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MaskpropError(f"cannot read spec file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MaskpropError(f"spec file {path} is not valid TOML: {exc}") from None
    return parse_spec(data, path.resolve().parent)
