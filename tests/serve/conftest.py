"""Assets for the serving tests: a tokenizer, a micro VQGAN (16 px, 8x8 codes from 32), a random tiny CM3Leon
checkpoint for both (256 positions: room for an edit prompt), and random tiny-CLIP weights (re-ranking)."""

import pytest
import torch

from cm3leon_lightning.modules.clip import ClipModule
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.tokenization.text import TextTokenizer
from cm3leon_lightning.tokenization.vqgan import VQGAN

CORPUS = ["a red circle", "a blue square", "two green triangles", "a small red square", "what colour is it"] * 20


@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tok = TextTokenizer.train(CORPUS, vocab_size=300)
    tok.save(root / "tok")
    torch.manual_seed(0)
    vqgan = VQGAN.from_name("micro").eval()
    vqgan.save_pretrained(root / "vqgan")
    vocab = tok.make_vocab(n_codes=vqgan.n_embed, grid_h=8, grid_w=8)
    module = CM3LeonModule(preset="tiny", vocab=vocab.to_dict(), max_seq_len=256)
    module.configure_model()
    with torch.no_grad():  # random blocks, so samples differ between seeds
        for p in module.model.parameters():
            p.normal_(0.0, 0.2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, root / "model.ckpt")
    torch.manual_seed(1)
    ClipModule(model_name="cm3leon-clip-tiny").export_weights(root / "clip.safetensors")
    return root
