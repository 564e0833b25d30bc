"""``cm3leon fid``: zero-shot text-to-image FID (paper section 3.2, table 1) of images written by ``cm3leon predict``.

:class:`~cm3leon_lightning.callbacks.FIDCallback` generates and scores inside one ``cm3leon validate`` job; this
command splits the protocol into steps that each resume or rerun on their own. ``prompts`` writes the evaluation
captions exactly as the callback selects them (the first ``--num-samples`` distinct images of the prepared shards, in
manifest order, each with its first caption); ``cm3leon predict`` draws them on any number of GPUs (resumably, and
with ``--trainer.callbacks.clip ViT-B-32 --trainer.callbacks.keep 1`` keeping the CLIP-best of the candidates);
``score`` compares those images with the captions' source images with the callback's resize rule, metric and
reference-statistics cache (a cache written by the callback is reused, and the other way round). MS-COCO FID-30K::

    cm3leon fid prompts --data data/coco_val2014_shards --num-samples 30000 --out coco30k.jsonl
    cm3leon predict ... --data.prompts coco30k.jsonl --trainer.callbacks.output_dir out/ \\
        --trainer.callbacks.clip ViT-B-32 --trainer.callbacks.keep 1 --model.init_args.generation.num_samples 8
    cm3leon fid score --generated out/ --data data/coco_val2014_shards --num-samples 30000 --cache-dir cache/fid

``score`` checks that ``out/predictions.jsonl`` holds prompts ``0 .. N-1`` with the reference captions (naming the
first index that does not), takes each prompt's ``files[--candidate]`` (0: the best, with re-ranking), and prints the
FID. Offline, give ``--feature-weights`` (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``);
``--feature-extractor module:Class`` replaces Inception by any module mapping uint8 ``(N, 3, H, W)`` to ``(N, d)``.
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cm3leon_lightning.files import jsonl_values, write_text_whole

PROG = "cm3leon fid"


def warn(message: str) -> None:
    """Print a one-line warning to stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def select_references(data: str, num_samples: int, image_size: int | None = None) -> list[Any]:
    """FIDCallback's evaluation set: ``read_shard_samples`` with its arguments (distinct images, first caption
    first); with ``image_size`` the images are decoded and resized as the callback does.

    Raises:
        FileNotFoundError: no prepared shards at ``data``.
        ValueError: ``num_samples`` < 2, fewer than 2 images, or a blank caption (its sample key named).
    """
    from cm3leon_lightning.callbacks.base import read_shard_samples
    from cm3leon_lightning.data.cleaning import model_text

    if num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 (FID needs two images), got {num_samples}")
    samples, _ = read_shard_samples(data, num_samples, image_size)
    if len(samples) < 2:
        raise ValueError(f"--data: {data} holds {len(samples)} images; FID needs >= 2")
    for s in samples:
        model_text(s.references[0], f"--data: {data}: sample {s.key!r}", "its caption")
    if len(samples) < num_samples and image_size is None:
        warn(f"--num-samples {num_samples} but {data} holds {len(samples)} distinct images; using {len(samples)}")
    return samples


def check_source_images(data: str) -> None:
    """Raise ValueError when the first sample of ``data`` keeps no source image (``jpg``): ``score`` compares the
    generated images with them, and without them the captions are not even grouped by image (cheap: one image)."""
    from cm3leon_lightning.callbacks.base import read_shard_samples

    try:
        read_shard_samples(data, 1, image_size=1)
    except ValueError as e:
        if "has no jpg" not in str(e):
            raise ValueError(f"--data: {e}") from e
        raise ValueError(
            f"--data: {data} keeps no source images ({e}); FID compares the generated images with them"
        ) from e


def write_prompts(data: str, num_samples: int, out: str, overwrite: bool = False) -> int:
    """Write the evaluation captions as a ``cm3leon predict`` prompts file (``{"prompt": ...}`` per line); returns
    the number written.

    Raises:
        ValueError: ``out`` does not end in ``.jsonl``, or exists and ``overwrite`` is False; ``data`` keeps no source
            images (:func:`check_source_images`).
    """
    path = Path(out)
    if path.suffix != ".jsonl":
        raise ValueError(f"--out: {out} must end in .jsonl (cm3leon predict reads a prompts file by its suffix)")
    if path.exists() and not overwrite:
        raise ValueError(f"--out: {out} already exists; give --overwrite to replace it")
    check_source_images(data)
    samples = select_references(data, num_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, "".join(json.dumps({"prompt": s.references[0]}) + "\n" for s in samples))
    return len(samples)


