"""DIR/gpu.md: the GPU check's record as markdown (what ran, what passed, the figures)."""
from __future__ import annotations

from benchmarks.gpu.common import PHASES


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        if v == 0:
            return "0"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    return str(v)


def _head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _errors(results: dict) -> list[str]:
    return [f"- {k}: `{r['error']}`" for k, r in results.items() if isinstance(r, dict) and "error" in r]


def _done(results: dict) -> dict:
    return {k: r for k, r in results.items() if isinstance(r, dict) and "error" not in r}


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
    lines += _head("phase", "status", "seconds", "deadline (s from start)", "cases run", "skipped")
    for name in PHASES:
        ph = record["phases"].get(name, {})
        lines.append(f"| {name} | {ph.get('status')} | {_f(ph.get('seconds'))} | {_f(ph.get('deadline_s'))} | "
                     f"{len(ph.get('results') or {})} | {len(ph.get('skipped') or {})} |")
    for name in PHASES:
        ph = record["phases"].get(name, {})
        lines += ["", f"## {name}", ""]
        if ph.get("error"):
            lines += [f"**Error:** `{ph['error']}`", ""]
        lines += _SECTIONS[name](ph, ph.get("results") or {})
        lines += [f"- skipped {key}: {why}" for key, why in (ph.get("skipped") or {}).items()]
        lines += [f"- not shown here ({key}): {why}" for key, why in (ph.get("cuda_only") or {}).items()]
        lines += [f"- {note}" for note in ph.get("notes") or []]
    return "\n".join(lines) + "\n"


def _kernels(ph: dict, res: dict) -> list[str]:
    if not res:
        return []
    lines = [f"Passed: **{_f(ph.get('passed'))}** (interpreted: {_f(ph.get('interpreted'))})", "",
             *_head("case", "max abs diff", "tolerance", "result")]
    for k, r in _done(res).items():
        diff = _f(r.get("max_abs_diff"))
        if "max_abs_diff_last_rows" in r:
            diff = f"{diff} (last rows {_f(r['max_abs_diff_last_rows'])})"
        elif "identical" in r:
            diff = "identical" if r["identical"] else "DIFFERENT"
        lines.append(f"| {k} | {diff} | {_f(r.get('tolerance'))} | {'pass' if r.get('pass') else 'FAIL'} |")
    return lines + _errors(res)


def _views(ph: dict, res: dict) -> list[str]:
    if not res:
        return []
    lines = _head("size / method / mode", "views/s (median)", "min–max")
    lines += [f"| {k} | {_f(r.get('median'))} | {_f(r.get('min'))}–{_f(r.get('max'))} |" for k, r in _done(res).items()]
    lines += ["", *_head("ratio", "value")]
    lines += [f"| {k} | {_f(v)}x |" for k, v in {**(ph.get("ratios") or {}), **(ph.get("decode_ratios") or {})}.items()]
    lines += [f"- target {t['name']}: {_f(t['value'])} ({t['target']}): {'met' if t['met'] else 'NOT met'}"
              for t in ph.get("targets") or []]
    return lines + _errors(res)


def _steps(ph: dict, res: dict) -> list[str]:
    lines = [f"bf16 matmul peak measured: {_f((ph.get('bf16_matmul_peak_flops') or 0) / 1e12)} TFLOP/s.", ""]
    if not res:
        return lines
    lines += _head("case", "images/s", "share of bf16 peak", "host syncs/step", "peak GiB", "copy / views / model ms")
    for k, r in _done(res).items():
        sp = r.get("split_ms") or {}
        lines.append(f"| {k} | {_f(r.get('images_per_s'))} | {_f(100 * r.get('bf16_peak_share', 0))} % | "
                     f"{r.get('host_syncs_per_step')} | {_f(r.get('peak_memory_gib'))} | "
                     f"{_f(sp.get('copy'))} / {_f(sp.get('views'))} / {_f(sp.get('model'))} |")
    lines += [f"- host syncs in {k}: {', '.join(f'{n} x {w}' for w, n in r['host_syncs'].items())}"
              for k, r in _done(res).items() if r.get("host_syncs")]
    return lines + _errors(res)


def _distributed(ph: dict, res: dict) -> list[str]:
    lines = []
    for key, r in res.items():
        lines.append(f"- {key}: world size {r.get('world_size')}, process group "
                     f"{r.get('backend') or 'none (DDP at world size 1 opens none)'} "
                     f"(option {r.get('process_group_option')}), devices {', '.join(r.get('devices') or [])}"
                     + (f", NCCL probe {'pass' if r['nccl_probe'].get('pass') else 'FAIL'}" if "nccl_probe" in r
                        else "") + (f"; error `{r['error']}`" if "error" in r else ""))
        lines += [f"  - {stage}: `{run['error']}`" for stage, run in (r.get("runs") or {}).items() if "error" in run]
    lines += ["", *_head("stage", "1 process", "2 processes (gloo)", "abs diff by step", "compared",
                         "split identical")]
    for stage, c in (ph.get("comparison") or {}).items():
        if "losses_1" not in c:
            lines.append(f"| {stage} | - | - | - | no: {c.get('reason')} | - |")
            continue
        verdict = (("within" if c["within"] else "OUTSIDE") + f" {_f(c['tolerance'])} (first {c['tight_steps']} "
                   f"steps; later {_f(c['tolerance_later'])})") if c["compared"] else f"no ({c['reason']})"
        lines.append(f"| {stage} | {', '.join(_f(v, 6) for v in c['losses_1'])} | "
                     f"{', '.join(_f(v, 6) for v in c['losses_2'])} | {', '.join(_f(d) for d in c['abs_diff'])} | "
                     f"{verdict} | {_f(c.get('split_identical'))} |")
    return lines


_SECTIONS = {"kernels": _kernels, "views": _views, "steps": _steps, "distributed": _distributed}
