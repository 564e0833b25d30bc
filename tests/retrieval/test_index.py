"""MemoryBank: exact neighbours against numpy, approximate indexes, save/load with checked metadata."""

import json

import numpy as np
import pytest

from cm3leon_lightning.retrieval.index import MemoryBank, bank_model_name


def _data(n: int = 500, d: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x, [f"doc{i:04d}" for i in range(n)]


def _brute_force(bank_x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    bx = bank_x / np.linalg.norm(bank_x, axis=1, keepdims=True)
    qx = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qx @ bx.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def test_flat_matches_brute_force_numpy():
    x, keys = _data()
    q = np.random.default_rng(1).standard_normal((37, 16)).astype(np.float32)
    bank = MemoryBank.build((x, keys), dim=16, model_name="m")
    res = bank.search(q, k=5, batch_size=8)  # several batches
    want_s, want_i = _brute_force(x, q, 5)
    np.testing.assert_array_equal(res.ids, want_i)
    np.testing.assert_allclose(res.scores, want_s, atol=1e-5)
    assert res.keys == [[keys[j] for j in row] for row in want_i]
    assert len(bank) == 500


def test_streamed_build_from_float16_memmap_matches_one_shot(tmp_path):
    x, keys = _data(300)
    mm = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    chunks = ((mm[i : i + 64], keys[i : i + 64]) for i in range(0, 300, 64))
    streamed = MemoryBank.build(chunks, dim=16, model_name="m")
    one_shot = MemoryBank.build((mm, keys), dim=16, model_name="m")
    q = x[:10]
    assert streamed.search(q, 4).keys == one_shot.search(q, 4).keys
    assert streamed.keys == keys


def test_unnormalized_bank_is_plain_inner_product():
    x, keys = _data(50, 4)
    q = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    bank = MemoryBank.build((x, keys), dim=4, model_name="m", normalize=False)
    s = q @ x.T
    res = bank.search(q, 3)
    np.testing.assert_array_equal(res.ids, np.argsort(-s, axis=1)[:, :3])


def test_more_k_than_documents_pads_with_no_hit():
    x, keys = _data(3, 4)
    res = MemoryBank.build((x, keys), dim=4, model_name="m").search(x[:1], k=5)
    assert res.ids[0, 3:].tolist() == [-1, -1] and np.isneginf(res.scores[0, 3:]).all()
    assert len(res.keys[0]) == 3 and res.keys[0][0] == "doc0000"


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16", "IVF4,PQ8x4"])
def test_approximate_indexes_find_the_document_itself(factory):
    x, keys = _data(400, 16)
    bank = MemoryBank.build((x, keys), dim=16, model_name="m", factory=factory, nprobe=8)
    res = bank.search(x[:50], k=1)
    hit = np.mean(res.ids[:, 0] == np.arange(50))
    assert hit >= (0.9 if "PQ" in factory else 1.0)


def test_ivf_needs_training_and_enough_rows():
    x, keys = _data(100, 16)
    bank = MemoryBank(16, "m", factory="IVF8,Flat")
    assert not bank.is_trained
    with pytest.raises(ValueError, match="must be trained"):
        bank.add(x, keys)
    with pytest.raises(ValueError, match="fewer than the 8 IVF lists"):
        bank.train(x[:5])
    bank.train(x)
    bank.add(x, keys)
    assert len(bank) == 100


def test_product_quantizer_sample_too_small_is_a_clear_error():
    """faiss's C++ assertion (a RuntimeError with its source location) becomes a ValueError naming the factory."""
    x, _ = _data(100, 16)
    bank = MemoryBank(16, "m", factory="IVF4,PQ8")
    with pytest.raises(ValueError, match=r"training 'IVF4,PQ8' on a sample of 100 rows failed: Number of training "):
        bank.train(x)
    assert not bank.is_trained


def test_bad_inputs_are_clear_errors():
    x, keys = _data(10, 4)
    bank = MemoryBank(4, "m")
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        bank.add(x[:, :3], keys)
    with pytest.raises(ValueError, match="10 embeddings but 9 keys"):
        bank.add(x, keys[:9])
    with pytest.raises(ValueError, match="duplicate document key 'doc0000'"):
        bank.add(x[:2], ["doc0000", "doc0000"])
    # every refused call above left the bank empty and its keys free (they were reserved before the checks)
    assert len(bank) == 0 and bank.keys == []
    bank.add(x, keys)
    assert len(bank) == 10 and bank.keys == keys
    with pytest.raises(ValueError, match="duplicate document key 'doc0003'"):
        bank.add(x[:2], ["new", "doc0003"])
    bank.add(x[:1], ["new"])  # "new" was not reserved by the refused call
    assert bank.keys[-1] == "new" and len(bank) == 11
    with pytest.raises(ValueError, match="factory='Nope'"):
        MemoryBank(4, "m", factory="Nope")
    with pytest.raises(ValueError, match="k must be >= 1"):
        MemoryBank.build((x, keys), 4, "m").search(x, 0)


def test_save_load_round_trip(tmp_path):
    x, keys = _data(200, 16)
    bank = MemoryBank.build((x, keys), dim=16, model_name="cm3leon-clip-tiny", factory="IVF4,Flat", nprobe=4)
    bank.save(tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "meta.json").read_text())
    assert meta == {
        "format_version": 1,
        "model_name": "cm3leon-clip-tiny",
        "dim": 16,
        "count": 200,
        "normalize": True,
        "factory": "IVF4,Flat",
        "metric": "inner_product",
    }
    for mmap in (False, True):
        loaded = MemoryBank.load(tmp_path / "bank", model_name="cm3leon-clip-tiny", dim=16, nprobe=4, mmap=mmap)
        a, b = bank.search(x[:20], 5), loaded.search(x[:20], 5)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.keys == b.keys and loaded.keys == keys and loaded.factory == "IVF4,Flat"


def test_load_checks_model_name_dimension_and_files(tmp_path):
    x, keys = _data(20, 16)
    MemoryBank.build((x, keys), dim=16, model_name="ViT-B-32").save(tmp_path / "bank")
    with pytest.raises(ValueError, match="CLIP model 'ViT-B-32' but queries use 'cm3leon-clip-tiny'"):
        MemoryBank.load(tmp_path / "bank", model_name="cm3leon-clip-tiny")
    with pytest.raises(ValueError, match="dimension 16 but queries have dimension 512"):
        MemoryBank.load(tmp_path / "bank", dim=512)
    meta_path = tmp_path / "bank" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "count": 21}))
    with pytest.raises(ValueError, match="inconsistent"):
        MemoryBank.load(tmp_path / "bank")
    (tmp_path / "bank" / "keys.json").unlink()
    with pytest.raises(FileNotFoundError, match="keys.json"):
        MemoryBank.load(tmp_path / "bank")


