"""CM3LeonDataModule: sources, exact splitting over ranks and workers, mid-epoch resume, bad data."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    CLIP,
    IMAGE_TOKENIZER,
    RETRIEVAL,
    TEXT_TOKENIZER,
    make_sample,
    write_dataset,
)  # tests/data/conftest.py (imported at collection, as the other data tests do)

from cm3leon_lightning.data import CM3LeonDataModule
from cm3leon_lightning.data.plan import exact_plan
from cm3leon_lightning.data.shards import Manifest, file_sha256, iter_tar_samples
from cm3leon_lightning.data.stream import ShardStream
from cm3leon_lightning.tokenization.vocab import MultimodalVocab

ALL_KEYS = {f"doc-{i:04d}" for i in range(22)}


def make_dm(
    root: Path | str | list[str], dm_class: type[CM3LeonDataModule] = CM3LeonDataModule, **kw
) -> CM3LeonDataModule:
    args = dict(
        train_data=root if isinstance(root, list) else str(root),
        seq_len=64,
        batch_size=2,
        num_workers=0,
        max_skip_share=1.0,
    )
    return dm_class(**{**args, **kw})


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for row in b["keys"] for k in row]


def test_vocabulary_comes_from_the_manifest(tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset)
    assert dm.vocab == MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=2, num_sentinels=8)
    assert dm.vocab_size == 128 and dm.manifest.num_samples == 22
    with pytest.raises(ValueError, match="one image document needs 6"):
        make_dm(tiny_dataset, seq_len=20)  # 20 - 17 reserved for masking < 6


def test_splits_tokenized_by_other_tokenizers_of_equal_sizes_are_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    """Equal vocabulary sizes were enough: a validation split of another BPE gave a meaningless val/loss."""
    import shutil

    from cm3leon_lightning.data import DataCountsLogger

    val = tmp_path / "val"
    shutil.copytree(tiny_dataset, val)
    doc = json.loads((val / "manifest.json").read_text())
    for section, key in (("text_tokenizer", "sha256"), ("image_tokenizer", "checkpoint_sha256")):
        other = json.loads(json.dumps(doc))
        other[section][key] = "f" * 64
        (val / "manifest.json").write_text(json.dumps(other))
        with pytest.raises(ValueError, match=rf"different tokenizers \({section}.{key}\)"):
            CM3LeonDataModule(train_data=str(tiny_dataset), val_data=str(val), seq_len=64)
    (val / "manifest.json").write_text(json.dumps(doc))
    assert CM3LeonDataModule(train_data=str(tiny_dataset), val_data=str(val), seq_len=64).vocab.n_text == 64
    # one VQGAN saved as two files (its checkpoint, its save_pretrained copy): the weights hashes say it is the same
    train = tmp_path / "train"
    shutil.copytree(tiny_dataset, train)
    for folder, file_hash, weights in ((train, "e" * 64, "a" * 64), (val, "f" * 64, "a" * 64)):
        other = json.loads(json.dumps(doc))
        other["image_tokenizer"].update(checkpoint_sha256=file_hash, weights_sha256=weights)
        (folder / "manifest.json").write_text(json.dumps(other))
    dm = CM3LeonDataModule(train_data=str(train), val_data=str(val), seq_len=64)
    assert dm.vocab.vqgan_weights_sha256 == "a" * 64
    other["image_tokenizer"]["weights_sha256"] = "b" * 64  # other weights too
    (val / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different tokenizers \(image_tokenizer.checkpoint_sha256\)"):
        CM3LeonDataModule(train_data=str(train), val_data=str(val), seq_len=64)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        DataCountsLogger(every_n_steps=0)  # failed at the first batch with ZeroDivisionError


def test_data_counts_every_n_steps_are_written_at_those_steps_only(tiny_dataset: Path, tmp_path: Path) -> None:
    """Logged through LightningModule.log at every third step, the counts were written again, stale, at the steps
    between (data/examples 6 at steps 3-5); now they reach the logger at steps 3 and 6 only, with their values."""
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cm3leon_lightning.data import DataCountsLogger
    from cm3leon_lightning.modules.cm3leon import CM3LeonModule

    dm = make_dm(tiny_dataset)
    module = CM3LeonModule(preset="tiny", vocab=dm.vocab.to_dict(), max_seq_len=64, warmup_steps=1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=7, logger=CSVLogger(tmp_path), callbacks=[DataCountsLogger(every_n_steps=3)],
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("data/examples")]
    assert [(int(r["step"]), float(r["data/examples"])) for r in rows] == [(3, 6.0), (6, 12.0)]  # 2 per batch


def test_data_counts_are_summed_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP only global rank zero's counts were logged: a rank that skipped a whole shard logged nothing."""
    from types import SimpleNamespace

    from cm3leon_lightning.data import DataCountsLogger

    other_rank = {"examples": 10, "skipped_corrupt_shard": 4}
    gathered: list[dict] = []

    def all_gather_object(out: list, obj: dict) -> None:
        gathered.append(obj)
        out[:] = [obj, other_rank]

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    written: list[tuple[dict, int]] = []
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(data_counts={"examples": 12, "dropped_retrieved": 1}),
        global_step=3,
        is_global_zero=True,
        loggers=[SimpleNamespace(log_metrics=lambda metrics, step: written.append((metrics, step)))],
    )
    callback = DataCountsLogger(every_n_steps=3)
    callback.on_train_batch_end(trainer, None)
    want = {"data/examples": 22.0, "data/dropped_retrieved": 1.0, "data/skipped_corrupt_shard": 4.0}
    assert written == [(want, 3)] and callback.last == want
    trainer.global_step = 4  # not a logging step: no collective either (every rank skips it alike)
    callback.on_train_batch_end(trainer, None)
    assert len(gathered) == 1 and len(written) == 1


