"""check_unsharded: the generation callbacks refuse a model sharded across devices before training."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from cm3leon_lightning.callbacks import FIDCallback
from cm3leon_lightning.callbacks.base import check_unsharded


def fake_trainer(strategy, world_size: int) -> SimpleNamespace:
    return SimpleNamespace(strategy=strategy, world_size=world_size)


@pytest.mark.parametrize("sharding", ["FULL_SHARD", "SHARD_GRAD_OP"])
def test_fsdp_sharding_on_several_devices_is_refused_naming_the_callback(sharding: str) -> None:
    trainer = fake_trainer(FSDPStrategy(sharding_strategy=sharding), 2)
    with pytest.raises(ValueError, match=rf"FIDCallback: .* 2 devices by FSDPStrategy \({sharding}\) .*init_from"):
        check_unsharded(trainer, "FIDCallback")


@pytest.mark.parametrize(
    ("strategy", "world_size"),
    [(FSDPStrategy(sharding_strategy="NO_SHARD"), 4), (FSDPStrategy(), 1), (DDPStrategy(), 8), (None, 1)],
)
def test_unsharded_runs_pass(strategy, world_size: int) -> None:
    check_unsharded(fake_trainer(strategy, world_size), "X")
    check_unsharded(None, "X")  # no trainer: a notebook calling the callback by hand


def test_callbacks_check_in_setup_before_reading_anything(tmp_path) -> None:
    """The check runs first in load_resources, which every callback's setup calls: a missing tokenizer file is not
    even looked at."""
    cb = FIDCallback(data=str(tmp_path), text_tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="FIDCallback: generating with a model sharded"):
        cb.load_resources(fake_trainer(FSDPStrategy(), 2))
