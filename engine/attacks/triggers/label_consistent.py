"""Label-consistent backdoor (Turner, Tsipras, Madry 2019).

Clean-label: target-class training images are first made hard to learn with a PGD
adversarial perturbation (L-inf eps 8/255, step 1.5/255, 100 steps, against a trained
classifier), then get the trigger: the original "all-corners" pattern, a 3x3 pattern
of full-amplitude pixels (255 or 0, replacing the image's) in each of the four
corners, each corner with its own pattern (Turner et al.'s code, as BackdoorBench's
``utils/bd_img_transform/lc.py`` carries it). At test time the trigger comes alone.

``dbd attack-prepare`` runs the PGD once, for every target-class training image (so
the cache serves any poisoning ratio), and caches the perturbations as int8 levels:
the perturbed image is uint8 anyway, so x_adv - x is an exact integer in
[-round(255 eps), round(255 eps)]. Cache: ``lc_perturbations.npy`` (K, H, W, 3) at the
frame size, and ``lc_perturbations.json`` beside it with the K sample indices (sorted;
row k belongs to indices[k]), the dataset hash and the PGD settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
import time
from pathlib import Path

import numpy as np
from numba import carray, njit

from engine.attacks.triggers.badnets import patch_kernel
from engine.attacks.base import Attack, as_pointer, check_images, resample_nearest
from engine.errors import UserError, check


@dataclass
class LabelConsistentConfig:
    eps: float = 8 / 255
    step_size: float = 1.5 / 255
    steps: int = 100
    # Model the PGD perturbations are computed against: a checkpoint path, or empty to
    # use the run's own ``supervised`` stage on clean data (``dbd attack-prepare``).
    model: str = ""
    perturbations: str = ""  # cache written by ``dbd attack-prepare``; empty = run dir
    # The clean surrogate ``dbd attack-prepare`` trains when ``model`` is empty: a recipe
    # of SURROGATE_RECIPES ("reference" is BackdoorBench's; "short" is for the demo and
    # the tests), with ``train_epochs`` / ``train_lr`` overriding it when set (> 0).
    surrogate: str = "reference"
    train_epochs: int = 0
    train_lr: float = 0.0
    batch_size: int = 128

    @staticmethod
    def input_files(section: dict, run_dir: str) -> dict[str, str]:
        """The files this section makes a run read (the stage-store key hashes their
        content, not their path): the perturbation cache and its side file (in the run
        dir when ``perturbations`` is empty), and the surrogate checkpoint if named."""
        npy = Path(section["perturbations"] or Path(run_dir) / "lc_perturbations.npy")
        files = {"perturbations": str(npy), "perturbations_index": str(npy.with_suffix(".json"))}
        if section["model"]:
            files["model"] = section["model"]
        return files

    def validate(self) -> None:
        check(self.steps >= 1, "attack.label_consistent.steps", "must be >= 1")
        check(0 < self.eps <= 1, "attack.label_consistent.eps", "must be in (0, 1]")
        check(self.step_size > 0, "attack.label_consistent.step_size", "must be > 0")
        check(self.surrogate in SURROGATE_RECIPES, "attack.label_consistent.surrogate",
              f"must be one of {', '.join(SURROGATE_RECIPES)}, got {self.surrogate!r}")
        check(self.train_epochs >= 0, "attack.label_consistent.train_epochs", "must be >= 0 (0 = the recipe's)")
        check(self.train_lr >= 0, "attack.label_consistent.train_lr", "must be >= 0 (0 = the recipe's)")
        check(self.batch_size >= 1, "attack.label_consistent.batch_size", "must be >= 1")

    def surrogate_recipe(self) -> "SurrogateRecipe":
        recipe = SURROGATE_RECIPES[self.surrogate]
        return SurrogateRecipe(epochs=self.train_epochs or recipe.epochs, lr=self.train_lr or recipe.lr)


@dataclass(frozen=True)
class SurrogateRecipe:
    """SGD (momentum 0.9, weight decay 5e-4) with a per-epoch cosine schedule from ``lr``
    to 0, on RandomCrop(padding 4, zero fill) + flip views: BackdoorBench's clean training."""

    epochs: int
    lr: float