def test_a_prepare_output_given_as_bank_names_the_bank_inside_it(tmp_path):
    """``cm3leon prepare`` writes its bank to ``OUT/work/bank/index``: OUT, or a split of it, given as the bank gets
    a message naming that path; the recorded model name is read without the index."""
    x, keys = _data(4, 16)
    bank = tmp_path / "out" / "work" / "bank" / "index"
    MemoryBank.build((x, keys), dim=16, model_name="ViT-B-32").save(bank)
    (tmp_path / "out" / "train").mkdir()
    for given in (tmp_path / "out", tmp_path / "out" / "train"):
        with pytest.raises(FileNotFoundError) as err:
            MemoryBank.load(given)
        assert (
            str(err.value)
            == f"memory bank {given} has no index.faiss (the memory bank of a cm3leon prepare output is {bank})"
        )
    with pytest.raises(FileNotFoundError, match=r"has no meta.json$"):
        bank_model_name(tmp_path)
    assert bank_model_name(bank) == "ViT-B-32"
    (bank / "meta.json").write_text("[]")
    with pytest.raises(ValueError, match=r"meta.json: field 'model_name' must be a str, got None$"):
        bank_model_name(bank)


def test_save_refuses_to_replace_a_bank_without_overwrite(tmp_path):
    """save() moved a new bank over one already in the directory, silently (another model's bank, say)."""
    x, keys = _data(20, 8)
    MemoryBank.build((x, keys), dim=8, model_name="ViT-B-32").save(tmp_path / "bank")
    other = MemoryBank.build((x[:3], keys[:3]), dim=8, model_name="cm3leon-clip-tiny")
    with pytest.raises(
        FileExistsError, match=r"bank already holds a memory bank \(index\.faiss, keys\.json, meta\.json\); "
    ):
        other.save(tmp_path / "bank")
    kept = MemoryBank.load(tmp_path / "bank")
    assert kept.keys == keys and kept.model_name == "ViT-B-32"
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["index.faiss", "keys.json", "meta.json"]
    (tmp_path / "bank" / "index.faiss").unlink()  # one file left of a bank is not overwritten either
    with pytest.raises(FileExistsError, match=r"\(keys\.json, meta\.json\); pass overwrite=True"):
        other.save(tmp_path / "bank")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    other.save(tmp_path / "other")  # an existing directory without a bank is fine
    assert (tmp_path / "other" / "notes.txt").read_text() == "kept"
    assert MemoryBank.load(tmp_path / "other", model_name="cm3leon-clip-tiny").keys == keys[:3]