def test_zero_counts_summed_over_ranks_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counter addition drops zeros: under DDP data/dropped_retrieved 0 was never logged (one process logs it)."""
    from cm3leon_lightning.data.datamodule import sum_over_ranks

    counts = {"examples": 12, "dropped_retrieved": 0, "truncated_tokens": 0}
    assert sum_over_ranks(counts) == counts  # one process: as is
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, o: out.__setitem__(slice(0, 2), [o] * 2))
    assert sum_over_ranks(counts) == {"examples": 24, "dropped_retrieved": 0, "truncated_tokens": 0}


@pytest.mark.parametrize(
    ("counts", "world", "workers", "per_batch"),
    [([4, 4, 4, 4, 4, 2], 2, 2, 2), ([5, 3, 7, 1], 3, 1, 4), ([10] * 7, 4, 3, 3), ([1, 1], 2, 0, 5)],
)
def test_exact_plan_covers_every_sample_once_with_equal_batches(counts, world, workers, per_batch) -> None:
    plan = exact_plan(counts, world, workers, per_batch, seed=1, epoch=2)
    seen = [(p.shard, i) for rank in plan for w in rank for p in w.pieces for i in range(p.start, p.stop)]
    assert sorted(seen) == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    batches = {sum(w.num_batches for w in rank) for rank in plan}
    assert len(batches) == 1
    assert all(w.num_samples <= w.num_batches * per_batch for rank in plan for w in rank)


def test_exact_mode_two_ranks_two_workers_simulated(tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset)
    _, urls, infos = dm.sources["train"]
    keys, per_rank = [], []
    for rank in range(2):
        stream = ShardStream(urls, infos, dm.cfg, 2, 64, rank=rank, world_size=2, num_workers=2)
        batches = [b for worker in range(2) for b in stream.iter_worker(worker)]
        assert all(b["input_ids"].shape == (2, 64) for b in batches)
        per_rank.append(len(batches))
        keys += keys_of(batches)
        assert len(batches) == len(stream) == 6  # 11 samples per rank -> 6 batches, the last one padded
    assert per_rank[0] == per_rank[1]
    assert len(keys) == len(set(keys)) and set(keys) == ALL_KEYS


def test_real_workers_interleave_like_the_simulation(tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset, num_workers=2)
    dm.setup("fit")
    real = list(dm.train_dataloader())
    _, urls, infos = dm.sources["train"]
    stream = ShardStream(urls, infos, dm.cfg, 2, 64, num_workers=2)
    w0, w1 = list(stream.iter_worker(0)), list(stream.iter_worker(1))
    expected = [b for pair in zip(w0, w1) for b in pair] + w0[len(w1) :]
    assert [b["keys"] for b in real] == [b["keys"] for b in expected]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(real, expected))
    assert set(keys_of(real)) == ALL_KEYS and len(real) == len(dm.train_dataloader()) == 11
    assert dm.data_counts["examples"] == 22


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_without_a_trainer(tiny_dataset: Path, workers: int) -> None:
    full_dm = make_dm(tiny_dataset, num_workers=workers)
    loader = full_dm.train_dataloader()
    full = list(loader) + list(loader)  # two epochs
    dm = make_dm(tiny_dataset, num_workers=workers)
    it = iter(dm.train_dataloader())
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(dm.state_dict()))  # survives a round trip through primitives
    del it
    resumed = make_dm(tiny_dataset, num_workers=workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    tail = list(loader) + list(loader)
    assert [b["keys"] for b in head + tail] == [b["keys"] for b in full]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(head + tail, full))
    assert resumed.data_counts == full_dm.data_counts and full_dm.data_counts["examples"] == 44
    with pytest.raises(ValueError, match=r"cannot resume mid-epoch: .* other settings \(batch_size: 2 -> 1\); resume"):
        make_dm(tiny_dataset, num_workers=workers, batch_size=1).train_dataloader().load_state_dict(state)
    for other in ({"shuffle_shards": 1}, {"shuffle": False}):  # were accepted: 8 samples twice, 8 never
        with pytest.raises(ValueError, match="cannot resume mid-epoch"):
            make_dm(tiny_dataset, num_workers=workers, **other).train_dataloader().load_state_dict(state)


def test_epochs_reshuffle_and_validation_is_deterministic(tiny_dataset: Path) -> None:
    dm = make_dm(tiny_dataset, val_data=str(tiny_dataset))
    loader = dm.train_dataloader()
    e0, e1 = keys_of(list(loader)), keys_of(list(loader))
    assert set(e0) == set(e1) == ALL_KEYS and e0 != e1
    v1, v2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert keys_of(v1) == sorted(ALL_KEYS)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(v1, v2))
    v_workers = list(make_dm(tiny_dataset, val_data=str(tiny_dataset), num_workers=2).val_dataloader())
    assert sorted(keys_of(v_workers)) == sorted(ALL_KEYS)


def test_resampled_mode_ends_when_no_shard_can_be_read(tiny_dataset: Path, tmp_path: Path) -> None:
    """Resampled mode draws shards forever: with all of them gone it never filled a batch (a silent hang)."""
    import logging
    import shutil

    gone = tmp_path / "gone"
    shutil.copytree(tiny_dataset, gone)
    dm = make_dm(gone, mode="resampled")
    for shard in gone.glob("shard-*.tar"):
        shard.unlink()  # the storage went away after the manifest was read
    logging.getLogger("cm3leon_lightning.data.stream").setLevel(logging.ERROR)  # one warning per draw otherwise
    try:
        with pytest.raises(RuntimeError, match=r"shards in a row could not be read \(of 6\)"):
            next(iter(dm.train_dataloader()))
    finally:
        logging.getLogger("cm3leon_lightning.data.stream").setLevel(logging.NOTSET)


def test_resampled_mode_and_packing(tiny_dataset: Path) -> None:
    a, b = make_dm(tiny_dataset, mode="resampled"), make_dm(tiny_dataset, mode="resampled")
    ka, kb = keys_of(list(a.train_dataloader())), keys_of(list(b.train_dataloader()))
    assert ka == kb and len(ka) == 22 and set(ka) <= ALL_KEYS and len(a.train_dataloader()) == 11
    packed = list(make_dm(tiny_dataset, pack=2).train_dataloader())
    assert len(packed) == 6 and sorted(keys_of(packed)) == sorted(ALL_KEYS)
    assert [len(row) for row in packed[0]["keys"]] == [2, 2]


def test_sources_lists_braces_and_remote_guard(tiny_dataset: Path) -> None:
    pattern = str(tiny_dataset / "shard-{000000..000001}.tar")
    for spec in (pattern, [str(tiny_dataset / "shard-000000.tar"), str(tiny_dataset / "shard-000001.tar")]):
        assert len(keys_of(list(make_dm(spec).train_dataloader()))) == 8
    with pytest.raises(ValueError, match="allow_remote=True"):
        make_dm("s3://bucket/ds/shard-{000000..000003}.tar")
    with pytest.raises(ValueError, match="need the manifest"):
        make_dm(f"pipe:cat {tiny_dataset}/shard-000000.tar", allow_remote=True)
    piped = make_dm(
        f"pipe:cat {tiny_dataset}/shard-000000.tar", manifest=str(tiny_dataset / "manifest.json"), allow_remote=True
    )
    assert sorted(keys_of(list(piped.train_dataloader()))) == [f"doc-{i:04d}" for i in range(4)]
    # the usual WebDataset form: the shard is the last word naming a .tar, not the trailing "-"
    aws_style = make_dm(
        f"pipe:cat {tiny_dataset}/shard-000001.tar -", manifest=str(tiny_dataset / "manifest.json"), allow_remote=True
    )
    assert sorted(keys_of(list(aws_style.train_dataloader()))) == [f"doc-{i:04d}" for i in range(4, 8)]
    failing = make_dm(  # a failing command is a shard that cannot be read: skipped and counted, not a crash
        f"pipe:cat {tiny_dataset}/missing/shard-000000.tar", manifest=str(tiny_dataset / "manifest.json"),
        allow_remote=True, max_skip_share=1.0,
    )  # fmt: skip
    assert keys_of(list(failing.train_dataloader())) == [] and failing.data_counts["skipped_corrupt_shard"] == 4
    with pytest.raises(ValueError, match="not listed in manifest"):
        make_dm([str(tiny_dataset / "shard-000009.tar")])
    with pytest.raises(ValueError, match="no manifest.json"):
        make_dm(tiny_dataset.parent)  # a directory without a manifest
    typo = tiny_dataset.parent / "trian"  # was read as a shard pattern: "cannot read manifest <parent>/manifest.json"
    with pytest.raises(ValueError, match=f"^train_data: {typo}: no such directory or file"):
        make_dm(typo)
    with pytest.raises(ValueError, match=f"^val_data: {typo}: no such directory"):
        make_dm(tiny_dataset, val_data=str(typo))


def test_shard_lists_name_each_shard_once_from_one_dataset(tiny_dataset: Path, tmp_path: Path) -> None:
    """A shard named twice (a pattern and a path) was read twice an epoch; a shard of another dataset was matched by
    its name to the first shard's manifest (another file's count and sha256: skipped as corrupt at training, or
    misread without sha256); a dataset directory in a list looked for a manifest in its parent; pathlib paths to
    shards raised TypeError ('PosixPath' object is not iterable) naming no argument."""
    other = tmp_path / "other"
    write_dataset(other, 8, 4, start=100)
    first = str(tiny_dataset / "shard-000001.tar")
    with pytest.raises(ValueError, match=r"^train_data: shard shard-000001.tar is named 2 times \(.*ds/shard-000001"
                       r"\.tar, .*ds/shard-000001\.tar\): its samples would be read 2 times an epoch"):  # fmt: skip
        make_dm([str(tiny_dataset / "shard-{000000..000002}.tar"), first])
    with pytest.raises(ValueError, match=r"^train_data: shard '.*other/shard-000000\.tar' is not in the directory "
                       "of the first shard, whose manifest.json was read"):  # fmt: skip
        make_dm([first, str(other / "shard-000000.tar")])
    with pytest.raises(ValueError, match=f"^train_data: {tiny_dataset} is a dataset directory or manifest, but a "
                       "list names shard files"):  # fmt: skip
        make_dm([str(tiny_dataset)])
    stored_apart = make_dm([first, str(other / "shard-000000.tar")], manifest=str(tiny_dataset / "manifest.json"),
                           max_retrieved=0, verify_sha256=False)  # fmt: skip
    assert len(stored_apart.sources["train"][1]) == 2
    for spec in (tiny_dataset / "shard-000001.tar", [tiny_dataset / "shard-000001.tar"]):
        assert sorted(keys_of(list(make_dm(spec).train_dataloader()))) == [f"doc-{i:04d}" for i in range(4, 8)]


def test_a_slot_too_short_for_any_retrieved_document_is_warned(tiny_dataset: Path) -> None:
    """2x2 grids: an image document is 5 tokens, query + one retrieved + <eos> 11, the masking reserve 17. A 27-token
    slot keeps no retrieved document ever (configs/data/shards_packed.yaml had this at the 16x16 scale); 28 can."""
    with pytest.warns(UserWarning, match="leaves 10 tokens .* no retrieved document"):
        make_dm(tiny_dataset, seq_len=54, pack=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dm(tiny_dataset, seq_len=56, pack=2)
        make_dm(tiny_dataset, seq_len=54, pack=2, max_retrieved=0)  # retrieval off: nothing to warn about


def test_a_slot_that_cuts_captions_says_so_once_and_one_without_room_for_any_is_refused(tiny_dataset: Path) -> None:
    """Captions of 3-6 tokens, 2x2 grids (4 image tokens), the masking reserve 17. A 27-token slot leaves 10: the
    query's image takes 6 (with <eos> and the final <eos>), <break> 1, so captions keep their first 3 tokens; they
    were cut without a word (only data/truncated_tokens counted it, when DataCountsLogger ran). The first training
    batch that cuts one now warns, once, naming the sample and what it needs; a slot with no room for one caption
    token (24: 7 left) is refused at construction."""
    dm = make_dm(tiny_dataset, seq_len=27, max_retrieved=0, shuffle=False, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.train_dataloader()
        epochs = [list(loader), list(loader)]
    assert [str(w.message) for w in caught] == [
        "seq_len // pack = 27 leaves 10 tokens after the masking reserve (17), but sample 'doc-0001' needs 28 (its 4 "
        "caption tokens, 4 image tokens, <eos>, <break>, the final <eos> and the reserve): its caption was cut to its "
        "first 3 tokens. Every caption longer than 3 tokens is cut from its end (after all retrieved documents were "
        "dropped; images are never cut), counted as data/truncated_tokens; raise seq_len or lower pack to train "
        "whole captions"
    ]
    cut = sum(i % 4 for i in range(22))  # doc-i has 3 + i % 4 caption tokens, 3 kept
    assert sum(int(b["truncated_tokens"].sum()) for b in epochs[0]) == cut
    assert dm.data_counts["truncated_tokens"] == 2 * cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(make_dm(tiny_dataset, seq_len=30, max_retrieved=0).train_dataloader())  # 13 left: 6 caption tokens fit
    with pytest.raises(ValueError, match=r"leaves 7 tokens .*: the query's image \(4 tokens, <eos> and the final "
                       r"<eos>: 6\) leaves no room for a caption token \(8 with <break>\), so every caption would be "
                       "cut away; raise seq_len or lower pack"):  # fmt: skip
        make_dm(tiny_dataset, seq_len=24)
    make_dm(tiny_dataset, seq_len=25, max_retrieved=0)  # 8 left: one caption token fits


def test_sft_documents_that_do_not_fit_are_skipped_not_cut(tmp_path: Path) -> None:
    """The same 27-token slot over documents of ``cm3leon prepare --source sft`` (keys ``sft-...``): their texts end
    with the answer, so the 16 whose 4-6 tokens do not fit are skipped as too_long instead of losing their end;
    ``cut_captions=True`` cuts them like captions."""
    from cm3leon_lightning.data.shards import ShardWriter

    root = tmp_path / "sft"
    writer = ShardWriter(root, TEXT_TOKENIZER, IMAGE_TOKENIZER, CLIP, RETRIEVAL, samples_per_shard=4)
    writer.write_all([dataclasses.replace(make_sample(i), key=f"sft-tasks-{i}-0") for i in range(22)])
    dm = make_dm(root, seq_len=27, max_retrieved=0, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no caption-cut warning
        keys = keys_of(list(dm.train_dataloader()))
    assert sorted(keys) == sorted(f"sft-tasks-{i}-0" for i in range(0, 22, 4))  # 3 text tokens: they fit whole
    assert dm.skip_counts == {"too_long": 16} and dm.data_counts["truncated_tokens"] == 0
    strict = make_dm(root, seq_len=27, max_retrieved=0, batch_size=4, max_skip_share=0.01)
    with pytest.raises(RuntimeError, match=r"\{'skipped_too_long': \d+\}.*\(skipped_too_long: raise seq_len or lower "
                       r"pack\)"):  # fmt: skip
        list(strict.train_dataloader())
    cut = make_dm(root, seq_len=27, max_retrieved=0, batch_size=4, cut_captions=True)
    with pytest.warns(UserWarning, match="caption was cut"):
        assert len(keys_of(list(cut.train_dataloader()))) == 22
    with pytest.raises(ValueError, match="cut_captions must be true, false or null"):
        make_dm(root, cut_captions=1)


def test_the_packed_config_leaves_room_for_retrieval_at_16x16() -> None:
    """configs/data/shards_packed.yaml is for 16x16 grids: each slot must hold the query and two retrieved documents
    (20-token captions, the masking reserve of 8 sentinels), as its comment says."""
    import yaml

    from cm3leon_lightning.data.stages import document_length, fit_to_context

    config = Path(__file__).resolve().parents[2] / "configs" / "data" / "shards_packed.yaml"
    args = yaml.safe_load(config.read_text())["data"]["init_args"]
    budget = args["seq_len"] // args["pack"] - (2 * 8 + 1)
    doc = document_length(20, 256)
    assert fit_to_context([doc] * args["max_retrieved"], 20, 256, budget) == (2, 20)


def test_bad_seed_and_infill_settings_fail_at_construction(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        make_dm(tiny_dataset, seed=-1)
    with pytest.raises(ValueError, match=r"infill_kwargs: unknown key\(s\) \['rat'\]"):
        make_dm(tiny_dataset, infill_kwargs={"rat": 2.0})


def test_too_few_shards_is_a_clear_error_at_setup(tiny_dataset: Path) -> None:
    biggest = max(s.count for s in Manifest.load(tiny_dataset / "manifest.json").shards)
    with pytest.raises(ValueError) as err:
        make_dm(tiny_dataset, num_workers=8).setup("fit")
    assert str(err.value) == (
        "train_data has 6 shards for 1 ranks x 8 workers = 8 readers (each reads whole shards); lower num_workers "
        "(--data.init_args.num_workers) or re-prepare into at least 8 shards (cm3leon prepare --samples-per-shard, "
        f"now {biggest})"
    )


# --------------------------------------------------------------------------------------------------- bad data
def rewrite_shard(root: Path, index: int, mutate: Callable[[list], None], update_manifest: bool = True) -> None:
    """Rewrite shard ``index`` after ``mutate`` edits its ``[(key, members)]``; refresh its sha256 by default."""
    path = root / f"shard-{index:06d}.tar"
    items = list(iter_tar_samples(io.BytesIO(path.read_bytes())))
    mutate(items)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in items:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    if update_manifest:
        m = json.loads((root / "manifest.json").read_text())
        m["shards"][index]["sha256"] = file_sha256(path)
        (root / "manifest.json").write_text(json.dumps(m))


def npy(values: list[int]) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array(values, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


BAD_CASES = {
    "corrupt_member": lambda items: items[1][1].update({"text.npy": b"\x93NUMPY garbage"}),
    "missing_field": lambda items: items[1][1].pop("neighbors.npz"),
    "ids_out_of_range": lambda items: items[1][1].update({"text.npy": npy([20, 99])}),
    "image_length": lambda items: items[1][1].update({"image.npy": npy([1, 2, 3])}),
    "forbidden_member": lambda items: items[1][1].update({"state.pth": b"\x80\x04N."}),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_samples_are_skipped_and_counted(tiny_dataset: Path, reason: str) -> None:
    rewrite_shard(tiny_dataset, 2, BAD_CASES[reason])
    dm = make_dm(tiny_dataset)
    keys = keys_of(list(dm.train_dataloader()))
    assert dm.skip_counts == {reason: 1} and len(keys) == 21 and "doc-0009" not in keys


def test_skipped_samples_are_logged_with_their_shard_and_key(tiny_dataset: Path, caplog) -> None:
    """The warning named the key only; a shard-level problem named the shard, a sample-level one did not."""
    rewrite_shard(tiny_dataset, 2, BAD_CASES["image_length"])
    with caplog.at_level("WARNING", logger="cm3leon_lightning.data.stream"):
        list(make_dm(tiny_dataset).train_dataloader())
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == [
        f"skipping a sample of shard {tiny_dataset / 'shard-000002.tar'}: sample 'doc-0009' image.npy: 3 image "
        "codes; expected grid_h*grid_w = 4"
    ]


def test_bad_shards_are_skipped_and_counted(tiny_dataset: Path) -> None:
    rewrite_shard(tiny_dataset, 1, lambda items: items[0][1].update({"caption.txt": b"edited"}), update_manifest=False)
    dm = make_dm(tiny_dataset)
    assert len(keys_of(list(dm.train_dataloader()))) == 18
    assert dm.skip_counts == {"sha256_mismatch": 4}
    data = (tiny_dataset / "shard-000003.tar").read_bytes()
    (tiny_dataset / "shard-000003.tar").write_bytes(data[: len(data) // 6])  # truncated: keeps < 1 sample
    dm = make_dm(tiny_dataset, verify_sha256=False)
    assert len(keys_of(list(dm.train_dataloader()))) == 18
    assert dm.skip_counts == {"corrupt_shard": 4}


def test_a_shard_count_other_than_the_manifest_is_named(tiny_dataset: Path, caplog) -> None:
    """A manifest count above the shard's samples was counted as corrupt_shard with no word naming the shard; one
    below it lost the shard's last samples every epoch without a count or a word (its sha256 still matched)."""
    m = json.loads((tiny_dataset / "manifest.json").read_text())
    url = tiny_dataset / "shard-000001.tar"
    for count, want_keys, want_skips, message in (
        (5, 22, {"corrupt_shard": 1}, f"skipping 1 samples of shard {url}: it holds 4 samples, the manifest counts 5"),
        (3, 21, {}, f"shard {url} holds more samples than the manifest's count 3: the rest are never read"),
    ):
        m["shards"][1]["count"] = count
        (tiny_dataset / "manifest.json").write_text(json.dumps(m))
        caplog.clear()
        dm = make_dm(tiny_dataset)
        with caplog.at_level("WARNING", logger="cm3leon_lightning.data.stream"):
            keys = keys_of(list(dm.train_dataloader()))
        assert len(keys) == want_keys and dm.skip_counts == want_skips
        assert [r.getMessage() for r in caplog.records if str(url) in r.getMessage()][0].startswith(message)


