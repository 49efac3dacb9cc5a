"""Config -> ``kernels`` view specs, so every stage builds its views the same way.

Each function takes the ``data`` config section (size, flips, normalisation) and the
stage's own view section."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.settings import PAD_CROP_FIELDS, RESIZED_CROP_FIELDS, DataConfig, SimCLRViewConfig, WeakViewConfig


def simclr_spec(data: DataConfig, views: SimCLRViewConfig):
    from engine.errors import check
    from kernels import SimCLRSpec

    # The config check cannot see data.image_size; a fixed kernel must fit reflect padding
    # (kernel_size // 2 < size). 0 (per sample) caps itself at the image and always fits.
    k = views.blur_kernel_size
    check(views.blur_p == 0 or k // 2 < data.image_size, "pretrain.views.blur_kernel_size",
          f"{k} is too large for data.image_size {data.image_size} (at most {2 * data.image_size - 1}; "
          "0 sizes each sample's kernel to its sigma)")
    # The section is the spec's fields but size and normalisation (engine.settings), so
    # every option passes through by name.
    values = views.spec_values(tuple(f.name for f in dataclasses.fields(views)))
    return SimCLRSpec(**{**values, **_from_data(data)})


def _from_data(data: DataConfig) -> dict:
    """What the data section sets in every view: size and normalisation, and no flip at
    all where data.horizontal_flip is false (digits, GTSRB signs)."""
    return dict(size=data.image_size, mean=tuple(data.mean), std=tuple(data.std),
                **({} if data.horizontal_flip else {"flip_p": 0.0}))


@dataclass
class WeakAugment:
    """The stage-2/3 and baseline view: pad-crop + flip (CIFAR) or resized crop + flip."""

    data: DataConfig
    view: WeakViewConfig

    def __post_init__(self) -> None:
        from kernels import SimCLRSpec, WeakSpec

        shared = _from_data(self.data)
        if self.view.kind == "pad_crop":
            self.spec = WeakSpec(**{**self.view.spec_values(PAD_CROP_FIELDS), **shared})
        else:
            # RandomResizedCrop + flip is the SimCLR view with every colour op off.
            self.spec = SimCLRSpec(**{**self.view.spec_values(RESIZED_CROP_FIELDS), **shared},
                                   jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)

    def __call__(self, images: torch.Tensor, *, seed: int, epoch: int, step: int, rank: int,
                 purpose: str = "train_view") -> torch.Tensor:
        from kernels import WeakSpec, simclr_views, weak_view

        from engine.runtime.seeds import seed_stream

        # ``purpose`` separates several views drawn at the same step (MixMatch's K views).
        gen = seed_stream(seed, purpose, epoch, step, rank, device=images.device)
        if isinstance(self.spec, WeakSpec):
            out, _ = weak_view(images, self.spec, generator=gen)
            return out
        views, _ = simclr_views(images, self.spec, n_views=1, generator=gen)
        return views[0]


def eval_view(data: DataConfig, images: torch.Tensor) -> torch.Tensor:
    from kernels import normalize

    return normalize(images, tuple(data.mean), tuple(data.std))