def test_failed_save_leaves_the_bank_already_saved_there_intact(tmp_path, monkeypatch):
    x, keys = _data(30, 8)
    MemoryBank.build((x[:10], keys[:10]), dim=8, model_name="m").save(tmp_path / "bank")
    bigger = MemoryBank.build((x, keys), dim=8, model_name="m")

    def disk_full() -> dict:
        raise OSError("No space left on device")

    monkeypatch.setattr(bigger, "metadata", disk_full)  # fails after index.faiss and keys.json are written
    with pytest.raises(OSError, match="No space left"):
        bigger.save(tmp_path / "bank", overwrite=True)
    loaded = MemoryBank.load(tmp_path / "bank")  # the old bank, whole: not the new index with the old meta.json
    assert loaded.keys == keys[:10] and loaded.search(x[3:4], 1).keys == [["doc0003"]]
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["index.faiss", "keys.json", "meta.json"]
    monkeypatch.undo()
    bigger.save(tmp_path / "bank", overwrite=True)  # overwriting works
    assert MemoryBank.load(tmp_path / "bank").keys == keys


def test_mmap_loaded_ivf_bank_refuses_adds_and_saves_whole_copies(tmp_path):
    x, keys = _data(200, 16)
    MemoryBank.build((x, keys), dim=16, model_name="m", factory="IVF4,Flat", nprobe=4).save(tmp_path / "a")
    bank = MemoryBank.load(tmp_path / "a", nprobe=4, mmap=True)
    # faiss maps the lists read-only: adding used to abort the whole process (C++ exception through SWIG)
    with pytest.raises(ValueError, match="mmap=True.*read-only"):
        bank.add(x[:2] * 2, ["new0", "new1"])
    assert len(bank) == 200 and bank.keys == keys
    want = bank.search(x[:20], 5)
    # write_index of mapped lists wrote a 400-byte reference to the mapped file, not the lists
    bank.save(tmp_path / "copy")
    bank.save(tmp_path / "a", overwrite=True)  # in place, while mapped
    for d in ("a", "copy"):
        got = MemoryBank.load(tmp_path / d, nprobe=4).search(x[:20], 5)
        np.testing.assert_array_equal(got.ids, want.ids)
        assert got.keys == want.keys
    flat = MemoryBank.build((x, keys), dim=16, model_name="m")
    flat.save(tmp_path / "flat")
    mapped = MemoryBank.load(tmp_path / "flat", mmap=True)  # Flat and HNSW copy on add: still allowed
    mapped.add(-x[:1], ["new"])
    assert mapped.search(-x[:1], 1).keys == [["new"]] and len(mapped) == 201


