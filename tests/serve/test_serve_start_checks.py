"""``cm3leon serve`` checks the files its workers load before any starts: a tokenizer that is none, a VQGAN of
another codebook, CLIP weights that cannot be had, a ``--retrieve`` that is no memory bank and ``--shards`` that
cannot hold the bank's documents each printed "Uvicorn running", a worker's traceback and "RuntimeError: One or more
workers failed to start" (exit status 1); now one line naming the flag, exit status 2, as ``cm3leon generate`` does."""

import dataclasses
import json

import pytest
from support.retrieval_setup import write_retrieval_assets

from cm3leon_lightning.cli import main as cm3leon_main
from cm3leon_lightning.data.shards import ShardWriter
from cm3leon_lightning.modules.cm3leon import CM3LeonModule
from cm3leon_lightning.serve import Rejected
from cm3leon_lightning.serve.cli import build_api, build_parser
from cm3leon_lightning.tokenization.vqgan import VQGAN


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_retrieval_assets(tmp_path_factory.mktemp("serve-start-checks"))


@pytest.fixture(autouse=True)
def never_started(monkeypatch):
    """Unfixed, the command would start LitServe: fail instead of serving."""
    import litserve

    from cm3leon_lightning.serve import cli

    def started(*a, **k):
        raise AssertionError("the server was started")

    monkeypatch.setattr(litserve.LitServer, "run", started)
    monkeypatch.setattr(cli, "stop_on_sigterm", lambda: None)


def serve_args(root, *extra, retrieve=True):
    args = ["--ckpt", str(root / "model.ckpt"), "--tokenizer", str(root / "tok"), "--vqgan", str(root / "vqgan"),
            "--compile", "eager", "--accelerator", "cpu", "--devices", "1"]  # fmt: skip
    if retrieve:
        args += ["--clip", "cm3leon-clip-tiny", "--clip-pretrained", str(root / "clip.safetensors"),
                 "--retrieve", str(root / "bank"), "--shards", str(root / "shards")]  # fmt: skip
    return [*args, *extra]


