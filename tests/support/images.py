"""A random PNG, base64-encoded, as a serving request carries an image."""

import base64
import io

import numpy as np
from PIL import Image


def png_base64(seed: int, size: int = 20) -> str:
    """A random RGB PNG, base64-encoded as a request carries it."""
    arr = np.random.default_rng(seed).integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
