"""A scale table, measured (runs only when named): per-core prepare and loader figures on a synthetic
ImageFolder tree, and from them the ``.beton`` size, the prepare time and the cores per GPU for
ImageNet-1k and ImageNet-100. Its phases, sources and caveats: docs/benchmarks.md."""
from __future__ import annotations

import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import alternate, measurement, pin_torch_threads, rate
from benchmarks.loader import ATTACKS, engine_epoch, engine_loader, trigger_by_attack
from benchmarks.synthetic import cache_dir, prepared_set, synthetic_tree

FULL = dict(n=20_000, val_n=500, write_budget_s=180.0, batch=256, loader_reps=3, attack_n=5_000, attack_reps=3)
QUICK = dict(n=64, val_n=20, write_budget_s=120.0, batch=16, loader_reps=1, attack_n=64, attack_reps=1)
# Training images: ILSVRC-2012's train split, and CMC's 100-class subset of it (Tian et al. 2020).
TRAIN_IMAGES = {"ImageNet-1k": 1_281_167, "ImageNet-100": 126_689}
PREPARE_CORES = (16, 64)
# FFCV's published per-A100 ImageNet training rates (ffcv.io; Leclerc et al., CVPR 2023).
GPU_RATES = {"ResNet-18": 10_000.0, "ResNet-50": 3_000.0}


