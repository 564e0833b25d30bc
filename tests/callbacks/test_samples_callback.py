"""SampleLoggerCallback: grids reach W&B (offline), TensorBoard and CSV (PNG files) run directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from support.eval_setup import micro_vqgan, shape_samples, tiny_module, tiny_tokenizer, trainer, val_loader

from cm3leon_lightning.callbacks import SampleLoggerCallback, render_grid

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def parts():
    tok = tiny_tokenizer()
    return tok, micro_vqgan(), tiny_module(tok)


class Fast(SampleLoggerCallback):
    """Default captioning, but image generation replaced by a solid colour per seed (keeps the test quick)."""

    def generate_images(self, pl_module, prompts, seeds):
        return torch.stack([torch.full((3, 16, 16), 40 * s, dtype=torch.uint8) for s in seeds])


def make(parts, cls=Fast, **kwargs) -> SampleLoggerCallback:
    tok, vqgan, _ = parts
    args = dict(
        prompts=PROMPTS, seeds=[1, 2, 3], caption_samples=shape_samples(2), num_caption_images=2, text_tokenizer=tok,
        vqgan=vqgan, max_new_tokens=4, cell=32,
    )  # fmt: skip
    return cls(**{**args, **kwargs})


def test_csv_logger_gets_png_files(parts, tmp_path: Path) -> None:
    _, _, module = parts
    cb = make(parts)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], logger).validate(module, val_loader(module.vocab), verbose=False)
    pngs = sorted((Path(logger.log_dir) / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["samples_image_to_text-step0000000.png", "samples_text_to_image-step0000000.png"]
    grid = Image.open(pngs[1])
    assert grid.size[0] == 3 * 32 and grid.size[1] > 32  # three cells, text band above the pictures
    assert grid.getpixel((5, grid.size[1] - 5)) == (40, 40, 40)  # seed 1's image in the first cell


def test_tensorboard_logger_gets_images(parts, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, module = parts
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [make(parts)], logger).validate(module, val_loader(module.vocab), verbose=False)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"samples/text_to_image", "samples/image_to_text"}


def test_wandb_offline_run_gets_images(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    _, _, module = parts
    logger = WandbLogger(save_dir=str(tmp_path), project="cm3leon-tests", offline=True)
    trainer(tmp_path, [make(parts)], logger).validate(module, val_loader(module.vocab), verbose=False)
    import wandb

    wandb.finish()
    media = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples/*.png"))
    assert len(media) == 2, list((tmp_path / "wandb").rglob("*"))


def test_default_generation_and_rank_zero_only(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, module = parts
    cb = make(parts, cls=SampleLoggerCallback, prompts=PROMPTS[:1], seeds=[5])
    trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    assert len(cb.written) == 2 and all(p.parent == tmp_path / "samples" for p in cb.written)
    assert Image.open(cb.written[1]).size[0] == 2 * 32  # two captioned images

    class NotZero(Fast):
        def on_validation_epoch_end(self, trainer, pl_module):
            with monkeypatch.context() as m:  # what a non-zero rank sees
                m.setattr(type(trainer.strategy), "is_global_zero", property(lambda self: False))
                super().on_validation_epoch_end(trainer, pl_module)

    other = make(parts, cls=NotZero)
    trainer(tmp_path / "r1", [other]).validate(module, val_loader(module.vocab), verbose=False)
    assert other.written == [] and not (tmp_path / "r1" / "samples").exists()


def test_render_grid_checks_lengths() -> None:
    with pytest.raises(ValueError, match="as many texts as images"):
        render_grid(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["one"])


def test_a_missing_vqgan_stops_the_run_before_training(parts, tmp_path: Path) -> None:
    """The resources were loaded at the first validation: a wrong VQGAN path failed after the training steps before
    it (hours, in a real run). Now setup loads them."""
    import lightning as L

    tok, _, module = parts
    steps: list[int] = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001
            steps.append(trainer.global_step)

    callback = make(parts, vqgan=str(tmp_path / "no-vqgan"))
    fit = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[callback, Count()], logger=False,
                    enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="^Fast vqgan: .*no-vqgan"):  # the callback and field named
        fit.fit(module, train_dataloaders=val_loader(module.vocab), val_dataloaders=val_loader(module.vocab))
    assert steps == []
    placeholder = make(parts, vqgan="artifacts/vqgan")  # the callback YAMLs' placeholder, left unchanged
    with pytest.raises(FileNotFoundError, match=r"artifacts/vqgan is the callback YAMLs' placeholder; with several"):
        placeholder.load_vqgan()


def test_a_test_run_says_it_does_not_evaluate(parts, tmp_path: Path) -> None:
    """`cm3leon test` with the evaluation callbacks logged nothing of theirs and said nothing."""
    _, _, module = parts
    runner = trainer(tmp_path, [make(parts)])
    with pytest.warns(UserWarning, match="Fast evaluates at the end of validation epochs: `cm3leon test`"):
        runner.test(module, dataloaders=val_loader(module.vocab))


def test_every_rank_generates_and_only_rank_zero_logs(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank generates the same prompts with the same seeds (a rank's seeds do not depend on its number); only
    rank zero renders and writes the grids."""
    calls: list[list[int]] = []

    class NotZero(Fast):
        def generate_images(self, pl_module, prompts, seeds):
            calls.append(list(seeds))
            return super().generate_images(pl_module, prompts, seeds)

        def on_validation_epoch_end(self, trainer, pl_module):
            with monkeypatch.context() as m:  # what a non-zero rank sees
                m.setattr(type(trainer.strategy), "is_global_zero", property(lambda self: False))
                super().on_validation_epoch_end(trainer, pl_module)

    _, _, module = parts
    other = make(parts, cls=NotZero)
    trainer(tmp_path, [other]).validate(module, val_loader(module.vocab), verbose=False)
    assert calls == [[1, 2, 3]]
    assert other.written == [] and not (tmp_path / "samples").exists()