def read_predictions(generated: str) -> tuple[Path, dict[int, tuple[int, dict[str, Any]]]]:
    """``generated/predictions.jsonl`` -> (its path, ``index -> (line number, row)``).

    Raises:
        FileNotFoundError: no ``predictions.jsonl`` in ``generated``.
        ValueError: a stopped predict run (its part files, no ``predictions.jsonl``), a line that is not a prediction
            (file and line named), or an index given twice.
    """
    from cm3leon_lightning.generation.predict import PREDICTIONS_FILE

    path = Path(generated) / PREDICTIONS_FILE
    parts = sorted(Path(generated).glob("predictions.rank*.jsonl"))
    if not path.is_file() and parts:
        raise ValueError(
            f"--generated: {generated} holds {parts[0].name} but no {PREDICTIONS_FILE}: its cm3leon predict run "
            "stopped before it finished; run it again with --trainer.callbacks.resume true"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"--generated: no {PREDICTIONS_FILE} in {generated} (the output_dir of a finished cm3leon predict run)"
        )
    rows: dict[int, tuple[int, dict[str, Any]]] = {}
    for n, row in jsonl_values(path):
        index = row.get("index") if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path} line {n} is not a prediction (an object with an integer 'index' and a 'prompt')")
        if index in rows:
            raise ValueError(f"{path} lines {rows[index][0]} and {n} both hold prompt {index}")
        rows[index] = (n, row)
    return path, rows


def generated_files(generated: str, references: Sequence[Any], candidate: int, data: str) -> list[Path]:
    """The image of each reference caption, in order: ``files[candidate]`` of prediction ``i``.

    Raises:
        ValueError: a missing index, a prompt that is not the reference caption, or no ``files[candidate]``.
        FileNotFoundError: an image file is missing.
    """
    path, rows = read_predictions(generated)
    out: list[Path] = []
    for i, ref in enumerate(references):
        if i not in rows:
            raise ValueError(
                f"{path} has no prediction for prompt {i} (it holds {len(rows)} lines; {len(references)} are needed): "
                "finish the predict run (--trainer.callbacks.resume true), or lower --num-samples"
            )
        n, row = rows[i]
        caption = ref.references[0]
        if row["prompt"] != caption:
            raise ValueError(
                f"{path} line {n}: prompt {i} is {row['prompt'][:80]!r} but reference caption {i} of {data} is "
                f"{caption[:80]!r}: the predict run read another prompts file (write it with cm3leon fid prompts "
                "and the same --data)"
            )
        files = row.get("files")
        if not isinstance(files, list) or not candidate < len(files) or not isinstance(files[candidate], str):
            have = len(files) if isinstance(files, list) else 0
            raise ValueError(
                f"{path} line {n}: prompt {i} has {have} image files, no files[{candidate}] (--candidate; a predict "
                "run with keep=K writes the best K only, and one without a VQGAN codes only)"
            )
        image = Path(generated) / files[candidate]
        if not image.is_file():
            raise FileNotFoundError(f"{path} line {n}: prompt {i}'s image {image} is missing")
        out.append(image)
    if len(rows) > len(references):
        print(f"{path}: {len(rows) - len(references)} predictions past the first {len(references)} are not scored")
    return out


def load_extractor(spec: str) -> nn.Module:
    """``module:Name`` -> the module: ``Name`` (dots allowed) is an ``nn.Module`` or is called without arguments.

    Raises:
        ValueError: the path cannot be imported or does not give an ``nn.Module``.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--feature-extractor must be module:Class, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for name in attr.split("."):
            obj = getattr(obj, name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--feature-extractor {spec}: cannot import it ({type(e).__name__}: {e})") from e
    extractor = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"--feature-extractor {spec} gives a {type(extractor).__name__}, not a torch nn.Module")
    return extractor.eval()


def build_metric(args: argparse.Namespace) -> Any:
    """The callback's ``make_fid`` from the flags; its errors name the flags to use (``--feature-weights`` with the file
    when that file is missing or holds no Inception weights)."""
    from cm3leon_lightning.metrics.fid import make_fid

    if args.feature_extractor is not None:
        if args.feature_weights is not None or args.feature_dim is not None:
            raise ValueError("--feature-extractor replaces Inception: give it without --feature-weights/--feature-dim")
        return make_fid(load_extractor(args.feature_extractor))
    try:
        return make_fid(None, args.feature_weights, 2048 if args.feature_dim is None else args.feature_dim)
    except (FileNotFoundError, RuntimeError) as e:  # weights neither on disk nor downloadable, or no torch-fidelity
        if str(e).startswith("feature_weights_path:"):  # the file given is missing or holds no Inception weights
            raise ValueError("--feature-weights" + str(e).removeprefix("feature_weights_path")) from e
        raise ValueError(f"{e} (here: --feature-weights FILE or --feature-extractor module:Class)") from e


def load_cached(cache: Path, metric: Any, count: int) -> bool:
    """Put cached reference statistics into ``metric`` as FIDCallback does; False (with a warning, the metric
    unchanged) when the file cannot be read or does not hold ``count`` finite images' sums."""
    from cm3leon_lightning.metrics.fid import load_cached_real_stats

    reason = load_cached_real_stats(cache, metric, count)
    if reason is not None:
        warn(f"ignoring the reference-statistics cache {cache} ({reason}); recomputing it")
    return reason is None


