"""CM3LeonModule: loss, schedule, optimisation, checkpoints and resume on a tiny model (CPU, seconds)."""

from __future__ import annotations

import csv
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from support.token_data import TokenDataModule, cpu_trainer

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.modules.cm3leon import CM3LeonModule, WarmupDecay
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

_trainer = cpu_trainer


def test_warmup_decay_schedule_values() -> None:
    s = WarmupDecay(warmup_steps=4, total_steps=14, decay="linear", min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    c = WarmupDecay(warmup_steps=0, total_steps=10, decay="cosine", min_lr_ratio=0.0)
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0)
    assert WarmupDecay(2, 10, "constant")(7) == 1.0
    CM3LeonModule(warmup_steps=10, decay_steps=5, lr_decay="constant")  # no decay: its length does not matter
    # decay_steps counts the warm-up too: a smaller one dropped the rate to the floor right after it. Refused when
    # training starts (configure_optimizers); such a module (an old checkpoint's) still builds, for predict/validate
    short = CM3LeonModule(preset="tiny", warmup_steps=1500, decay_steps=1000)
    with pytest.raises(ValueError, match="decay_steps 1000 <= warmup_steps 1500.*--model.init_args.decay_steps"):
        short.configure_optimizers()
    with pytest.raises(ValueError, match="lr_decay"):
        WarmupDecay(2, 10, "exponential")
    for kwargs, match in (({"min_lr_ratio": -1.0}, "min_lr_ratio must lie in"), ({"min_lr_ratio": 3.0}, "min_lr"),
                          ({"warmup_steps": -10}, "warmup_steps must be >= 0"), ({"decay_steps": -5}, "decay_steps"),
                          ({"lr": -1e-3}, "lr must be >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CM3LeonModule(**kwargs)


def test_adamw_arguments_are_refused_when_the_module_is_built_naming_them() -> None:
    """Out-of-range betas, eps and weight_decay (and an infinite lr) passed __init__ and failed only when training
    started, after the data and network were set up, in AdamW's words (`tuple index out of range` for one beta; a
    third beta or an infinite lr trained silently)."""
    for kwargs, match in (({"betas": (0.9,)}, r"betas must be two values in \[0, 1\).*got \[0.9\]"),
                          ({"betas": (0.9, 0.95, 0.99)}, r"betas must be two values.*got \[0.9, 0.95, 0.99\]"),
                          ({"betas": [1.5, 0.95]}, r"betas must be two values.*got \[1.5, 0.95\]"),
                          ({"eps": -1e-8}, "eps must be >= 0 and finite, got -1e-08"),
                          ({"eps": float("nan")}, "eps must be >= 0 and finite, got nan"),
                          ({"weight_decay": -0.1}, "weight_decay must be >= 0 and finite, got -0.1"),
                          ({"lr": float("inf")}, "lr must be >= 0 and finite, got inf")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CM3LeonModule(preset="tiny", **kwargs)
    module = CM3LeonModule(preset="tiny", betas=[0.0, 0.5], eps=0.0, weight_decay=0.0, lr=0.0)  # the bounds pass
    module.configure_model()
    assert module.configure_optimizers()["optimizer"].defaults["betas"] == (0.0, 0.5)


def test_a_decaying_schedule_needs_the_length_of_training(tmp_path) -> None:
    """With data of unknown length and no max_steps the decay length was warmup + 1: the LR fell to min_lr_ratio
    the step after warm-up. Now it is an error, unless the decay is constant or decay_steps is given."""
    from torch.utils.data import DataLoader, IterableDataset

    rows = TokenDataModule(n_train=4).train_rows

    class Stream(IterableDataset):
        def __iter__(self):
            return iter({"input_ids": r} for r in rows)

    def fit(**kwargs) -> CM3LeonModule:
        module = CM3LeonModule(preset="tiny", warmup_steps=1, **kwargs)
        trainer = cpu_trainer(tmp_path, max_epochs=1, enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=DataLoader(Stream(), batch_size=2))
        return module

    with pytest.raises(ValueError, match="lr_decay='linear' needs the length of training.*max_steps.*decay_steps"):
        fit()
    fit(lr_decay="constant")
    fit(decay_steps=10)


def test_validation_losses_are_per_scored_token_over_the_epoch() -> None:
    """A text-only batch weighs nothing in val/loss_image (it used to count as a 0 loss), rows weigh by their
    targets, and val/ppl is exp(val/loss): all equal to the figures over every scored token of the epoch."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    data = TokenDataModule(n_train=4, n_val=4, batch_size=2)
    rows = data.val_rows.clone()  # (4, T): <eos> caption <break> image <eos>
    text_only = rows[:2].clone()
    text_only[:, 8:] = 0  # the image and the final <eos> padded away
    batches = [{"input_ids": text_only}, {"input_ids": rows[2:]}]
    torch.manual_seed(0)
    module = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict())
    module.configure_model()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # far from uniform, so the two losses differ
    got = cpu_trainer(None).validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]
    per_token, targets = [], []
    with torch.no_grad():
        for b in batches:
            inputs, t = module.build_sequence(b)
            per_token.append(F.cross_entropy(module(inputs).flatten(0, 1), t.flatten(), reduction="none"))
            targets.append(t.flatten())
    loss, t = torch.cat(per_token), torch.cat(targets)
    scored = t != 0
    image = scored & (t >= data.vocab.n_text)
    assert got["val/loss"] == pytest.approx(loss[scored].mean().item(), rel=1e-5)
    assert got["val/loss_image"] == pytest.approx(loss[image].mean().item(), rel=1e-5)
    assert got["val/loss_text"] == pytest.approx(loss[scored & ~image].mean().item(), rel=1e-5)
    assert got["val/ppl"] == pytest.approx(math.exp(got["val/loss"]), rel=1e-5)


def test_a_validation_that_raised_does_not_count_in_the_next() -> None:
    """The loss sums of the batches before the error were added to the next validation's epoch."""
    from torch.utils.data import DataLoader

    data = TokenDataModule(n_train=4, n_val=4, batch_size=2)
    torch.manual_seed(0)
    module = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict())
    good = DataLoader([{"input_ids": data.val_rows[:2]}], batch_size=None)
    bad = DataLoader([{"input_ids": data.val_rows[2:]}, {"input_ids": data.val_rows[0]}], batch_size=None)
    want = cpu_trainer(None).validate(module, good, verbose=False)[0]
    for stage in ("validate", "test"):
        with pytest.raises(ValueError, match=r"must have shape \(B, T\), got \(15,\)"):
            getattr(cpu_trainer(None), stage)(module, bad, verbose=False)
        got = getattr(cpu_trainer(None), stage)(module, good, verbose=False)[0]
        prefix = "val" if stage == "validate" else "test"
        assert got[f"{prefix}/loss"] == want["val/loss"] and got[f"{prefix}/ppl"] == want["val/ppl"]


def test_a_training_batch_without_image_targets_logs_no_image_loss(tmp_path) -> None:
    """compute_loss gives loss_image 0 for a text-only batch, and training logged that 0 as the batch's image loss
    (a dive to 0 in the curve); it is NaN now (a key not logged at a step would be written again, stale)."""
    from torch.utils.data import DataLoader

    data = TokenDataModule(n_train=4, batch_size=2)
    text_only = data.train_rows[:2].clone()
    text_only[:, 8:] = 0  # <eos> caption(6) <break>, then padding
    batches = [{"input_ids": data.train_rows[2:]}, {"input_ids": text_only}]
    torch.manual_seed(0)
    module = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict(), lr=0.0, warmup_steps=0, lr_decay="constant")
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False,
                          logger=CSVLogger(tmp_path), log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    with torch.no_grad():
        want = [module.compute_loss(module(b["input_ids"][:, :-1]), b["input_ids"][:, 1:], b) for b in batches]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row, losses in zip(rows, want):
        assert float(row["train/loss"]) == pytest.approx(losses["loss"].item(), rel=1e-5)
        assert float(row["train/loss_text"]) == pytest.approx(losses["loss_text"].item(), rel=1e-5)
    assert want[1]["tokens_image"].item() == 0 and want[1]["loss_image"].item() == 0.0
    assert float(rows[0]["train/loss_image"]) == pytest.approx(want[0]["loss_image"].item(), rel=1e-5)
    assert math.isnan(float(rows[1]["train/loss_image"]))


def test_compute_loss_ignores_pad_and_splits_text_and_image() -> None:
    vocab = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=3)
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict())
    V = module.config.vocab_size
    torch.manual_seed(0)
    logits = torch.randn(1, 4, V)
    targets = torch.tensor([[10, 70, 0, 80]])  # text, image, pad, image
    out = module.compute_loss(logits, targets, {})
    ce = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    assert out["tokens"].item() == 3
    assert out["loss"].item() == pytest.approx(((ce[0] + ce[1] + ce[3]) / 3).item(), rel=1e-6)
    assert out["loss_text"].item() == pytest.approx(ce[0].item(), rel=1e-6)
    assert out["loss_image"].item() == pytest.approx(((ce[1] + ce[3]) / 2).item(), rel=1e-6)


