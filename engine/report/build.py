"""``summary.json``, ``report.md`` and the plots of a run, rebuilt from its files alone.

Inputs: ``config.yaml``, ``metrics.jsonl`` and each stage's ``done.json`` and
``features.npz``. ``dbd report RUN_DIR`` calls this, so a report can be rebuilt (or
built on another machine) without rerunning anything.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.fsutil import write_json, write_text
from engine.report.metrics import read_metrics
from engine.report.plots import plot_curves, plot_features, plot_split
from engine.stages.context import DONE

EVALUATED = ("supervised", "linear", "finetune")
LABELS = {"supervised": "no defense", "linear": "DBD, linear stage", "finetune": "DBD"}


def load_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    stages = {}
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if (d / DONE).is_file():
            stages[d.name] = json.loads((d / DONE).read_text())
    if not stages:
        raise UserError(f"{run_dir} holds no finished stage (no */{DONE})")
    return cfg, read_metrics(run_dir / "metrics.jsonl"), stages


def summarise(cfg: dict, records: list[dict], stages: dict) -> dict:
    summary: dict = {}
    for name in EVALUATED:
        if name not in stages:
            continue
        s = stages[name]
        entry = {k: s[k] for k in ("BA", "ASR", "RA") if k in s}
        entry["split"] = [r["labelled_poison_share"] for r in _latest(records, "split", name)]
        entry["seconds"] = s.get("seconds")
        summary[name] = entry
    summary["stages_seconds"] = {k: v.get("seconds") for k, v in stages.items()}
    summary["attack"] = cfg.get("attack", {}).get("name")
    summary["dataset"] = cfg.get("data", {}).get("name")
    if "finetune" in stages:
        splits = _latest(records, "split", "finetune")
        if splits:
            summary["finetune"]["split_detail"] = splits
    return summary


def _latest(records: list[dict], kind: str, stage: str) -> list[dict]:
    """Per-epoch records of one kind, the last write winning (a resumed epoch reruns)."""
    by_epoch: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == kind and r.get("stage") == stage:
            by_epoch[int(r["epoch"])] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def results_table(summary: dict, stages: dict) -> str:
    rows = ["| model | BA | ASR | RA | poisoned share of labelled split | time |",
            "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in EVALUATED:
        if name not in summary:
            continue
        s = summary[name]
        split = f"{s['split'][-1]:.2f}%" if s.get("split") else "-"
        t = _stage_time(name, stages)
        rows.append(f"| {LABELS[name]} ({name}) | {fmt(s.get('BA'))} | {fmt(s.get('ASR'))} | {fmt(s.get('RA'))} "
                    f"| {split} | {t} |")
    return "\n".join(rows)


def _stage_time(name: str, stages: dict) -> str:
    # DBD's cost is all its stages; the baseline's is its own.
    names = [name] if name == "supervised" else [n for n in ("pretrain", "linear", "finetune") if n in stages]
    if name == "linear":
        names = [n for n in ("pretrain", "linear") if n in stages]
    total = sum(stages[n].get("seconds", 0) or 0 for n in names)
    return f"{total / 60:.1f} min" if total >= 60 else f"{total:.0f} s"


def build_report(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    cfg, records, stages = load_run(run_dir)
    summary = summarise(cfg, records, stages)
    write_json(run_dir / "summary.json", summary)
    plots_dir = run_dir / "plots"
    plots = []
    plots += plot_curves(records, plots_dir)
    plots += plot_split(records, plots_dir)
    plots += plot_features(run_dir, plots_dir, cfg)
    table = results_table(summary, stages)
    attack = cfg.get("attack", {})
    lines = [
        f"# DBD run: {cfg.get('data', {}).get('name', '?')} / {attack.get('name', '?')}",
        "",
        f"Run directory `{run_dir}`; attack `{attack.get('name')}` with target {attack.get('target')}, "
        f"ratio {attack.get('ratio')}; model `{cfg.get('model', {}).get('arch')}` "
        f"width {cfg.get('model', {}).get('width')}.",
        "",
        "BA: clean test accuracy. ASR: triggered non-target test images classified as the target. "
        "RA: the same images classified as their true class. All in percent.",
        "",
        table,
        "",
        "## Stage times",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v.get('seconds', 0):.1f} |" for k, v in stages.items()],
        "",
    ]
    if "finetune" in summary and summary["finetune"].get("split_detail"):
        lines += ["## Split quality per fine-tuning epoch", "",
                  "| epoch | labelled | poisoned share of labelled | poisoned kept labelled | detector precision | detector recall |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in summary["finetune"]["split_detail"]:
            lines.append(f"| {r['epoch']} | {r['labelled']} | {r['labelled_poison_share']:.2f}% "
                         f"| {r['poisoned_in_labelled']:.2f}% | {r['precision']:.2f}% | {r['recall']:.2f}% |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    write_text(run_dir / "report.md", "\n".join(lines))
    return table
