"""The SimCLR Gaussian blur against its references: torchvision's gaussian_blur and PIL's GaussianBlur.

The reference (DBD, MoCo's blur) is PIL ``ImageFilter.GaussianBlur(radius=sigma)``, sigma
U[0.1, 2] px at the view's resolution: a full Gaussian. By default (``blur_kernel_size=0``)
each sample gets torchvision's kernel of 2*ceil(3*sigma)+1 taps (radius capped at size - 1
for reflect padding); an odd ``blur_kernel_size`` is torchvision's fixed kernel. The Triton
kernel is checked against the torch path in test_kernels_triton.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from kernels_testutil import reference_kernel_size
from PIL import Image, ImageFilter

from kernels import SimCLRSpec, simclr_views, torch_path

# Radius 1 (0.1), 1/3 in float32 (3 * 0.33333334 rounds to 1.0 in float32 but the exact
# product is just above 1, so the radius is 2), 2 (0.34, 0.5), 3, 5, 6 (1.99, 2.0).
SIGMAS = [0.1, 1.0 / 3.0, 0.34, 0.5, 1.0, 1.5, 1.99, 2.0]


def _blur(img: torch.Tensor, sigma: torch.Tensor, spec: SimCLRSpec) -> torch.Tensor:
    radii = torch_path.blur_radii(sigma, spec)
    return torch_path.gaussian_blur(img, sigma, radii, int(radii.max()))


@pytest.mark.parametrize(
    "size,kernel_size",
    [(7, 0), (32, 0), (4, 0), (16, 5), (9, 17)],  # per sample (size 4 caps the radius at 3); fixed 5; 17 = 2*9-1
)
def test_matches_torchvision_per_sample(size, kernel_size):
    spec = SimCLRSpec(size=size, blur_kernel_size=kernel_size)
    sigma = torch.tensor(SIGMAS, dtype=torch.float32)
    img = torch.rand(len(SIGMAS), size, size, 3, generator=torch.Generator().manual_seed(size))
    got = _blur(img, sigma, spec)
    for i, s in enumerate(sigma.tolist()):
        k = reference_kernel_size(s, spec)
        ref = F.gaussian_blur(img[i].permute(2, 0, 1), [k, k], [s, s])
        # fp32 only: the taps' positions come from arange / sqrt(2) instead of linspace.
        torch.testing.assert_close(got[i].permute(2, 0, 1), ref, atol=1e-6, rtol=0)


def test_radius_rule():
    sigma = torch.tensor(SIGMAS, dtype=torch.float32)
    want = [math.ceil(3.0 * s) for s in sigma.tolist()]
    assert want[:2] == [1, 2] and want[-1] == 6
    assert torch_path.blur_radii(sigma, SimCLRSpec()).tolist() == want
    assert SimCLRSpec().blur_radius == 6 and SimCLRSpec(size=4).blur_radius == 3
    assert torch_path.blur_radii(sigma, SimCLRSpec(size=4)).tolist() == [min(r, 3) for r in want]
    # Replayed sigmas beyond the spec's range are truncated at its widest kernel (the Triton
    # kernel unrolls exactly that many taps).
    narrow = SimCLRSpec(blur_sigma=(0.1, 1.0))
    assert narrow.blur_radius == 3 and torch_path.blur_radii(sigma, narrow).tolist() == [min(r, 3) for r in want]
    fixed = SimCLRSpec(blur_kernel_size=23, size=224)
    assert fixed.blur_radius == 11 and torch_path.blur_radii(sigma, fixed).tolist() == [11] * len(SIGMAS)


def test_kernels_are_normalised_over_each_samples_own_taps():
    sigma = torch.tensor([0.5, 2.0])
    radii = torch.tensor([2, 6])
    k = torch_path.gaussian_kernels(sigma, radii, 6)
    assert k.shape == (2, 13)
    assert torch.equal(k[0, :4], torch.zeros(4)) and torch.equal(k[0, 9:], torch.zeros(4))
    torch.testing.assert_close(k.sum(1), torch.ones(2), atol=1e-6, rtol=0)
    d = torch.arange(-6, 7, dtype=torch.float64)
    g = torch.exp(-(d**2) / (2 * 2.0**2))
    torch.testing.assert_close(k[1].double(), g / g.sum(), atol=1e-7, rtol=0)


def test_default_pipeline_blurs_with_the_full_kernel():
    # Through simclr_views: a blurred sample at sigma 2 must be the 13-tap blur, not a 3-tap one.
    spec = SimCLRSpec(size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, flip_p=0.0)
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views, params = simclr_views(images, spec, n_views=1, seed=0, impl="torch")
    p = params[0]
    no_blur = SimCLRSpec(size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)
    plain = torch_path.simclr_unnormalised(images, no_blur, p)
    for i in range(3):
        s = float(p.sigma[i])
        k = 2 * math.ceil(3 * s) + 1
        ref = F.gaussian_blur(plain[i].permute(2, 0, 1), [k, k], [s, s])
        got = views[0][i].float() * torch.tensor(spec.std).view(3, 1, 1) + torch.tensor(spec.mean).view(3, 1, 1)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


def _photo(size: int) -> np.ndarray:
    """A real photograph (scikit-learn's bundled china.jpg, 427x640), centre square resized to size."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")
    h, w, _ = photo.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(photo[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.BICUBIC))


def _ours_uint8(image: np.ndarray, sigma: float, kernel_size: int = 0) -> np.ndarray:
    """The project's blur on a uint8 HWC image, through [0, 1] floats, rounded back to uint8."""
    spec = SimCLRSpec(size=image.shape[0], blur_kernel_size=kernel_size)
    x = torch.from_numpy(image.copy())[None].to(torch.float32) / 255.0
    out = _blur(x, torch.tensor([sigma]), spec)[0]
    return (out * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


# Measured interior |PIL - ours| in 8-bit levels (max, mean) on china.jpg (AMD EPYC, Pillow 13.0,
# torch 2.14), border of ceil(3 sigma) px left out. PIL approximates the Gaussian with three
# extended box blurs and replicates the edge pixel, where torchvision (and we) reflect: within
# ceil(3 sigma) of the border the difference is by design (measured there: up to 12-20 levels at
# 32 px, 10-29 at 224 px). The old 3-tap kernel, for scale: interior max/mean 14/2.38 (32 px) and
# 21/1.55 (224 px) at sigma 1, 52/10.5 and 70/5.78 at sigma 2.
PIL_MEASURED = {
    (32, 0.5): (3, 0.502), (32, 1.0): (2, 0.476), (32, 1.5): (3, 0.477), (32, 2.0): (2, 0.426),
    (224, 0.5): (3, 0.389), (224, 1.0): (3, 0.441), (224, 1.5): (4, 0.333), (224, 2.0): (3, 0.310),
}
# Just above the measurements: one more level for a float rounding that lands on .5 elsewhere,
# and 0.03 levels on the mean.
PIL_MAX_MARGIN, PIL_MEAN_MARGIN = 1, 0.03


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0])
def test_matches_pil_gaussian_blur_on_a_photo(size, sigma):
    image = _photo(size)
    pil = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.int32)
    b = math.ceil(3 * sigma)
    inner = (slice(b, size - b), slice(b, size - b))
    diff = np.abs(pil - _ours_uint8(image, sigma).astype(np.int32))[inner]
    max_ok, mean_ok = PIL_MEASURED[(size, sigma)]
    assert diff.max() <= max_ok + PIL_MAX_MARGIN, diff.max()
    assert diff.mean() <= mean_ok + PIL_MEAN_MARGIN, diff.mean()
    if sigma >= 1.0:
        # The old default (3 taps) misses the same tolerance by far: the test can tell them apart.
        old = np.abs(pil - _ours_uint8(image, sigma, kernel_size=3).astype(np.int32))[inner]
        assert old.mean() > 1.5 and old.max() > 10