def test_vocab_sets_model_vocab_size_and_hparams_are_primitive() -> None:
    vocab = MultimodalVocab(n_text=300, n_codes=100, grid_h=2, grid_w=2)
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=64)
    assert module.config.vocab_size == 512 == vocab.padded_size
    assert module.config.max_seq_len == 64
    allowed = (int, float, str, bool, type(None), list, tuple, dict)
    assert all(isinstance(v, allowed) for v in module.hparams.values())
    assert module.hparams["config"] == module.config.to_dict()


def test_a_network_built_before_fit_adopts_the_datas_vocabulary(tmp_path) -> None:
    """A module without `vocab` whose network was built before fit (a forward, configure_model) had its size checked
    against the data but kept no vocabulary: no text/image losses were logged and its checkpoints recorded none, so
    from_pretrained (and export, generate) refused them."""
    data = TokenDataModule(n_train=8, batch_size=4)
    module = CM3LeonModule(config=CM3LeonConfig.from_preset("tiny", vocab_size=data.vocab.padded_size), warmup_steps=1)
    module.configure_model()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert module.hparams.vocab == data.vocab.to_dict()
    assert {"train/loss_text", "train/loss_image"} <= set(trainer.logged_metrics)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert CM3LeonModule.from_pretrained(str(tmp_path / "a.ckpt")).vocab == data.vocab
    other = CM3LeonModule(preset="tiny")  # built for another size: still refused
    other.configure_model()
    with pytest.raises(ValueError, match="vocabulary mismatch: the model has vocab_size 512, the data needs 128"):
        _trainer(tmp_path, max_steps=1).fit(other, datamodule=data)


