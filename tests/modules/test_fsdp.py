"""The sharded-training path of configs/trainer/fsdp_bf16.yaml (Lightning's FSDPStrategy), on one GPU, and reading
its sharded checkpoint back without consolidating it (``model/weights.py``).

Lightning's FSDP strategy refuses CPU accelerators, so these tests run only where CUDA is (benchmarks/gpu_suite.sh);
the CPU-side part of the path (weight decay of flat sharded parameters) is tested in test_cm3leon_module.py.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from support.token_data import TokenDataModule

from cm3leon_lightning.model.transformer import Block
from cm3leon_lightning.modules.cm3leon import CM3LeonModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs CUDA")


def fit(tmp_path, steps: int, fsdp: bool, ckpt: str | None = None) -> tuple[CM3LeonModule, L.Trainer]:
    L.seed_everything(1)
    module = CM3LeonModule(preset="tiny", lr=3e-3, warmup_steps=2, decay_steps=6)
    strategy = (
        FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="FULL_SHARD", state_dict_type="sharded")
        if fsdp
        else "auto"
    )
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=strategy, precision="32-true", max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
        deterministic=True, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=TokenDataModule(n_train=4, batch_size=4), ckpt_path=ckpt)
    return module, trainer


def full_weights(module: CM3LeonModule, trainer: L.Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from cm3leon_lightning.model.transformer import clean_param_name

    model = trainer.strategy.model
    with FSDP.summon_full_params(model) if isinstance(model, FSDP) else torch.no_grad():
        return {clean_param_name(n): p.detach().cpu().clone() for n, p in module.model.named_parameters()}


def test_fsdp_training_matches_plain_training_and_resumes_from_a_sharded_checkpoint(tmp_path) -> None:
    plain, t_plain = fit(tmp_path / "plain", 6, fsdp=False)
    sharded, t_sharded = fit(tmp_path / "fsdp", 6, fsdp=True)
    want, got = full_weights(plain, t_plain), full_weights(sharded, t_sharded)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    # every weight decayed (the groups were judged by the shapes built, not FSDP's flat views)
    decay, no_decay = t_sharded.optimizers[0].param_groups
    assert no_decay["params"] == [] and len(decay["params"]) == 10

    m3, t3 = fit(tmp_path / "fsdp3", 3, fsdp=True)
    t3.save_checkpoint(tmp_path / "three.ckpt")
    assert (tmp_path / "three.ckpt").is_dir()  # state_dict_type="sharded": one shard file per rank + metadata
    # read without consolidating (init_from, cm3leon generate / export): the full weights, the step
    from cm3leon_lightning.model.weights import read_weights

    weights, three = read_weights(tmp_path / "three.ckpt"), full_weights(m3, t3)
    assert weights.kind == "sharded checkpoint" and weights.source["global_step"] == 3
    for name, value in three.items():
        assert torch.equal(weights.state_dict[name], value), name
    from cm3leon_lightning.generation.cli import load_checkpoint

    on_gpu, _ = load_checkpoint(tmp_path / "three.ckpt", device="cuda")  # read chunk by chunk onto the GPU
    assert all(p.is_cuda for p in on_gpu.parameters()) and on_gpu.lm_head.weight is on_gpu.wte.weight
    for name, value in three.items():
        assert torch.equal(on_gpu.state_dict()[name].cpu(), value), name
    resumed, t6 = fit(tmp_path / "fsdp6", 6, fsdp=True, ckpt=str(tmp_path / "three.ckpt"))
    assert t6.global_step == 6
    again = full_weights(resumed, t6)
    for name in got:
        torch.testing.assert_close(again[name], got[name], atol=1e-6, rtol=1e-5, msg=name)
