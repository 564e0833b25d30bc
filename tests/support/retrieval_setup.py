"""A tiny retrieval setup on disk: tokenizer, micro VQGAN, a random tiny CM3Leon checkpoint, 12 shard documents with
distinct captions, a random tiny CLIP saved as safetensors, and a Flat memory bank of the captions' CLIP text
embeddings (for ``cm3leon generate --retrieve`` and ``cm3leon serve --retrieve``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cm3leon_lightning.data.shards import ShardSample, ShardWriter
from cm3leon_lightning.retrieval.encoder import ClipEncoder, create_clip
from cm3leon_lightning.retrieval.index import MemoryBank
from support.eval_setup import CAPTIONS, micro_vqgan, tiny_module, tiny_tokenizer


def write_retrieval_assets(root: Path) -> dict:
    """Write the setup under ``root`` (``tok/``, ``vqgan/``, ``model.ckpt``, ``shards/``, ``clip.safetensors``,
    ``bank/``); returns ``root``, the samples by key, the caption embeddings, the CLIP encoder and the vocabulary."""
    tok = tiny_tokenizer()
    tok.save(root / "tok")
    micro_vqgan().save_pretrained(root / "vqgan")
    module = tiny_module(tok)
    with torch.no_grad():
        for p in module.model.parameters():
            p.normal_(0.0, 0.2)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, root / "model.ckpt")

    rng = np.random.default_rng(0)
    samples = [
        ShardSample(f"doc-{i:02d}", c, np.asarray(tok.encode(c), np.int32), rng.integers(0, 32, 64).astype(np.int16))
        for i, c in enumerate(CAPTIONS)
    ]
    text_info = {"path": "tok/tokenizer.json", "sha256": tok.sha256, "n_text": tok.vocab_size, "num_sentinels": 8}
    image_info = {"checkpoint_sha256": "0" * 64, "n_codes": 32, "grid_h": 8, "grid_w": 8, "image_size": 16}
    ShardWriter(root / "shards", text_info, image_info, samples_per_shard=5).write_all(samples)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        clip_model = create_clip("cm3leon-clip-tiny", None)
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, str(root / "clip.safetensors"))
    clip = ClipEncoder("cm3leon-clip-tiny", pretrained=str(root / "clip.safetensors"))
    emb = clip.embed_texts(CAPTIONS)  # (12, 64), unit rows
    MemoryBank.build((emb, [s.key for s in samples]), clip.dim, clip.model_name).save(root / "bank")
    return {"root": root, "samples": {s.key: s for s in samples}, "emb": emb, "clip": clip, "vocab": module.vocab}