def test_no_vqgan_is_refused_at_setup(parts, tmp_path: Path) -> None:
    """Without a VQGAN the default image generation failed at the first validation end, after the training steps
    before it; setup now names the argument. Runs that need no VQGAN still work."""
    tok, _, module = parts
    no_codes = shape_samples(1)  # pixels but no codes: the VQGAN must encode them
    with pytest.raises(ValueError, match=r"give vqgan .* to draw the prompts' images, or prompts=\[\]"):
        SampleLoggerCallback(prompts=["a red square"], text_tokenizer=tok, num_caption_images=0).setup(
            None, module, "fit"
        )
    cb = SampleLoggerCallback(prompts=[], caption_samples=no_codes, num_caption_images=1, text_tokenizer=tok)
    with pytest.raises(ValueError, match=r"give vqgan .* \['shape-0'\] lack pixels to show or codes to caption"):
        cb.setup(None, module, "fit")
    # an overridden generate_images, and images with pixels and codes, need no VQGAN
    both = [dataclasses.replace(s, codes=torch.zeros(64, dtype=torch.long)) for s in no_codes]
    fine = Fast(prompts=PROMPTS, seeds=[1, 2, 3], caption_samples=both, num_caption_images=1, text_tokenizer=tok,
                max_new_tokens=2, cell=32)  # fmt: skip
    trainer(tmp_path, [fine]).validate(module, val_loader(module.vocab), verbose=False)
    assert [p.name for p in fine.written] == [
        "samples_text_to_image-step0000000.png", "samples_image_to_text-step0000000.png"
    ]  # fmt: skip


def test_a_logger_without_a_log_dir_gets_png_files_in_the_root_dir(parts, tmp_path: Path) -> None:
    """With only a logger that keeps nothing locally (MLflow, Comet: ``log_dir`` None) the grids went nowhere."""
    from lightning.pytorch.loggers import Logger

    class Remote(Logger):
        name, version = "remote", 0

        def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
            pass

        def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001
            pass

    _, _, module = parts
    cb = make(parts)
    trainer(tmp_path, [cb], Remote()).validate(module, val_loader(module.vocab), verbose=False)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "samples_image_to_text-step0000000.png", "samples_text_to_image-step0000000.png"
    ]  # fmt: skip