def test_a_partial_vocab_is_refused_naming_the_missing_field() -> None:
    """A description without ``grid_h`` took the default 32 and was saved as given, so `cm3leon export`, generate and
    predict (which require every field) refused the checkpoint after training."""
    partial = {k: v for k, v in MultimodalVocab(n_text=300, n_codes=100, grid_h=2, grid_w=2).to_dict().items()}
    del partial["grid_h"]
    with pytest.raises(ValueError, match=r"CM3LeonModule vocab: missing field\(s\) \['grid_h'\]"):
        CM3LeonModule(preset="tiny", vocab=partial)


def test_weight_decay_only_on_matrices() -> None:
    module = CM3LeonModule(preset="tiny", warmup_steps=2)
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in module.parameters())
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_weight_decay_survives_fsdp_style_flat_parameters() -> None:
    """What FSDP (use_orig_params) leaves for configure_optimizers: wrapped blocks (``_fsdp_wrapped_module`` in the
    names) whose parameters are flat 1-D shards. Every weight still decays, judged by the shapes built."""
    module = CM3LeonModule(preset="tiny", warmup_steps=2)
    module.configure_model()

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = inner

    module.model.blocks = torch.nn.ModuleList(Wrapped(b) for b in module.model.blocks)
    with torch.no_grad():
        for p in module.model.parameters():
            p.data = p.data.flatten()
    assert all(p.ndim == 1 for p in module.parameters())
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert no_decay["params"] == [] and len(decay["params"]) == len(list(module.parameters())) == 10
    with pytest.raises(ValueError, match="not in ndims"):
        module._param_ndims.pop("wpe.weight")
        module.configure_optimizers()


def test_overfits_one_fixed_batch() -> None:
    """The loss on one fixed batch falls by more than an order of magnitude."""
    torch.manual_seed(0)
    data = TokenDataModule(n_train=4, batch_size=4)
    module = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict(), lr=1e-2, warmup_steps=10, lr_decay="constant")
    module.configure_model()
    opt = module.configure_optimizers()["optimizer"]
    batch = {"input_ids": data.train_rows}
    first = None
    for _ in range(150):
        inputs, targets = module.build_sequence(batch)
        loss = module.compute_loss(module(inputs), targets, batch)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0
    assert loss.item() < first / 10


