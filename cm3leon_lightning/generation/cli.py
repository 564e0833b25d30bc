"""``cm3leon generate``: text-to-image (PNGs and a captioned grid) or image-to-text from a trained checkpoint.

Examples::

    cm3leon generate --ckpt last.ckpt --tokenizer tok/ --vqgan vqgan/ --prompt "a red circle" \\
        --num-samples 8 --method top_p --cfg 3 --out samples/
    cm3leon generate --ckpt last.ckpt --tokenizer tok/ --vqgan vqgan/ --image x.png \\
        --instruction "Describe the given picture." --out answers/
    cm3leon generate ... --image x.png --instruction "Question: what colour is it? Answer:" --layout image_first
    cm3leon generate ... --prompt "a red circle" --retrieve bank/ --shards data/ --clip-pretrained openai
    cm3leon generate ... --image x.png --edit "make the circle blue" --text-cfg 7.5 --image-cfg 1.5 --out edits/
    cm3leon generate ... --image edges.png --edit "a cat on a sofa" --task edge_to_image --out grounded/
    cm3leon generate ... --image x.png --infill "a <mask> circle" --infill-rows 16:32 --out infilled/
    cm3leon generate --ckpt models/350m --prompt "a red circle" --out samples/   # cm3leon export's directory

``--ckpt`` takes a ``CM3LeonModule`` checkpoint (a ``.ckpt`` file or the sharded directory FSDP writes) or a model
directory of ``cm3leon export``, whose ``tokenizer/`` and ``vqgan/`` are then the defaults of ``--tokenizer`` and
``--vqgan``.

Text-to-image writes ``sample-{i}.png`` (best CLIP score first when ``--rerank`` is given), ``grid.png`` with the
prompt written above the candidates, ``codes.npy``, with ``--rerank`` ``scores.json`` (each sample's CLIP score, in
the order written, and the index it was decoded as), and with ``--retrieve`` ``retrieved.json`` (the bank keys of the
documents placed before the prompt, nearest first). Image-to-text writes ``answer.txt`` and prints it. ``--edit``
(a model instruction-tuned on ``edit`` documents, paper table 5) writes the edited candidates as text-to-image does;
with ``--task edge_to_image`` (or another grounded task) it draws the image whose edges (etc.) ``--image`` shows.
``--infill`` fills the ``<mask>`` spans of a caption and (``--infill-rows``) redraws rows of ``--image``; it writes
``answer.txt``, ``answers.json`` and the redrawn images.
``--prompt``, ``--instruction``, ``--edit`` and ``--infill`` are read as ``cm3leon prepare`` cleaned the training
captions (control characters to spaces, repeated whitespace to one, ends stripped), for the tokenizer, CLIP and the
files written; text that cleans to nothing is refused naming its flag.
An ``--out`` that already holds files of an earlier run (:data:`OUTPUT_NAME`: a second run with fewer samples
left the first run's ``sample-{i}.png`` beside its own) is refused before anything is loaded, unless ``--overwrite``
is given: then exactly those files are deleted, just before this run writes its first file (a run that fails
earlier leaves them).
Errors (missing files, a checkpoint whose vocabulary does not match the tokenizer or the VQGAN, a prompt longer
than the context, ``--device cuda`` on a machine without one, a flag the task would ignore such as ``--instruction``
with ``--prompt`` or ``--text-cfg`` without ``--edit``) are reported in one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cm3leon_lightning.config import CM3LeonConfig
from cm3leon_lightning.generation.cli_args import add_model_arguments as add_model_arguments  # re-exported
from cm3leon_lightning.generation.cli_args import build_parser, check_numbers, check_used, clean_texts, resolve_clip
from cm3leon_lightning.generation.cli_files import (  # noqa: F401  (re-exported: the names' old home)
    OUTPUT_NAME,
    check_out,
    load_image,
    previous_outputs,
    save_grid,
    square_image,
    start_writing,
    to_pil,
    write_images,
)
from cm3leon_lightning.generation.generate import edit_image, generate_image, generate_text, image_prompt
from cm3leon_lightning.generation.graphs import resolve_mode
from cm3leon_lightning.generation.infilling import infill_batch
from cm3leon_lightning.generation.tasks import TASK_GUIDANCE, task_prefix
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.model.pretrained import DTYPES  # the --dtype choices besides auto
from cm3leon_lightning.tokenization.vocab import Document, MultimodalVocab


def check_device(device: str, flag: str = "--device") -> torch.device:
    """``device`` as a ``torch.device``, after checking this machine has it (a CUDA request without a GPU failed
    with a long traceback while the checkpoint was loading).

    Raises:
        ValueError: naming ``flag``: not a device name, CUDA (or an index ``cuda:N``) or MPS this machine lacks.
    """
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{flag}: {device!r} is not a device (cpu, cuda, cuda:1, mps ...)") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine (no GPU or driver); use cpu")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise ValueError(f"{flag} {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available on this machine; use cpu")
    return d


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The dtype for ``--dtype name``: ``auto`` is bfloat16 on a CUDA device that supports it (half the weight and
    cache bytes per decode step; the benchmarks' setting) and float32 elsewhere."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[CM3Leon, MultimodalVocab]:
    """Load the network and vocabulary of a ``CM3LeonModule`` checkpoint (a ``.ckpt`` file or the sharded directory
    FSDP writes) or of a model directory of ``cm3leon export``, on ``device`` and in ``dtype`` (None: as saved).

    The weights are read without the optimizer state (:func:`~cm3leon_lightning.model.weights.read_weights`).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: not a CM3LeonModule checkpoint or model directory (no architecture and vocabulary, or weights
            that do not fit them).
    """
    from cm3leon_lightning.model.weights import load_weights, read_weights

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--ckpt: checkpoint file not found: {p}")
    weights = read_weights(p, "--ckpt", lazy=True)  # read a chunk at a time: the file's copy is never whole
    if not weights.config or not weights.vocab:
        from cm3leon_lightning.model.pretrained import other_network

        raise ValueError(
            f"--ckpt: {p} ({weights.kind}) lacks the architecture and vocabulary ('config' and 'vocab')"
            f"{other_network(weights.state_dict)}; give a CM3LeonModule checkpoint or a model directory of "
            "'cm3leon export'"
        )
    vocab = MultimodalVocab.from_dict(weights.vocab, f"--ckpt {p}: vocab")
    if dtype is None:  # as saved: a model directory exported in bfloat16 stays bfloat16
        dtype = next((v.dtype for v in weights.state_dict.values() if v.is_floating_point()), None)
    with torch.device("meta"):  # every weight comes from the file: no random initialisation (13 s at 350m on CPU)
        model = CM3Leon(CM3LeonConfig.from_dict(weights.config)).to(dtype=dtype)  # read straight into the dtype
    if not any(k in weights.state_dict for k in model.state_dict()):
        raise ValueError(f"--ckpt: {p} holds no weights of the network (no 'model.*' keys in its state_dict)")
    load_weights(model, weights.state_dict, f"--ckpt {str(p)!r}", weights.fetch, device)  # chunks go to the device
    return model.to(device=device, dtype=dtype).eval(), vocab


def bundled_tokenizers(ckpt: str | Path, tokenizer: str | None, vqgan: str | None) -> tuple[str, str | None]:
    """``--tokenizer`` and ``--vqgan``, taken from a model directory's (``cm3leon export``) when not given.

    Raises:
        ValueError: no ``--tokenizer`` and none inside ``ckpt``.
    """
    from cm3leon_lightning.model.pretrained import bundled_paths, is_hf_dir, is_model_dir

    inside_tokenizer, inside_vqgan = bundled_paths(ckpt)
    if tokenizer is None:
        if inside_tokenizer is None:
            where = f"{ckpt} holds none" if is_model_dir(ckpt) or is_hf_dir(ckpt) else "--ckpt is not a model directory"
            raise ValueError(f"--tokenizer is required: {where} (cm3leon export --tokenizer bundles one)")
        tokenizer = str(inside_tokenizer)
    if vqgan is None and inside_vqgan is not None:
        vqgan = str(inside_vqgan)
    return tokenizer, vqgan


def check_tokenizers(
    vocab: MultimodalVocab,
    tokenizer: object | None,
    vqgan: torch.nn.Module | None,
    source: str = "the checkpoint",
    vqgan_path: str | Path | None = None,
    flags: tuple[str, str] = ("--tokenizer", "--vqgan"),
) -> None:
    """Raise ValueError naming both sides when the tokenizer or VQGAN does not match the checkpoint's vocabulary:
    its sizes, and the tokenizers' hashes it records (another BPE of the same size gives the same ids other words).

    The text tokenizer is compared by its ``tokenizer.json`` sha256; the VQGAN by the sha256 of ``vqgan_path`` (the
    file or directory, as ``cm3leon prepare`` hashed it) or by its weights' (:func:`vqgan_weights_sha256`, recorded by
    ``cm3leon export``). A vocabulary that records no hash (an older checkpoint) is accepted with a warning, once.

    Args:
        vocab: the checkpoint's vocabulary.
        tokenizer: the text tokenizer given (a ``TextTokenizer``), or None.
        vqgan: the VQGAN given, or None.
        source: the checkpoint, for messages (``"--ckpt runs/last.ckpt"``).
        vqgan_path: the file or directory ``vqgan`` was read from, when known.
        flags: how messages name the tokenizer and the VQGAN (the caller's arguments).
    """
    if tokenizer is not None:
        have = (tokenizer.vocab_size, tokenizer.num_sentinels)  # type: ignore[attr-defined]
        if have != (vocab.n_text, vocab.num_sentinels):
            raise ValueError(
                f"vocabulary mismatch: the checkpoint has n_text={vocab.n_text}, num_sentinels={vocab.num_sentinels} "
                f"but --tokenizer has vocab_size={have[0]}, num_sentinels={have[1]}"
            )
    if vqgan is not None:
        grid = tuple(vqgan.config.grid_size)  # type: ignore[union-attr]
        if (vqgan.n_embed, grid) != (vocab.n_codes, (vocab.grid_h, vocab.grid_w)):
            raise ValueError(
                f"vocabulary mismatch: the checkpoint has n_codes={vocab.n_codes}, grid {vocab.grid_h}x{vocab.grid_w} "
                f"but --vqgan has n_embed={vqgan.n_embed}, grid {grid[0]}x{grid[1]}"
            )
    from cm3leon_lightning.tokenization.vocab import check_same_tokenizer, vqgan_weights_sha256

    model = vocab.identity
    if tokenizer is not None:
        path = getattr(tokenizer, "path", None)
        other = {"text_tokenizer_sha256": tokenizer.sha256}  # type: ignore[attr-defined]
        check_same_tokenizer("text", model, source, other, f"{flags[0]} {path}" if path else flags[0], "", True)
    if vqgan is not None:
        other = {}
        if vocab.vqgan_weights_sha256:
            other["vqgan_weights_sha256"] = vqgan_weights_sha256(vqgan)
        weights_matched = bool(other) and other["vqgan_weights_sha256"] == vocab.vqgan_weights_sha256
        if vocab.vqgan_sha256 and vqgan_path is not None and not weights_matched:
            from cm3leon_lightning.data.prepare_run import path_sha256

            other["vqgan_sha256"] = path_sha256(vqgan_path)
        where = f"{flags[1]} {vqgan_path}" if vqgan_path else flags[1]
        check_same_tokenizer("vqgan", model, source, other, where, "", True)


def retrieve_documents(
    bank_dir: str,
    shards_dir: str,
    prompt: str,
    k: int,
    clip: object,
    vocab: MultimodalVocab | None = None,
    tokenizer_sha256: str | None = None,
) -> tuple[list[str], list[Document]]:
    """The ``k`` nearest documents of ``prompt`` (CLIP text embedding) in a memory bank, read from its shards.

    Args:
        bank_dir: the :class:`~cm3leon_lightning.retrieval.index.MemoryBank` directory.
        shards_dir: the prepared dataset (``manifest.json`` and shards) holding the bank's documents.
        prompt: the caption to retrieve for.
        k: documents to retrieve (best first).
        clip: the :class:`~cm3leon_lightning.retrieval.encoder.ClipEncoder` the bank was built with.
        vocab: when given, the checkpoint's vocabulary; the shards must have been tokenized for it.
        tokenizer_sha256: when given, the text tokenizer's sha256; the manifest must record the same one.

    Returns:
        The bank keys and their documents ``[caption text, image]``, nearest first (fewer than ``k`` when
        near-duplicate pictures run the candidates out).

    Raises:
        ValueError: ``k < 1`` or above the bank's documents, a bank that does not match ``clip``, shards for
            another vocabulary or tokenizer, or a bank key missing from the shards.
    """
    from cm3leon_lightning.generation.retrieve import DocumentRetriever

    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    retriever = DocumentRetriever(bank_dir, shards_dir, clip, vocab, tokenizer_sha256)
    if k > len(retriever.bank):  # the whole bank came back, silently (as cm3leon serve refuses it)
        n = len(retriever.bank)
        raise ValueError(f"--k {k}: the memory bank {bank_dir} (--retrieve) holds {n} documents; retrieve at most {n}")
    return retriever.retrieve([prompt], k)[0]


def run(args: argparse.Namespace) -> None:
    """Execute a parsed ``cm3leon generate`` command (raises on bad input)."""
    from cm3leon_lightning.tokenization.text import TextTokenizer

    check_numbers(args)
    clean_texts(args)
    if not (args.prompt or args.image or args.infill is not None):
        raise ValueError("give --prompt (text-to-image), --image (image-to-text, --edit) or --infill")
    if args.infill is not None and (args.prompt or args.edit is not None or args.instruction):
        raise ValueError("--infill fills a document of its own: no --prompt, --edit or --instruction with it")
    if args.infill_rows and args.infill is None:
        raise ValueError("--infill-rows needs --infill (the caption, '<mask>' to fill it too)")
    if args.retrieve and not args.shards:
        raise ValueError("--retrieve needs --shards, the prepared dataset that holds the bank's documents")
    args.tokenizer, args.vqgan = bundled_tokenizers(args.ckpt, args.tokenizer, args.vqgan)
    if args.rerank and not args.vqgan:
        raise ValueError("--rerank scores decoded images with CLIP: it needs --vqgan")
    if args.retrieve and not args.prompt:
        raise ValueError(
            "--retrieve adds documents to a text-to-image prompt; it cannot be used with --image or --infill"
        )
    if args.edit is not None:
        if not args.image or args.instruction:
            raise ValueError("--edit edits the picture of --image; give --image, and no --instruction")
        if args.method == "cd_k" or args.rerank:
            raise ValueError("--edit samples with greedy, temperature or top_p, without --rerank")
    if args.rerank and not args.prompt:  # was ignored (a CLIP model loaded for nothing)
        raise ValueError(
            "--rerank orders the images of --prompt (text-to-image); it cannot be used with --image or --infill"
        )
    check_out(Path(args.out), args.overwrite)
    check_used(args)
    resolve_clip(args)  # before the checkpoint loads: a --retrieve that is no bank fails at once
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    check_device(device)
    compile = False if args.no_compile else (None if args.compile == "auto" else args.compile)
    resolve_mode(compile, torch.device(device))  # a CUDA-only mode on CPU fails here, before any loading
    model, vocab = load_checkpoint(args.ckpt, device, resolve_dtype(args.dtype, device))
    model.set_attention(args.attention)
    tokenizer = TextTokenizer.load(args.tokenizer)
    vqgan = None
    if args.vqgan:
        from cm3leon_lightning.tokenization.vqgan import VQGAN

        vqgan = VQGAN.from_pretrained(args.vqgan, map_location=device).eval()
    check_tokenizers(vocab, tokenizer, vqgan, f"--ckpt {args.ckpt}", args.vqgan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = None
    if args.rerank or args.retrieve:
        from cm3leon_lightning.retrieval.encoder import ClipEncoder, ClipWeightsUnavailableError

        try:
            clip = ClipEncoder(args.clip, pretrained=args.clip_pretrained, device=device)
        except ClipWeightsUnavailableError as e:
            raise ValueError(f"--clip/--clip-pretrained: {e}") from e

    if args.image:
        if vqgan is None:
            raise ValueError("--image needs --vqgan to turn the picture into codes")
        codes = vqgan.encode(load_image(args.image, vqgan).to(device))  # (1, h*w)
    if args.infill is not None:
        run_infill(args, model, vocab, tokenizer, vqgan, codes[0].tolist() if args.image else None, out, compile)
        return
    if args.image:
        if args.edit is not None:
            text_cfg, image_cfg = TASK_GUIDANCE[args.task]
            result = edit_image(
                model, vocab, codes, [tokenizer.encode(args.edit)], tokenizer.encode(task_prefix(args.task)),
                text_cfg=text_cfg if args.text_cfg is None else args.text_cfg,
                image_cfg=image_cfg if args.image_cfg is None else args.image_cfg,
                num_samples=args.num_samples, method=args.method,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, vqgan=vqgan, compile=compile,
            )  # fmt: skip
            start_writing(args, out)
            write_images(out, result.codes[0], result.images[0], args.edit)
            return
        instruction = tokenizer.encode(args.instruction) if args.instruction else None
        answer_ids = generate_text(
            model, vocab, codes, instruction, max_new_tokens=args.max_new_tokens,
            method="greedy" if args.method in ("greedy", "cd_k") else args.method,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, compile=compile, layout=args.layout,
        )[0]  # fmt: skip
        answer = tokenizer.decode(answer_ids)
        start_writing(args, out)
        (out / "answer.txt").write_text(answer + "\n", encoding="utf-8")
        print(answer)
        return

    retrieved = None
    if args.retrieve:
        keys, docs = retrieve_documents(args.retrieve, args.shards, args.prompt, args.k, clip, vocab, tokenizer.sha256)
        text_ids = tokenizer.encode(args.prompt)
        n_text, need = len(text_ids), len(image_prompt(vocab, text_ids, docs))
        if need + vocab.image_tokens > model.config.max_seq_len:
            raise ValueError(
                f"--retrieve: {n_text} text tokens, {len(docs)} retrieved documents (--k {args.k}) and "
                f"{vocab.image_tokens} image tokens need {need + vocab.image_tokens} positions, more than the model's "
                f"context max_seq_len={model.config.max_seq_len}: retrieve fewer documents (a smaller --k)"
            )
        retrieved = [docs]
    result = generate_image(
        model, vocab, [tokenizer.encode(args.prompt)], retrieved=retrieved, num_samples=args.num_samples,
        method=args.method, cfg=args.cfg, temperature=args.temperature, top_p=args.top_p, cdk_k=args.cdk_k,
        cdk_alpha=args.cdk_alpha, seed=args.seed, vqgan=vqgan, compile=compile,
    )  # fmt: skip
    codes, images = result.codes[0], None if result.images is None else result.images[0]  # (N, h*w), (N, C, H, W)
    if args.rerank and images is not None:
        from cm3leon_lightning.generation.rerank import rerank

        best = rerank(clip, [args.prompt], images[None], codes[None], keep=len(codes))
        codes, images = best.codes[0], best.images[0]
    start_writing(args, out)  # after decoding: --overwrite keeps the earlier run's files until this one has its own
    if args.retrieve:
        (out / "retrieved.json").write_text(json.dumps({"prompt": args.prompt, "keys": keys}, indent=1) + "\n")
    if args.rerank and images is not None:
        scores = {"prompt": args.prompt, "clip": args.clip, "clip_pretrained": args.clip_pretrained,
                  "scores": [None if s != s else s for s in best.scores[0].tolist()],  # NaN: not JSON
                  "decoded_as": best.order[0].tolist()}  # fmt: skip
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    write_images(out, codes, images, args.prompt)


def run_infill(
    args: argparse.Namespace,
    model: CM3Leon,
    vocab: MultimodalVocab,
    tokenizer: object,
    vqgan: torch.nn.Module | None,
    codes: list[int] | None,
    out: Path,
    compile: bool | str | None,
) -> None:
    """``--infill``: fill the masked document ``--num-samples`` times in one batch (seed ``--seed``); writes the
    filled text of the first sample to ``answer.txt``, of every sample to ``answers.json`` (a list), and, with
    ``--infill-rows``, the redrawn images as text-to-image does."""
    from cm3leon_lightning.generation.masking import infill_document, parse_rows

    rows = parse_rows(args.infill_rows, vocab.grid_h) if args.infill_rows else None
    ids, kinds = infill_document(tokenizer.encode, vocab, args.infill, codes, rows)  # type: ignore[attr-defined]
    n = args.num_samples
    results = infill_batch(
        model, vocab, [ids] * n, span_kinds=[kinds] * n, max_span_tokens=args.max_new_tokens,
        method="greedy" if args.method in ("greedy", "cd_k") else args.method, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, compile=compile,
    )  # fmt: skip
    texts, images = [], []
    for result in results:
        doc = vocab.ids_to_document(result.ids)
        texts.append(tokenizer.decode(list(doc[0].tokens)))  # type: ignore[attr-defined]
        if codes is not None:
            images.append(torch.as_tensor(doc[1].tokens))
    start_writing(args, out)
    (out / "answer.txt").write_text(texts[0] + "\n", encoding="utf-8")
    (out / "answers.json").write_text(json.dumps(texts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print("\n".join(texts))
    if rows is not None:
        stacked = torch.stack(images)  # (N, h*w)
        decoded = None if vqgan is None else vqgan.decode(stacked.to(next(vqgan.parameters()).device))
        write_images(out, stacked, decoded, texts[0])


def main(argv: Sequence[str]) -> int:
    """Entry point of ``cm3leon generate``; returns the exit status (2 on bad input, with a one-line error)."""
    args = build_parser().parse_args(list(argv))
    new_out = not Path(args.out).exists()
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        if new_out:  # the folder this run made holds nothing finished
            shutil.rmtree(args.out, ignore_errors=True)
        print(f"cm3leon generate: error: {e}", file=sys.stderr)
        return 2
    return 0