class _FailingRows:
    """A (N, dim) array-like whose second batch read fails, like a memmap on a failing disk."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.reads = x, x.shape, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item: slice) -> np.ndarray:
        self.reads += 1
        if self.reads == 2:
            raise OSError("Input/output error")
        return self.x[item]


def test_an_add_failing_midway_keeps_row_ids_and_keys_aligned():
    x, keys = _data(30, 8)
    bank = MemoryBank(8, "m")
    with pytest.raises(OSError, match="Input/output"):
        bank.add(_FailingRows(x[:20]), keys[:20], batch_size=8)
    assert len(bank) == len(bank.keys) == 8  # the first batch, with its keys
    bank.add(x[20:], keys[20:])  # row ids 8.. must name these keys, not the unadded keys 8..19
    res = bank.search(x[20:], 1)
    assert [r[0] for r in res.keys] == keys[20:]
    bank.add(x[8:20], keys[8:20])  # the keys of the failed batches are free again
    assert len(bank) == 30


def test_load_names_the_file_and_field_of_bad_metadata(tmp_path):
    x, keys = _data(20, 8)
    MemoryBank.build((x, keys), dim=8, model_name="m").save(tmp_path / "bank")
    meta_path, keys_path = tmp_path / "bank" / "meta.json", tmp_path / "bank" / "keys.json"
    meta = json.loads(meta_path.read_text())
    cases = [
        ("{not json", r"meta\.json: not valid JSON"),
        ("[1, 2]", r"meta\.json: expected a JSON object"),
        (json.dumps({k: v for k, v in meta.items() if k != "normalize"}), r"meta\.json: field 'normalize' must be"),
        (json.dumps({**meta, "normalize": "false"}), r"meta\.json: field 'normalize' must be a bool, got 'false'"),
        (json.dumps({**meta, "dim": "8"}), r"meta\.json: field 'dim' must be a int"),
        (json.dumps({**meta, "metric": "l2"}), r"meta\.json: field 'metric' is 'l2'"),
    ]
    for text, match in cases:
        meta_path.write_text(text)
        with pytest.raises(ValueError, match=match):
            MemoryBank.load(tmp_path / "bank")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"bank was built with CLIP model 'm' but queries use 'ViT-B-32'"):
        MemoryBank.load(tmp_path / "bank", model_name="ViT-B-32")
    keys_path.write_text(json.dumps(keys[:19] + [keys[0]]))
    with pytest.raises(ValueError, match=r"keys\.json: duplicate document key 'doc0000'"):
        MemoryBank.load(tmp_path / "bank")
    keys_path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"keys\.json: expected a JSON list"):
        MemoryBank.load(tmp_path / "bank")
    keys_path.write_text(json.dumps(keys))
    assert MemoryBank.load(tmp_path / "bank").keys == keys


@pytest.mark.parametrize("bad", ["", "doc\nextra"])
def test_load_refuses_keys_that_add_refuses_naming_the_file_and_row(tmp_path, bad):
    """An empty or multi-line key in a hand-edited keys.json loaded (and saved again) though add() refuses it."""
    x, keys = _data(5, 8)
    bank = MemoryBank.build((x, keys), dim=8, model_name="m")
    with pytest.raises(ValueError, match="non-empty single-line"):
        bank.add(x[:1], [bad])
    bank.save(tmp_path / "bank")
    keys_path = tmp_path / "bank" / "keys.json"
    keys_path.write_text(json.dumps(keys[:3] + [bad] + keys[4:]))
    with pytest.raises(ValueError) as err:
        MemoryBank.load(tmp_path / "bank")
    assert str(err.value) == (
        f"{keys_path}: row 3 has the key {bad!r}; document keys must be non-empty single-line strings"
    )


def test_empty_bank_searches_saves_and_loads(tmp_path):
    bank = MemoryBank(4, "m")
    res = bank.search(np.ones((2, 4), np.float32), k=3)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all() and res.keys == [[], []]
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert len(loaded) == 0 and loaded.keys == []
    loaded.add(np.eye(4, dtype=np.float32), list("abcd"))
    assert loaded.search(np.eye(4, dtype=np.float32)[2:3], 5).keys[0][0] == "c"


def test_corrupt_index_file_is_a_value_error_naming_it(tmp_path):
    """faiss's C++ RuntimeError ('Index type 0x62726167 ("garb") not recognized') did not name the bank's file."""
    x, keys = _data(20, 8)
    MemoryBank.build((x, keys), dim=8, model_name="m").save(tmp_path / "bank")
    path = tmp_path / "bank" / "index.faiss"
    raw = path.read_bytes()
    for broken, reason in [
        (raw[:50], r"read error"),
        (b"garbage" * 20, r"Index type 0x62726167 \(\"garb\"\) not recog"),
    ]:
        path.write_bytes(broken)
        for mmap in (False, True):
            with pytest.raises(ValueError, match=rf"bank/index\.faiss: not a readable faiss index .*: {reason}"):
                MemoryBank.load(tmp_path / "bank", mmap=mmap)


def test_nan_or_inf_embeddings_are_refused_naming_the_row():
    """A NaN row was stored and never found again; a float16 value past 65504 is inf, normalised to NaN; a NaN query
    came back with no hits, as if the bank were empty."""
    x, keys = _data(10, 4)
    bank = MemoryBank(4, "m")
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"embeddings row 7 \(document key 'doc0007'\) has NaN or infinite values"):
        bank.add(bad, keys, batch_size=4)
    assert len(bank) == len(bank.keys) == 4  # the batch before it, with its keys (as for any failing batch)
    big = np.full((1, 4), np.float16(np.inf))  # what float16 makes of a value past 65504
    with pytest.raises(ValueError, match=r"embeddings row 0 \(document key 'big'\) has NaN"):
        bank.add(big, ["big"])
    with pytest.raises(ValueError, match=r"queries row 1 has NaN or infinite values \(1 such rows\)"):
        bank.search(np.stack([x[0], np.full(4, np.inf, np.float32)]), 2)
    with pytest.raises(ValueError, match=r"sample row 3 has NaN"):
        MemoryBank(4, "m", factory="IVF2,Flat").train(bad[4:])
    unnormalised = MemoryBank(4, "m", normalize=False)
    with pytest.raises(ValueError, match=r"row 7 \(document key 'doc0007'\)"):
        unnormalised.add(bad, keys)
    assert len(unnormalised) == 0


def test_empty_untrained_ivf_bank_searches_to_no_hits_and_batch_sizes_are_checked(tmp_path):
    """An empty IVF bank (saved before any training) raised faiss's C++ assertion '!(is_trained)' on search, where an
    empty Flat bank returns no hits; batch_size=0 raised 'range() arg 3 must not be zero'."""
    MemoryBank(4, "m", factory="IVF2,Flat").save(tmp_path / "bank")
    bank = MemoryBank.load(tmp_path / "bank")
    assert not bank.is_trained
    res = bank.search(np.ones((2, 4), np.float32), k=3)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all() and res.keys == [[], []]
    x, keys = _data(10, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        bank.search(x, 2, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        MemoryBank(4, "m").add(x, keys, batch_size=0)
    flat = MemoryBank.build((x, keys), 4, "m")
    res = flat.search(x[:2], k=12)  # faiss is asked for 10 columns, the rest padded
    assert res.ids.shape == (2, 12) and (res.ids[:, 10:] == -1).all() and [len(r) for r in res.keys] == [10, 10]
    assert res.ids[0, 0] == 0 and sorted(res.ids[0, :10].tolist()) == list(range(10))


@pytest.mark.parametrize("factory", ["PCA8,HNSW8", "HNSW8", "IVF4_HNSW8,Flat"])
def test_ef_search_reaches_an_hnsw_inside_a_wrapper_and_survives_load(tmp_path, factory):
    """The HNSW of "PCA8,HNSW8" kept faiss's default efSearch of 16 whatever ef_search was given."""
    import faiss

    def ef(bank: MemoryBank) -> int:
        index = faiss.downcast_index(bank.index)
        inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
        ivf = faiss.try_extract_index_ivf(inner)
        return (faiss.downcast_index(ivf.quantizer) if ivf is not None else inner).hnsw.efSearch

    x, keys = _data(300, 16)
    bank = MemoryBank.build((x, keys), dim=16, model_name="m", factory=factory, ef_search=99)
    assert ef(bank) == 99
    bank.set_search_params(ef_search=41)
    assert ef(bank) == 41
    bank.save(tmp_path / "bank")
    assert ef(MemoryBank.load(tmp_path / "bank", ef_search=77)) == 77


