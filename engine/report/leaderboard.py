"""``dbd leaderboard SWEEP_DIR``: one row per cell of a sweep, over its seeds, with the cost.

Inputs are the sweep's ``cells.json``, each cell's ``status.json`` (merged into
``cells.json`` first, which is rewritten when they tell it something new: a ``--slurm``
sweep's tasks write only those) and each cell's run dir (its stages' ``done.json`` and
``summary.json``), so the table can be rebuilt at any time, also while a sweep runs or
after a ``--slurm`` sweep. A row groups the cells whose values differ only in
``seed``: BA, ASR, RA and each defense's own figures (engine/report/columns.py, e.g. DBD's
split's poisoned share at the last epoch) are mean ± sample std over the finished seeds,
with their count. The cost columns are per cell (mean over its seeds) and count every
stage the cell's result used, shared ones included: what the number cost to produce
alone. The sweep's own total, under the table, counts each shared stage once. BA drop
and ASR reduction compare a defense's row with the row of the same values under
``defense: none``.

Failed or unfinished cells are shown as such, never left out: in the status column,
with their errors (the CSV's ``errors`` column, the markdown's failed-cells list) and
in both plots (a red x, a hatched placeholder bar). Outputs: ``leaderboard.md``,
``leaderboard.csv`` and ``plots/leaderboard_ba_asr.png`` (BA against ASR, an arrow from
each no-defense row to its defended row) and ``plots/leaderboard_cost.png`` (wall time
and device-hours per row).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.fsutil import write_text
from engine.report.build import fmt_time, total_cost
from engine.report.columns import DefenseColumn, for_defenses
from engine.rundir import CONFIG, DONE, LEADERBOARD, NO_DEFENSE, SUMMARY, SWEEP_INDEX, Status

METRICS = ("BA", "ASR", "RA")  # every defense's; its own columns add theirs


@dataclass
class CellResult:
    name: str
    values: dict
    defense: str | None
    status: Status  # done | failed | unfinished | not run
    error: str | None = None
    traceback: str | None = None  # the failure's traceback file, relative to the sweep folder
    started: float | None = None  # when its first attempt started (status.json)
    host: str | None = None  # where its last attempt ran
    job: str | None = None  # the Slurm job of its last attempt (``<array job>_<task>``)
    metrics: dict = field(default_factory=dict)  # BA, ASR, RA, the columns' metrics (None where they do not apply)
    implanted: bool | None = None  # a no-defense cell's verdict (engine.report.implant), None otherwise
    cost: dict = field(default_factory=dict)  # engine.report.build.total_cost over the cell's stages
    stage_dirs: dict = field(default_factory=dict)  # stage -> resolved folder (shared ones are one folder)


def _final_stage(stages: list[str], dones: dict) -> str | None:
    evaluated = [s for s in stages if s in dones and dones[s].get("evaluates", "BA" in dones[s])]
    return evaluated[-1] if evaluated else None


def read_cell(sweep: Path, entry: dict, columns: list[DefenseColumn]) -> CellResult:
    run_dir = sweep / entry["run_dir"]
    stages = list(entry.get("stages") or [])
    dones = {s: json.loads((run_dir / s / DONE).read_text()) for s in stages if (run_dir / s / DONE).is_file()}
    status = entry.get("status")
    if status == Status.FAILED:
        state = Status.FAILED
    elif stages and len(dones) == len(stages):
        state = Status.DONE
    elif status == Status.RUNNING or dones or (run_dir / CONFIG).is_file():  # a run has started there
        state = Status.UNFINISHED
    else:
        state = Status.NOT_RUN
    result = CellResult(name=entry["name"], values=dict(entry.get("values") or {}), defense=entry.get("defense"),
                        status=state, error=entry.get("error"), traceback=entry.get("traceback"),
                        started=entry.get("started"), host=entry.get("host"), job=entry.get("job"))
    result.stage_dirs = {s: os.path.realpath(run_dir / s) for s in dones}
    if state != Status.DONE:
        return result
    final = _final_stage(stages, dones)
    done = dones[final] if final else {}
    if result.defense is None:
        result.defense = done.get("defense")
    result.metrics = {k: done.get(k) for k in METRICS} | {c.metric: None for c in columns}
    summary_path = run_dir / SUMMARY
    if summary_path.is_file() and final:
        summary = json.loads(summary_path.read_text())
        result.metrics |= {c.metric: c.last(summary.get(final) or {}) for c in columns}
        result.implanted = summary.get("attack_implanted")
    result.cost = total_cost(d["cost"] for d in dones.values() if isinstance(d.get("cost"), dict))
    return result


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class Row:
    values: dict  # the grid values but the seed
    defense: str | None
    cells: list[CellResult]

    @property
    def done(self) -> list[CellResult]:
        return [c for c in self.cells if c.status == Status.DONE]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        return _mean_std([c.metrics[key] for c in self.done if c.metrics.get(key) is not None])

    def cost(self, key: str) -> float | None:
        xs = [c.cost[key] for c in self.done if c.cost.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    @property
    def state(self) -> str:
        counts: dict[str, int] = {}
        for c in self.cells:
            counts[c.status] = counts.get(c.status, 0) + 1
        if counts.get(Status.DONE) == len(self.cells):
            return Status.DONE
        return ", ".join(f"{n} {s}" for s, n in counts.items())

    def implanted(self, rows: list["Row"]) -> bool | None:
        """Whether the attack implanted in this row's no-defense row (this row itself, for
        a baseline): every finished seed's baseline must say so. None when unknown."""
        base = self if self.defense == NO_DEFENSE else baseline_of(self, rows)
        verdicts = [c.implanted for c in base.done] if base is not None else []
        if not verdicts or any(v is None for v in verdicts):
            return None
        return all(verdicts)

    @property
    def failed(self) -> list[CellResult]:
        return [c for c in self.cells if c.status == Status.FAILED]

    @property
    def errors(self) -> list[str]:
        return [f"{c.name}: {c.error}" + (f" (traceback: `{c.traceback}`)" if c.traceback else "")
                for c in self.failed if c.error]