def test_a_second_grid_at_one_step_does_not_replace_the_first(parts, tmp_path: Path) -> None:
    """Two validate runs (two checkpoints) into one directory wrote the same step-0 file names: the second grid
    replaced the first."""
    _, _, module = parts
    cb = make(parts)
    runner = trainer(tmp_path, [cb])
    runner.validate(module, val_loader(module.vocab), verbose=False)
    runner.validate(module, val_loader(module.vocab), verbose=False)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "samples_image_to_text-step0000000-1.png", "samples_image_to_text-step0000000.png",
        "samples_text_to_image-step0000000-1.png", "samples_text_to_image-step0000000.png",
    ]  # fmt: skip
    assert len(set(cb.written)) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_caption_images": -1}, "num_caption_images must be >= 0, got -1"),
     ({"columns": 0}, "columns must be >= 1, got 0"), ({"cell": 0}, "cell must be >= 1, got 0")],
)  # fmt: skip
def test_bad_layout_arguments_are_named(parts, kwargs, match) -> None:
    """columns=0 failed with ZeroDivisionError at the first validation end; num_caption_images=-1 silently
    captioned nothing."""
    with pytest.raises(ValueError, match=match):
        make(parts, **kwargs)


def test_prompts_are_read_as_the_training_captions(parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configured prompt with a trailing newline or a doubled space (a YAML block scalar) was tokenized as given:
    tokens no training caption ends with. Prompts are cleaned as ``cm3leon prepare`` cleans captions (and shown so);
    a blank one, or a single string (each letter a prompt), is refused naming ``prompts``."""
    import cm3leon_lightning.generation as generation

    tok, _, module = parts
    seen, real = [], generation.generate_image

    def spy(model, vocab, prompts, **kwargs):
        seen.append(prompts)
        return real(model, vocab, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate_image", spy)
    cb = make(parts, cls=SampleLoggerCallback, prompts=["a red  square\n", "a blue\tcircle "], seeds=[1, 2],
              num_caption_images=0)  # fmt: skip
    assert cb.prompts == ["a red square", "a blue circle"]
    trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    assert seen == [[tok.encode("a red square")], [tok.encode("a blue circle")]]
    assert tok.encode("a red  square\n") != seen[0][0]
    with pytest.raises(ValueError, match=r"^SampleLoggerCallback: prompts\[1\]: the prompt holds no text \(only"):
        make(parts, prompts=["a red square", "\n"], seeds=[1, 2])
    with pytest.raises(ValueError, match="prompts must be a list of captions, got the string 'a red square'"):
        make(parts, prompts="a red square", seeds=None)


def test_images_to_caption_of_several_sizes(parts, tmp_path: Path) -> None:
    """In-memory images of two sizes failed at the first validation end (``torch.stack`` of unequal sizes, when
    encoding and when showing them); they are encoded at the VQGAN's size and shown at ``cell``."""
    _, vqgan, module = parts
    mixed = shape_samples(1) + shape_samples(1, size=32, seed=1)
    cb = make(parts, prompts=[], seeds=[], caption_samples=mixed, cell=16)
    trainer(tmp_path, [cb]).validate(module, val_loader(module.vocab), verbose=False)
    assert [tuple(s.image.shape) for s in cb.samples] == [(3, 16, 16), (3, 16, 16)]  # the micro VQGAN's 16 px
    assert [p.name for p in cb.written] == ["samples_image_to_text-step0000000.png"]
    assert Image.open(cb.written[0]).size[0] == 2 * 16


def test_sampling_at_validation_leaves_the_training_rng_alone(parts, tmp_path: Path) -> None:
    """Generating at validation ends must not draw from the global RNG: a run with the callback shuffles and trains
    exactly as one without it (guard; the decoders sample from their own seeded generators)."""
    import lightning as L
    from torch.utils.data import DataLoader

    tok, vqgan, _ = parts

    def losses(callbacks) -> list[float]:
        module, seen = tiny_module(tok), []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:  # noqa: ANN001
                seen.append(float(outputs["loss"]))

        L.seed_everything(0)
        train = DataLoader(val_loader(module.vocab, n=8).dataset, batch_size=2, shuffle=True)  # global-RNG shuffle
        fit = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, callbacks=[*callbacks, Losses()],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
        fit.fit(module, train_dataloaders=train, val_dataloaders=val_loader(module.vocab, n=2))
        return seen

    cb = make(parts, cls=SampleLoggerCallback, prompts=PROMPTS[:1], seeds=[5], caption_samples=shape_samples(1),
              num_caption_images=1, method="top_p", compile=False)  # fmt: skip
    plain = losses([])
    assert len(plain) == 12 and losses([cb]) == plain and len(cb.written) == 6


@pytest.mark.parametrize("autocast", [True, False])
def test_generation_follows_the_trainers_precision_and_the_vqgan_decodes_in_its_own(
    parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autocast: bool
) -> None:
    """The callbacks decoded outside Lightning's autocast (it covers only the step methods): under ``bf16-mixed``
    they generated in float32, slower than the training they evaluate. They now decode under the trainer's precision
    context (``autocast=False`` keeps float32), while the VQGAN turns the codes into pixels in its own dtype."""
    import lightning as L

    _, vqgan, module = parts
    seen: dict[str, list] = {"model": [], "logits": [], "vqgan": []}

    def record(m, args, out) -> None:
        seen["model"].append(torch.is_autocast_enabled("cpu"))
        seen["logits"].append(out.dtype)

    hook = module.model.register_forward_hook(record)
    decode = vqgan.decode

    def recording_decode(codes):
        seen["vqgan"].append(torch.is_autocast_enabled("cpu"))
        return decode(codes)

    monkeypatch.setattr(vqgan, "decode", recording_decode)
    cb = make(parts, cls=SampleLoggerCallback, prompts=PROMPTS[:1], seeds=[5], autocast=autocast)
    run = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, callbacks=[cb],
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=str(tmp_path))  # fmt: skip
    try:
        run.validate(module, val_loader(module.vocab), verbose=False)
    finally:
        hook.remove()
    generated = seen["model"][-20:]  # the validation step's forward runs under autocast either way
    assert generated == [autocast] * len(generated) and len(generated) == 20
    assert set(seen["logits"][-20:]) == {torch.bfloat16 if autocast else torch.float32}
    assert seen["vqgan"] and not any(seen["vqgan"])  # the grid's image is decoded with autocast off
    assert len(cb.written) == 2


