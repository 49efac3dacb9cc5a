"""DIR/gpu.md: the GPU check's record as markdown, every phase alike: its status, its
scalar figures, and a table of its results (and of any other case-by-case dict)."""
from __future__ import annotations

from benchmarks.gpu.common import PHASES

SCALAR = (int, float, str, type(None))
# Shown in their own places, not among a phase's figures.
OWN = ("status", "seconds", "deadline_s", "error", "passed", "cuda_only", "skipped", "notes")


def _shown(v) -> bool:
    """Fits a table cell: a scalar, or a list or dict of scalars."""
    return isinstance(v, SCALAR) or isinstance(v, (list, tuple)) and all(isinstance(x, SCALAR) for x in v) or \
        isinstance(v, dict) and all(isinstance(x, SCALAR) for x in v.values())


def _f(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_f(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_f(x)}" for k, x in v.items())
    return "-" if v is None else str(v).replace("\n", " ").replace("|", "\\|")


def _table(rows: dict, first: str) -> list[str]:
    """One row per case, one column per field any case has that fits a cell."""
    rows = {k: r for k, r in rows.items() if isinstance(r, dict)}
    cols = list(dict.fromkeys(c for r in rows.values() for c, v in r.items()
                              if c not in ("traceback", "reps") and _shown(v)))
    if not rows or not cols:
        return []
    return (["| " + " | ".join([first, *cols]) + " |", "|" + " --- |" * (len(cols) + 1)] +
            [f"| {k} | " + " | ".join(_f(r.get(c)) for c in cols) + " |" for k, r in rows.items()] + [""])


def markdown(record: dict) -> str:
    env = record.get("environment", {})
    lines = [f"# GPU check ({record['mode']})", "",
             f"Device: **{env.get('device')}** ({env.get('gpu_count', 0)} visible), torch {env.get('torch')}, "
             f"Python {env.get('python')}, commit `{str(env.get('commit'))[:12]}`, {env.get('date')}. "
             f"FFCV importable: {_f(record.get('ffcv_importable'))}. Wall: {_f(record.get('wall_seconds'))} s "
             f"(planned limit {record['budget']['planned_limit_s']} s).", ""]
    if record["mode"] == "smoke":
        lines += ["Smoke run: CPU, tiny sizes, Triton interpreted. Its figures check that the code runs; "
                  "they are not measurements.", ""]
    lines += ["| phase | status | seconds | deadline (s from start) | cases run | skipped |", "|" + " --- |" * 6]
    phases = {name: record["phases"].get(name, {}) for name in PHASES}
    lines += [f"| {name} | {ph.get('status')} | {_f(ph.get('seconds'))} | {_f(ph.get('deadline_s'))} | "
              f"{len(ph.get('results') or {})} | {len(ph.get('skipped') or {})} |" for name, ph in phases.items()]
    for name, ph in phases.items():
        lines += ["", f"## {name}", ""]
        if ph.get("error"):
            lines += [f"**Error:** `{ph['error']}`", ""]
        if "passed" in ph:
            lines += [f"Passed: **{_f(ph['passed'])}**", ""]
        lines += [f"- {k}: {_f(v)}" for k, v in ph.items() if k not in OWN and v != [] and _shown(v)] + [""]
        lines += _table(ph.get("results") or {}, "case")
        lines += _table(ph.get("comparison") or {}, "stage")
        lines += [f"- target {t['name']}: {_f(t['value'])} ({t['target']}): {'met' if t['met'] else 'NOT met'}"
                  for t in ph.get("targets") or []]
        lines += [f"- skipped {key}: {why}" for key, why in (ph.get("skipped") or {}).items()]
        lines += [f"- not shown here ({key}): {why}" for key, why in (ph.get("cuda_only") or {}).items()]
        lines += [f"- {note}" for note in ph.get("notes") or []]
    return "\n".join(lines) + "\n"