def test_fit_checkpoint_weights_only_and_resume(tmp_path) -> None:
    L.seed_everything(0)
    data = TokenDataModule(n_train=16, batch_size=4)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2)
    trainer = _trainer(tmp_path, max_steps=6, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    # setup() adopted the data's vocabulary because none was given.
    assert module.hparams.vocab == data.vocab.to_dict()
    assert module.config.vocab_size == data.vocab.padded_size
    ckpt = tmp_path / "six.ckpt"
    trainer.save_checkpoint(ckpt)

    raw = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert raw["global_step"] == 6
    assert raw["hyper_parameters"]["vocab"] == data.vocab.to_dict()

    loaded = CM3LeonModule.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    ids = data.val_rows[:2]
    module.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(module(ids), loaded(ids))

    # Resume: the global step continues and training goes on to max_steps.
    resumed = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2)
    trainer2 = _trainer(tmp_path, max_steps=10, limit_val_batches=1)
    trainer2.fit(resumed, datamodule=TokenDataModule(n_train=16, batch_size=4), ckpt_path=ckpt)
    assert trainer2.global_step == 10
    sched = trainer2.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 10  # the schedule resumed too, not restarted


def test_resumed_run_equals_uninterrupted_run(tmp_path) -> None:
    """Stop after 3 steps, resume to 6: the weights equal those of 6 uninterrupted steps (CPU, bitwise).

    One batch per epoch, so the stop falls on an epoch boundary and a plain DataLoader resumes exactly; this checks
    model, optimizer and schedule state (mid-epoch data resume is the streaming DataModule's test).
    """

    def run(max_steps: int, ckpt: str | None = None) -> tuple[CM3LeonModule, L.Trainer]:
        L.seed_everything(1)
        module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2, decay_steps=6)
        trainer = _trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, deterministic=True)
        trainer.fit(module, datamodule=TokenDataModule(n_train=4, batch_size=4), ckpt_path=ckpt)
        return module, trainer

    full, _ = run(6)
    _, t3 = run(3)
    t3.save_checkpoint(tmp_path / "three.ckpt")
    resumed, t6 = run(6, str(tmp_path / "three.ckpt"))
    assert t6.global_step == 6
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_resume_with_more_steps_extends_the_decay(tmp_path) -> None:
    """Stop at max_steps 3, resume with max_steps 6: the decay now spans 6 steps. LambdaLR restored the saved
    schedule object's length (3) over the new one, so the resumed steps all ran at the floor rate."""
    lrs: list[tuple[int, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
            lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    def run(max_steps: int, ckpt: str | None = None) -> L.Trainer:
        module = CM3LeonModule(preset="tiny", lr=1e-3, warmup_steps=1, min_lr_ratio=0.1)
        trainer = _trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, callbacks=[Record()])
        trainer.fit(module, datamodule=TokenDataModule(n_train=4, batch_size=4), ckpt_path=ckpt)
        return trainer

    run(3).save_checkpoint(tmp_path / "three.ckpt")
    lrs.clear()
    run(6, str(tmp_path / "three.ckpt"))
    want = WarmupDecay(1, 6, "linear", 0.1)
    assert [step for step, _ in lrs] == [3, 4, 5]
    assert [lr for _, lr in lrs] == pytest.approx([1e-3 * want(step) for step in (3, 4, 5)])
    assert lrs[0][1] > 1e-4 * 1.5  # above the floor


def test_a_resume_takes_this_runs_optimizer_settings(tmp_path) -> None:
    """Resumed with CM3LeonModule(lr=..., weight_decay=..., ...) and ckpt_path, the restored optimizer and scheduler
    kept the checkpoint's values: the new lr and weight decay were silently ignored."""
    seen: list[tuple[int, float, float, float, tuple, float]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
            decay, no_decay = trainer.optimizers[0].param_groups
            seen.append((trainer.global_step, decay["lr"], decay["weight_decay"], no_decay["weight_decay"],
                         decay["betas"], decay["eps"]))  # fmt: skip

    def run(max_steps: int, ckpt: str | None = None, **kwargs) -> L.Trainer:
        module = CM3LeonModule(preset="tiny", warmup_steps=1, min_lr_ratio=0.1, **kwargs)
        trainer = _trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, callbacks=[Record()])
        trainer.fit(module, datamodule=TokenDataModule(n_train=4, batch_size=4), ckpt_path=ckpt)
        return trainer

    run(2, lr=1e-3, weight_decay=0.1).save_checkpoint(tmp_path / "two.ckpt")
    seen.clear()
    run(4, str(tmp_path / "two.ckpt"), lr=4e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    want = WarmupDecay(1, 4, "linear", 0.1)
    assert [s[0] for s in seen] == [2, 3]
    assert [s[1] for s in seen] == pytest.approx([4e-3 * want(2), 4e-3 * want(3)])
    assert [s[2:] for s in seen] == [(0.05, 0.0, (0.8, 0.9), 1e-6)] * 2


def test_a_warm_up_longer_than_the_run_is_warned(tmp_path) -> None:
    module = CM3LeonModule(preset="tiny", lr=1e-3, warmup_steps=5)
    with pytest.warns(UserWarning, match="warmup_steps 5 >= the run's 3 steps: the learning rate never reaches"):
        _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, datamodule=TokenDataModule(n_train=4))


def test_vocabulary_mismatch_is_refused(tmp_path) -> None:
    data = TokenDataModule(n_train=8, batch_size=4)
    other = MultimodalVocab(n_text=64, n_codes=32, grid_h=3, grid_w=3)
    module = CM3LeonModule(preset="tiny", vocab=other.to_dict())
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=data)

    # A checkpoint trained on one vocabulary refuses data with another, before training, naming both.
    good = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict())
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(good, datamodule=data)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    bigger = MultimodalVocab(n_text=64, n_codes=40, grid_h=2, grid_w=3)
    mismatched = CM3LeonModule(preset="tiny", vocab=bigger.to_dict())
    with pytest.raises(ValueError, match="vocabulary mismatch") as err:
        mismatched.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=True))
    assert "'n_codes': 32" in str(err.value) and "'n_codes': 40" in str(err.value)


