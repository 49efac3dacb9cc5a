"""``summary.json``, ``report.md`` and the plots of a run, rebuilt from its files alone.

Inputs: ``config.yaml``, ``metrics.jsonl`` and each stage's ``done.json`` and
``features.npz``. ``dbd report RUN_DIR`` calls this, so a report can be rebuilt (or
built on another machine) without rerunning anything.

Everything the report says about a stage comes from its ``done.json``: ``label`` (how
the row is named), ``defense`` ("none" for the no-defense baseline) and ``evaluates``
(whether it has BA/ASR/RA). Rows follow the ``stages`` list of ``config.yaml``. An
older ``done.json`` without these fields reads as: label = stage name, evaluates =
whether it has ``BA``, defense unknown (neither a baseline nor a defense row).

Figures beyond BA/ASR/RA are the defenses' own (engine/report/columns.py): the caller
passes every defense's columns, and those of the defenses present in the run show.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.fsutil import write_json, write_text
from engine.report.columns import DefenseColumn, for_defenses
from engine.report.implant import Implant, assess
from engine.report.metrics import read_metrics
from engine.report.plots import plot_curves, plot_epoch_lines, plot_features
from engine.rundir import CONFIG, DONE, METRICS, NO_DEFENSE, REPORT, SUMMARY


@dataclass(frozen=True)
class StageInfo:
    name: str
    label: str
    defense: str | None
    evaluates: bool
    seconds: float

    @classmethod
    def of(cls, name: str, done: dict) -> "StageInfo":
        return cls(name=name, label=done.get("label") or name, defense=done.get("defense"),
                   evaluates=bool(done["evaluates"]) if "evaluates" in done else "BA" in done,
                   seconds=float(done.get("seconds") or 0.0))

    @property
    def row_name(self) -> str:
        return self.label if self.label == self.name else f"{self.label} ({self.name})"

    @property
    def is_defense(self) -> bool:
        """A defense row: it evaluates and belongs to a known defense other than the baseline."""
        return self.evaluates and self.defense not in (None, NO_DEFENSE)


def load_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    cfg_path = run_dir / CONFIG
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    found = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (d / DONE).is_file():
            found[d.name] = json.loads((d / DONE).read_text())
    if not found:
        raise UserError(f"{run_dir} holds no finished stage (no */{DONE})")
    return cfg, read_metrics(run_dir / METRICS), {n: found[n] for n in stage_order(cfg, found)}


def stage_order(cfg: dict, stages: dict) -> list[str]:
    """The config's ``stages`` order, then any other finished stage in folder order."""
    listed = cfg.get("stages") or []
    listed = [s for s in listed if isinstance(s, str)] if isinstance(listed, list) else []
    first = [s for s in dict.fromkeys(listed) if s in stages]
    return first + [s for s in stages if s not in first]


def run_columns(columns: list[DefenseColumn], stages: dict) -> list[DefenseColumn]:
    """The columns of the defenses whose stages this run finished."""
    return for_defenses(columns, {StageInfo.of(n, d).defense for n, d in stages.items()})


def summarise(cfg: dict, records: list[dict], stages: dict, columns: list[DefenseColumn]) -> dict:
    infos = [StageInfo.of(n, d) for n, d in stages.items()]
    columns = run_columns(columns, stages)
    summary: dict = {}
    for info in infos:
        if not info.evaluates:
            continue
        s = stages[info.name]
        entry = {k: s[k] for k in ("BA", "ASR", "RA") if k in s}
        # Every stage's entry has each column's key (the baseline's is an empty list), so
        # runs compare key by key; only the column's own defense's stages fill it.
        per_epoch = {c.summary_key: _latest(records, c.record_kind, info.name) if info.defense in c.defenses else []
                     for c in columns}
        for c in columns:
            entry[c.summary_key] = [r[c.field] for r in per_epoch[c.summary_key]]
        entry["seconds"] = s.get("seconds")
        for c in columns:
            if per_epoch[c.summary_key]:
                entry[c.detail_key] = per_epoch[c.summary_key]
        summary[info.name] = entry
    summary["stages_seconds"] = {k: v.get("seconds") for k, v in stages.items()}
    attack = cfg.get("attack") or {}
    summary["attack"] = attack.get("name")
    summary["dataset"] = (cfg.get("data") or {}).get("name")
    summary.update(assess(cfg, stages, list(stages)).summary_fields())
    summary["stage_labels"] = {i.name: i.label for i in infos}
    summary["defense_seconds"] = defense_seconds(infos)
    summary["cost"] = {name: done["cost"] for name, done in stages.items() if isinstance(done.get("cost"), dict)}
    summary["cost_total"] = total_cost(summary["cost"].values())
    return summary


