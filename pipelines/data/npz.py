"""An NPZ archive of arrays, opened the one way training's reader and batch prediction's both need."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.errors import FluxoError


def read_npz(path: Path, instances: str) -> dict[str, np.ndarray]:
    """Every array of the archive, by name; ``x`` must be one. ``instances`` says what ``x`` holds, for the fix.

    Pickled objects are refused (``allow_pickle=False``): a file from elsewhere runs no code here.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise FluxoError(f"{path}: not a readable NPZ file ({error})") from error
    with archive:
        if "x" not in archive:
            raise FluxoError(f"{path}: no array 'x'; arrays are {', '.join(archive.files)}; save the {instances} as 'x'")
        return {name: archive[name] for name in archive.files}
