"""A user's image folder (one subfolder per class, PNG or JPEG) → fixed-size uint8 tensors.

Pixels are brought to size by ``serving.images.fit_pixels``, the function the
service applies to uploads, so a served image is preprocessed exactly as in
training (the one place ``pipelines`` reads from ``serving``: a pure PIL/numpy
function, no BentoML or onnxruntime).

Images are decoded in parallel straight into a memory-mapped array in a scratch
directory, so a folder far larger than RAM ingests with a small, flat footprint.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.data.raw import Problem, RawDataset
from pipelines.errors import FluxoError

if TYPE_CHECKING:
    from pipelines.settings import ImageSettings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHUNK = 2_048  # images per worker task


def scan(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[Problem]]:
    """Classes (sorted subfolder names), (file, class index) pairs in a stable order, and problems.

    Only a folder without class subfolders fails here (nothing else could be checked); empty
    classes and non-image files are left to validation, which reports them all together.
    """
    if not root.is_dir():
        raise FluxoError(f"{root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FluxoError(f"{root}: no class subfolders; lay images out as {root}/<class>/<image>.png")
    files: list[tuple[Path, int]] = []
    not_images: list[str] = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, index))
            else:
                not_images.append(str(path))
    problems = []
    if not_images:
        problems.append(Problem("corrupt", "not a PNG or JPEG file", not_images))
    return classes, files, problems


def _unreadable() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file it cannot decode; caught per file so one bad image (a truncated
    PNG, a decompression bomb) is reported with the rest by validation instead of ending the ingest."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError)


def _decode_chunk(args: tuple[list[str], str, int, int, tuple[int, int], str, int]) -> list[str]:
    """Decode files into rows ``offset..`` of the shared memory map; return the paths that failed."""
    from PIL import Image

    from serving.images import fit_pixels  # the service decodes uploads with the same function

    paths, array_path, offset, total, size, policy, channels = args
    out = np.lib.format.open_memmap(array_path, mode="r+")
    failed = []
    mode = "L" if channels == 1 else "RGB"
    for row, path in enumerate(paths, start=offset):
        try:
            with Image.open(path) as image:
                image.load()
                out[row] = fit_pixels(image, mode, size, policy)
        except _unreadable():
            failed.append(path)
    out.flush()
    return failed


def _detect_channels(files: list[tuple[Path, int]]) -> int:
    """1 if every readable image is grayscale (checks headers only, no decoding), else 3."""
    from PIL import Image

    for path, _ in files:
        try:
            with Image.open(path) as image:
                if image.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except _unreadable():
            continue
    return 1


def load_image_folder(root: Path, settings: "ImageSettings", scratch: Path) -> RawDataset:
    """Decode every image of ``root`` into a uint8 memory map under ``scratch``; report unreadable files."""
    from pipelines.settings import dataset_display_name

    classes, files, problems = scan(root)
    channels = _detect_channels(files) if settings.channels == "auto" else int(settings.channels)
    height, width = settings.size
    array_path = scratch / "decoded.npy"
    decoded = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(len(files), channels, height, width))
    del decoded
    tasks = [
        ([str(p) for p, _ in files[i : i + _CHUNK]], str(array_path), i, len(files), (height, width), settings.resize, channels)
        for i in range(0, len(files), _CHUNK)
    ]
    failed: list[str] = []
    workers = min(os.cpu_count() or 1, max(1, len(tasks)))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(_decode_chunk, tasks):
                failed.extend(result)
    else:
        for task in tasks:
            failed.extend(_decode_chunk(task))
    if failed:
        problems.append(Problem("corrupt", "unreadable or corrupt image", failed))
    failed_set = set(failed)
    readable = np.array([str(p) not in failed_set for p, _ in files], dtype=bool)
    x = np.load(array_path, mmap_mode="r")
    y = np.array([label for _, label in files], dtype=np.int64)
    log.info("decoded %d images from %s into %d classes (%d unreadable)", int(readable.sum()), root, len(classes), len(failed))
    return RawDataset(
        name=dataset_display_name(str(root)),
        kind="image",
        x=x,
        y=y,
        labels=classes,
        ids=[str(p.relative_to(root)) for p, _ in files],
        description=f"image folder {root}",
        preprocessing={"size": [height, width], "channels": channels, "resize": settings.resize, "dtype": "uint8"},
        problems=problems,
        readable=readable,
    )