def _prepare_timed(tree: Path, out: Path, cores: int) -> dict:
    """``dbd prepare imagefolder`` at 256 px, end to end, and the bytes of its train.beton that grow
    with the images (data, metadata rows, allocation entries: not the file's constant part)."""
    from engine.data.beton import open_beton
    from engine.data.prepare import WriterSettings, prepare
    t0 = time.perf_counter()
    meta = prepare("imagefolder", str(tree), out, writer=WriterSettings(decode_size=256, num_workers=cores),
                   progress=False, force=True)
    seconds = time.perf_counter() - t0
    n_train, n_val = meta["splits"]["train"]["count"], meta["splits"]["test"]["count"]
    reader = open_beton(out / "train.beton")
    payload = int(reader.alloc_table["size"].sum()) + int(reader.metadata.nbytes) + int(reader.alloc_table.nbytes)
    # prepare() runs one writer process per 2,000 images of a split, at most ``cores``.
    return {"train_images": n_train, "val_images": n_val, "seconds": seconds,
            "writer_processes": min(cores, max(1, n_train // 2000)), "images_per_s": (n_train + n_val) / seconds,
            "payload_bytes": payload, "train_beton_bytes": (out / "train.beton").stat().st_size}


def drop_page_cache() -> bool:
    """``sync; echo 1 > /proc/sys/vm/drop_caches``; False where the kernel refuses it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def _loader_rates(bench, s: dict, cores: int) -> tuple[dict, list[bool]]:
    """The clean loader's images/s, os_cache on/off x 1 thread / all cores, the thread counts alternating.
    os_cache on runs first, so a page-cache drop (before each os_cache-off epoch) never lands in it."""
    rates, drops = {}, []
    for oc in (True, False):
        def epoch(loader, r: int) -> float:
            if not oc and r >= 0:
                drops.append(drop_page_cache())
            return rate(lambda: engine_epoch(loader, r))
        loaders = {t: engine_loader(bench, s["batch"], t, os_cache=oc) for t in sorted({1, cores})}
        r = alternate({t: lambda k, x=x: epoch(x, k) for t, x in loaders.items()}, s["loader_reps"])
        rates.update({f"os_cache_{'on' if oc else 'off'}/threads{t}": v for t, v in r.items()})
    return rates, drops


def _measure(tree: Path, store: Path, s: dict, cores: int) -> tuple[dict, dict, list[bool]]:
    """Prepare ``tree`` into ``store``, then time the clean loader and each attack's over it."""
    m, prep = {}, _prepare_timed(tree, store, cores)
    m["prepare/256/bytes_per_image"] = measurement("bytes", [prep["payload_bytes"] / prep["train_images"]])
    bench = prepared_set(store, tree)
    loader, drops = _loader_rates(bench, s, cores)
    attack = trigger_by_attack(bench, batch=s["batch"], threads=cores, reps=s["attack_reps"], epochs=1,
                               indices=np.arange(min(s["attack_n"], len(bench.labels))))
    rates = {"prepare/256": ([prep["images_per_s"]], prep["writer_processes"])}
    rates.update({f"loader/{key}": (reps, int(key.rsplit("threads", 1)[1])) for key, reps in loader.items()})
    rates.update({f"attack/{name}": (reps, cores) for name, reps in attack["results"].items()})
    for key, (reps, n) in rates.items():  # n: the cores, threads or writer processes the figure used
        m[f"{key}/images_per_s"] = measurement("images/s", reps, cores=n)
        m[f"{key}/images_per_s_per_core"] = measurement("images/s/core", [x / n for x in reps])
    for who, usage in (("self", resource.RUSAGE_SELF), ("largest_child", resource.RUSAGE_CHILDREN)):
        # Linux reports ru_maxrss in KiB; the largest child is one of the prepare's writers.
        m[f"rss/peak_{who}_mb"] = measurement("MB", [resource.getrusage(usage).ru_maxrss * 1024 / 1e6])
    return m, prep, drops


def _g(x: float) -> str:
    """A figure for a derivation: thousands separators for whole numbers, else 3 significant digits."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def _bytes(b: float) -> str:
    unit, f = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)) if abs(b) >= f), ("B", 1))
    return f"{_g(b / f)} {unit}"


def _duration(sec: float) -> str:
    return f"{_g(sec / 3600)} h" if sec >= 3600 else f"{_g(sec / 60)} min" if sec >= 60 else f"{_g(sec)} s"


def derive(pc: dict) -> dict:
    """The table from the per-core figures ``pc``: each entry its column, value, formula and derivation."""
    b, p, rows = pc["bytes_per_image"], pc["prepare_images_per_s_per_core"], {}
    for ds, n in TRAIN_IMAGES.items():
        rows[ds] = row = {"train_images": n, "beton_bytes/bytes_per_image": {
            "column": ".beton 256 px", "value": n * b, "unit": "bytes", "shown": _bytes(n * b),
            "formula": "train_images x bytes_per_image", "derivation": f"{n:,} x {_bytes(b)} = {_bytes(n * b)}"}}
        for c in PREPARE_CORES:
            row[f"prepare_seconds/{c}_cores"] = {
                "column": f"prepare, {c} cores", "value": n / (p * c), "unit": "s", "shown": _duration(n / (p * c)),
                "formula": f"train_images / (prepare_images_per_s_per_core x {c})",
                "derivation": f"{n:,} / ({_g(p)} img/s/core x {c}) = {_g(n / (p * c))} s"}
        for (model, gpu), which in ((mg, w) for mg in GPU_RATES.items() for w in ("clean", "slowest_attack")):
            per = pc[f"loader_{which}"]
            row[f"cores_per_gpu/{model}/loader_{which}"] = {
                "column": f"cores/GPU {model} {which.replace('_', ' ')}", "value": gpu / per, "unit": "cores",
                "shown": _g(gpu / per), "formula": f"{model} GPU rate / loader_{which} per core",
                "derivation": f"{_g(gpu)} img/s / {_g(per)} img/s/core = {_g(gpu / per)} cores"}
    return rows


def markdown(rows: dict) -> str:
    entries = {ds: {k: e for k, e in row.items() if isinstance(e, dict)} for ds, row in rows.items()}
    head = ["dataset", "train images"] + [e["column"] for e in next(iter(entries.values())).values()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += [f"| {ds} | {rows[ds]['train_images']:,} | " + " | ".join(e["shown"] for e in row.values()) + " |"
              for ds, row in entries.items()]
    lines += ["", "Derivations:", ""] + [f"- {ds}, {k}: {e['derivation']}" for ds, row in entries.items()
                                          for k, e in row.items()]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, device: str | None = None, threads: int | None = None, out: str | None = None) -> dict:
    """``device`` is unused (CPU loading); ``threads`` pins torch's intra-op threads; ``out``: the
    results folder, where ``scale.md`` (the table) is written next to ``scale.json``."""
    from engine.fsutil import write_text
    from engine.runtime.threads import usable_cores
    s = dict(QUICK if quick else FULL)
    if not quick:
        s["n"] = int(os.environ.get("DBD_BENCH_SCALE_N", s["n"]))
        s["write_budget_s"] = float(os.environ.get("DBD_BENCH_SCALE_WRITE_S", s["write_budget_s"]))
    cores, torch_threads, t_start = usable_cores(), pin_torch_threads(threads), time.perf_counter()
    tree = synthetic_tree(s["n"], s["val_n"], s["write_budget_s"])
    store = cache_dir() / f"scale-work-{os.getpid()}"
    try:
        m, prep, drops = _measure(Path(tree["root"]), store, s, cores)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    attack = {a: m[f"attack/{a}/images_per_s_per_core"]["median"] for a in ATTACKS}
    pc = {"bytes_per_image": m["prepare/256/bytes_per_image"]["median"],
          "prepare_images_per_s_per_core": m["prepare/256/images_per_s_per_core"]["median"],
          "loader_clean": m[f"loader/os_cache_on/threads{cores}/images_per_s_per_core"]["median"],
          "loader_slowest_attack": min(attack.values()), "slowest_attack": min(attack, key=attack.get)}
    rows = derive(pc)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_text(Path(out) / "scale.md", "# scale\n\n" + markdown(rows))  # atomic: a stopped run leaves the old table
    notes = ["Caveats (crops of two photos; per-core figures assume linear scaling): docs/benchmarks.md, scale."]
    notes += [f"The writing budget stopped the tree at {tree['train_images']:,} images."] if tree["budget_cut"] else []
    return {"unit": "images/s/core", "measurements": m, "per_core": pc, "derived": rows, "notes": notes,
            "table_markdown": markdown(rows), "tree": tree, "prepare": prep, "seconds": time.perf_counter() - t_start,
            "settings": {**s, "quick": quick, "cores": cores, "torch_threads": torch_threads, "device_unused": device,
                         "gpu_rates_images_per_s": GPU_RATES, "train_images": TRAIN_IMAGES},
            "page_cache_drop": {"attempts": len(drops), "succeeded": sum(drops), "worked": bool(drops) and all(drops)}}