def test_skip_counts_survive_resume_and_the_limit_stops_the_run(tiny_dataset: Path) -> None:
    rewrite_shard(tiny_dataset, 0, BAD_CASES["image_length"])
    full = make_dm(tiny_dataset)
    list(full.train_dataloader())
    dm = make_dm(tiny_dataset)
    it = iter(dm.train_dataloader())
    [next(it) for _ in range(6)]
    resumed = make_dm(tiny_dataset)
    resumed.load_state_dict(dm.state_dict())
    list(resumed.train_dataloader())
    assert resumed.data_counts == full.data_counts and resumed.skip_counts == {"image_length": 1}
    after_epoch = make_dm(tiny_dataset)
    after_epoch.load_state_dict(resumed.state_dict())
    assert after_epoch.skip_counts == {"image_length": 1}
    with pytest.raises(RuntimeError, match=r"skipped 1 of its 22 samples .*max_skip_share=0.01"):
        list(make_dm(tiny_dataset, max_skip_share=0.01).train_dataloader())


class EpochRateStream(ShardStream):
    """A masking-rate curriculum: no CM3 masking in epoch 0, about three spans per example from epoch 1 on."""

    def iter_worker(self, worker: int):
        rate = 0.0 if self.epoch == 0 else 3.0
        self.cfg = dataclasses.replace(self.cfg, infill_kwargs={"rate": rate})
        yield from super().iter_worker(worker)