def test_search_params_below_one_are_refused_everywhere(tmp_path):
    """load() and set_search_params() took ef_search=0 (one hit per query, silently) and nprobe=0 (faiss's C++
    assertion at the first search)."""
    x, keys = _data(200, 8)
    MemoryBank.build((x, keys), dim=8, model_name="m", factory="HNSW8").save(tmp_path / "bank")
    with pytest.raises(ValueError) as err:
        MemoryBank.load(tmp_path / "bank", ef_search=0)
    assert str(err.value) == "ef_search must be an integer >= 1, got 0"
    bank = MemoryBank.build((x, keys), dim=8, model_name="m", factory="IVF4,Flat")
    with pytest.raises(ValueError) as err:
        bank.set_search_params(nprobe=0)
    assert str(err.value) == "nprobe must be an integer >= 1, got 0"
    with pytest.raises(ValueError, match=r"^nprobe must be an integer >= 1, got 2\.5$"):
        MemoryBank(8, "m", nprobe=2.5)
    bank.set_search_params(nprobe=np.int64(4))
    assert bank.search(x[:3], 3).ids[:, 0].tolist() == [0, 1, 2]


def test_an_idmap_factory_is_refused_at_construction():
    """ "IDMap,Flat" was accepted, then every add() raised faiss's C++ 'add does not make sense with IndexIDMap'."""
    for factory in ("IDMap,Flat", "IDMap2,HNSW8"):
        with pytest.raises(ValueError) as err:
            MemoryBank(8, "m", factory=factory)
        assert str(err.value) == f"factory={factory!r}: the bank numbers its rows itself; drop the IDMap prefix"


