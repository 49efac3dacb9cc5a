"""Blended with an image pattern against the DBD reference's own recipe, done in PIL:
``pattern.resize(image.size, filter)`` then ``Image.blend(image, pattern, alpha)``.

The images are scikit-learn's two bundled photos (one the image, the other the
pattern), at the CIFAR frame and at a non-square one, so both resize directions and
every filter are exercised on real content."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.attacks.base import AttackContext
from engine.attacks.triggers.blended import Blended, BlendedConfig
from engine.attacks.ops import compiled_kernel
from engine.errors import UserError

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return china, flower


def _context(frame):
    return AttackContext(frame=frame, plan=None, train=True, run_dir=None, meta={}, seed=0)


def _pil_reference(image: np.ndarray, pattern_file, alpha: float, resample: str) -> np.ndarray:
    img = Image.fromarray(image)
    with Image.open(pattern_file) as f:
        pattern = f.convert("RGB").resize(img.size, FILTERS[resample])
    return np.asarray(Image.blend(img, pattern, alpha))


@pytest.mark.parametrize("frame", [(32, 32), (40, 56)])
@pytest.mark.parametrize("resample", sorted(FILTERS))
@pytest.mark.parametrize("alpha", [0.1, 0.2])  # DBD, BackdoorBench
def test_image_pattern_equals_pil_resize_then_blend(photos, tmp_path, frame, resample, alpha):
    china, flower = photos
    pattern_file = tmp_path / "pattern.png"
    Image.fromarray(flower).save(pattern_file)
    h, w = frame
    # The image at the frame size, made with PIL so it is a real photo's pixels.
    image = np.asarray(Image.fromarray(china).resize((w, h), Image.BICUBIC))
    expected = _pil_reference(image, pattern_file, alpha, resample)

    attack = Blended.from_config(BlendedConfig(alpha=alpha, pattern=str(pattern_file), resample=resample),
                                 _context(frame))
    out = attack.apply(image[None].copy(), np.array([0]))[0]
    assert np.array_equal(out, expected)
    # The numba kernel the FFCV pipeline runs, on the same window.
    window = image.copy()
    compiled_kernel(attack)(window, 0)
    assert np.array_equal(window, expected)


def test_filters_give_different_patterns(photos, tmp_path):
    """The option is not ignored: each filter changes the poisoned pixels."""
    _, flower = photos
    pattern_file = tmp_path / "pattern.png"
    Image.fromarray(flower).save(pattern_file)
    patterns = {r: Blended.from_config(BlendedConfig(pattern=str(pattern_file), resample=r), _context((32, 32))).pattern
                for r in FILTERS}
    assert not np.array_equal(patterns["bicubic"], patterns["bilinear"])
    assert not np.array_equal(patterns["bicubic"], patterns["nearest"])


def test_missing_pattern_names_the_file_and_where_to_get_it(tmp_path):
    missing = tmp_path / "trigger" / "hello_kitty.png"
    with pytest.raises(UserError) as e:
        Blended.from_config(BlendedConfig(pattern=str(missing)), _context((32, 32)))
    message = str(e.value)
    assert str(missing) in message and "SCLBD/DBD" in message and "\n" not in message


def test_unknown_resample_is_refused():
    with pytest.raises(UserError, match="attack.blended.resample"):
        BlendedConfig(resample="lanczos").validate()