SURROGATE_RECIPES = {
    # BackdoorBench trains its PGD surrogate at its defaults: 100 epochs, SGD lr 0.01, cosine.
    "reference": SurrogateRecipe(epochs=100, lr=0.01),
    # A deviation for small machines: the demo and the tests. It leaves a weaker surrogate,
    # so fewer perturbations fool it and the attack is weaker.
    "short": SurrogateRecipe(epochs=5, lr=0.05),
}


# Where the model and cache live, and how the helper classifier is trained, do not
# define the trigger.
_NOT_TRIGGER = ("model", "perturbations", "surrogate", "train_epochs", "train_lr", "batch_size")

CORNER_FRAME = 32  # the corner patterns are defined at 32 px and scaled with the image
# The four corners of the original pattern, rows top to bottom and columns left to
# right within each 3x3 corner (1 = 255, 0 = 0). They are not one pattern copied four
# times: the original's 36 (row, column, +1/-1) entries give these.
CORNERS = {
    "top_left": [[1, 0, 0], [0, 1, 0], [1, 0, 1]],
    "top_right": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
    "bottom_left": [[1, 0, 0], [0, 1, 0], [1, 0, 1]],
    "bottom_right": [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
}


def corner_trigger(frame: int = CORNER_FRAME) -> tuple[np.ndarray, np.ndarray]:
    pattern = np.zeros((frame, frame, 3), np.uint8)
    mask = np.zeros((frame, frame, 3), bool)
    n = 3
    places = {"top_left": (0, 0), "top_right": (0, frame - n), "bottom_left": (frame - n, 0),
              "bottom_right": (frame - n, frame - n)}
    for corner, (r0, c0) in places.items():
        pattern[r0:r0 + n, c0:c0 + n] = (np.array(CORNERS[corner], np.uint8) * 255)[..., None]
        mask[r0:r0 + n, c0:c0 + n] = True
    return pattern, mask


class LabelConsistent(Attack):
    name = "label_consistent"
    config_class = LabelConsistentConfig
    clean_label = True
    per_sample_training = True  # each poisoned sample has its own perturbation

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        # Clean-label: half the target class (digits: about 68 images).
        return ["attack.ratio=0.5", "attack.clean_label_ratio_of=class"]

    @classmethod
    def from_config(cls, section: LabelConsistentConfig, ctx) -> "LabelConsistent":
        if not ctx.train:
            return cls()
        pert, rows = load_perturbations(section, ctx.run_dir, ctx.meta, ctx.frame, ctx.plan.poisoned_indices,
                                        len(ctx.plan.true_labels))
        return cls(pert, rows)

    @classmethod
    def prepare(cls, cfg, runtime, *, force: bool = False, log=print) -> None:
        """The PGD perturbation cache: computed, unless a valid one exists (``force``
        recomputes)."""
        if not force:
            try:
                runtime.train_attack()
            except UserError:
                pass  # missing or stale: compute it below
            else:
                log(f"perturbations up to date: {cache_paths(cfg.attack.label_consistent, runtime.run_dir)[0]} "
                    f"(--force recomputes)")
                return
        prepare(cfg, runtime.meta, runtime, runtime.run_dir, log=log)

    @classmethod
    def preview_stand_in(cls, runtime) -> "LabelConsistent":
        # Without the PGD cache the training trigger cannot be drawn; the corner pattern
        # alone still shows where the trigger goes.
        return runtime.test_attack()

    @classmethod
    def trigger_settings(cls, section: LabelConsistentConfig) -> dict:
        return {k: v for k, v in super().trigger_settings(section).items() if k not in _NOT_TRIGGER}

    def __init__(self, perturbations: np.ndarray | None = None, rows: np.ndarray | None = None):
        """``perturbations`` int8 (K, H, W, 3) at the frame size; ``rows`` int32 over the
        dataset: the row of each sample's perturbation, -1 for none. Both None for the
        test-time trigger."""
        self.pattern, self.mask = corner_trigger()
        if (perturbations is None) != (rows is None):
            raise ValueError("perturbations and rows go together")
        if perturbations is not None and (perturbations.dtype != np.int8 or perturbations.ndim != 4):
            raise ValueError(f"perturbations must be int8 (K, H, W, 3), got {perturbations.dtype} "
                             f"{perturbations.shape}")
        self.perturbations = perturbations
        self.rows = None if rows is None else np.ascontiguousarray(rows, dtype=np.int32)

    def trigger_only(self) -> "LabelConsistent":
        return LabelConsistent()

    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        check_images(images)
        h, w = images.shape[1:3]
        out = images.copy()
        if self.rows is not None:
            for k, index in enumerate(indices):
                row = self.rows[int(index)]
                if row >= 0:
                    delta = resample_nearest(np.asarray(self.perturbations[row]), h, w).astype(np.int16)
                    out[k] = np.clip(out[k].astype(np.int16) + delta, 0, 255).astype(np.uint8)
        pattern = resample_nearest(self.pattern, h, w)
        mask = resample_nearest(self.mask, h, w)
        return np.where(mask[None], pattern[None], out)

    def check_fits(self, height: int, width: int) -> None:
        if not resample_nearest(self.mask, height, width).any():
            raise UserError(f"the label-consistent corner trigger vanishes at {height}x{width} px")

    def kernel(self):
        corners = patch_kernel(self.pattern, self.mask)
        if self.rows is None:
            return corners
        rows = self.rows
        # The cache can be large (one frame per target-class image) and is usually
        # memory-mapped: as a closure constant it would be read and copied into every
        # pipeline, so the kernel reads it through its address; this object holds the
        # array, and the operations hold this object, for the loader's life.
        pert = self.perturbations
        address = pert.ctypes.data
        shape = tuple(int(s) for s in pert.shape)
        ph, pw = shape[1], shape[2]

        def lc_kernel(win, index):
            row = rows[index]
            if row >= 0:
                delta = carray(as_pointer(address), shape, np.int8)
                h, w = win.shape[0], win.shape[1]
                cols = np.empty(w, np.int64)  # once per window, not per pixel
                for c in range(w):
                    cols[c] = ((2 * c + 1) * pw) // (2 * w)
                for r in range(h):
                    pr = ((2 * r + 1) * ph) // (2 * h)
                    for c in range(w):
                        pc = cols[c]
                        for k in range(3):
                            v = np.int64(win[r, c, k]) + np.int64(delta[row, pr, pc, k])
                            win[r, c, k] = 0 if v < 0 else (255 if v > 255 else v)
            corners(win, index)

        return njit(nogil=True)(lc_kernel)


# --------------------------------------------------------------------------- the cache


def cache_paths(lc_cfg, run_dir: Path | None) -> tuple[Path, Path] | None:
    if lc_cfg.perturbations:
        npy = Path(lc_cfg.perturbations)
    elif run_dir is not None:
        npy = Path(run_dir) / "lc_perturbations.npy"
    else:
        return None
    return npy, npy.with_suffix(".json")


def load_perturbations(lc_cfg, run_dir: Path | None, meta: dict, frame: tuple[int, int],
                       needed: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(perturbations int8 (K, H, W, 3), rows int32[n_train]) covering ``needed``."""
    paths = cache_paths(lc_cfg, run_dir)
    hint = "run `dbd attack-prepare CONFIG` first"
    if paths is None or not paths[0].is_file() or not paths[1].is_file():
        where = paths[0] if paths else "<run_dir>/lc_perturbations.npy"
        raise UserError(f"label-consistent perturbations not found at {where}: {hint}")
    npy, side = paths
    try:
        info = json.loads(side.read_text())
        arr = np.load(npy, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"label-consistent perturbation cache {npy} is unreadable ({e}): {hint}") from None
    if info.get("content_hash") != meta["content_hash"]:
        raise UserError(f"label-consistent perturbations {npy} were computed for another dataset "
                        f"(hash {str(info.get('content_hash'))[:12]}, "
                        f"data.root has {meta['content_hash'][:12]}): {hint}")
    indices = np.asarray(info.get("indices", []), dtype=np.int64)
    if arr.ndim != 4 or arr.shape[0] != len(indices) or tuple(arr.shape[1:3]) != tuple(frame) or arr.shape[3] != 3:
        raise UserError(f"label-consistent perturbations {npy} have shape {arr.shape}, expected "
                        f"({len(indices)}, {frame[0]}, {frame[1]}, 3): {hint}")
    if arr.dtype != np.int8:
        # A user-supplied float cache holds perturbations in [0, 1] image units.
        arr = np.clip(np.rint(np.asarray(arr, np.float32) * 255), -127, 127).astype(np.int8)
    rows = np.full(n_train, -1, dtype=np.int32)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_train):
        raise UserError(f"label-consistent perturbations {npy} index samples outside the training set: {hint}")
    rows[indices] = np.arange(len(indices), dtype=np.int32)
    missing = np.asarray(needed)[rows[np.asarray(needed, dtype=np.int64)] < 0]
    if len(missing):
        raise UserError(f"label-consistent perturbations {npy} lack {len(missing)} poisoned sample(s) "
                        f"(e.g. index {int(missing[0])}): {hint}")
    return arr, rows


# --------------------------------------------------------------------------- PGD


def _device(cfg):
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("config: device is cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def load_classifier(path: str, cfg, num_classes: int):
    import torch

    from engine.models import Classifier

    p = Path(path)
    if not p.is_file():
        raise UserError(f"attack.label_consistent.model: checkpoint not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted types for foreign or damaged files
        raise UserError(f"attack.label_consistent.model: cannot load {p}: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"attack.label_consistent.model: {p} does not hold a state dict")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    model = Classifier(cfg.model.arch, cfg.model.width, num_classes)
    result = model.load_state_dict(state, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise UserError(f"attack.label_consistent.model: {p} does not fit Classifier({cfg.model.arch}, "
                        f"width {cfg.model.width}, {num_classes} classes): key {problems[0]!r} "
                        f"{'missing' if result.missing_keys else 'unexpected'}")
    return model


def _normalize(x, mean, std):
    return (x - mean) / std


def _loader_spec(cfg, indices, *, shuffle: bool, batch_size: int, seed: int = 0):
    from engine.data.loaders import LoaderSpec

    # On CPU, a backward pass through oneDNN while the loader's thread runs numba's
    # parallel decoding corrupts the heap (double free or segfault; seen with the tbb,
    # omp and workqueue layers alike). One decoding thread compiles the pipeline
    # without numba's parallel runtime, which avoids it; decoding is not this step's
    # bottleneck.
    threads = 1 if _device(cfg).type == "cpu" else cfg.data.num_workers
    return LoaderSpec(root=cfg.data.root, split="train", batch_size=batch_size, shuffle=shuffle,
                      drop_last=False, seed=seed, num_workers=threads, indices=indices,
                      decode_size=cfg.data.decode_side, train=True,
                      os_cache=cfg.data.os_cache)


def train_classifier(cfg, num_classes: int, n_train: int, device, log=print):
    """The clean surrogate, by ``attack.label_consistent``'s recipe (SurrogateRecipe)."""
    import torch
    import torch.nn.functional as F

    from kernels import WeakSpec, weak_view

    from engine.data.loaders import make_loader
    from engine.models import Classifier

    lc = cfg.attack.label_consistent
    recipe = lc.surrogate_recipe()
    torch.manual_seed(cfg.seed)
    model = Classifier(cfg.model.arch, cfg.model.width, num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4)
    # Per epoch, like BackdoorBench's CosineAnnealingLR(T_max=epochs).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    # BackdoorBench's clean training view: RandomCrop(padding 4), zero fill, + flip.
    view = WeakSpec(size=cfg.data.image_size, padding=4, padding_mode="constant",
                    flip_p=0.5 if cfg.data.horizontal_flip else 0.0,
                    mean=tuple(cfg.data.mean), std=tuple(cfg.data.std))
    loader = make_loader(_loader_spec(cfg, np.arange(n_train), shuffle=True, batch_size=lc.batch_size,
                                      seed=cfg.seed))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.train()
    for epoch in range(recipe.epochs):
        t0, seen, correct, total_loss = time.time(), 0, 0, 0.0
        for images, labels, _ in loader:
            x, _ = weak_view(images.to(device), view, generator=gen)
            y = labels.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        schedule.step()
        log(f"[attack-prepare] surrogate epoch {epoch + 1}/{recipe.epochs}: loss {total_loss / seen:.3f}, "
            f"train accuracy {100 * correct / seen:.1f}%, {time.time() - t0:.1f} s")
    return model


def pgd(model, x, y, *, eps: float, step: float, steps: int, mean, std):
    """Untargeted L-inf PGD from the clean image (no random start), x in [0, 1]."""
    import torch
    import torch.nn.functional as F

    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(_normalize(x_adv, mean, std)), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def prepare(cfg, meta: dict, runtime, run_dir: Path | None, *, log=print) -> Path:
    """Compute and cache the perturbations of every target-class training image."""
    import torch

    from engine.data.loaders import make_loader
    from engine.fsutil import atomic_path, write_json

    lc = cfg.attack.label_consistent
    paths = cache_paths(lc, run_dir)
    if paths is None:
        raise UserError("attack-prepare needs run_dir or attack.label_consistent.perturbations to write to")
    npy, side = paths
    device = _device(cfg)
    num_classes = int(meta["num_classes"])
    plan = runtime.plan
    n_train = len(plan.true_labels)
    candidates = np.flatnonzero(plan.true_labels == plan.target)
    if lc.model:
        model = load_classifier(lc.model, cfg, num_classes).to(device)
        source = str(Path(lc.model).resolve())
        log(f"[attack-prepare] PGD against {source}")
    else:
        recipe = lc.surrogate_recipe()
        log(f"[attack-prepare] no attack.label_consistent.model: training a clean surrogate "
            f"({lc.surrogate} recipe: {recipe.epochs} epochs, SGD lr {recipe.lr}, cosine) on {device}")
        model = train_classifier(cfg, num_classes, n_train, device, log)
        source = (f"trained here: {cfg.model.arch} width {cfg.model.width}, {lc.surrogate} recipe, "
                  f"{recipe.epochs} epochs, lr {recipe.lr}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    limit = int(round(lc.eps * 255))
    frame = runtime.frame
    out = np.zeros((len(candidates), frame[0], frame[1], 3), dtype=np.int8)
    row_of = {int(i): k for k, i in enumerate(candidates)}
    loader = make_loader(_loader_spec(cfg, candidates, shuffle=False, batch_size=lc.batch_size))
    t0, fooled, done = time.time(), 0, 0
    for images, labels, indices in loader:
        x = images.to(device).permute(0, 3, 1, 2).float().div_(255)
        y = labels.to(device)
        x_adv = pgd(model, x, y, eps=lc.eps, step=lc.step_size, steps=lc.steps, mean=mean, std=std)
        with torch.no_grad():
            fooled += int((model(_normalize(x_adv, mean, std)).argmax(1) != y).sum())
        adv = torch.round(x_adv * 255).permute(0, 2, 3, 1).to("cpu", torch.int16)
        delta = (adv - images.to(torch.int16)).clamp_(-limit, limit).to(torch.int8).numpy()
        for k, index in enumerate(indices.tolist()):
            out[row_of[index]] = delta[k]
        done += len(y)
        log(f"[attack-prepare] PGD {done}/{len(candidates)} images, {time.time() - t0:.1f} s")
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, out)
    write_json(side, {
        "content_hash": meta["content_hash"], "dataset": meta.get("name"), "frame": list(frame),
        "target": int(plan.target), "indices": candidates.tolist(), "eps": lc.eps, "step_size": lc.step_size,
        "steps": lc.steps, "model": source, "dtype": "int8 levels of 1/255",
        "misclassified_after_pgd": fooled, "count": int(len(candidates)),
    })
    log(f"[attack-prepare] {fooled}/{len(candidates)} target-class images misclassified after PGD; "
        f"wrote {npy}")
    return npy
