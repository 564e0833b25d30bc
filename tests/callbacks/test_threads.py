"""ThreadsWhenFree: the thread count rises at the first batch after the other process has ended, not before."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cm3leon_lightning.callbacks import ThreadsWhenFree


class _FakeProcess:
    """Alive for the first ``alive_checks`` calls of is_alive()."""

    def __init__(self, alive_checks: int) -> None:
        self.left = alive_checks

    def is_alive(self) -> bool:
        self.left -= 1
        return self.left >= 0


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.threads: list[int] = []

    def training_step(self, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        return (self.w - batch.float()).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_threads_rise_once_the_process_has_ended(tmp_path):
    before = torch.get_num_threads()
    probe = _Probe()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[ThreadsWhenFree(_FakeProcess(alive_checks=2), threads=before + 1)])  # fmt: skip
    try:
        torch.set_num_threads(before)
        trainer.fit(probe, DataLoader(torch.arange(5), batch_size=1))
        assert probe.threads == [before, before, before + 1, before + 1, before + 1]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ThreadsWhenFree(_FakeProcess(0), threads=0)
