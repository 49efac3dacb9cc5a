"""Shared pieces of the attack tests: configs, source pixels, loader output, references."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.attacks.export import collect
from engine.config import load_config
from engine.data.loaders import LoaderSpec, beton_path, crop_ratio, make_loader


def attack_names() -> list[str]:
    """Every registered attack: the parity tests loop over the registry."""
    from engine.attacks import ATTACKS

    return sorted(ATTACKS)


def tiny_settings(name: str) -> list[str]:
    """The attack's own test settings (``Attack.tiny_overrides``)."""
    from engine.attacks import ATTACKS

    return ATTACKS[name].tiny_overrides()


def write_prepared_inputs(name: str, cfg, meta: dict, run_dir: Path) -> None:
    """What ``dbd attack-prepare`` would write for an attack that needs preparing, as a
    fast stand-in (label-consistent: random deltas in its cache format). An attack that
    overrides ``Attack.prepare`` must have an entry here (test_attack_ops checks it)."""
    from engine.attacks.runtime import build_poison

    writer = PREPARED_FIXTURES.get(name)
    if writer is not None:
        writer(build_poison(cfg, meta, run_dir), run_dir)


def make_cfg(root: Path, name: str, *overrides: str, run_dir: Path | None = None):
    meta = json.loads((Path(root) / "meta.json").read_text())
    items = [f"data.root={root}", f"data.name={meta['name']}", f"attack.name={name}"]
    if run_dir is not None:
        items.append(f"run_dir={run_dir}")
    return load_config(None, items + list(overrides))


def source_image(root: Path, split: str, index: int) -> np.ndarray:
    """A sample as stored, decoded at source resolution by FFCV's own JPEG decoder."""
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

    path = beton_path(root, split)
    reader = Reader(str(path))
    field = reader.metadata[f"f{reader.field_names.index('image')}"][index]
    ptr = int(field["data_ptr"])
    table = reader.alloc_table
    size = int(table["size"][table["ptr"] == ptr][0])
    data = np.fromfile(path, dtype=np.uint8, count=size, offset=ptr)
    h, w = int(field["height"]), int(field["width"])
    if int(field["mode"]) == 0:  # jpg
        img = np.zeros((h, w, 3), np.uint8)
        imdecode(data, img, h, w, h, w, 0, 0, 1, 1, False, False)
        return img
    return data[:h * w * 3].reshape(h, w, 3).copy()


def expected_frame(root: Path, split: str, index: int, attack, triggered: bool, *, fixed: bool,
                   decode_size: int, train: bool) -> np.ndarray:
    """What the loader must deliver: (variable-size data) FFCV's crop-and-resize of the
    stored image to the decode size, then the reference trigger on that frame."""
    from ffcv.fields.rgb_image import get_center_crop
    from ffcv.libffcv import resize_crop

    img = source_image(root, split, index)
    if not fixed:
        h, w = img.shape[:2]
        i, j, ch, cw = get_center_crop(h, w, None, crop_ratio(train))
        out = np.zeros((decode_size, decode_size, 3), np.uint8)
        resize_crop(img, i, i + ch, j, j + cw, out)
        img = out
    return attack.apply(img[None], np.array([index]))[0] if triggered else img


def load(root: Path, split: str, poison=None, *, indices=None, shuffle=False, batch_size=64, decode_size=32,
         train=True, seed=0):
    return make_loader(LoaderSpec(root=str(root), split=split, batch_size=batch_size, shuffle=shuffle,
                                  drop_last=False, seed=seed, indices=indices, decode_size=decode_size,
                                  train=train), poison=poison)


def epoch(loader):
    return collect(loader)


def write_lc_cache(runtime, run_dir: Path, seed: int = 0) -> np.ndarray:
    """A perturbation cache in the format `dbd attack-prepare` writes, with random deltas."""
    plan = runtime.plan
    indices = np.flatnonzero(plan.true_labels == plan.target)
    rng = np.random.default_rng(seed)
    deltas = rng.integers(-8, 9, size=(len(indices), *runtime.frame, 3)).astype(np.int8)
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "lc_perturbations.npy", deltas)
    (run_dir / "lc_perturbations.json").write_text(json.dumps({
        "content_hash": runtime.meta["content_hash"], "indices": indices.tolist(), "frame": list(runtime.frame)}))
    return deltas


# Attack name -> the writer of its prepared inputs (see write_prepared_inputs).
PREPARED_FIXTURES = {"label_consistent": write_lc_cache}