def set_flag(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = str(value)
    return args


def one_line(capsys, argv):
    assert cm3leon_main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cm3leon serve: error: ") and err.count("\n") == 1
    return err[len("cm3leon serve: error: ") : -1]


def test_the_files_are_checked_without_loading_the_model(assets, monkeypatch):
    """The checks read no network weights: a good set of files builds the API in this process as before."""
    from cm3leon_lightning.generation import cli as generation_cli

    monkeypatch.setattr(generation_cli, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    api = build_api(build_parser().parse_args(serve_args(assets["root"])))
    assert (api.bank_dir, api.retrieve_k) == (str(assets["root"] / "bank"), 2)


def test_a_tokenizer_that_is_none_names_the_flag(assets, tmp_path, capsys):
    yaml = tmp_path / "model.yaml"
    yaml.write_text("model:\n  params: {}\n")
    err = one_line(capsys, set_flag(serve_args(assets["root"]), "--tokenizer", yaml))
    assert err.startswith(f"--tokenizer: {yaml}: not a valid tokenizers JSON file (")


def test_a_vqgan_of_another_codebook_names_the_flag(assets, tmp_path, capsys):
    micro = VQGAN.from_name("micro").config
    VQGAN(dataclasses.replace(micro, n_embed=64)).save_pretrained(tmp_path / "vqgan64")
    err = one_line(capsys, set_flag(serve_args(assets["root"]), "--vqgan", tmp_path / "vqgan64"))
    assert err == "vocabulary mismatch: the checkpoint has n_codes=32, grid 8x8 but --vqgan has n_embed=64, grid 8x8"
    (tmp_path / "empty").mkdir()
    err = one_line(capsys, set_flag(serve_args(assets["root"]), "--vqgan", tmp_path / "empty"))
    assert err == f"--vqgan: {tmp_path / 'empty'}: no model.safetensors, vqgan.ckpt or checkpoints/last.ckpt in this " \
        "directory"  # fmt: skip


def test_clip_weights_that_cannot_be_had_name_the_flag(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    args = serve_args(assets["root"], retrieve=False)
    assert one_line(capsys, [*args, "--clip", "ViT-B-32"]).startswith(
        "--clip/--clip-pretrained: CLIP weights 'ViT-B-32'/'openai' are not in the local cache and the hub cannot be "
        "reached (no network or HF_HUB_OFFLINE=1). Pass a local checkpoint instead: "
    )  # create_clip's own check (encoder.clip_tag), with the flags named
    assert one_line(capsys, [*args, "--clip", "ViT-X-99"]) == "--clip: 'ViT-X-99' is not an open_clip architecture"
    err = one_line(capsys, [*args, "--clip", "cm3leon-clip-tiny"])  # the default tag 'openai' is not one of its own
    assert err.startswith("--clip-pretrained: pretrained='openai' is neither an existing file nor a pretrained tag of ")


def test_a_retrieve_that_is_no_memory_bank_names_the_flag(assets, capsys):
    root = assets["root"]
    err = one_line(capsys, set_flag(serve_args(root), "--retrieve", root / "shards"))
    assert err == f"--retrieve: memory bank {root / 'shards'} has no index.faiss"


def test_shards_that_cannot_hold_the_bank_s_keys_name_the_flag(assets, tmp_path, capsys):
    root = assets["root"]
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    samples = list(assets["samples"].values())[:3]
    ShardWriter(tmp_path / "three", manifest["text_tokenizer"], manifest["image_tokenizer"]).write_all(samples)
    err = one_line(capsys, set_flag(serve_args(root), "--shards", tmp_path / "three"))
    assert err == f"--shards: {tmp_path / 'three'} holds 3 documents, fewer than the 12 keys of the memory bank " \
        f"{root / 'bank'} (--retrieve): it is not the dataset the bank was built from"  # fmt: skip
    err = one_line(capsys, set_flag(serve_args(root), "--shards", root / "bank"))  # no manifest.json
    assert err.startswith("--shards: ") and "manifest.json" in err


def write_shards(root, out, samples):
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    ShardWriter(out, manifest["text_tokenizer"], manifest["image_tokenizer"], samples_per_shard=5).write_all(samples)
    return out


def test_shards_of_other_documents_name_the_shard_and_the_bank_s_keys_file(assets, tmp_path, capsys):
    """As many documents as the bank has keys, but other ones: the check by count passed, and the worker failed with
    "--retrieve: bank keys [...] are not in the shards" after "Uvicorn running"."""
    root = assets["root"]
    other = [dataclasses.replace(s, key=f"other-{i:02d}") for i, s in enumerate(assets["samples"].values())]
    write_shards(root, tmp_path / "other", other)
    err = one_line(capsys, set_flag(serve_args(root), "--shards", tmp_path / "other"))
    assert err == (
        f"--shards: {tmp_path / 'other' / 'shard-000000.tar'} begins with the document 'other-00', which is not a key "
        f"of the memory bank {root / 'bank' / 'keys.json'} (--retrieve), and 12 of the bank's 12 keys (first 'doc-00') "
        f"are in no shard of {tmp_path / 'other'}: it is not the dataset the bank was built from"
    )
    (tmp_path / "other" / "shard-000001.tar").unlink()
    err = one_line(capsys, set_flag(serve_args(root), "--shards", tmp_path / "other"))
    assert (
        err == f"--shards: {tmp_path / 'other' / 'shard-000001.tar'}: not found (listed in the dataset's manifest.json)"
    )


def test_the_shards_keys_are_read_from_one_header_each_unless_one_is_not_the_bank_s(assets, tmp_path, monkeypatch):
    """The bank's own shards pass on their first keys; a dataset holding more documents than the bank (three others
    first) passes once the headers of all its shards show every bank key."""
    from cm3leon_lightning.serve import checks

    root, read = assets["root"], []
    tar_keys = checks.tar_keys
    monkeypatch.setattr(
        checks, "tar_keys", lambda path, first_only=False: read.append(first_only) or tar_keys(path, first_only)
    )
    build_api(build_parser().parse_args(serve_args(root)))
    assert read == [True, True, True]  # 3 shards: 5, 5 and 2 documents
    extra = [dataclasses.replace(s, key=f"extra-{i}") for i, s in enumerate(list(assets["samples"].values())[:3])]
    write_shards(root, tmp_path / "more", extra + list(assets["samples"].values()))
    read.clear()
    build_api(build_parser().parse_args(set_flag(serve_args(root), "--shards", tmp_path / "more")))
    assert read == [True, False, False, False]  # the first of 3 shards begins with extra-0: every header is read


def test_a_prompt_too_long_by_itself_is_named_not_retrieve(assets, tmp_path):
    """With --k 1 on a 192-position model a long prompt was answered "retrieve: ... need 452 positions" although the
    prompt alone needs more than the context: no number of documents would help, so the prompt is named."""
    module = CM3LeonModule(preset="tiny", vocab=assets["vocab"].to_dict(), max_seq_len=192)
    module.configure_model()
    import torch

    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "m.ckpt")
    args = set_flag(serve_args(assets["root"], "--k", "1"), "--ckpt", tmp_path / "m.ckpt")
    api = build_api(build_parser().parse_args(args))
    api.setup("cpu")
    long = " ".join(["a blue circle"] * 30)  # 419 characters
    n = len(api.tokenizer.encode(long))
    job = api.decode_request({"prompt": long})
    assert isinstance(job, Rejected) and job.status == 400
    assert job.detail.startswith(f"prompt: {n} text tokens, 1 retrieved documents and 64 image tokens need ")
    assert job.detail.endswith(f"more than the model's context max_seq_len=192 (the prompt alone needs {n + 2 + 64})")
    short = api.decode_request({"prompt": "a blue circle", "retrieve": 3})  # fits alone: the documents are too many
    assert isinstance(short, Rejected) and short.detail.startswith("retrieve: ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
        (["--temperature", "nan"], "--temperature must lie in [0, 10], got nan"),
        (["--cdk-k", "0"], "--cdk-k must be an integer >= 1, got 0"),
        # a request could not ask for these defaults itself (temperature: [0, 10]); the server took them
        (["--temperature", "50"], "--temperature must lie in [0, 10], got 50.0"),
        (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
        (["--cdk-alpha", "1.5"], "--cdk-alpha must lie in [0, 1], got 1.5"),
        (["--batch-timeout", "nan"], "--batch-timeout must lie in [0, --timeout 600], got nan"),
        (["--batch-timeout", "20", "--timeout", "10"], "--batch-timeout must lie in [0, --timeout 10], got 20.0"),
        (["--devices", "2"], "--devices 2: the CPU is one device (LitServe starts one worker there); use "
         "--workers-per-device 2 for 2 model copies"),
    ],
)  # fmt: skip
def test_server_settings_name_their_flags(assets, capsys, extra, message):
    """A bad sampling default was named as a field only ("top_p must lie in (0, 1]"), not as the flag; a NaN
    --batch-timeout started the server and one above --timeout got LitServe's "batch_timeout must be less than
    request_timeout"; --devices 2 on the CPU started one worker, silently (LitServe ignores devices there)."""
    assert one_line(capsys, [*serve_args(assets["root"], retrieve=False), *extra]) == message


def test_a_k_above_the_bank_s_documents_is_refused_naming_its_size(assets, capsys, monkeypatch):
    """The retriever returned the whole bank (12 documents) for --k 13, silently."""
    from cm3leon_lightning.serve import cli

    monkeypatch.setattr(cli, "check_retrieve_k", lambda ckpt, k: None)  # the tiny context refuses 13 documents first
    bank = assets["root"] / "bank"
    err = one_line(capsys, serve_args(assets["root"], "--k", "13"))
    assert err == f"--k 13: the memory bank {bank} (--retrieve) holds 12 documents; retrieve at most 12"
    assert build_api(build_parser().parse_args(serve_args(assets["root"], "--k", "12"))).retrieve_k == 12


def test_the_implied_k_takes_all_of_a_bank_of_one_document(assets, tmp_path):
    """Without --k a server retrieves 2 documents per request: over a 1-document bank it started and then refused
    every request that did not send "retrieve" ("2 documents asked for; the memory bank holds 1")."""
    from cm3leon_lightning.retrieval.index import MemoryBank

    MemoryBank.build((assets["emb"][:1], ["doc-00"]), 64, "cm3leon-clip-tiny").save(tmp_path / "bank1")
    one = set_flag(serve_args(assets["root"]), "--retrieve", tmp_path / "bank1")
    assert build_api(build_parser().parse_args(one)).retrieve_k == 1
    assert build_api(build_parser().parse_args(serve_args(assets["root"]))).retrieve_k == 2  # 12 documents


def test_a_cdk_alpha_of_zero_is_a_default_a_request_may_send_too(assets):
    api = build_api(build_parser().parse_args(serve_args(assets["root"], "--cdk-alpha", "0", retrieve=False)))
    assert api.image_defaults.cdk_alpha == 0.0


def test_flags_that_would_be_unused_are_refused(assets, capsys):
    """--shards without --retrieve and --clip-pretrained without --clip started a server that never read them."""
    args = serve_args(assets["root"], retrieve=False)
    shards, clip = str(assets["root"] / "shards"), str(assets["root"] / "clip.safetensors")
    assert one_line(capsys, [*args, "--shards", shards]) == "--shards is used only with --retrieve, which is not given"
    err = one_line(capsys, [*args, "--clip-pretrained", clip])
    assert err == "--clip-pretrained is used only with --clip, which is not given"
    assert build_api(build_parser().parse_args(serve_args(assets["root"]))).clip_pretrained == clip
    args = [a for a in serve_args(assets["root"]) if a not in ("--clip-pretrained", clip)]
    assert build_parser().parse_args(args).clip_pretrained is None
    assert one_line(capsys, args).startswith("--clip-pretrained: pretrained='openai' is neither")  # still the default


def test_the_default_clip_pretrained_given_without_clip_is_no_error(assets):
    """Found in review: ``--clip-pretrained openai``, the default its help names, was refused without ``--clip`` as an
    unused flag; ``cm3leon generate`` takes a flag given its default value (its check_used), and so does serve now."""
    args = serve_args(assets["root"], "--clip-pretrained", "openai", retrieve=False)
    api = build_api(build_parser().parse_args(args))
    assert api.clip_name is None and api.clip_pretrained == "openai"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-num-samples", "100"],
         "--max-num-samples must be an integer in [1, 64] (what a request's num_samples takes), got 100"),
        (["--max-num-samples", "80", "--num-samples", "80"], "--num-samples must be an integer in [1, 64], got 80"),
        (["--max-new-tokens", "2000"], "--max-new-tokens must be an integer in [1, 1024], got 2000"),
    ],
)  # fmt: skip
def test_sample_and_token_limits_a_request_could_not_ask_for_are_refused(assets, capsys, extra, message):
    """Found in review: ``--max-num-samples 100`` started, but a request's ``num_samples`` above 64 was answered 422
    (the request schema's bound), so the flag's limit was 64 whatever it said; ``--num-samples 80`` and
    ``--max-new-tokens 2000`` (a model of long context; here without a VQGAN, so no context check) were defaults no
    request could send itself. The largest values still start."""
    vqgan = ("--vqgan", str(assets["root"] / "vqgan"))
    args = [a for a in serve_args(assets["root"], retrieve=False) if a not in vqgan]
    assert one_line(capsys, [*args, *extra]) == message
    api = build_api(build_parser().parse_args([*args, "--max-num-samples", "64", "--num-samples", "64",
                                               "--max-new-tokens", "1024"]))  # fmt: skip
    assert (api.max_num_samples, api.image_defaults.num_samples, api.text_defaults.max_new_tokens) == (64, 64, 1024)