def test_grids_share_the_step_of_the_validation_metrics(parts, tmp_path: Path) -> None:
    """TensorBoard (and W&B) got the grids at ``global_step``, one more than the step Lightning logs the same
    validation's ``val/`` metrics at inside ``fit``; PNG files keep the ``global_step`` of checkpoint names."""
    import lightning as L
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    tok, _, _ = parts
    module = tiny_module(tok)
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    fit = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, logger=loggers, callbacks=[make(parts)],
                    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                    num_sanity_val_steps=0, default_root_dir=str(tmp_path))  # fmt: skip
    train = DataLoader(val_loader(module.vocab, n=8).dataset, batch_size=2)
    fit.fit(module, train_dataloaders=train, val_dataloaders=val_loader(module.vocab, n=2))
    loggers[0].experiment.flush()
    acc = EventAccumulator(loggers[0].log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [1, 3]
    for tag in ("samples/text_to_image", "samples/image_to_text"):
        assert [e.step for e in acc.Images(tag)] == [1, 3], tag
    pngs = sorted(p.name for p in (Path(loggers[1].log_dir) / "samples").glob("*.png"))
    assert pngs == [f"samples_{kind}-step000000{s}.png" for kind in ("image_to_text", "text_to_image") for s in (2, 4)]


def test_render_grid_draws_any_text_with_the_bitmap_font(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: where PIL's default font is its Latin-1 bitmap font (Pillow 10.0, the oldest allowed, or a
    build without FreeType), a caption with another character (the U+FFFD of a token cut mid-character) raised
    UnicodeEncodeError at the validation end; such characters now show as '?'."""
    from PIL import ImageDraw, ImageFont

    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow has no separate bitmap default font")
    monkeypatch.setattr(ImageFont, "load_default", ImageFont.load_default_imagefont)
    drawn: list[str] = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: drawn.append(t) or text(self, xy, t, *a, **k)
    )
    grid = render_grid(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a caf\u00e9 \ufffd", "\u65e5\u672c"], cell=64)
    assert grid.size == (2 * 64, 12 + 4 + 64) and drawn == ["a caf\u00e9 ?", "??"]
