"""A scale table, measured: per-core prepare and loader figures on a synthetic ImageFolder
tree, and from them the ``.beton`` size, the prepare time and the cores per GPU for
ImageNet-1k and ImageNet-100 (runs only when named). Its phases and the environment
variables that size it: docs/benchmarks.md."""
from __future__ import annotations

import math
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import alternate, measurement, pin_torch_threads, rate
from benchmarks.loader import engine_epoch, engine_loader
from benchmarks.synthetic import subset_tree, synthetic_tree

POISON_RATIO = 0.1
ATTACKS = ("badnets", "blended", "wanet")

FULL = dict(n=20_000, val_n=500, write_budget_s=180.0, batch=256, loader_reps=3, attack_n=5_000, attack_reps=3,
            source_n=5_000, warmup=1)
QUICK = dict(n=64, val_n=20, write_budget_s=120.0, batch=16, loader_reps=1, attack_n=64, attack_reps=1,
             source_n=64, warmup=1)

# Training-set sizes. ImageNet-1k: the ILSVRC-2012 train split (Russakovsky et al., IJCV
# 2015). ImageNet-100: the 100-class subset of CMC (Tian et al., "Contrastive Multiview
# Coding", ECCV 2020; its class list, as used by the self-supervised literature).
DATASETS = {"ImageNet-1k": {"train_images": 1_281_167, "source": "ILSVRC-2012 train split (Russakovsky et al. 2015)"},
            "ImageNet-100": {"train_images": 126_689, "source": "CMC's 100-class subset of ILSVRC-2012 train "
                             "(Tian et al., Contrastive Multiview Coding, ECCV 2020)"}}
PREPARE_CORES = (16, 64)
# Per-GPU training rates FFCV publishes for ImageNet on A100s (ffcv.io ImageNet
# benchmarks; Leclerc et al., "FFCV: Accelerating Training by Removing Data
# Bottlenecks", CVPR 2023): about 10,000 img/s for ResNet-18 at its low training
# resolution and about 3,000 img/s for ResNet-50.
GPU_RATES = {"ResNet-18": 10_000.0, "ResNet-50": 3_000.0}
GPU_RATE_SOURCE = ("FFCV's published per-A100 ImageNet training rates (ffcv.io; Leclerc et al., CVPR 2023): "
                   "about 10,000 img/s ResNet-18 at low resolution, about 3,000 img/s ResNet-50")


# --------------------------------------------------------------------------- measuring