def test_rows_longer_than_the_context_are_refused_at_setup(tmp_path) -> None:
    """configs/model/tiny.yaml (256 positions) with configs/data/shards.yaml (seq_len 4096) failed at the first
    forward, after the data had loaded; setup now names both settings. seq_len = max_seq_len + 1 fits exactly."""
    from support.eval_setup import write_eval_data

    from cm3leon_lightning.data.datamodule import CM3LeonDataModule

    paths = write_eval_data(tmp_path / "data", n_train=4, n_val=2)
    for seq_len, fits in ((130, False), (129, True)):
        data = CM3LeonDataModule(
            train_data=paths["train"], seq_len=seq_len, batch_size=2, max_retrieved=0, num_workers=0
        )
        module = CM3LeonModule(preset="tiny", max_seq_len=128)
        trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
        if fits:
            trainer.fit(module, datamodule=data)
            assert trainer.global_step == 1
        else:
            with pytest.raises(
                ValueError, match="seq_len 130 feeds 129 positions, more than the model's max_seq_len 128"
            ):
                trainer.fit(module, datamodule=data)
            assert module.model is None  # refused before the network was built


def test_activation_checkpointing_gives_same_gradients() -> None:
    data = TokenDataModule(n_train=4, batch_size=4)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        module = CM3LeonModule(preset="tiny", vocab=data.vocab.to_dict(), activation_checkpointing=flag)
        module.configure_model()
        module.train()
        batch = {"input_ids": data.train_rows}
        inputs, targets = module.build_sequence(batch)
        module.compute_loss(module(inputs), targets, batch)["loss"].backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_config_argument_and_bad_values() -> None:
    cfg = CM3LeonConfig.from_preset("tiny", n_layer=1)
    module = CM3LeonModule(config=cfg)
    module.configure_model()
    assert len(module.model.blocks) == 1
    assert CM3LeonModule(config=cfg.to_dict()).config == cfg  # as restored from hyper-parameters
    with pytest.raises(ValueError, match="preset"):
        CM3LeonModule(preset="13b")
    with pytest.raises(ValueError, match="lr_decay"):
        CM3LeonModule(lr_decay="step")
    assert math.isfinite(CM3LeonModule().hparams.lr)


def test_architecture_mismatch_is_refused_naming_the_field() -> None:
    saved = CM3LeonModule(preset="tiny")
    checkpoint = {"hyper_parameters": dict(saved.hparams)}
    other = CM3LeonModule(config=CM3LeonConfig.from_preset("tiny", n_layer=3))
    with pytest.raises(ValueError, match=r"architecture mismatch.*'n_layer': \(2, 3\)"):
        other.on_load_checkpoint(checkpoint)
    CM3LeonModule(preset="tiny").on_load_checkpoint(checkpoint)  # the same architecture loads