class CurriculumDataModule(CM3LeonDataModule):
    stream_class = EpochRateStream


@pytest.mark.parametrize("workers", [0, 2])
def test_a_subclass_changes_the_pipeline_through_stream_class_and_still_resumes(
    tiny_dataset: Path, workers: int
) -> None:
    """`stream_class` names the stream of every split (subclasses had to override the private `_stream`), and a
    stream that depends on its epoch resumes mid-epoch exactly."""
    infill = MultimodalVocab(n_text=64, n_codes=32, grid_h=2, grid_w=2).infill_id
    kw = dict(num_workers=workers, max_retrieved=0, val_data=str(tiny_dataset))
    loader = make_dm(tiny_dataset, dm_class=CurriculumDataModule, **kw).train_dataloader()
    full = list(loader) + list(loader)  # 11 batches per epoch
    assert isinstance(loader.stream, EpochRateStream)
    assert [int((b["input_ids"] == infill).sum()) > 0 for b in full] == [False] * 11 + [True] * 11
    dm = make_dm(tiny_dataset, dm_class=CurriculumDataModule, **kw)
    assert isinstance(dm.val_dataloader().dataset, EpochRateStream)
    head = list(dm.train_dataloader())
    it = iter(dm.train_dataloader())
    head += [next(it) for _ in range(4)]  # into epoch 1
    state = json.loads(json.dumps(dm.state_dict()))
    del it
    resumed = make_dm(tiny_dataset, dm_class=CurriculumDataModule, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed.train_dataloader())
    assert len(head) == 15 and len(head + tail) == 22
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(head + tail, full))