def test_a_max_new_tokens_that_never_fits_the_context_is_refused(assets, capsys):
    """--max-new-tokens 300 on a 256-position model with 64 image codes started healthy, then answered every
    image-to-text request that left max_new_tokens out 400; the largest that fits still starts."""
    args = serve_args(assets["root"], retrieve=False)
    assert one_line(capsys, [*args, "--max-new-tokens", "188"]) == (
        "--max-new-tokens 188: an image-to-text prompt of --layout infill (69 positions with its 64 image tokens and "
        "no instruction) and 188 new tokens need 257 positions, more than the model's context max_seq_len=256; the "
        "largest --max-new-tokens that fits is 187"
    )
    err = one_line(capsys, [*args, "--max-new-tokens", "191", "--layout", "image_first"])
    assert err.endswith("need 257 positions, more than the model's context max_seq_len=256; the largest "
                        "--max-new-tokens that fits is 190")  # fmt: skip
    api = build_api(build_parser().parse_args([*args, "--max-new-tokens", "187"]))
    assert api.text_defaults.max_new_tokens == 187
    no_vqgan = [a for a in args if a not in ("--vqgan", str(assets["root"] / "vqgan"))]  # no image-to-text at all
    assert build_api(build_parser().parse_args([*no_vqgan, "--max-new-tokens", "188"])).vqgan_path is None


def test_a_port_in_use_is_one_line_naming_it(assets, capsys):
    """uvicorn logged "[Errno 98] Address already in use", naming neither the port nor the flag, and exited 3."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        err = one_line(capsys, serve_args(assets["root"], "--host", "127.0.0.1", "--port", str(port), retrieve=False))
    assert err == f"--port {port}: cannot listen on 127.0.0.1 port {port}: Address already in use (another server " \
        "uses it?); choose another --port"  # fmt: skip
