"""The writer of ``cm3leon predict`` (:class:`ImageWriter`): each prompt's candidates as PNGs, a captioned grid, its
codes and a line of ``predictions.jsonl``, with CLIP re-ranking, and resuming a stopped run
(:mod:`cm3leon_lightning.generation.predict` describes the command; it re-exports everything here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from cm3leon_lightning.data.cleaning import model_text
from cm3leon_lightning.files import write_text_whole

PREDICTIONS_FILE = "predictions.jsonl"
SETTINGS_FILE = "predict_settings.json"
"""What decided the images (:meth:`ImageWriter.run_settings`); a resumed run must have the same."""
LATER_SETTINGS = ("precision",)
"""Settings recorded since a later version: a file without them (an older run's) is not compared on them."""


# ------------------------------------------------------------------------------------------------ writing
OUTPUT_NAME = re.compile(
    r"(\d{6,}-(\d+|grid)\.png|\d{6,}-codes\.npy|predictions(\.rank\d+)?\.jsonl|predict_settings\.json)"
)
"""The names :class:`ImageWriter` writes (``config.yaml`` of LightningCLI and other files are not its own)."""


def previous_outputs(output_dir: Path) -> list[Path]:
    """The files of an earlier :class:`ImageWriter` run in ``output_dir``, sorted by name (none if it is absent)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.is_file() and OUTPUT_NAME.fullmatch(p.name))


def weights_fingerprint(module: torch.nn.Module, samples: int = 4096) -> str:
    """sha256 over each tensor of ``module.state_dict()``: its name, shape, dtype and up to ``samples`` evenly strided
    values. Other weights (another checkpoint, one re-trained at the same path) give another fingerprint, for a few
    thousand reads per tensor rather than hashing gigabytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        h.update(flat[:: max(1, flat.numel() // samples)][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()


def written_rows(output_dir: Path) -> dict[int, str]:
    """The JSON lines of the prompts written to ``output_dir`` (its part files, then ``predictions.jsonl``), by
    prompt index. A line cut short (a run stopped while writing it) or damaged (not JSON, not UTF-8) is not one: its
    prompt is decoded again."""
    rows: dict[int, str] = {}
    for path in [*sorted(output_dir.glob("predictions.rank*.jsonl")), output_dir / PREDICTIONS_FILE]:
        if not path.is_file():
            continue
        for raw in path.read_bytes().split(b"\n"):  # line by line: a damaged line (not UTF-8) is one prompt's
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line else None
            except ValueError:  # UnicodeDecodeError, JSONDecodeError
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                rows.setdefault(row["index"], line)
    return rows


def on_rank_zero(trainer: L.Trainer, what: str, step: Callable[[], None]) -> None:
    """Run ``step`` on rank zero while the other ranks wait, then raise on every rank if it failed: rank zero its own
    error (noting ``what``), the others a RuntimeError naming ``what`` and quoting it, instead of waiting at a barrier
    until a launcher or the process group's timeout stops them. One collective: a broadcast of the error (or None)."""
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - re-raised below, once every rank knows
            error = e
    message = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
    if error is not None:
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"ImageWriter: while {what}")
        raise error
    if message is not None:
        raise RuntimeError(f"ImageWriter: rank 0 failed while {what} ({message}); rank {trainer.global_rank} stops too")


class ImageWriter(BasePredictionWriter):
    """Write each prompt's candidates as PNGs, a captioned grid, its codes, and a line of ``predictions.jsonl``.

    With ``clip``, the candidates are re-ranked by CLIP score against their prompt (paper section 3.1) and written
    best first: ``{i:06d}-0.png`` is the best, the codes file follows the same order, and the JSON line adds
    ``clip_scores`` (best first) and ``order`` (each written candidate's index among the N sampled).

    Args:
        output_dir: directory for the files (created).
        vqgan: VQGAN directory or checkpoint (``VQGAN.from_pretrained``); None writes only the codes.
        grid: also write ``{i:06d}-grid.png``, the candidates under the prompt.
        clip: open_clip model name of the re-ranking CLIP (e.g. ``ViT-B-32``); None: no re-ranking.
        clip_pretrained: its weights: an open_clip tag (``openai``) or a local checkpoint path.
        keep: write only the best ``keep`` candidates of each prompt (needs ``clip``); None: all.
        overwrite: with ``output_dir`` already holding a run's outputs (``predictions.jsonl``, ``{i:06d}-*`` files,
            a stopped run's part files), delete them first; False (the default) refuses to start, so no earlier
            output is lost or left beside new ones it no longer describes.
        resume: with ``output_dir`` holding an earlier (stopped) run's outputs of the same prompts file, keep the
            prompts it wrote completely (a JSON line is written after its prompt's files) and decode the others;
            the data module must have ``exclude``
            (:class:`~cm3leon_lightning.generation.predict.PromptDataModule`), and the run the same
            :meth:`run_settings` as the earlier one (``predict_settings.json``). Each prompt's samples depend on its
            seed only, so the result is the uninterrupted run's.
    """

    def __init__(
        self,
        output_dir: str,
        vqgan: str | None = None,
        grid: bool = True,
        clip: str | None = None,
        clip_pretrained: str | None = "openai",
        keep: int | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if overwrite and resume:
            raise ValueError(
                "ImageWriter: give overwrite (delete an earlier run's outputs) or resume (keep them), not both"
            )
        if clip is not None and vqgan is None:
            raise ValueError("ImageWriter clip: re-ranking scores decoded images, so it needs vqgan")
        if keep is not None and (clip is None or keep < 1):
            raise ValueError(f"ImageWriter keep must be >= 1 and needs clip (re-ranking), got keep={keep}, clip={clip}")
        self.output_dir, self.vqgan_path, self.grid = Path(output_dir), vqgan, grid
        self.clip_name, self.clip_pretrained, self.keep = clip, clip_pretrained, keep
        self.overwrite, self.resume = overwrite, resume
        self.vqgan: torch.nn.Module | None = None
        self.clip: Any = None
        self._part: Path | None = None
        self._settings: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse an ``output_dir`` that is a file or holds an earlier run's outputs (unless ``overwrite`` or
        ``resume``), load the VQGAN on the module's device and check it against the module's vocabulary."""
        if stage != "predict":
            return
        same = [cb for cb in trainer.callbacks if isinstance(cb, ImageWriter) and cb.output_dir == self.output_dir]
        if len(same) > 1:
            raise ValueError(
                f"{len(same)} ImageWriter callbacks write to {self.output_dir}; give one (does --config name a saved "
                "predict config that already holds one?)"
            )
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"ImageWriter output_dir: {self.output_dir} is a file, not a directory")
        earlier = previous_outputs(self.output_dir)
        if earlier and not (self.overwrite or self.resume):
            names = ", ".join(p.name for p in earlier[:3]) + (" ..." if len(earlier) > 3 else "")
            raise ValueError(
                f"ImageWriter output_dir: {self.output_dir} already holds {len(earlier)} files of an earlier predict "
                f"run ({names}); give a new or empty directory, overwrite=True (--trainer.callbacks.overwrite "
                "true) to delete them first, or resume=True (--trainer.callbacks.resume true) to keep the prompts it "
                "finished and decode the rest"
            )
        if self.resume:  # the settings are compared in on_predict_start, once the checkpoint's weights are loaded
            self.resume_from_earlier(trainer, getattr(getattr(pl_module, "generation", None), "seed", None))
        from cm3leon_lightning.generation.cli import check_tokenizers

        if self.vqgan_path is not None and self.vqgan is None:
            from cm3leon_lightning.tokenization.vqgan import VQGAN

            self.vqgan = VQGAN.from_pretrained(self.vqgan_path).eval().requires_grad_(False)
        vocab = getattr(pl_module, "vocab", None)
        if self.vqgan is not None and vocab is not None:
            ckpt = getattr(trainer, "ckpt_path", None)
            model = f"the model ({ckpt})" if ckpt else "the model"
            check_tokenizers(vocab, None, self.vqgan, model, self.vqgan_path, ("tokenizer", "ImageWriter vqgan"))

    def run_settings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What decides a prompt's files, recorded in ``predict_settings.json``: the model's weights
        (:func:`weights_fingerprint`, with the checkpoint or ``init_from`` they came from as ``model_source``, which
        is not compared), the trainer's ``precision`` (``bf16-mixed`` keeps float32 weights but draws other
        samples), the module's ``generation`` settings, and this writer's re-ranking and grid. Call it once the
        checkpoint is loaded (``on_predict_start``)."""
        generation = getattr(pl_module, "generation", None)
        if dataclasses.is_dataclass(generation) and not isinstance(generation, type):
            generation = dataclasses.asdict(generation)
        source = getattr(trainer, "ckpt_path", None) or getattr(pl_module, "hparams", {}).get("init_from")
        settings = {
            "model": weights_fingerprint(pl_module),
            "model_source": None if source is None else str(source),
            "precision": str(getattr(trainer, "precision", None)),
            "generation": generation,
            "vqgan": self.vqgan_path,
            "clip": self.clip_name,
            "clip_pretrained": self.clip_pretrained if self.clip_name is not None else None,
            "keep": self.keep,
            "grid": self.grid,
        }
        return json.loads(json.dumps(settings, default=str))  # as read back from the file

    def check_same_settings(self, settings: dict[str, Any]) -> None:
        """``resume``: refuse settings other than the earlier run's (``predict_settings.json``), naming each
        difference: the finished prompts' images would not be this run's. An earlier run without the file (older
        than it) cannot be checked: a warning says so."""
        path = self.output_dir / SETTINGS_FILE
        if not path.is_file():
            if previous_outputs(self.output_dir):
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"ImageWriter resume: {self.output_dir} has no {SETTINGS_FILE}: its settings are unknown"
                )
            return
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"ImageWriter resume: {path} is not readable JSON ({e})") from e

        def flat(d: Any, prefix: str = "") -> dict[str, Any]:  # {"generation": {"cfg": 3}} -> {"generation.cfg": 3}
            if not isinstance(d, dict):
                return {prefix[:-1]: d}
            return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

        have, want = flat(settings), flat(recorded)
        later = [k for k in LATER_SETTINGS if k not in want]  # an earlier version's file: not recorded then
        skip = {"model_source", *later}
        differ = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k) and k not in skip]
        if differ:
            changes = ", ".join(f"{k}: {want.get(k)!r} -> {have.get(k)!r}" for k in differ[:4])
            raise ValueError(
                f"ImageWriter resume: this run's settings differ from the earlier run's ({path}): {changes}"
                f"{' ...' if len(differ) > 4 else ''}; the finished prompts' images would not be this run's. Resume "
                "with the earlier settings, or give a new output_dir"
            )

    def resume_from_earlier(self, trainer: L.Trainer, base_seed: int | None = None) -> None:
        """``resume``: rank zero gathers the earlier run's lines (its part files and ``predictions.jsonl``) into
        ``predictions.jsonl``; then every rank reads it and leaves those prompts out of the data module (its
        ``exclude``, given the generation seed ``base_seed`` where it takes one). A failed merge raises on every rank
        (:func:`on_rank_zero`)."""
        exclude = getattr(trainer.datamodule, "exclude", None)
        if exclude is None:
            raise ValueError(
                f"ImageWriter resume: the data module {type(trainer.datamodule).__name__} cannot leave prompts out "
                "(it has no exclude(done, source)); use PromptDataModule"
            )
        merged = self.output_dir / PREDICTIONS_FILE

        def merge() -> None:
            if self.output_dir.is_dir():
                rows = written_rows(self.output_dir)
                write_text_whole(merged, "".join(rows[i] + "\n" for i in sorted(rows)))
                for part in self.output_dir.glob("predictions.rank*.jsonl"):
                    part.unlink()

        on_rank_zero(trainer, f"merging the earlier run's lines into {merged}", merge)
        done = {i: json.loads(line) for i, line in written_rows(self.output_dir).items()}
        if "base_seed" in inspect.signature(exclude).parameters:  # a custom data module's may take (done, source)
            exclude(done, str(merged), base_seed=base_seed)
        else:
            exclude(done, str(merged))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``resume``, refuse other settings than the earlier run's (:meth:`check_same_settings`); create the
        output directory, record this run's settings and create this rank's part of ``predictions.jsonl`` (with
        ``overwrite``, an earlier run's outputs deleted first; a failure there raises on every rank)."""
        self._settings = self.run_settings(trainer, pl_module)
        if self.resume:
            self.check_same_settings(self._settings)

        def start() -> None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for earlier in [] if self.resume else previous_outputs(self.output_dir):  # none unless overwrite
                earlier.unlink()
            settings = json.dumps(self._settings, indent=1, sort_keys=True) + "\n"
            write_text_whole(self.output_dir / SETTINGS_FILE, settings)

        on_rank_zero(trainer, f"writing {self.output_dir / SETTINGS_FILE}", start)
        if self.vqgan is not None:
            self.vqgan.to(pl_module.device)
        if self.clip_name is not None and self.clip is None:
            self.clip = self.load_scorer(pl_module.device)
        self._part = self.output_dir / f"predictions.rank{trainer.global_rank}.jsonl"
        self._part.write_text("", encoding="utf-8")

    def load_scorer(self, device: torch.device) -> Any:
        """The re-ranking scorer (``embed_texts``/``embed_images``, see :mod:`~cm3leon_lightning.generation.rerank`):
        a frozen :class:`~cm3leon_lightning.retrieval.ClipEncoder` of ``clip``/``clip_pretrained``. Override to
        score with something else."""
        from cm3leon_lightning.retrieval.encoder import ClipEncoder, ClipWeightsUnavailableError

        try:
            return ClipEncoder(self.clip_name or "ViT-B-32", pretrained=self.clip_pretrained, device=str(device))
        except ClipWeightsUnavailableError as e:
            raise ValueError(f"ImageWriter clip/clip_pretrained: {e}") from e

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Decode and write the batch's candidates; append one JSON line per prompt to this rank's part file. A
        prompt the batch flags ``repeat`` (a filler of a device that had none, see
        :class:`~cm3leon_lightning.generation.predict.PromptDataset`) is not written: another rank writes it."""
        from cm3leon_lightning.generation.cli import save_grid, to_pil

        codes = prediction["codes"]  # (B, N, h*w)
        images = None
        if self.vqgan is not None:
            with torch.no_grad():
                flat = self.vqgan.decode(codes.flatten(0, 1).to(pl_module.device))  # (B*N, C, H, W)
            images = flat.view(*codes.shape[:2], *flat.shape[1:]).float().cpu()  # (B, N, C, H, W)
        ranked = None
        if self.clip is not None and images is not None:
            from cm3leon_lightning.generation.rerank import rerank

            ranked = rerank(
                self.clip,
                [model_text(p) for p in prediction["prompt"]],
                images,
                codes.cpu(),  # as tokenized
                keep=self.keep or codes.shape[1],
            )
            images, codes = ranked.images, ranked.codes  # best first, (B, keep, ...)
        repeats = batch.get("repeat") if isinstance(batch, dict) else None
        lines = []
        for b, (index, prompt, seed) in enumerate(zip(prediction["index"], prediction["prompt"], prediction["seed"])):
            if repeats is not None and repeats[b]:
                continue
            stem = f"{int(index):06d}"
            np.save(self.output_dir / f"{stem}-codes.npy", codes[b].cpu().numpy().astype(np.int32))
            row: dict[str, Any] = {"index": int(index), "prompt": prompt, "seed": seed, "files": [], "grid": None}
            row["codes"] = f"{stem}-codes.npy"
            if ranked is not None:
                row["clip_scores"] = [round(float(x), 6) for x in ranked.scores[b]]
                row["order"] = [int(x) for x in ranked.order[b]]
            if images is not None:
                for j, image in enumerate(images[b]):
                    to_pil(image).save(self.output_dir / f"{stem}-{j}.png")
                    row["files"].append(f"{stem}-{j}.png")
                if self.grid:
                    save_grid(images[b], prompt, self.output_dir / f"{stem}-grid.png")
                    row["grid"] = f"{stem}-grid.png"
            lines.append(json.dumps(row) + "\n")  # ASCII: a prompt's U+2028 etc. cannot break a line
        with open(self._part, "a", encoding="utf-8") as f:  # type: ignore[arg-type]
            f.writelines(lines)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After every rank finished, rank zero merges the part files into ``predictions.jsonl`` (by index; a resumed
        run's earlier lines too); it is replaced whole and the part files are deleted only once it is written, so a
        failed write (a full disk) loses no line, and raises on every rank (:func:`on_rank_zero`)."""
        trainer.strategy.barrier("image_writer")

        def merge() -> None:
            rows = written_rows(self.output_dir)  # a resumed run's earlier lines too
            parts = sorted(self.output_dir.glob("predictions.rank*.jsonl"))
            text = "".join(rows[i] + "\n" for i in sorted(rows))
            write_text_whole(self.output_dir / PREDICTIONS_FILE, text)  # a resumed run's file holds earlier lines
            for part in parts:
                part.unlink()

        on_rank_zero(trainer, f"merging the ranks' lines into {self.output_dir / PREDICTIONS_FILE}", merge)