class EvenKeysStream(ShardStream):
    """A filter through the per-sample hook: only documents with an even index."""

    def make_example(self, url, item):
        return super().make_example(url, item) if int(item[0].rsplit("-", 1)[1]) % 2 == 0 else None


class EvenKeysDataModule(CM3LeonDataModule):
    stream_class = EvenKeysStream


def test_make_example_filters_samples_counted_apart_from_skips(tiny_dataset: Path) -> None:
    """`ShardStream.make_example` is the per-sample hook: None leaves a sample out, counted as `filtered` (not a skip,
    so max_skip_share=0 does not stop the run), and a resumed stream gives the same batches."""
    kw = dict(max_retrieved=0, max_skip_share=0.0, mode="exact")
    dm = make_dm(tiny_dataset, dm_class=EvenKeysDataModule, **kw)
    batches = list(dm.train_dataloader())
    assert sorted(keys_of(batches)) == sorted(k for k in ALL_KEYS if int(k[-4:]) % 2 == 0)
    assert dm.data_counts["filtered"] == 11 and dm.data_counts["examples"] == 11
    half = make_dm(tiny_dataset, dm_class=EvenKeysDataModule, **kw)
    it = iter(half.train_dataloader())
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(half.state_dict()))
    del it
    resumed = make_dm(tiny_dataset, dm_class=EvenKeysDataModule, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed.train_dataloader())
    assert [k for b in head + tail for row in b["keys"] for k in row] == keys_of(batches)


def test_validate_and_test_without_their_split_are_refused_at_setup(tiny_dataset: Path) -> None:
    """``cm3leon test`` without test data failed only when the loader was built, after the checkpoint had loaded, and
    without naming the flag."""
    dm = CM3LeonDataModule(train_data=str(tiny_dataset), seq_len=64)
    for stage, split in (("test", "test"), ("validate", "val")):
        with pytest.raises(ValueError) as e:
            dm.setup(stage)
        assert str(e.value) == (
            f"{stage} needs {split}_data, but none was given to CM3LeonDataModule (--data.init_args.{split}_data DIR)"
        )
    dm.setup("fit")  # training alone needs no validation data
