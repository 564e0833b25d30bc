"""Image cleaning rules (data/cleaning.py) not covered with the folder and shard readers in test_images.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cm3leon_lightning.data.cleaning import load_image, to_rgb


@pytest.mark.parametrize(
    ("key", "want"),
    [
        (65535, [0, 1, 1, 4, 156, 255]),  # white was transparent: it stays white, and nothing else turns white
        (1000, [0, 1, 1, 255, 156, 255]),
        (255, [0, 1, 255, 4, 156, 255]),
        (0, [255, 1, 1, 4, 156, 255]),
    ],
)
def test_a_16_bit_grey_transparent_value_is_matched_at_full_depth(key: int, want: list[int]) -> None:
    """A 16-bit grey PNG's tRNS value was matched after ``convert("RGBA")`` clipped the grey to 8 bits: with 65535 (a
    white background) or 255 every pixel >= 255 turned white (the mid grey 40000 too), and 1000 matched no pixel, so
    the transparent one kept its grey (4). Only the pixels of exactly that value are transparent (white) now."""
    grey = np.array([[0, 200, 255, 1000, 40000, 65535]], np.uint16)  # v / 257: 0 1 1 4 156 255
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG", transparency=key)
    png = Image.open(io.BytesIO(buf.getvalue()))
    assert (png.mode, png.info["transparency"]) == ("I;16", key)
    assert np.asarray(to_rgb(png))[0, :, 0].tolist() == want
    image, repairs = load_image(buf.getvalue(), min_size=1)
    assert np.asarray(image)[0].tolist() == [[v, v, v] for v in want] and repairs == ["repaired_image_mode"]