def total_cost(costs) -> dict:
    """The sum of stage costs: wall time, images, device-hours; memory peaks as the max."""
    costs = list(costs)
    if not costs:
        return {}
    wall = sum(float(c.get("wall_seconds") or 0.0) for c in costs)
    images = sum(int(c.get("images") or 0) for c in costs)
    gpu = [c["peak_gpu_memory_mib"] for c in costs if c.get("peak_gpu_memory_mib") is not None]
    return {"wall_seconds": round(wall, 2), "images": images,
            "images_per_second": round(images / wall, 1) if wall > 0 else 0.0,
            "device_hours": round(sum(float(c.get("device_hours") or 0.0) for c in costs), 6),
            "device_hours_unit": costs[0].get("device_hours_unit"),
            "peak_host_rss_mib": max(float(c.get("peak_host_rss_mib") or 0.0) for c in costs),
            "peak_gpu_memory_mib": max(gpu) if gpu else None}


def cost_table(costs: dict) -> list[str]:
    """report.md's cost section: one row per stage that recorded its cost."""
    if not costs:
        return []
    first = next(iter(costs.values()))
    unit = first.get("device_hours_unit") or "device-hours"
    lines = ["## Cost", "",
             f"Measured on {first.get('device')}, world size {first.get('world_size')}, commit "
             f"{first.get('commit')}; " + ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items())
             + ". Images are training images; images/s is over the stage's whole wall time (building, "
             "evaluation and checkpoints included).", "",
             f"| stage | wall time | images | images/s | {unit} | peak host RSS (MiB) | peak GPU memory (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, c in costs.items():
        gpu = c.get("peak_gpu_memory_mib")
        lines.append(f"| {name} | {fmt_time(float(c.get('wall_seconds') or 0.0))} | {c.get('images')} "
                     f"| {c.get('images_per_second')} | {float(c.get('device_hours') or 0.0):.4f} "
                     f"| {c.get('peak_host_rss_mib')} | {'-' if gpu is None else gpu} |")
    return lines + [""]


def defense_seconds(infos: list[StageInfo]) -> dict[str, float]:
    """Each defense's total: the own times of all its finished stages (evaluated or not)."""
    out: dict[str, float] = {}
    for i in infos:
        if i.defense not in (None, NO_DEFENSE):
            out[i.defense] = round(out.get(i.defense, 0.0) + i.seconds, 2)
    return out


