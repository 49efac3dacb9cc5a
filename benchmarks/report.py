"""Markdown tables from a results folder: ``python -m benchmarks.report DIR``.

What benchmarks/RESULTS.md quotes is rendered from the JSON files the suite wrote, so
no figure is copied by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _n(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _spread(stats: dict | None) -> str:
    if not stats or "q1" not in stats:
        return ""
    return f"{_n(stats['q1'])}–{_n(stats['q3'])}"


def header(rec: dict) -> str:
    env = rec.get("environment", {})
    load = env.get("load_average_1_5_15")
    after = env.get("load_average_after")
    return (f"Machine `{env.get('machine')}`: {env.get('cpu_model')}, {env.get('cpu_count')} cores, device "
            f"{env.get('device')}; {env.get('date')}; commit `{str(env.get('commit', ''))[:12]}`; torch "
            f"{env.get('torch')}, ffcv {env.get('ffcv')}, numpy {env.get('numpy')}; load average (1 min) "
            f"{load[0] if load else '?'} at the start, {after[0] if after else '?'} at the end; "
            f"{rec.get('wall_seconds', 0):.0f} s.")


def comparisons_table(rec: dict) -> str:
    rows = ["| figure | unit | engine (median, IQR) | reference (median, IQR) | engine / reference |",
            "| --- | --- | ---: | ---: | ---: |"]
    for key, c in rec.get("comparisons", {}).items():
        mark = " **(headline)**" if key == rec.get("headline") else ""
        rows.append(f"| {key}{mark} | {c['unit']} | {_n(c['engine'])} ({_spread(c.get('engine_stats'))}) | "
                    f"{_n(c['reference'])} ({_spread(c.get('reference_stats'))}) | **{c['ratio']:.2f}x** |")
    return "\n".join(rows)


def measurements_table(rec: dict) -> str:
    rows = ["| figure | unit | median | spread (IQR or min–max) | reps |", "| --- | --- | ---: | ---: | ---: |"]
    for key, m in rec.get("measurements", {}).items():
        spread = _spread(m) if "q1" in m else (f"{_n(min(m['reps']))}–{_n(max(m['reps']))}" if m.get("reps") else "")
        rows.append(f"| {key} | {m.get('unit', '')} | {_n(m.get('median'))} | {spread} | {len(m.get('reps', []))} |")
    return "\n".join(rows)


def targets_table(rec: dict) -> str:
    if not rec.get("targets"):
        return ""
    rows = ["| target | measured | wanted | met |", "| --- | ---: | --- | --- |"]
    for t in rec["targets"]:
        rows.append(f"| {t['name']} | {_n(t['value'])} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(rows)


def render(folder: Path) -> str:
    out = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        if "benchmark" not in rec:
            continue
        out += [f"### {rec['benchmark']}", "", header(rec), ""]
        if rec.get("comparisons"):
            out += [comparisons_table(rec), ""]
        if rec.get("measurements"):
            out += [measurements_table(rec), ""]
        t = targets_table(rec)
        if t:
            out += [t, ""]
        for key in ("not_measured", "notes"):
            for line in rec.get(key) or []:
                out.append(f"- {key.replace('_', ' ')}: {line}")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a folder written by python -m benchmarks --out")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    print(render(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