def _width(profile: np.ndarray) -> float:
    """Standard deviation of a centred 1-D response (the blur's width in pixels)."""
    d = np.arange(len(profile)) - len(profile) // 2
    return math.sqrt(float((profile * d * d).sum() / profile.sum()))


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_blur_width_matches_sigma(sigma):
    n = 41
    impulse = torch.zeros(1, n, n, 3)
    impulse[0, n // 2, n // 2] = 1.0
    ours = _blur(impulse, torch.tensor([sigma]), SimCLRSpec(size=n))[0, n // 2, :, 0].double().numpy()
    old = _blur(impulse, torch.tensor([sigma]), SimCLRSpec(size=n, blur_kernel_size=3))[0, n // 2, :, 0]
    # PIL works on 8-bit images: a bright line (a 1-D impulse) keeps the quantisation small.
    line = np.zeros((n, n), np.uint8)
    line[:, n // 2] = 255
    pil = np.asarray(Image.fromarray(line).filter(ImageFilter.GaussianBlur(radius=sigma)))[n // 2].astype(np.float64)
    # Measured: ours 0.998 / 1.498 / 1.988, PIL 0.994 / 1.498 / 1.996, 3 taps 0.740 / 0.785 / 0.799.
    assert abs(_width(ours) / sigma - 1) < 0.05
    assert abs(_width(pil) / sigma - 1) < 0.05
    assert _width(old.double().numpy()) < 0.81 < 0.95 * sigma


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 2.0])
def test_imagenet_23_taps_vs_per_sample_rule(sigma):
    """What dropping the presets' blur_kernel_size: 23 changes at 224 px.

    23 taps reach 11 px = 5.5 sigma at sigma 2 (the kernel's support ends at 5.75 sigma); the
    per-sample rule stops at ceil(3 sigma) px. Measured max |difference| on the photo in [0, 1]:
    <1e-6 / 2.5e-4 / 2.5e-4 / 1.4e-3 at sigma 0.5 / 1 / 1.5 / 2. The bound for any image in
    [0, 1] is the L1 distance of the two 2-D kernels: 5e-8 / 1.1e-3 / 7.6e-4 / 4.1e-3.
    """
    spec_auto, spec_23 = SimCLRSpec(size=224), SimCLRSpec(size=224, blur_kernel_size=23)
    s = torch.tensor([sigma])
    x = torch.from_numpy(_photo(224).copy())[None].to(torch.float32) / 255.0
    diff = (_blur(x, s, spec_auto) - _blur(x, s, spec_23)).abs().max().item()
    ka = torch_path.gaussian_kernels(s, torch_path.blur_radii(s, spec_auto), 11)[0]
    kf = torch_path.gaussian_kernels(s, torch_path.blur_radii(s, spec_23), 11)[0]
    bound = (ka[:, None] * ka[None] - kf[:, None] * kf[None]).abs().sum().item()
    measured = {0.5: 1e-6, 1.0: 2.6e-4, 1.5: 2.6e-4, 2.0: 1.4e-3}[sigma]
    assert diff <= bound + 1e-6 and diff <= measured
    assert bound <= 4.1e-3


def test_engine_config_default_and_validation():
    from engine.errors import UserError
    from engine.settings import DataConfig, SimCLRViewConfig
    from engine.stages.views import simclr_spec

    views = SimCLRViewConfig()
    assert views.blur_kernel_size == 0
    views.validate("pretrain.views")
    for bad in (4, -1):
        with pytest.raises(UserError, match="blur_kernel_size"):
            SimCLRViewConfig(blur_kernel_size=bad).validate("pretrain.views")
    data = DataConfig(image_size=32)
    assert simclr_spec(data, views).blur_kernel_size == 0
    assert simclr_spec(data, SimCLRViewConfig(blur_kernel_size=63)).blur_kernel_size == 63
    with pytest.raises(UserError, match="too large"):
        simclr_spec(data, SimCLRViewConfig(blur_kernel_size=65))


@pytest.mark.parametrize("name", ["imagenet30_badnets_dbd", "imagenet100_badnets_dbd"])
def test_imagenet_presets_follow_the_reference_blur(name):
    from pathlib import Path

    from engine.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "imagenet" / f"{name}.yaml"
    assert load_config(path).pretrain.views.blur_kernel_size == 0
