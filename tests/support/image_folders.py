"""A folder of own images for ``data.dataset=folder`` tests: images at several depths among files that are not."""

from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n: int = 6) -> list[Path]:
    """``n`` small PNG/JPEG images at several depths, plus files that are not images or are hidden."""
    paths = []
    for i in range(n):
        folder = root / ("a" if i % 2 else "b/c/d") / f"batch{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.{'JPG' if i % 3 == 0 else 'png'}"
        Image.fromarray(np.full((20, 24, 3), (37 * i) % 256, dtype=np.uint8)).save(
            path, format="JPEG" if i % 3 == 0 else "PNG"
        )
        paths.append(path)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / ".thumbnails" / "x.png")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "a" / "._hidden.png")
    return paths
