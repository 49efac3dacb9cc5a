"""DIR/gpu.md: the check's record as Markdown, every phase alike: a line per figure, a
table per case-by-case collection (its results, comparison, targets)."""
from __future__ import annotations

from benchmarks.gpu.plan import PHASES

SCALAR = (int, float, str, type(None))
SHOWN_APART = ("status", "seconds", "deadline_s", "error", "passed")  # a phase's, shown in their own places
NOT_IN_TABLES = ("traceback", "reps")


def cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(cell(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {cell(x)}" for k, x in v.items())
    return "-" if v is None else str(v).replace("\n", " ").replace("|", "\\|")


def fits_a_cell(v) -> bool:
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
    return all(isinstance(x, SCALAR) for x in items)


def rows_of(v) -> dict:
    """``v`` as table rows (case -> fields) where it is a collection of dicts, else {}."""
    rows = dict(enumerate(v)) if isinstance(v, list) else v if isinstance(v, dict) else {}
    return rows if rows and all(isinstance(r, dict) for r in rows.values()) else {}


def table(name: str, rows: dict) -> list[str]:
    cols = list(dict.fromkeys(c for r in rows.values() for c, v in r.items() if c not in NOT_IN_TABLES
                              and fits_a_cell(v)))
    return [f"| {name} | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1),
            *(f"| {k} | " + " | ".join(cell(r.get(c)) for c in cols) + " |" for k, r in rows.items()), ""]


def section(name: str, ph: dict) -> list[str]:
    lines = ["", f"## {name}", ""]
    lines += [f"**Error:** `{ph['error']}`", ""] if "error" in ph else []
    lines += [f"Passed: **{cell(ph['passed'])}**", ""] if "passed" in ph else []
    lines += [f"- {k}: {cell(v)}" for k, v in ph.items() if k not in SHOWN_APART and not rows_of(v) and v not in
              ([], {}) and fits_a_cell(v)] + [""]
    return lines + [line for k, v in ph.items() if rows_of(v) for line in table(k, rows_of(v))]


def markdown(record: dict) -> str:
    env, phases = record["environment"], {name: record["phases"].get(name, {}) for name in PHASES}
    lines = [f"# GPU check ({record['mode']})", "",
             f"Device: **{env['device']}** ({env['gpu_count']} visible), torch {env['torch']}, Python "
             f"{env['python']}, commit `{str(env['commit'])[:12]}`, {env['date']}. FFCV importable: "
             f"{cell(record['ffcv_importable'])}. Wall: {cell(record.get('wall_seconds'))} s (planned limit "
             f"{record['budget']['planned_limit_s']} s).", ""]
    if record["mode"] == "smoke":
        lines += ["Smoke run: CPU, tiny sizes, Triton interpreted. Its figures check that the code runs; "
                  "they are not measurements.", ""]
    lines += ["| phase | status | seconds | deadline (s from start) | cases run | skipped |", "|" + " --- |" * 6]
    lines += [f"| {name} | {ph.get('status')} | {cell(ph.get('seconds'))} | {cell(ph.get('deadline_s'))} | "
              f"{len(ph.get('results') or {})} | {len(ph.get('skipped') or {})} |" for name, ph in phases.items()]
    return "\n".join(lines + [line for name, ph in phases.items() for line in section(name, ph)]) + "\n"
