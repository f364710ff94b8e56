"""A generated ImageFolder for tests: a few classes told apart by colour and stripes, varied sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "stripes")


def make_imagefolder(
    root: Path, *, n_train: int = 24, n_test: int = 8, size: tuple[int, int] = (64, 64), vary: bool = True
) -> Path:
    """root/train/<class>/*.png|jpg and root/test/<class>/*; image sizes vary around ``size`` when ``vary``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size
                if vary:
                    h, w = h + int(rng.integers(0, 17)), w + int(rng.integers(0, 33))
                img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                img[..., c] += 150  # the class's channel is bright
                if name == "stripes":
                    img[:, ::8] = 255
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(img).save(d / f"{i:03d}.{ext}", quality=95)
    return root