def group_rows(cells: list[CellResult]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for c in cells:
        values = {k: v for k, v in c.values.items() if k != "seed"}
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in rows:
            rows[key] = Row(values=values, defense=c.defense, cells=[])
        rows[key].cells.append(c)
        if rows[key].defense is None:
            rows[key].defense = c.defense
    return list(rows.values())


def baseline_of(row: Row, rows: list[Row]) -> Row | None:
    if row.defense in (None, NO_DEFENSE):
        return None
    want = {**row.values, "defense": NO_DEFENSE} if "defense" in row.values else None
    for other in rows:
        if want is not None and other.values == want:
            return other
    return None


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table_rows(rows: list[Row], keys: list[str],
               columns: list[DefenseColumn]) -> tuple[list[str], list[list], list[list[str]]]:
    """Column names, raw values (the CSV) and formatted cells (the markdown)."""
    value_keys = [k for k in keys if k not in ("seed", "defense")]
    metrics = [*METRICS, *(c.metric for c in columns)]
    header = [*value_keys, "defense", "seeds", "status", "implanted", *(x for k in metrics for x in (k, f"{k}_std")),
              "BA_drop", "ASR_reduction", "wall_seconds", "device_hours", "device_hours_unit", "images_per_second",
              "peak_host_rss_mib", "peak_gpu_memory_mib", "errors"]
    raw, shown = [], []
    for row in rows:
        stats = {k: row.stat(k) for k in metrics}
        base = baseline_of(row, rows)
        drop = _diff(base.stat("BA")[0], stats["BA"][0]) if base else None
        reduction = _diff(base.stat("ASR")[0], stats["ASR"][0]) if base else None
        unit = next((c.cost.get("device_hours_unit") for c in row.done if c.cost), "")
        cost = {k: row.cost(k) for k in ("wall_seconds", "device_hours", "images_per_second", "peak_host_rss_mib",
                                         "peak_gpu_memory_mib")}
        implanted = row.implanted(rows)
        raw.append([*(row.values.get(k) for k in value_keys), row.defense, len(row.done), row.state, implanted,
                    *(x for k in metrics for x in stats[k]), drop, reduction, cost["wall_seconds"],
                    cost["device_hours"], unit, cost["images_per_second"], cost["peak_host_rss_mib"],
                    cost["peak_gpu_memory_mib"], "; ".join(row.errors) or None])
        num = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        own = ["-" if stats[c.metric][0] is None else _fmt(*stats[c.metric]) + c.suffix for c in columns]
        shown.append([*(str(row.values.get(k)) for k in value_keys), str(row.defense),
                      f"{len(row.done)}/{len(row.cells)}",
                      row.state if row.state == Status.DONE else f"**{row.state}**",
                      {True: "yes", False: "**no**", None: "-"}[implanted],
                      _fmt(*stats["BA"]), _fmt(*stats["ASR"]), _fmt(*stats["RA"]), *own, num(drop), num(reduction),
                      "-" if cost["wall_seconds"] is None else fmt_time(cost["wall_seconds"]),
                      num(cost["device_hours"], "{:.4f}") + (f" {_unit_short(unit)}" if unit else ""),
                      num(cost["images_per_second"], "{:.0f}"), num(cost["peak_host_rss_mib"], "{:.0f}"),
                      num(cost["peak_gpu_memory_mib"], "{:.0f}")])
    return header, raw, shown


def _unit_short(unit: str) -> str:
    return {"GPU-hours": "GPU-h", "CPU core-hours": "core-h"}.get(unit, unit)


def _read_index(sweep: Path) -> dict:
    path = sweep / SWEEP_INDEX
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or remove it") from None


def build_leaderboard(sweep: str | Path, columns: list[DefenseColumn]) -> str:
    """Write leaderboard.md, leaderboard.csv and the plots; return the markdown table.
    ``columns``: every defense's own figures (``engine.defenses.report_columns()``);
    those of the defenses in the sweep's rows show.

    Reads ``cells.json`` as it is: ``dbd leaderboard`` first merges the cells' status
    files into it (engine.sweep.runner.refresh_index), so a ``--slurm`` sweep's tasks
    show their real statuses."""
    sweep = Path(sweep)
    index = _read_index(sweep)
    if not index.get("cells"):
        raise UserError(f"{sweep} is not a sweep folder: no {SWEEP_INDEX} with cells "
                        f"(run `dbd sweep GRID --out {sweep}`)")
    keys = list(index.get("keys") or [])
    cells = [read_cell(sweep, e, columns) for e in index["cells"]]
    rows = group_rows(cells)
    columns = for_defenses(columns, {r.defense for r in rows})
    header, raw, shown = table_rows(rows, keys, columns)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in raw])
    write_text((sweep / LEADERBOARD).with_suffix(".csv"), buf.getvalue())

    value_keys = [k for k in keys if k not in ("seed", "defense")]
    cols = [*value_keys, "defense", "seeds", "status", "implanted", "BA", "ASR", "RA",
            *(c.short_header for c in columns), "BA drop", "ASR reduction", "wall time", "device-hours", "images/s",
            "peak RSS (MiB)", "peak GPU (MiB)"]
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                      + ["| " + " | ".join(r) + " |" for r in shown])
    plots = [d["path"] for d in leaderboard_plots(sweep, rows, value_keys).values()]
    lines = [f"# Leaderboard: {sweep.name}", "",
             f"Grid `{index.get('grid')}` on base config `{index.get('base')}`: {len(cells)} cells, "
             f"{sum(c.status == Status.DONE for c in cells)} done.", "",
             "BA: clean test accuracy; ASR: attack success rate; RA: robust accuracy (triggered images classified "
             "as their true class)" + "".join(f"; {c.legend}" for c in columns)
             + ". All in percent, mean ± sample std over the finished seeds. BA drop and ASR reduction: "
             "the no-defense row of the same values minus this row. Implanted: whether the no-defense ASR "
             "reached attack.implant_threshold on every seed; where it did not, a defense's low ASR says "
             "nothing about the defense. Cost columns: per cell (mean over seeds), every stage the result "
             "used counted, shared ones included.", "",
             table, ""]
    lines += _totals(cells)
    errors = [e for r in rows for e in r.errors]
    if errors:
        lines += ["## Failed cells", ""] + [f"- {e}" for e in errors] + [""]
    unfinished = [c for c in cells if c.status == Status.UNFINISHED]
    if unfinished:
        lines += ["## Unfinished cells", "",
                  "Started but without a result: still running, or killed (a time limit, a node failure) "
                  "before it could record one. Rerun the sweep (or resubmit) to finish them.", ""]
        lines += [f"- {c.name}" + _where(c) for c in unfinished] + [""]
    env = next((c for c in cells if c.cost), None)
    if env is not None:
        lines += [_measured_on(sweep, env), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    write_text(sweep / LEADERBOARD, "\n".join(lines))
    return table


def _totals(cells: list[CellResult]) -> list[str]:
    """The sweep's own cost: every distinct stage folder once (shared stages trained once)."""
    seen: dict[str, dict] = {}
    for c in cells:
        for folder in c.stage_dirs.values():
            done = Path(folder) / DONE
            if folder not in seen and done.is_file():
                cost = json.loads(done.read_text()).get("cost")
                if isinstance(cost, dict):
                    seen[folder] = cost
    if not seen:
        return []
    total = total_cost(seen.values())
    per_cell = sum(float(c.cost.get("wall_seconds") or 0.0) for c in cells if c.cost)
    unit = total.get("device_hours_unit") or "device-hours"
    return [f"Sweep total: {fmt_time(total['wall_seconds'])} of stage wall time and {total['device_hours']:.4f} "
            f"{unit} for {len(seen)} distinct stages; the cells' own costs add up to {fmt_time(per_cell)} "
            f"(the difference is the stages they share).", ""]


def _measured_on(sweep: Path, cell: CellResult) -> str:
    run_dir = sweep / "cells" / cell.name
    for folder in cell.stage_dirs.values():
        cost = json.loads((Path(folder) / DONE).read_text()).get("cost") or {}
        if cost:
            versions = ", ".join(f"{k} {v}" for k, v in (cost.get("versions") or {}).items())
            return (f"Measured on {cost.get('device')}, world size {cost.get('world_size')}, commit "
                    f"{cost.get('commit')}; {versions} (from {run_dir.name}).")
    return ""


def _where(c: CellResult) -> str:
    parts = []
    if c.started:
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M", time.localtime(c.started)))
    if c.host:
        parts.append(f"on {c.host}")
    if c.job:
        parts.append(f"Slurm job {c.job}")
    return f": {' '.join(parts)}" if parts else ""


def leaderboard_plots(sweep: Path, rows: list[Row], value_keys: list[str]) -> dict[str, dict]:
    """The leaderboard's plots (engine.report.plots), failed rows marked in both: plot
    name -> {path, rows, failed}, as read back from the figures."""
    from engine.report.plots import plot_leaderboard_ba_asr, plot_leaderboard_cost

    done = [r for r in rows if r.done and r.stat("BA")[0] is not None]
    failed = [r for r in rows if r.failed]
    if not done and not failed:
        return {}
    out = sweep / "plots"
    label = lambda r: ", ".join(str(r.values[k]) for k in value_keys) or "base"  # noqa: E731
    drawn = {}

    def point(r: Row) -> tuple[float, float] | None:
        ba = r.stat("BA")[0] if r.done else None
        return None if ba is None else (r.stat("ASR")[0], ba)

    points = []
    shown = {id(r) for r in done + failed}
    for r in rows:
        if id(r) not in shown:
            continue
        own, base = point(r), baseline_of(r, rows)
        points.append({"name": f"{label(r)} ({r.defense})", "defense": r.defense,
                       "BA": own[1] if own else None, "ASR": own[0] if own else None,
                       "baseline": point(base) if base is not None else None, "failed": len(r.failed)})
    path, info = plot_leaderboard_ba_asr(points, out / "leaderboard_ba_asr.png")
    drawn["ba_asr"] = {"path": path, **info}

    costed = [r for r in done if r.cost("wall_seconds") is not None]
    if costed or failed:
        ids = {id(r) for r in costed}
        bars = [{"name": f"{label(r)} ({r.defense})", "wall_seconds": r.cost("wall_seconds") if id(r) in ids else None,
                 "device_hours": r.cost("device_hours"), "failed": len(r.failed)}
                for r in rows if id(r) in ids or r.failed]
        unit = next((c.cost.get("device_hours_unit") for r in costed for c in r.done if c.cost), "device-hours")
        path, info = plot_leaderboard_cost(bars, out / "leaderboard_cost.png", unit)
        drawn["cost"] = {"path": path, **info}
    return drawn