def read_image(path: Path, image_size: int, sizes: dict[tuple[int, int], Path] | None = None) -> torch.Tensor:
    """A generated image file -> uint8 ``(3, image_size, image_size)`` by :func:`~cm3leon_lightning.metrics.fid_resize`
    (raises ValueError naming the file when it is not an image); ``sizes`` records its ``(width, height)`` (the first
    file of each size)."""
    from PIL import Image, UnidentifiedImageError

    from cm3leon_lightning.metrics.fid import fid_resize

    try:
        with Image.open(path) as image:
            image.load()
            if sizes is not None:
                sizes.setdefault(image.size, path)
            return fid_resize(image, image_size)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e})") from e


def check_sizes(sizes: dict[tuple[int, int], Path], image_size: int) -> None:
    """Warn when generated images (``(width, height)`` -> a file of that size) are not all ``image_size`` square:
    they were resized as the reference images are, and images of several sizes come from several runs or models."""
    other = {size: path for size, path in sizes.items() if size != (image_size, image_size)}
    if not other:
        return
    listed = ", ".join(f"{w}x{h} ({path})" for (w, h), path in sorted(other.items())[:3])
    several = f"; they have {len(sizes)} sizes: do they come from one run?" if len(sizes) > 1 else ""
    warn(
        f"generated images of {listed}{' ...' if len(other) > 3 else ''} are not --image-size {image_size}: "
        f"resized to it as the reference images are (shorter side, then centre crop){several}"
    )


