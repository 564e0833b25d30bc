"""The files ``cm3leon generate`` reads and writes besides the model: ``--image`` in; ``--out`` checked, emptied of an
earlier run's outputs with ``--overwrite``, and written (``sample-{i}.png``, ``grid.png``, ``codes.npy``).

Split from :mod:`cm3leon_lightning.generation.cli` (which re-exports these names) so each file reads in one sitting.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # PIL is imported lazily, where images are written
    from PIL import Image


OUTPUT_NAME = re.compile(r"sample-\d+\.png|grid\.png|codes\.npy|retrieved\.json|scores\.json|answer\.txt|answers\.json")
"""The names ``cm3leon generate`` writes into ``--out`` (any other file there is not its own)."""


def previous_outputs(out: Path) -> list[Path]:
    """The files of an earlier ``cm3leon generate`` run in ``out``, sorted by name (none if it is absent)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.is_file() and OUTPUT_NAME.fullmatch(p.name))


def check_out(out: Path, overwrite: bool) -> None:
    """Raise ValueError naming ``--out`` and a few of its files when it holds an earlier run's outputs and
    ``overwrite`` is not set: a run with fewer samples would leave stale ``sample-{i}.png`` beside its own; or when
    ``out`` is a file (it failed with a traceback once the model had been loaded)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a directory")
    earlier = previous_outputs(out)
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
        raise ValueError(
            f"--out: {out} already holds {len(earlier)} file{'s' * (len(earlier) > 1)} of an earlier generate run "
            f"({names}); give a new or empty directory, or --overwrite to delete them first"
        )


def start_writing(args: argparse.Namespace, out: Path) -> None:
    """Before the first file of this run is written: with ``--overwrite``, delete the earlier run's outputs (only
    the names of :data:`OUTPUT_NAME`; other files of the user stay), once."""
    if args.overwrite:
        for earlier in previous_outputs(out):
            earlier.unlink()
        args.overwrite = False  # done: the files written next are this run's


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(C, H, W)`` float image in ``[-1, 1]`` -> ``PIL.Image``."""
    from PIL import Image

    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def drawable_text(text: str) -> str:
    """``text`` as PIL's default font can draw it: unchanged where that is a FreeType font; where it is the Latin-1
    bitmap font (Pillow 10.0, or a build without FreeType), other characters as ``?`` (drawing them raised
    ``UnicodeEncodeError``, after the images were decoded)."""
    from PIL import ImageFont

    if isinstance(ImageFont.load_default(), ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def save_grid(images: torch.Tensor, caption: str, path: Path, pad: int = 4) -> Image.Image:
    """Write candidates ``(N, C, H, W)`` side by side under a strip holding ``caption`` on one line (its line breaks
    drawn as spaces; in PIL's default font, where that is its Latin-1 bitmap font other characters show as ``?``);
    returns the PIL image."""
    from PIL import Image, ImageDraw

    caption = drawable_text(" ".join(caption.split()))  # a prompt's newline drew a second line over the tiles
    tiles = [to_pil(im).convert("RGB") for im in images]
    w, h = tiles[0].size
    strip = 14
    grid = Image.new("RGB", (len(tiles) * (w + pad) + pad, h + 2 * pad + strip), "white")
    ImageDraw.Draw(grid).text((pad, 1), caption, fill="black")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (pad + i * (w + pad), strip + pad))
    grid.save(path)
    return grid


def load_image(path: str | Path, vqgan: torch.nn.Module) -> torch.Tensor:
    """Read an image file, centre-crop and resize to the VQGAN's resolution; ``(1, 3, R, R)`` uint8."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--image: file not found: {p}")
    try:
        with Image.open(p) as img:
            return square_image(img, vqgan.config.resolution)[None]  # type: ignore[union-attr]
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"--image: {p} is not an image this machine can read ({e})") from e


def square_image(img: Image.Image, resolution: int) -> torch.Tensor:
    """A PIL image as RGB (as ``cm3leon prepare`` converts training images: 16-bit grey scaled to 8 bits, transparent
    pixels white), centre-cropped to a square and resized (bicubic) to ``resolution``; ``(3, R, R)`` uint8."""
    from PIL import Image

    from cm3leon_lightning.data.cleaning import to_rgb

    img = to_rgb(img)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def write_images(out: Path, codes: torch.Tensor, images: torch.Tensor | None, caption: str) -> None:
    """Write ``codes.npy`` ``(N, h*w)`` and, with images ``(N, C, H, W)``, ``sample-{i}.png`` and ``grid.png``."""
    np.save(out / "codes.npy", codes.cpu().numpy().astype(np.int32))
    if images is None:
        print(f"wrote {out / 'codes.npy'} (no --vqgan: no PNGs)")
        return
    for i, im in enumerate(images):
        to_pil(im).save(out / f"sample-{i}.png")
    save_grid(images, caption, out / "grid.png")
    print(f"wrote {len(images)} samples and grid.png to {out}")