def test_a_preset_beside_a_config_of_another_architecture_is_warned_about_naming_the_fields() -> None:
    """--config tiny.yaml --model.init_args.config.n_layer 4 built CM3LeonConfig's defaults (350m) with 4 layers,
    ignoring preset: tiny without a word. The warning names each field; checkpoints record no preset beside config."""
    partial = CM3LeonConfig(n_layer=4)  # what jsonargparse builds from one config field: the other fields' defaults
    with pytest.warns(UserWarning) as record:
        module = CM3LeonModule(preset="tiny", config=partial)
    (warning,) = [w for w in record if "preset='tiny'" in str(w.message)]
    message = str(warning.message)
    assert "n_layer 4 (preset: 2)" in message and "d_model 1024 (preset: 64)" in message
    assert "vocab_size" not in message.split(";")[0] and "max_seq_len 4096" not in message  # data, max_seq_len
    assert module.config.n_layer == 4 and module.config.d_model == 1024  # the config is used, whole
    assert module.hparams.preset is None  # a reload from its hyper-parameters does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CM3LeonModule(**{k: module.hparams[k] for k in ("preset", "config")})
        same = CM3LeonModule(preset="tiny", config=CM3LeonConfig.from_preset("tiny", vocab_size=512, init_std=0.05))
        assert same.hparams.preset is None and same.config.vocab_size == 512
        assert CM3LeonModule(preset="350m").hparams.preset == "350m"
        assert CM3LeonModule().config == CM3LeonConfig.from_preset("tiny")


def test_flops_per_batch_drives_lightnings_throughput_monitor(tmp_path) -> None:
    """The module reports each batch's FLOPs (3x forward in training, forward in validation); ThroughputMonitor with
    the configs' batch_rows/batch_tokens logs FLOP/s and tokens per second from them (no MFU on a CPU)."""
    from lightning.pytorch.callbacks import ThroughputMonitor

    from cm3leon_lightning.modules.cm3leon import batch_rows, batch_tokens

    seen: dict[str, list[int]] = {"train": [], "val": []}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            seen["train"].append((module.flops_per_batch, *batch["input_ids"].shape))

        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            seen["val"].append((module.flops_per_batch, *batch["input_ids"].shape))

    monitor = ThroughputMonitor(batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=2)
    module = CM3LeonModule(preset="tiny", warmup_steps=1)
    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(
        tmp_path, max_steps=3, limit_val_batches=1, log_every_n_steps=1, callbacks=[Probe(), monitor],
        logger=CSVLogger(tmp_path),  # the monitor logs through the trainer's loggers only
    )  # fmt: skip
    trainer.fit(module, datamodule=TokenDataModule(n_train=12, batch_size=4))
    for stage, factor in (("train", 3), ("val", 1)):
        assert seen[stage]
        for flops, rows, length in seen[stage]:
            assert flops == factor * rows * module.config.forward_flops(length - 1)
    metrics = trainer.logged_metrics
    assert metrics["train/device/flops_per_sec"] > 0 and metrics["train/device/items_per_sec"] > 0
    assert "train/device/mfu" not in metrics  # the CPU's peak FLOP/s is unknown to Lightning


def test_tokens_per_second_restarts_after_a_validation(tmp_path) -> None:
    """The first training step after a mid-epoch validation logged its tokens over the validation's time too."""
    rates: list[tuple[int, bool]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
            rates.append((trainer.global_step, module._last_step_time is not None))

    module = CM3LeonModule(preset="tiny", warmup_steps=1)
    trainer = cpu_trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1, callbacks=[Record()],
                          enable_checkpointing=False, logger=CSVLogger(tmp_path), log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, datamodule=TokenDataModule(n_train=16, n_val=2, batch_size=2))
    assert rates == [(0, False), (1, True), (2, False), (3, True)]  # step 2 follows the validation
    # and every step logs its own rate: one skipped (the first, the one after the validation) was written again,
    # stale, by Lightning
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        logged = [(int(r["step"]), r["train/tokens_per_sec"]) for r in csv.DictReader(f) if r["train/tokens_per_sec"]]
    assert [step for step, _ in logged] == [0, 1, 2, 3] and len({rate for _, rate in logged}) == 4
