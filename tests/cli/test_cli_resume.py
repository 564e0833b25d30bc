"""`cm3leon fit --ckpt_path` resumes modules without a `vocab` argument (VQGAN, CLIP), as README "Resuming" says."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


def test_a_vqgan_fit_resumes_through_the_cli(tmp_path: Path) -> None:
    """README "Resuming": `cm3leon fit ... --ckpt_path` continues a VQGAN run (ImageDataModule). The checkpoint's
    hyper-parameters held `vocab: None`, which LightningCLI passes back: VQGANModule got an unexpected `vocab`."""
    from cm3leon_lightning.cli import main

    args = ["fit", "--model", "cm3leon_lightning.modules.vqgan.VQGANModule", "--model.init_args.preset", "tiny",
            "--model.init_args.disc_weight", "0.0", "--data", "cm3leon_lightning.data.images.ImageDataModule",
            "--data.init_args.synthetic", "8", "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
            "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks+", "ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
            "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]  # fmt: skip
    main([*args, "--trainer.max_steps", "1"])
    first = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"
    main([*args, "--trainer.max_steps", "2", "--ckpt_path", str(first)])
    assert (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").is_file()


def test_a_clip_fit_resumes_with_overwrite_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished CLIP run has exported its weights, so resuming it with `--ckpt_path` met the refusal of an existing
    `export_path`, which asks for `--model.init_args.overwrite_export true`: that was ignored, as LightningCLI puts the
    checkpoint's hyper-parameters (`overwrite_export: false`) over the command line, so no resume could run."""
    from cm3leon_lightning.cli import main

    export = tmp_path / "clip.safetensors"
    args = ["fit", "--model", "cm3leon_lightning.modules.clip.ClipModule", "--model.init_args.model_name",
            "cm3leon-clip-tiny", "--model.init_args.export_path", str(export), "--data",
            "cm3leon_lightning.data.pairs.ImageCaptionDataModule", "--data.init_args.synthetic", "32",
            "--data.init_args.synthetic_source", "shapes", "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks+", "ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
            "--trainer.callbacks.save_last", "true"]  # fmt: skip
    assert main([*args, "--trainer.max_steps", "1"]) == 0
    first = export.read_bytes()
    resume = [*args, "--trainer.max_steps", "2", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")]
    assert main(resume) == 2  # still refused unless asked for
    assert "export_path" in capsys.readouterr().err and export.read_bytes() == first
    assert main([*resume, "--model.init_args.overwrite_export", "true"]) == 0
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert export.read_bytes() != first


def test_a_checkpoint_of_another_module_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cm3leon fit <CM3Leon configs> --ckpt_path <a VQGAN checkpoint>`: LightningCLI took the checkpoint's class
    path over the config's and built a VQGANModule, which then failed on the trainer's gradient clipping."""
    from support.token_data import write_fit_config

    from cm3leon_lightning.cli import main

    vqgan_args = ["fit", "--model", "cm3leon_lightning.modules.vqgan.VQGANModule", "--model.init_args.preset", "tiny",
                  "--model.init_args.disc_weight", "0.0", "--data", "cm3leon_lightning.data.images.ImageDataModule",
                  "--data.init_args.synthetic", "4", "--data.init_args.image_size", "32",
                  "--data.init_args.batch_size", "4", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                  "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1"]  # fmt: skip
    assert main(vqgan_args) == 0
    vqgan_ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    cfg = write_fit_config(tmp_path, max_steps=1, n_train=4)
    tiny = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny), "--config", str(cfg), "--ckpt_path", str(vqgan_ckpt)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --ckpt_path: {vqgan_ckpt} is a checkpoint of cm3leon_lightning.modules.vqgan.VQGANModule, but the "
        "model given is cm3leon_lightning.modules.cm3leon.CM3LeonModule; give the checkpoint of this model, or the "
        "config of the run that wrote it"
    )
    assert not (tmp_path / "ckpt").exists()  # nothing trained


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("Ctrl-C", 130)])
def test_a_run_stopped_by_a_signal_exits_with_its_status(
    signal_name: str, status: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning ends a fit stopped by SIGTERM with `SIGTERMException`, a SystemExit without a code: `cm3leon fit`
    exited with status 0, as if training had finished (`cm3leon fit ... && cm3leon export ...` went on); Ctrl-C
    exited with 1, as a failure does."""
    import sys

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import cm3leon_lightning.trainer_cli as trainer_cli
    from cm3leon_lightning.cli import main

    def stopped(args: object) -> None:  # what Lightning's _call_and_handle_interrupt raises
        if signal_name == "SIGTERM":
            raise SIGTERMException
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)

    monkeypatch.setattr(trainer_cli, "CM3LeonCLI", stopped)
    assert main(["fit", "--config", "run.yaml"]) == status
    assert capsys.readouterr().err == (
        f"cm3leon fit: stopped by {signal_name} (exit status {status}); the checkpoints written so far are kept: "
        "resume with --ckpt_path <last.ckpt>\n"
    )
    monkeypatch.setattr(trainer_cli, "CM3LeonCLI", lambda args: sys.exit(1))  # another exit is left as it is
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", "run.yaml"])
    assert exit_info.value.code == 1


def _resumed_module(args: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """The ``CM3LeonCLI`` of ``cm3leon <args>``, built as for a run that is then not started."""
    from cm3leon_lightning.trainer_cli import CM3LeonCLI

    monkeypatch.setattr(CM3LeonCLI, "_run_subcommand", lambda self, subcommand: None)
    return CM3LeonCLI(args=args)


def test_a_resume_warns_of_the_model_arguments_the_checkpoint_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LightningCLI puts a checkpoint's hyper-parameters over the command line: `cm3leon fit ... --ckpt_path last.ckpt
    --model.init_args.lr 1e-4` resumed with the checkpoint's lr without a word, and `activation_checkpointing true`
    (to resume on a smaller GPU) or `compile true` were dropped the same way. Those two only change memory and speed,
    so they are now taken as given; the others are named in a warning."""
    from support.token_data import write_fit_config

    from cm3leon_lightning.cli import main

    tiny = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"
    cfg = write_fit_config(tmp_path, max_steps=1, n_train=4)
    base = ["fit", "--config", str(tiny), "--config", str(cfg)]
    assert main(base) == 0
    last = tmp_path / "ckpt" / "last.ckpt"
    given = ["--model.init_args.lr", "1e-4", "--model.init_args.decay_steps", "50",
             "--model.init_args.activation_checkpointing", "true", "--model.init_args.compile", "true"]  # fmt: skip
    with pytest.warns(UserWarning) as record:
        cli = _resumed_module([*base, "--ckpt_path", str(last), *given], monkeypatch)
    hparams = cli.model.hparams
    assert (hparams.lr, hparams.decay_steps) == (3e-3, None)  # tiny.yaml's, as the checkpoint holds
    assert (hparams.activation_checkpointing, hparams.compile) == (True, True)
    assert [str(w.message) for w in record if str(w.message).startswith("--ckpt_path")] == [
        f"--ckpt_path {last}: the run resumes with the checkpoint's model hyper-parameters, not these given: lr "
        "0.0001 (the checkpoint's: 0.003), decay_steps 50 (the checkpoint's: None) (LightningCLI restores them; "
        "--model.init_args.init_from starts a new run from its weights with them)"
    ]
    with warnings.catch_warnings(record=True) as record:  # the same arguments as the checkpoint's: nothing to say
        warnings.simplefilter("always")
        cli = _resumed_module([*base, "--ckpt_path", str(last)], monkeypatch)
    assert [str(w.message) for w in record if str(w.message).startswith("--ckpt_path")] == []
    assert (cli.model.hparams.activation_checkpointing, cli.model.hparams.compile) == (False, False)


def test_a_resume_on_data_of_another_vqgan_takes_allow_tokenizer_change(tmp_path: Path) -> None:
    """The refusal of data prepared with another VQGAN than a checkpoint's asks for `--model.init_args.
    allow_tokenizer_change true`; on `--ckpt_path` LightningCLI replaced it with the checkpoint's `false`, so the
    refusal came again and no resume could run."""
    from support.eval_setup import write_eval_data

    from cm3leon_lightning.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    first, other = write_eval_data(tmp_path / "a", n_train=4, n_val=2), write_eval_data(tmp_path / "b", 4, 2, seed=1)
    args = ["fit", "--config", str(configs / "trainer" / "cpu.yaml"), "--config", str(configs / "model" / "tiny.yaml"),
            "--config", str(configs / "data" / "shards.yaml"), "--data.init_args.seq_len", "256",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--trainer.logger", "false",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    data = ["--data.init_args.train_data", first["train"], "--data.init_args.val_data", first["val"]]
    assert main([*args, *data, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "r1")]) == 0
    last = tmp_path / "r1" / "checkpoints" / "last.ckpt"
    data = ["--data.init_args.train_data", other["train"], "--data.init_args.val_data", other["val"]]
    resume = [*args, *data, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "r2")]
    assert main([*resume, "--ckpt_path", str(last)]) == 2  # refused unless asked for
    assert main([*resume, "--ckpt_path", str(last), "--model.init_args.allow_tokenizer_change", "true"]) == 0
    ckpt = torch.load(tmp_path / "r2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert (
        ckpt["hyper_parameters"]["vocab"]["vqgan_sha256"]
        != torch.load(last, weights_only=True)["hyper_parameters"]["vocab"]["vqgan_sha256"]
    )  # the data's VQGAN, recorded
