"""Builders of tiny datasets in each real on-disk format (CIFAR pickles, GTSRB PPM+CSV, JPEG trees)."""
from __future__ import annotations

import csv
import pickle
import tarfile
from pathlib import Path

import numpy as np



def write_cifar_folder(root: Path, n_per_batch: int = 12, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder in the real release's pickle layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x,
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)]}, f, protocol=2)
        all_x.append(x)
        all_y.append(np.asarray(y))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": n_per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    images = np.concatenate(all_x).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return folder, images, np.concatenate(all_y)


def tar_folder(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def sample_photo_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """Real JPEG photos (scikit-learn's bundled samples), cropped to assorted sizes."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        top, left = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        out.append(np.ascontiguousarray(img[top:top + h, left:left + w]))
    return out


def write_gtsrb(root: Path, classes: int = 3, per_class: int = 4, n_test: int = 6) -> Path:
    from PIL import Image

    crops = sample_photo_crops(classes * per_class + n_test, seed=1)
    train = root / "Final_Training" / "Images"
    k = 0
    for c in range(classes):
        d = train / f"{c:05d}"
        d.mkdir(parents=True)
        with open(d / f"GT-{c:05d}.csv", "w", newline="") as f:
            w = csv.writer(f, delimiter=";")
            w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
            for i in range(per_class):
                img = crops[k]
                k += 1
                name = f"{i:05d}_00000.ppm"
                Image.fromarray(img).save(d / name)
                w.writerow([name, img.shape[1], img.shape[0], 1, 1, img.shape[1] - 1, img.shape[0] - 1, c])
    test = root / "Final_Test" / "Images"
    test.mkdir(parents=True)
    with open(test / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for i in range(n_test):
            img = crops[k]
            k += 1
            name = f"{i:05d}.ppm"
            Image.fromarray(img).save(test / name)
            w.writerow([name, img.shape[1], img.shape[0], 1, 1, img.shape[1] - 1, img.shape[0] - 1, i % classes])
    return root


def write_imagefolder(root: Path, classes=("cat", "dog", "fish"), per_class: int = 3) -> Path:
    from PIL import Image

    crops = sample_photo_crops(2 * len(classes) * per_class, seed=2)
    k = 0
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(crops[k]).save(d / f"{i}.jpg", quality=95)
                k += 1
    return root


def write_pattern_cifar(root: Path, n_per_batch: int = 40, seed: int = 0):
    """A CIFAR-format folder whose classes are stripe patterns (ten orientations) plus
    noise: an easy case that any backbone separates, colour-augmented or not, so that
    label noise (the poisoned samples) stands out by its loss."""
    rng = np.random.default_rng(seed)
    folder, _, _ = write_cifar_folder(root, n_per_batch=n_per_batch, seed=seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        y = np.asarray(d[b"labels"])
        theta = np.pi * y / 10
        phase = rng.uniform(0, 2 * np.pi, size=len(y))
        wave = np.sin((np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy) * 0.8
                      + phase[:, None, None])
        img = 128 + 90 * wave[:, None] + rng.normal(0, 10, size=(len(y), 3, 32, 32))
        d[b"data"] = np.clip(img, 0, 255).astype(np.uint8).reshape(len(y), -1)
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return folder


PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
           [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]]


def write_color_cifar(root: Path, n_per_batch: int = 40, seed: int = 0):
    """A CIFAR-format folder whose classes are flat colours plus noise: a planted easy
    case in which the class can be read off the mean colour, so label noise (the
    poisoned samples) stands out by its loss under a colour oracle."""
    rng = np.random.default_rng(seed)
    folder, _, _ = write_cifar_folder(root, n_per_batch=n_per_batch, seed=seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        y = np.asarray(d[b"labels"])
        img = np.asarray(PALETTE)[y][:, :, None, None] + rng.normal(0, 12, size=(len(y), 3, 32, 32))
        d[b"data"] = np.clip(img, 0, 255).astype(np.uint8).reshape(len(y), -1)
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return folder


def prepared_color_cifar(base: Path, n_per_batch: int) -> Path:
    """``write_color_cifar`` under ``base``, prepared as ``dbd prepare cifar10`` stores it."""
    from engine.data.prepare import prepare

    folder = write_color_cifar(base / "src", n_per_batch=n_per_batch)
    prepare("cifar10", str(folder), base / "beton", progress=False)
    return base / "beton"

def write_cifar100_folder(root: Path, n_train: int = 200, n_test: int = 40, seed: int = 0):
    """A cifar-100-python folder in the real release's pickle layout (``train``, ``test``,
    ``meta``; keys ``data``, ``fine_labels``, ``coarse_labels``, ``filenames``). Every fine
    class appears in ``train`` (n_train >= 100). Returns (folder, {split: (images NHWC,
    fine, coarse)}, fine names, coarse names)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    coarse_of = rng.permutation(np.arange(100) % 20)  # each fine class has one superclass
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        coarse = coarse_of[fine]
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
                         b"data": x}, f, protocol=2)
        out[name] = (x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine, coarse)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in fine_names],
                     b"coarse_label_names": [n.encode() for n in coarse_names]}, f, protocol=2)
    return folder, out, fine_names, coarse_names


TINY_WNIDS = ("n02124075", "n01443537", "n04067472")  # wnids.txt order, deliberately not sorted


def write_tinyimagenet(root: Path, wnids=TINY_WNIDS, per_class: int = 4, per_class_val: int = 2,
                       grey: int = 1) -> Path:
    """A tiny-imagenet-200 folder in the release layout: wnids.txt, words.txt,
    train/<wnid>/images/<wnid>_<n>.JPEG + <wnid>_boxes.txt, val/images/val_<k>.JPEG +
    val/val_annotations.txt, an unlabelled test/images. Real JPEGs (64x64 photo crops),
    the first ``grey`` of each class in greyscale, as some of the release's are."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(3)
    photos = load_sample_images().images

    def crop(k: int) -> np.ndarray:
        img = photos[k % len(photos)]
        t, left = int(rng.integers(0, img.shape[0] - 64)), int(rng.integers(0, img.shape[1] - 64))
        return np.ascontiguousarray(img[t:t + 64, left:left + 64])

    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\tthing {i}, item {i}\n"
                                                                     for i, w in enumerate(wnids)))
    k = 0
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        # Written out of numeric order (10 before 2) so the reader's order is tested.
        for i in sorted(range(per_class), key=str):
            img = Image.fromarray(crop(k))
            k += 1
            (img.convert("L") if i < grey else img).save(d / f"{w}_{i}.JPEG", quality=90)
        (root / "train" / w / f"{w}_boxes.txt").write_text(
            "".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(per_class_val * len(wnids)):
        w = wnids[(j * 2) % len(wnids)]
        Image.fromarray(crop(k)).save(root / "val" / "images" / f"val_{j}.JPEG", quality=90)
        k += 1
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "test" / "images").mkdir(parents=True)
    Image.fromarray(crop(k)).save(root / "test" / "images" / "test_0.JPEG")
    return root
