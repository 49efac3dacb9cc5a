"""What the GPU check's phases share: the plan (phases, time caps, sizes), the device,
test images and in-memory data, and ``Progress``, a phase's results saved as they come."""
from __future__ import annotations

import gc
import sys
import time
import traceback

from benchmarks.harness import jsonable

PHASES = ("kernels", "views", "steps", "distributed")
# Seconds per phase. A phase's deadline is cumulative (start + its cap + the caps before
# it), so what an early phase leaves unused goes to the later ones, and the whole check
# ends by start + sum(caps) + GRACE_S (450 s in full mode) whatever happens.
CAPS = {"full": dict(kernels=60, views=70, steps=230, distributed=75),
        "smoke": dict(kernels=120, views=90, steps=150, distributed=150)}
GRACE_S = 15  # past its deadline by this much, a phase's child is killed
# steps cases: (family, stage, arch, width, view size, source size, batch), batch being the
# stage's own batch_size (MixMatch: labelled, plus as many unlabelled). decode: JPEGs of
# (height, width) decoded and framed at decode_size, ``poisoned`` of them triggered.
SIZES = {
    "full": dict(
        kernels=dict(small=(512, 32, 32), large=(256, 256, 224), strided_small=512, strided_large=64,
                     overflow=1024, overflow_dtypes=("fp32", "bf16"), padding=4),
        views=dict(sizes={"32px": (32, 32), "224px": (256, 224)}, batch=512, per_sample=64, reps=5),
        decode=dict(source=(350, 400), decode_size=256, batch=256, reps=3, poisoned=0.1),
        steps=dict(warmup=3, timed={"cifar": 10, "imagenet": 5}, cases=(
            ("cifar", "pretrain", "cifar_resnet18", 64, 32, 32, 512),
            ("cifar", "finetune", "cifar_resnet18", 64, 32, 32, 64),
            ("imagenet", "pretrain", "resnet18", 64, 224, 256, 256),
            ("imagenet", "finetune", "resnet18", 64, 224, 256, 256),
            ("cifar", "finetune", "cifar_resnet18", 64, 32, 32, 256))),
        distributed=dict(width=64, n_train=512, batch=128, finetune_batch=32, steps=3),
    ),
    "smoke": dict(
        # 7 px views from 9 px sources are one tile; 33 px views (1,089 pixels) are two,
        # which takes the contrast pre-pass and the tiled blur like 224 px does. The
        # interpreter runs program by program (about 1 s per 33 px image and view), so
        # the batches are as small as still say something.
        kernels=dict(small=(4, 9, 7), large=(1, 40, 33), strided_small=4, strided_large=2, overflow=3,
                     overflow_dtypes=("fp32",), padding=2),
        views=dict(sizes={"8px": (8, 8), "16px": (20, 16)}, batch=2, per_sample=1, reps=1),
        decode=dict(source=(35, 40), decode_size=32, batch=4, reps=1, poisoned=0.5),
        steps=dict(warmup=1, timed={"cifar": 2, "imagenet": 2}, cases=(
            ("cifar", "pretrain", "cifar_resnet18", 4, 32, 32, 16),
            ("cifar", "finetune", "cifar_resnet18", 4, 32, 32, 8),
            ("imagenet", "pretrain", "resnet18", 64, 64, 72, 4),
            ("imagenet", "finetune", "resnet18", 64, 64, 72, 4),
            ("cifar", "finetune", "cifar_resnet18", 4, 32, 32, 16))),
        distributed=dict(width=4, n_train=64, batch=16, finetune_batch=8, steps=3),
    ),
}
CLASSES = 10
NO_CUDA = "no CUDA device: the gpu check needs one (--smoke runs its CPU path)"


def mode(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def dist_stages() -> tuple[str, ...]:
    """Every registered stage, each after those it needs (the registry: a new defense's
    stages are checked without editing this package)."""
    from engine.stages.base import stages_in_order
    return stages_in_order()


def ffcv_importable() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def device(smoke: bool):
    import torch
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    return torch.device("cuda", 0)


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def images(batch: int, h: int, w: int, dev, seed: int):
    """Random uint8 NHWC images on ``dev``."""
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=dev, generator=g)


def memory_data(cfg, dist, n: int, source: int, seed: int = 1234):
    """In-memory uint8 data for the stages. ``source`` > data.image_size: the ImageNet
    presets cut their 224 px views from 256 px decodes on the device; MemoryData checks
    that its images are at the training size, so the larger sources replace its training
    images after that check (the test images stay at the size evaluation reads)."""
    import torch
    from engine.data.memory import MemoryData
    g = torch.Generator().manual_seed(seed)
    size, test_n = cfg.data.image_size, 8
    labels = torch.randint(0, CLASSES, (n,), generator=g)  # first: the seed's draws name the data set
    data = MemoryData(cfg.data, dist, cfg.seed,
                      train=(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g), labels),
                      test=(torch.randint(0, 256, (test_n, size, size, 3), dtype=torch.uint8, generator=g),
                            torch.arange(test_n) % CLASSES), num_classes=CLASSES)
    if source != size:
        data.images = torch.randint(0, 256, (n, source, source, 3), dtype=torch.uint8, generator=g)
    return data


def error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


class Progress:
    """A phase's results as they come, saved atomically after every case, so a phase
    killed at its time cap still reports the cases it finished. ``case`` runs one case
    unless the deadline is too close, and records its error instead of raising."""

    def __init__(self, path: str | None, deadline: float):
        self.path, self.deadline = path, deadline
        self.data: dict = {"results": {}, "skipped": {}, "cuda_only": {}, "notes": []}
        self.last = 0.0  # seconds of the latest case
        self.took: dict[str, float] = {}  # seconds of the latest case of each kind

    def save(self) -> None:
        if self.path:
            from engine.fsutil import write_json
            write_json(self.path, jsonable(self.data))

    def cuda_only(self, what: str, why: str) -> None:
        self.data["cuda_only"][what] = why

    def case(self, key: str, fn, kind: str | None = None):
        """Run ``fn`` as case ``key`` unless the deadline is nearer than the time the last
        case of the same ``kind`` took (or, for a first one, the last case of any kind)."""
        est, left = self.took.get(kind, self.last), self.deadline - time.time()
        if est > left:
            self.data["skipped"][key] = f"phase time cap: {max(left, 0):.0f} s left, the case would take about " \
                                        f"{est:.0f} s"
            self.save()
            return None
        t0 = time.time()
        try:
            value = fn()
        except Exception as e:  # one broken case must not hide the others
            value = error(e)
        if isinstance(value, dict) and "error" in value:
            free_memory()  # out here, where the failed case's frames (and tensors) are gone
        self.last = self.took[kind] = time.time() - t0
        if isinstance(value, dict):
            value.setdefault("seconds", round(self.last, 2))
        self.data["results"][key] = value
        self.save()
        return value

    def finish(self) -> dict:
        self.data["ffcv_loaded"] = any(m == "ffcv" or m.startswith("ffcv.") for m in sys.modules)
        self.data["ffcv_importable"] = ffcv_importable()
        self.save()
        return self.data