def _latest(records: list[dict], kind: str, stage: str) -> list[dict]:
    """Per-epoch records of one kind, the last write winning (a resumed epoch reruns)."""
    by_epoch: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == kind and r.get("stage") == stage:
            by_epoch[int(r["epoch"])] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def results_table(summary: dict, stages: dict, columns: list[DefenseColumn], implant: Implant | None = None) -> str:
    """The results table (one row per finished stage, its own time in "stage time"),
    then the lines under it: each defense's total time and whether the attack implanted."""
    infos = [StageInfo.of(n, d) for n, d in stages.items()]
    columns = run_columns(columns, stages)
    note = implant.row_note() if implant is not None else None
    with_note = note is not None and any(i.is_defense for i in infos)
    head = "| model | BA | ASR | RA | " + "".join(f"{c.header} | " for c in columns) + "stage time |"
    rule = "|" + " --- |" * (5 + len(columns))
    if with_note:
        head, rule = head + " note |", rule + " --- |"
    rows = [head, rule]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for info in infos:
        s = summary.get(info.name, {}) if info.evaluates else {}
        extra = "".join(f"| {'-' if c.last(s) is None else f'{c.last(s):.2f}{c.suffix}'} " for c in columns)
        row = (f"| {info.row_name} | {fmt(s.get('BA'))} | {fmt(s.get('ASR'))} | {fmt(s.get('RA'))} "
               f"{extra}| {fmt_time(info.seconds)} |")
        if with_note:
            row += f" {note if info.is_defense else '-'} |"
        rows.append(row)
    under = []
    for defense, total in defense_seconds(infos).items():
        parts = " + ".join(i.name for i in infos if i.defense == defense)
        under.append(f"{defense.upper()} total ({parts}): {fmt_time(total)}")
    sentence = implant.table_note() if implant is not None else None
    if sentence:
        under.append(sentence)
    if under:
        rows.append("")
        for i, line in enumerate(under):
            rows += [line] if i == 0 else ["", line]
    return "\n".join(rows)


def detail_tables(column: DefenseColumn, summary: dict, infos: list[StageInfo]) -> list[str]:
    """report.md's per-epoch table of a column, one per stage that logged its records."""
    lines: list[str] = []
    for info in infos:
        detail = summary.get(info.name, {}).get(column.detail_key)
        if not detail or not column.detail:
            continue
        lines += [f"## {column.detail_title}: {info.row_name}", "",
                  "| " + " | ".join(h for h, _, _ in column.detail) + " |", "|" + " --- |" * len(column.detail)]
        lines += ["| " + " | ".join(f.format(r[k]) for _, k, f in column.detail) + " |" for r in detail]
        lines.append("")
    return lines


def build_report(run_dir: str | Path, columns: list[DefenseColumn]) -> str:
    """Write ``summary.json``, ``report.md`` and the plots; return the results table.
    ``columns``: every defense's own figures (``engine.defenses.report_columns()``)."""
    run_dir = Path(run_dir)
    cfg, records, stages = load_run(run_dir)
    summary = summarise(cfg, records, stages, columns)
    implant = assess(cfg, stages, list(stages))
    write_json(run_dir / SUMMARY, summary)
    infos = [StageInfo.of(n, d) for n, d in stages.items()]
    labels = {i.name: i.row_name for i in infos}
    plots_dir = run_dir / "plots"
    plots = []
    plots += plot_curves(records, plots_dir, order=list(stages))
    for column in run_columns(columns, stages):
        plots += plot_epoch_lines(records, plots_dir, column.record_kind, column.plot) if column.plot else []
    plots += plot_features(run_dir, plots_dir, cfg, titles=labels)
    table = results_table(summary, stages, columns, implant)
    attack = cfg.get("attack") or {}
    model = cfg.get("model") or {}
    lines = [
        f"# DBD run: {(cfg.get('data') or {}).get('name', '?')} / {attack.get('name', '?')}",
        "",
        f"Run directory `{run_dir}`; attack `{attack.get('name')}` with target {attack.get('target')}, "
        f"ratio {attack.get('ratio')}; model `{model.get('arch')}` width {model.get('width')}.",
        "",
        "BA: clean test accuracy. ASR: triggered non-target test images classified as the target. "
        "RA: the same images classified as their true class. All in percent. "
        "Stage time: the stage's own wall time (a defense's total is under the table).",
        "",
        table,
        "",
        "## Stage times",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {i.name} | {i.seconds:.1f} |" for i in infos],
        "",
        *cost_table(summary["cost"]),
    ]
    for column in run_columns(columns, stages):
        lines += detail_tables(column, summary, infos)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    write_text(run_dir / REPORT, "\n".join(lines))
    if (cfg.get("logging") or {}).get("tensorboard"):
        from engine.report.tensorboard import write_events

        write_events(records, run_dir)
    return table
