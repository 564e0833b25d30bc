"""Assets for the serving tests: a tokenizer, a micro VQGAN (16 px, 8x8 codes from 32), a random tiny CM3Leon
checkpoint for both (256 positions: room for an edit prompt), and random tiny-CLIP weights (re-ranking)."""

import pytest
import torch
from support.checkpoint_setup import write_checkpoint_assets

from cm3leon_lightning.modules.clip import ClipModule


@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory):
    root = write_checkpoint_assets(tmp_path_factory.mktemp("serve"), max_seq_len=256)
    torch.manual_seed(1)
    ClipModule(model_name="cm3leon-clip-tiny").export_weights(root / "clip.safetensors")
    return root