def score(args: argparse.Namespace) -> dict[str, Any]:
    """``cm3leon fid score``: the FID and what it was computed from (see the module docstring)."""
    from cm3leon_lightning.callbacks.base import batches
    from cm3leon_lightning.callbacks.fid import reference_images_id
    from cm3leon_lightning.metrics.fid import real_stats, reference_cache_path, save_real_stats

    if args.candidate < 0 or args.batch_size < 1 or args.image_size < 1:
        raise ValueError(
            f"--candidate must be >= 0, --batch-size and --image-size >= 1; got {args.candidate}, "
            f"{args.batch_size}, {args.image_size}"
        )
    if args.json is not None and Path(args.json).is_dir():
        raise ValueError(f"--json: {args.json} is a directory; give the JSON file to write")
    if args.json is not None and Path(args.json).exists() and not args.overwrite:
        raise ValueError(f"--json: {args.json} already exists; give --overwrite to replace it")
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise ValueError(f"--cache-dir: {args.cache_dir} is not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    files = generated_files(args.generated, select_references(args.data, args.num_samples), args.candidate, args.data)
    metric = build_metric(args).to(device)
    samples = select_references(args.data, args.num_samples, args.image_size)
    n, dims = len(samples), int(metric.real_features_sum.shape[0])
    if n <= dims:
        warn(
            f"{n} images for {dims} features: the covariances are singular, so the FID is biased upward; compare it "
            "only with runs of the same count"
        )
    cache = (
        None if args.cache_dir is None else reference_cache_path(args.cache_dir, reference_images_id(samples), metric)
    )
    loaded = cache is not None and cache.is_file() and load_cached(cache, metric, n)
    if not loaded:
        for chunk in batches(samples, args.batch_size):
            metric.update(torch.stack([s.image for s in chunk]).to(device), real=True)
        if cache is not None:
            try:
                save_real_stats(cache, real_stats(metric))
            except OSError as e:  # a full disk: the FID is still computed, the next run recomputes the statistics
                warn(f"could not write the reference-statistics cache {cache} ({e}); the FID does not need it")
                cache = None
    del samples  # the reference images: 30K of them at 256 px are 5.9 GB
    sizes: dict[tuple[int, int], Path] = {}
    for chunk in batches(files, args.batch_size):
        metric.update(torch.stack([read_image(p, args.image_size, sizes) for p in chunk]).to(device), real=False)
    check_sizes(sizes, args.image_size)
    feature = args.feature_extractor or f"inception-{2048 if args.feature_dim is None else args.feature_dim}"
    return {
        "fid": float(metric.compute()),
        "num_samples": n,
        "candidate": args.candidate,
        "image_size": args.image_size,
        "feature": feature,
        "generated": str(args.generated),
        "data": str(args.data),
        "reference_cache": None if cache is None else str(cache),
        "reference_cache_loaded": bool(loaded),
    }


def build_parser() -> argparse.ArgumentParser:
    """The ``cm3leon fid`` argument parser (subcommands ``prompts`` and ``score``)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{prompts,score}")
    data_help = "prepared shards that keep the source jpg (directory or manifest.json), e.g. COCO val2014"
    n_help = "captions / reference images: the first N distinct images in manifest order (FIDCallback's num_samples)"
    pr = sub.add_parser(
        "prompts",
        help="write the evaluation captions as a cm3leon predict prompts file",
        description="Write FIDCallback's evaluation captions as a prompts file for cm3leon predict.",
    )
    pr.add_argument("--data", required=True, help=data_help)
    pr.add_argument("--num-samples", type=int, required=True, help=n_help)
    pr.add_argument("--out", required=True, help='the prompts file to write (.jsonl, one {"prompt": ...} per line)')
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sc = sub.add_parser(
        "score",
        help="FID of a cm3leon predict output directory against the reference images",
        description="FID between the images of a cm3leon predict run and the captions' source images.",
    )
    sc.add_argument("--generated", required=True, help="output_dir of cm3leon predict (holds predictions.jsonl)")
    sc.add_argument("--data", required=True, help=data_help + " (the one given to cm3leon fid prompts)")
    sc.add_argument("--num-samples", type=int, required=True, help=n_help)
    sc.add_argument(
        "--candidate", type=int, default=0, help="which of each prompt's files (0: the best when re-ranked)"
    )
    sc.add_argument("--image-size", type=int, default=256, help="side both sets are brought to (MS-COCO: 256)")
    sc.add_argument("--feature-weights", help="local torch-fidelity Inception weights file (no download)")
    sc.add_argument("--feature-dim", type=int, choices=(64, 192, 768, 2048), help="Inception layer (default 2048)")
    sc.add_argument(
        "--feature-extractor",
        metavar="MODULE:CLASS",
        help="nn.Module replacing Inception (uint8 images (N, 3, H, W) -> (N, d) features), built without arguments",
    )
    sc.add_argument("--cache-dir", help="directory of cached reference statistics (shared with FIDCallback)")
    sc.add_argument("--batch-size", type=int, default=64, help="images per feature-extractor batch")
    sc.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    sc.add_argument("--json", help="also write the result to this JSON file")
    sc.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    return p


def report(result: dict[str, Any]) -> None:
    """Print the FID and what it was computed from (two lines)."""
    cache = result["reference_cache"]
    how = f"loaded from {cache}" if result["reference_cache_loaded"] else "computed"
    how += f", cached in {cache}" if cache and not result["reference_cache_loaded"] else ""
    size = result["image_size"]
    print(
        f"FID {result['fid']:.4f} ({result['feature']} features): {result['num_samples']} generated images "
        f"(files[{result['candidate']}] in {result['generated']}) vs {result['num_samples']} reference images of "
        f"{result['data']} at {size}x{size}"
    )
    print(f"reference statistics: {how}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cm3leon fid``; returns the exit status (2 on bad input, with a one-line error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prompts":
            count = write_prompts(args.data, args.num_samples, args.out, args.overwrite)
            print(f"wrote {count} prompts to {args.out}")
            print(
                f"next: cm3leon predict ... --data.prompts {args.out}; then cm3leon fid score --data {args.data} "
                f"--num-samples {count} --generated <its output_dir>"
            )
            return 0
        result = score(args)
        report(result)  # before the JSON file: a failed write loses no result
        if args.json is not None:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_text_whole(args.json, json.dumps(result, indent=2) + "\n")
    except (OSError, ValueError) as e:  # OSError: also an output that cannot be written
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
