"""`cm3leon fit --ckpt_path` resumes modules without a `vocab` argument (VQGAN, CLIP), as README "Resuming" says."""

from __future__ import annotations

from pathlib import Path


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