def _prepare_timed(tree: Path, out: Path, decode_size: int, cores: int) -> dict:
    from engine.data.prepare import WriterSettings, prepare
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    meta = prepare("imagefolder", str(tree), out, writer=WriterSettings(decode_size=decode_size, num_workers=cores),
                   progress=False, force=True)
    seconds = time.perf_counter() - t0
    n_train, n_val = meta["splits"]["train"]["count"], meta["splits"]["test"]["count"]
    # prepare() caps the writer processes at one per 2,000 images of a split.
    writers = min(cores, max(1, n_train // 2000))
    size = (out / "train.beton").stat().st_size
    payload = _payload_bytes(out / "train.beton")
    ips = (n_train + n_val) / seconds
    return {"decode_size": decode_size, "train_images": n_train, "val_images": n_val, "seconds": seconds,
            "writer_processes": writers, "images_per_s": ips, "images_per_s_per_core": ips / writers,
            "train_beton_bytes": size, "file_bytes_per_image": size / n_train, "payload_bytes": payload,
            "bytes_per_image": payload / n_train, "meta": meta}


def _payload_bytes(path: Path) -> int:
    """The bytes of a ``.beton`` that grow with its images: the samples' data (the JPEGs),
    their metadata rows and allocation entries. The rest (header, the unused tail of each
    writer's last page: up to a page per writer process) is a constant, which dominates a
    small file: the file size over the image count would overstate a large set's size."""
    from engine.data.beton import open_beton
    reader = open_beton(path)
    return int(reader.alloc_table["size"].sum()) + int(reader.metadata.nbytes) + int(reader.alloc_table.nbytes)


def drop_page_cache() -> bool:
    """``sync; echo 1 > /proc/sys/vm/drop_caches``; False where the kernel refuses it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def _loader(root: Path, batch: int, threads: int, os_cache: bool = True, poison=None, indices=None):
    return engine_loader(root, batch, threads, 256, poison, drop_last=False, os_cache=os_cache, indices=indices)


def _loader_rates(root: Path, s: dict, cores: int) -> tuple[dict, dict]:
    """Clean loader images/s for os_cache on/off x 1 thread/all cores: a warm-up epoch,
    then ``loader_reps`` timed epochs per configuration, the thread counts alternating
    (ABBA). The os_cache=True configurations run first, so a page-cache drop before an
    os_cache=False epoch never lands in an os_cache=True one."""
    rates, drops = {}, []

    def epoch(loader, os_cache: bool):
        def one(r: int) -> float:
            if not os_cache and r >= 0:
                drops.append(drop_page_cache())
            return rate(lambda: engine_epoch(loader, r))
        return one
    for os_cache in (True, False):
        r = alternate({t: epoch(_loader(root, s["batch"], t, os_cache), os_cache) for t in sorted({1, cores})},
                      s["loader_reps"], s["warmup"])
        rates.update({f"os_cache_{'on' if os_cache else 'off'}/threads{t}": v for t, v in r.items()})
    return rates, {"attempts": len(drops), "succeeded": sum(drops), "worked": bool(drops) and all(drops)}


def _attack_rates(root: Path, s: dict, cores: int) -> dict:
    """The clean loader and each attack's loader (all cores, os_cache on) over the first
    ``attack_n`` images, a warm-up epoch each, then the sides in a fresh seeded random
    order every repetition (as ``benchmarks.loader.trigger_by_attack``)."""
    from benchmarks.synthetic import BenchSet, poison_runtime
    from engine.data.prepare import load_meta
    meta = load_meta(root)
    bench = BenchSet(root=root, meta=meta, labels=np.zeros(meta["splits"]["train"]["count"], np.int64), images=None,
                     jpeg_paths=None)
    idx = np.arange(min(s["attack_n"], len(bench.labels)))
    loaders = {"clean": _loader(root, s["batch"], cores, True, indices=idx)}
    for name in ATTACKS:
        runtime, _ = poison_runtime(bench, attack=name, image_size=224, decode_size=256, ratio=POISON_RATIO,
                                    num_workers=cores)
        loaders[name] = _loader(root, s["batch"], cores, True, poison=runtime.train_ops(), indices=idx)
    rates = alternate({k: lambda r, x=x: rate(lambda: engine_epoch(x, r)) for k, x in loaders.items()},
                      s["attack_reps"], seed=0)
    return {"images": len(idx), "threads": cores, "rates": rates}


def peak_rss() -> dict:
    """Peak resident set sizes in MB (Linux reports ru_maxrss in KiB): this process, and
    the largest of its reaped children (the prepare's writer processes, the tree's pool)."""
    scale = 1024 if os.uname().sysname != "Darwin" else 1
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 1e6
    return {"self_mb": own, "largest_child_mb": children}


# --------------------------------------------------------------------------- the table

def _g(x: float, digits: int = 3) -> str:
    """A figure for a derivation: thousands separators for integers, else 3 significant digits."""
    if float(x).is_integer() and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:,.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}" if x else "0"


def _bytes(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(b) >= f:
            return f"{_g(b / f)} {unit}"
    return f"{_g(b)} B"


def _duration(sec: float) -> str:
    return f"{_g(sec / 3600)} h" if sec >= 3600 else f"{_g(sec / 60)} min" if sec >= 60 else f"{_g(sec)} s"


def derive(per_core: dict) -> dict:
    """The scale table from the measured per-core figures (``per_core``: bytes_per_image
    and bytes_per_image_source, prepare_images_per_s_per_core (256 px route), and the
    loader's images/s per core: loader_clean, loader_slowest_attack). Every entry is
    {value, unit, formula, derivation}."""
    rows = {}
    for ds, info in DATASETS.items():
        n = info["train_images"]
        row = {"train_images": n, "train_images_source": info["source"]}
        for key, label in (("bytes_per_image", "256 px"), ("bytes_per_image_source", "source resolution")):
            b = per_core.get(key)
            if b:
                row[f"beton_bytes/{key}"] = {
                    "value": n * b, "unit": "bytes", "formula": f"train_images x {key}",
                    "derivation": f"{n:,} x {_bytes(b)} = {_bytes(n * b)} (train.beton, {label})"}
        p = per_core["prepare_images_per_s_per_core"]
        for cores in PREPARE_CORES:
            sec = n / (p * cores)
            row[f"prepare_seconds/{cores}_cores"] = {
                "value": sec, "unit": "s", "formula": f"train_images / (prepare_images_per_s_per_core x {cores})",
                "derivation": f"{n:,} / ({_g(p)} img/s/core x {cores}) = {_g(sec)} s = {_duration(sec)}"}
        for model, gpu_rate in GPU_RATES.items():
            for which in ("loader_clean", "loader_slowest_attack"):
                per = per_core[which]
                c = gpu_rate / per
                row[f"cores_per_gpu/{model}/{which}"] = {
                    "value": c, "unit": "cores", "formula": f"{model} GPU rate / {which} per core",
                    "derivation": f"{_g(gpu_rate)} img/s / {_g(per)} img/s/core = {_g(c)} cores"}
        rows[ds] = row
    return rows


def markdown(rows: dict, per_core: dict) -> str:
    models = list(GPU_RATES)
    head = (["dataset", "train images", ".beton 256 px", ".beton source res."]
            + [f"prepare, {c} cores" for c in PREPARE_CORES]
            + [f"cores/GPU {m} {k}" for m in models for k in ("clean", "slowest attack")])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for ds, row in rows.items():
        cells = [ds, f"{row['train_images']:,}"]
        for key in ("bytes_per_image", "bytes_per_image_source"):
            e = row.get(f"beton_bytes/{key}")
            cells.append(_bytes(e["value"]) if e else "-")
        cells += [_duration(row[f"prepare_seconds/{c}_cores"]["value"]) for c in PREPARE_CORES]
        cells += [_g(row[f"cores_per_gpu/{m}/{k}"]["value"]) for m in models
                  for k in ("loader_clean", "loader_slowest_attack")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Measured per-core figures:", ""]
    lines += [f"- {k}: {_g(v) if isinstance(v, float) else v}" for k, v in per_core.items()]
    lines += ["", "Derivations:", ""]
    for ds, row in rows.items():
        for key, e in row.items():
            if isinstance(e, dict):
                lines.append(f"- {ds}, {key}: {e['derivation']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- run

def run(quick: bool = False, device: str | None = None, threads: int | None = None, out: str | None = None) -> dict:
    """``device`` is unused (CPU loading); ``threads`` pins torch's intra-op threads; ``out``:
    the results folder, where ``scale.md`` (the table) is written next to ``scale.json``."""
    from benchmarks.synthetic import cache_dir
    from engine.runtime.threads import usable_cores
    s = dict(QUICK if quick else FULL)
    if not quick:
        s["n"] = int(os.environ.get("DBD_BENCH_SCALE_N", s["n"]))
        s["write_budget_s"] = float(os.environ.get("DBD_BENCH_SCALE_WRITE_S", s["write_budget_s"]))
    cores = usable_cores()
    torch_threads = pin_torch_threads(threads)
    t_start = time.perf_counter()
    measurements, notes = {}, []
    # 1. the tree
    tree = synthetic_tree(s["n"], s["val_n"], s["write_budget_s"], cores)
    tree_root = Path(tree["root"])
    measurements["tree/source_files_per_s_per_core"] = measurement(
        "files/s/core", [tree["source_files_per_s_per_core"]], files=tree["train_images"],
        seconds=tree["write_seconds"], workers=tree["write_workers"], cached=tree["cached"])
    measurements["tree/bytes_per_source_file"] = measurement("bytes", [tree["bytes_per_source_file"]])
    if tree["budget_cut"]:
        notes.append(f"the tree's writing budget ({tree['budget_s']:.0f} s) stopped it at {tree['train_images']:,} "
                     f"of {tree['target_images']:,} images")
    # 2. prepare: the 256 px route on the whole tree, source resolution on a subset
    work = cache_dir() / f"scale-work-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        p256 = _prepare_timed(tree_root, work / "d256", 256, cores)
        sub_n = subset_tree(tree_root, work / "subset", min(s["source_n"], tree["train_images"]))
        p0 = _prepare_timed(work / "subset", work / "d0", 0, cores)
        shutil.rmtree(work / "d0", ignore_errors=True)
        for tag, p in (("256", p256), ("source", p0)):
            measurements[f"prepare/{tag}/images_per_s"] = measurement(
                "images/s", [p["images_per_s"]], images=p["train_images"] + p["val_images"], seconds=p["seconds"],
                writer_processes=p["writer_processes"])
            measurements[f"prepare/{tag}/images_per_s_per_core"] = measurement(
                "images/s/core", [p["images_per_s_per_core"]])
            measurements[f"prepare/{tag}/bytes_per_image"] = measurement(
                "bytes", [p["bytes_per_image"]], train_beton_bytes=p["train_beton_bytes"],
                file_bytes_per_image=p["file_bytes_per_image"], payload_bytes=p["payload_bytes"])
        rss_after_prepare = peak_rss()
        # 3. the clean loader, os_cache on/off x 1 thread / all cores
        store = work / "d256"
        loader_reps, drops = _loader_rates(store, s, cores)
        for key, reps in loader_reps.items():
            t = int(key.rsplit("threads", 1)[1])
            measurements[f"loader/{key}/images_per_s"] = measurement("images/s", reps, threads=t)
            measurements[f"loader/{key}/images_per_s_per_core"] = measurement(
                "images/s/core", [x / t for x in reps], threads=t)
        scaling = {}
        for oc in ("on", "off"):
            one = statistics.median(loader_reps[f"os_cache_{oc}/threads1"])
            allc = statistics.median(loader_reps[f"os_cache_{oc}/threads{cores}"])
            scaling[f"os_cache_{oc}"] = {"threads1_images_per_s": one, "all_cores_images_per_s": allc,
                                         "cores": cores, "speedup": allc / one, "efficiency": allc / one / cores}
        # 5. per attack
        att = _attack_rates(store, s, cores)
        for name, reps in att["rates"].items():
            measurements[f"attack/{name}/images_per_s"] = measurement("images/s", reps, threads=cores,
                                                                      images=att["images"])
            measurements[f"attack/{name}/images_per_s_per_core"] = measurement(
                "images/s/core", [x / cores for x in reps], threads=cores)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # 4. peak RSS
    rss = peak_rss()
    measurements["rss/peak_self_mb"] = measurement("MB", [rss["self_mb"]])
    measurements["rss/peak_largest_child_mb"] = measurement("MB", [rss["largest_child_mb"]])
    # 6. the derived table
    attack_per_core = {a: measurements[f"attack/{a}/images_per_s_per_core"]["median"] for a in ATTACKS}
    slowest = min(attack_per_core, key=attack_per_core.get)
    per_core = {
        "bytes_per_image": measurements["prepare/256/bytes_per_image"]["median"],
        "bytes_per_image_source": measurements["prepare/source/bytes_per_image"]["median"],
        "prepare_images_per_s_per_core": measurements["prepare/256/images_per_s_per_core"]["median"],
        "loader_clean": measurements[f"loader/os_cache_on/threads{cores}/images_per_s_per_core"]["median"],
        "loader_slowest_attack": attack_per_core[slowest],
        "slowest_attack": slowest,
    }
    rows = derive(per_core)
    table_md = markdown(rows, per_core)
    if out:
        from engine.fsutil import atomic_path
        Path(out).mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(out) / "scale.md") as tmp:
            Path(tmp).write_text("# scale\n\n" + table_md)
    notes += [
        "The synthetic crops come from two photos (sklearn's sample images): bytes per image, hence the .beton "
        "size, may differ from real ImageNet, whose photos vary more in content and size.",
        "Per-core figures assume linear scaling with cores: the measured loader speed-up from 1 thread to all "
        f"{cores} cores is in 'loader_scaling' (efficiency = speed-up / cores), for the reader to judge.",
        "loader_clean: the clean training loader (256 px store, decode_size 256, os_cache on, all cores) in "
        "images/s per core; loader_slowest_attack: the slowest of badnets/blended/wanet at 10 % poisoned, "
        "same loader. Cores per GPU = the GPU's training rate / that figure.",
        "Prepare images/s counts train + val images over the whole prepare (scan, content hash, decode, "
        "crop-resize, encode, write); per core divides by the writer processes prepare() uses "
        "(min(cores, train images // 2000), at least 1). The source-resolution route ran on a subset "
        f"({sub_n:,} train images).",
        f"Page-cache drop before os_cache=False epochs: {drops['succeeded']} of {drops['attempts']} succeeded"
        + ("" if drops["worked"] else " (refused: those epochs may read from the page cache)") + ".",
        f"Cores per GPU use {GPU_RATE_SOURCE}.",
        "Bytes per image: the train.beton's per-sample bytes (JPEG data, metadata row, allocation entry) over "
        "its images; the file's fixed part (header, the unused tail of each writer's last page) is left out, "
        "since it does not grow with the set (file_bytes_per_image keeps the plain file size / images).",
        "The table covers the train split; the val split (ImageNet-1k 50,000, ImageNet-100 5,000 images) adds "
        "its share at the same rates.",
    ]
    if quick:
        notes.append("quick mode: a tiny tree and one repetition; its figures are a smoke test, not measurements")
    return {
        "unit": "images/s/core",
        "settings": {**s, "quick": quick, "cores": cores, "torch_threads": torch_threads,
                     "torch_threads_pinned": threads is not None, "device_unused": device, "batch_size": s["batch"],
                     "decode_size": 256, "poison_ratio": POISON_RATIO, "attacks": list(ATTACKS),
                     "tree_root": str(tree_root), "source_route_images": sub_n,
                     "gpu_rates_images_per_s": GPU_RATES, "prepare_cores": list(PREPARE_CORES)},
        "tree": tree, "prepare": {"256": {k: v for k, v in p256.items() if k != "meta"},
                                  "source": {k: v for k, v in p0.items() if k != "meta"}},
        "measurements": measurements, "loader_scaling": scaling, "page_cache_drop": drops,
        "peak_rss": {"after_prepare": rss_after_prepare, "end": rss},
        "per_core": per_core, "derived": rows, "datasets": DATASETS, "gpu_rate_source": GPU_RATE_SOURCE,
        "table_markdown": table_md, "notes": notes, "seconds": time.perf_counter() - t_start,
    }
