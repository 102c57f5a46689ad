"""``maskprop simulate``: the method against manual polygons, naive verification and LSUN on
a simulated pool (paper Sec. 5.2); writes report.json and the figures."""

from __future__ import annotations

import json
import math
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop_app.console import Bars, fail


class Strategy(StrEnum):
    heuristic = "heuristic"
    bfs = "bfs"
    dfs = "dfs"
    dfs_heuristic = "dfs_heuristic"
    universal = "universal"


class SequentialRule(StrEnum):
    curtail = "curtail"
    beta = "beta"


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".maskprop-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise MaskpropError(f"cannot write to output directory {out}: {exc.strerror}") from None


def _jsonable(x: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by null, numpy scalars by Python numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def _print_summary(report: dict[str, Any]) -> None:
    cols = ("quantity", "sq", "precision", "questions", "hours", "speedup_vs_manual")
    names = ("maskprop", "manual", "naive_verification", "lsun")
    typer.echo(f"{'method':<20}" + "".join(f"{c:>18}" for c in cols))
    for name in names:
        row = report[name]
        typer.echo(f"{name:<20}" + "".join(f"{_fmt(row[c]):>18}" for c in cols))
    if "ablation" in report:
        typer.echo("\nlabel reuse / sequential verification (same pool):")
        acols = ("quantity", "questions", "masks_per_question", "sq", "masks_per_question_vs_paper")
        typer.echo(f"{'variant':<20}" + "".join(f"{c:>30}" for c in acols))
        for name, row in report["ablation"].items():
            typer.echo(f"{name:<20}" + "".join(f"{_fmt(row[c]):>30}" for c in acols))


def simulate(
    out: Annotated[Path, typer.Option(help="Directory for report.json and the PNG plots.")],
    masks: Annotated[int, typer.Option(help="Masks in the simulated pool.")] = 200_000,
    classes: Annotated[int, typer.Option(help="Object classes (ADE-like generator).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the pool, sampling and annotators.")] = 0,
    strategy: Annotated[Strategy, typer.Option(help="How maskprop searches the trees.")] = (
        Strategy.heuristic
    ),
    sequential: Annotated[
        bool, typer.Option("--sequential", help="Ask a few masks at a time and stop early.")
    ] = False,
    sequential_rule: Annotated[
        SequentialRule, typer.Option(help="Stopping rule used with --sequential.")
    ] = SequentialRule.curtail,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse/--no-reuse",
            help="Reuse ancestors' answers in children (--no-reuse is the paper's rule).",
        ),
    ] = True,
    annotator_error: Annotated[
        float, typer.Option(help="Probability that a simulated answer is wrong (0-0.5).")
    ] = 0.0,
    from_table: Annotated[
        Path | None,
        typer.Option(help="CSV of real predictions (class,s,iou,f0..) to fit the pool to."),
    ] = None,
    samples_per_cluster: Annotated[int, typer.Option(help="N_s.")] = 15,
    accept_threshold: Annotated[float, typer.Option(help="K_a.")] = 0.85,
    iou_threshold: Annotated[float, typer.Option(help="K_iou.")] = 0.75,
    prior_accept_threshold: Annotated[
        float | None, typer.Option(help="K_pa; omit with --learn-prior-accept to learn it.")
    ] = 0.7,
    learn_prior_accept: Annotated[
        bool, typer.Option(help="Learn K_pa from held-out data instead of using 0.7.")
    ] = False,
    dim: Annotated[int, typer.Option(help="Feature dimension of the ADE-like generator.")] = 32,
    ablation: Annotated[
        bool, typer.Option(help="Also compare label reuse and sequential rules.")
    ] = True,
    strategy_curves: Annotated[
        bool, typer.Option(help="Also trace every search strategy (Fig. 6b).")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars on stderr.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(help="Classes simulated at once, one process each (default: the CPUs)."),
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option(help="Memory the workers may use together (default: 80% of available)."),
    ] = None,
) -> None:
    """Simulate the method against manual polygons, naive verification and LSUN (Sec. 5.2)."""
    from maskprop.simulate.classwise import AdeSource, PoolSource, simulate_classes
    from maskprop.simulate.generator import fitted_pool, load_prediction_table

    bars = Bars(progress)
    try:
        if masks < 1:
            raise MaskpropError("--masks must be a positive number")
        if classes < 1:
            raise MaskpropError("--classes must be a positive number")
        if not 0.0 <= annotator_error <= 0.5:
            raise MaskpropError("--annotator-error must be between 0 and 0.5")
        params = AnnotationParams(
            samples_per_cluster=samples_per_cluster,
            accept_threshold=accept_threshold,
            iou_threshold=iou_threshold,
            prior_accept_threshold=None if learn_prior_accept else prior_accept_threshold,
            prior_reject_threshold=None,
            reuse_answers=reuse,
            sequential=sequential_rule.value if sequential else "off",
        )
        _prepare_out(out)
        started = time.perf_counter()
        if dim < 1:
            raise MaskpropError("--dim must be at least 1")
        if workers is not None and workers < 1:
            raise MaskpropError("--workers must be at least 1")
        if memory_gb is not None and not memory_gb > 0:
            raise MaskpropError("--memory-gb must be positive")
        # Held-out clusters with known quality teach the selection (Sec. 4.3): 5% extra masks.
        heldout_n = max(2_000, masks // 20)
        source: AdeSource | PoolSource
        if from_table is not None:
            table = load_prediction_table(from_table)
            full = fitted_pool(table, masks + heldout_n, seed=seed)
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(full))
            source = PoolSource(
                full.subset(np.sort(perm[heldout_n:])), full.subset(np.sort(perm[:heldout_n]))
            )
            workers = 1  # the pool is in memory: its classes are simulated in this process
        else:
            # Generated class by class in the workers: the pool never exists in one piece.
            source = AdeSource(masks, heldout_n, classes, seed=seed, feature_dim=dim)
        result = simulate_classes(
            source,
            params,
            strategy=strategy.value,
            annotator_error=annotator_error,
            seed=seed,
            ablation=ablation,
            strategy_curves=strategy_curves,
            workers=workers,
            memory_budget=int(memory_gb * 2**30) if memory_gb is not None else None,
            progress=bars,
        )
        report = result.report
        report["config"]["generator"] = (
            f"fitted:{from_table}" if from_table is not None else "ade_like"
        )
        report["config"]["wall_seconds"] = round(time.perf_counter() - started, 1)
        _write_outputs(out, result)
    except MaskpropError as exc:
        bars.close()
        fail(str(exc))
    bars.close()
    _print_summary(report)
    typer.echo(
        f"\nwrote {out / 'report.json'} and plots in {report['config']['wall_seconds']} s "
        f"(peak RSS of one class's process: {result.peak_class_rss_bytes / 2**30:.2f} GiB)"
    )


def _write_outputs(out: Path, result: Any) -> None:
    from maskprop.selection import Selection
    from maskprop_app import plots

    report = result.report
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    plots.fig8(result.curves, out / "fig8_quantity_quality_vs_hours.png")
    if result.search_curves:
        plots.fig6b(result.search_curves, out / "fig6b_search_strategies.png")
    used = report["config"]["selection_used"]
    plots.fig4c(
        result.likelihoods,
        Selection(used["prior_reject_threshold"], used["prior_accept_threshold"]),
        out / "fig4c_selection_likelihoods.png",
    )
    if "ablation" in report:
        plots.ablation(report["ablation"], out / "ablation_reuse_sequential.png")
