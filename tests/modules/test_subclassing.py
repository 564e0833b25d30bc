"""Extending the package as users do: a CM3LeonModule subclass with a task loss and arguments of its own, trained,
validated, tested, checkpointed and reloaded, directly and through the `cm3leon` CLI (the data's vocabulary linked
into the subclass), and a GenerationCallback subclass for a new metric composed with a shipped one."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.eval_setup import micro_vqgan, shape_samples, tiny_module, tiny_tokenizer, val_loader
from support.eval_setup import trainer as eval_trainer
from support.token_data import TokenDataModule, cpu_trainer

from cm3leon_lightning.callbacks import SampleLoggerCallback
from cm3leon_lightning.callbacks.base import GenerationCallback, module_network
from cm3leon_lightning.generation.generate import GenerationSettings
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.vocab import BREAK_ID, PAD_ID


class OutputOnly(CM3LeonModule):
    """A task loss that scores only the targets after each row's last `<break>` (the last segment, e.g. an image)."""

    def __init__(self, output_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_weight = output_weight

    def build_sequence(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().build_sequence(batch)
        pos = torch.arange(targets.shape[1]).expand_as(targets)
        last_break = torch.where(targets == BREAK_ID, pos, -1).max(dim=1, keepdim=True).values
        return inputs, targets.masked_fill(pos <= last_break, PAD_ID)


class SelfSaving(OutputOnly):
    """Lightning's idiom: the subclass saves its own arguments, leaving out one that is no hyper-parameter."""

    def __init__(self, teacher: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["teacher"])


def test_an_output_only_loss_keeps_the_logged_text_image_split_exact(tmp_path) -> None:
    """Rows are `<eos> caption(6) <break> image(6) <eos>`: the subclass scores the 6 codes and the final `<eos>`
    of each row, and val/test figures are those of exactly these targets."""
    data = TokenDataModule(n_train=8, n_val=4, batch_size=2)
    torch.manual_seed(0)
    module = OutputOnly(output_weight=2.0, preset="tiny", vocab=data.vocab.to_dict(), warmup_steps=1, lr=1e-2)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(module, data)
    assert {"train/loss", "train/loss_text", "train/loss_image", "train/tokens_per_sec"} <= set(trainer.logged_metrics)
    batch = {"input_ids": data.val_rows}
    _, targets = module.build_sequence(batch)
    assert (targets != PAD_ID).sum(dim=1).tolist() == [7, 7, 7, 7]
    losses = module.compute_loss(module(data.val_rows[:, :-1]), targets, batch)
    assert (losses["tokens"].item(), losses["tokens_text"].item(), losses["tokens_image"].item()) == (28, 4, 24)
    got = cpu_trainer(tmp_path).validate(module, data, verbose=False)[0]
    assert got["val/loss"] == pytest.approx(losses["loss"].item(), rel=1e-5)
    assert got["val/loss_text"] == pytest.approx(losses["loss_text"].item(), rel=1e-5)
    assert got["val/loss_image"] == pytest.approx(losses["loss_image"].item(), rel=1e-5)
    assert cpu_trainer(tmp_path).test(module, data, verbose=False)[0]["test/loss"] == pytest.approx(got["val/loss"])


def test_the_readme_image_only_loss_scores_exactly_the_codes() -> None:
    """README "Extending": `ImageOnly` leaves the 6 image codes of each row as targets, and their loss is the image
    part of the plain module's loss."""

    class ImageOnly(CM3LeonModule):  # as in the README
        def build_sequence(self, batch):
            inputs, targets = super().build_sequence(batch)
            return inputs, targets.masked_fill(targets < self.vocab.n_text, PAD_ID)

    data = TokenDataModule(n_train=4, n_val=4, batch_size=2)
    torch.manual_seed(0)
    module = ImageOnly(preset="tiny", vocab=data.vocab.to_dict())
    batch = {"input_ids": data.val_rows}
    inputs, targets = module.build_sequence(batch)
    assert ((targets != PAD_ID).sum(dim=1) == 6).all() and (targets[targets != PAD_ID] >= data.vocab.n_text).all()
    plain_inputs, plain_targets = CM3LeonModule.build_sequence(module, batch)
    logits = module(inputs)
    plain = CM3LeonModule.compute_loss(module, logits, plain_targets, batch)
    image_only = module.compute_loss(logits, targets, batch)
    assert torch.equal(inputs, plain_inputs) and image_only["tokens"].item() == 24
    assert image_only["loss"].item() == pytest.approx(plain["loss_image"].item(), rel=1e-6)


def test_a_compute_loss_override_that_returns_only_the_loss(tmp_path) -> None:
    """It failed training with KeyError 'tokens' and validated to no metric at all; now every non-pad target counts."""

    class PlainLoss(CM3LeonModule):
        def compute_loss(self, logits, targets, batch):
            return {"loss": F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID)}

    data = TokenDataModule(n_train=4, n_val=4, batch_size=4)
    torch.manual_seed(0)
    module = PlainLoss(preset="tiny", warmup_steps=1)
    cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(module, data)
    got = cpu_trainer(tmp_path).validate(module, data, verbose=False)[0]
    with torch.no_grad():
        expected = module.compute_loss(module(data.val_rows[:, :-1]), data.val_rows[:, 1:], {})["loss"].item()
    assert set(got) == {"val/loss", "val/ppl"}
    assert got["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_a_compute_loss_that_returns_no_loss_entry_is_named(tmp_path) -> None:
    """Returning the loss tensor itself (as a plain LightningModule does) failed with `Tensor.__contains__ only
    supports Tensor or scalar`, and a dict without `loss` with KeyError 'loss'."""

    class BareTensor(CM3LeonModule):
        def compute_loss(self, logits, targets, batch):
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID)

    class OtherKey(CM3LeonModule):
        def compute_loss(self, logits, targets, batch):
            return {"nll": super().compute_loss(logits, targets, batch)["loss"]}

    data = TokenDataModule(n_train=4, n_val=4, batch_size=4)
    for cls, got in ((BareTensor, "got Tensor"), (OtherKey, r"got a dict with keys \['nll'\]")):
        match = rf"{cls.__name__}.compute_loss must return a dict with 'loss'.*{got}"
        with pytest.raises(TypeError, match=match):
            cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(cls(preset="tiny", warmup_steps=1), data)
        with pytest.raises(TypeError, match=match):
            cpu_trainer(tmp_path).validate(cls(preset="tiny"), data, verbose=False)


def test_a_subclass_that_saves_its_own_hyperparameters_keeps_the_checkpoint_readable(tmp_path) -> None:
    """A second save_hyperparameters stored `config` as given (None under the CLI, so from_pretrained, export and
    info found no architecture) and `generation` as an object (no weights_only load)."""
    data = TokenDataModule(n_train=4, n_val=4, batch_size=4)
    module = SelfSaving(teacher="t.ckpt", output_weight=0.5, preset="tiny", config=None, vocab=data.vocab.to_dict(),
                        max_seq_len=32, generation=GenerationSettings(cfg=2.0), warmup_steps=1)  # fmt: skip
    assert module.hparams["config"] == module.config.to_dict() and module.config.max_seq_len == 32
    assert module.hparams["vocab"] == data.vocab.to_dict() and module.hparams["output_weight"] == 0.5
    assert "generation" not in module.hparams and "teacher" not in module.hparams
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["config"] == module.config.to_dict()
    reloaded = SelfSaving.load_from_checkpoint(tmp_path / "last.ckpt")
    assert reloaded.output_weight == 0.5 and reloaded.config == module.config
    pretrained = SelfSaving.from_pretrained(str(tmp_path / "last.ckpt"), output_weight=3.0)
    assert type(pretrained) is SelfSaving and pretrained.output_weight == 3.0
    assert torch.equal(pretrained.model.wte.weight, module.model.wte.weight)


def test_the_cli_links_the_datas_vocabulary_into_a_subclass(tmp_path) -> None:
    import yaml
    from support.token_data import write_fit_config

    from cm3leon_lightning.cli import main

    config = yaml.safe_load(write_fit_config(tmp_path, max_steps=2, n_train=8).read_text())
    config["model"] = {"class_path": f"{__name__}.SelfSaving",
                       "init_args": {"preset": "tiny", "warmup_steps": 1, "output_weight": 0.25}}  # fmt: skip
    (tmp_path / "sub.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "sub.yaml")])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["vocab"] == TokenDataModule().vocab.to_dict() and saved["output_weight"] == 0.25
    assert saved["config"]["vocab_size"] == 128 and saved["_class_path"] == f"{__name__}.SelfSaving"
    assert type(CM3LeonModule.from_pretrained(str(tmp_path / "ckpt" / "last.ckpt"))) is CM3LeonModule


class NetworkNorm(GenerationCallback):
    """A new metric at validation ends: the norm of the token embedding (stands for any generated-sample score)."""

    def __init__(self, log_name: str = "val/wte_norm", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_name = log_name
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.should_run(trainer):
            self.values.append(module_network(pl_module).wte.weight.norm().item())
            pl_module.log(self.log_name, self.values[-1], batch_size=1)


class NormInTests(NetworkNorm):
    """The same metric in test runs too."""

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("test/wte_norm", module_network(pl_module).wte.weight.norm().item(), batch_size=1)


class Fast(SampleLoggerCallback):
    def generate_images(self, pl_module, prompts, seeds):
        return torch.stack([torch.full((3, 16, 16), 40 * s, dtype=torch.uint8) for s in seeds])


def test_a_callback_subclass_composes_with_the_shipped_ones(tmp_path) -> None:
    tok = tiny_tokenizer()
    module = tiny_module(tok)
    every = NetworkNorm(text_tokenizer=tok)
    second = NetworkNorm(log_name="val/wte_norm_2", every_n_val_epochs=2, text_tokenizer=tok)
    samples = Fast(prompts=["a red square"], caption_samples=shape_samples(1), num_caption_images=1,
                   text_tokenizer=tok, vqgan=micro_vqgan(), max_new_tokens=2, cell=16)  # fmt: skip
    trainer = eval_trainer(tmp_path, [every, second, samples])
    for _ in range(2):
        got = trainer.validate(module, val_loader(module.vocab), verbose=False)[0]
    norm = module.model.wte.weight.norm().item()
    assert every.values == [pytest.approx(norm)] * 2 and second.values == [pytest.approx(norm)]
    assert got["val/wte_norm"] == pytest.approx(norm) and len(samples.written) == 4
    assert len({every.state_key, second.state_key, samples.state_key}) == 3
    # a subclass that evaluates in test runs is not told that it does not
    with pytest.warns(UserWarning, match="NetworkNorm evaluates at the end of validation epochs"):
        eval_trainer(tmp_path, [NetworkNorm(text_tokenizer=tok)]).test(module, val_loader(module.vocab), verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*evaluates at the end of validation epochs")
        tested = eval_trainer(tmp_path, [NormInTests(text_tokenizer=tok)])
        got = tested.test(module, val_loader(module.vocab), verbose=False)
    assert got[0]["test/wte_norm"] == pytest.approx(norm)