def test_a_single_str_of_keys_and_a_float_k_are_refused_naming_the_argument():
    """Found in review: ``add(x, "abc")`` with three rows took 'a', 'b', 'c' as the keys (a str's length agreed), and
    ``search(q, 2.0)`` failed inside numpy and ``search(q, np.int64(2))`` inside faiss, with TypeErrors naming no
    argument."""
    x, keys = _data(3, 4)
    bank = MemoryBank(4, "m")
    with pytest.raises(ValueError, match="keys must be a sequence of document keys, got a single str 'abc'"):
        bank.add(x, "abc")
    assert len(bank) == 0 and bank.keys == []
    bank.add(x, keys)
    with pytest.raises(ValueError, match=r"k must be an integer, got 2\.0"):
        bank.search(x, 2.0)
    with pytest.raises(ValueError, match="batch_size must be an integer, got True"):
        bank.search(x, 2, batch_size=True)
    res = bank.search(x[:1], np.int64(2))
    assert res.keys == [["doc0000", "doc0001"]] and res.ids.tolist() == _brute_force(x, x[:1], 2)[1].tolist()


def test_an_mmap_loaded_ivf_bank_refuses_to_save_after_its_file_was_replaced(tmp_path):
    """Found in review: after another bank was saved over the directory an IVF bank was mmap-loaded from, ``save``
    copied the new index file beside the loaded bank's keys: the copy found 'doc0000' for the other bank's first
    vector. Saving over its own file (twice) still works."""
    x, keys = _data(200, 16)
    y, other = _data(200, 16, seed=1)
    other = [k.replace("doc", "new") for k in other]
    MemoryBank.build((x, keys), 16, "m", "IVF4,Flat").save(tmp_path / "a")
    bank = MemoryBank.load(tmp_path / "a", nprobe=4, mmap=True)
    bank.save(tmp_path / "a", overwrite=True)
    bank.save(tmp_path / "a", overwrite=True)  # its own copy: the same lists
    MemoryBank.build((y, other), 16, "m", "IVF4,Flat").save(tmp_path / "a", overwrite=True)
    assert bank.search(x[:1], 1).keys == [["doc0000"]]  # still searches the lists it mapped
    with pytest.raises(ValueError, match=r"a/index\.faiss was replaced or changed since this bank was loaded"):
        bank.save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert MemoryBank.load(tmp_path / "a", nprobe=4).search(y[:1], 1).keys == [["new0000"]]  # left as saved
