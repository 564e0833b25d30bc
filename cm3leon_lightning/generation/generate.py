"""Text-to-image, image-to-text and infilling with the static KV cache (paper sections 3.1 and 4).

Every function builds the prompts of DESIGN section 3, puts all rows (guidance streams x prompts x candidates) in
one left-padded batch and decodes them together with :class:`~cm3leon_lightning.generation.decoder.Decoder`: one
prefill, then one forward per token for the whole batch.

* :func:`generate_image`: ``[retrieved docs] <eos> caption <break>`` -> exactly ``grid_h * grid_w`` image codes
  (only the image-code range is ever sampled), with CFG (equation (2)) or CD-K (equation (3)).
* :func:`edit_image`: separate text and image guidance (section 4.1), three streams.
* :func:`generate_text`: ``<eos> [instruction] <mask:0> <break> image <infill> <mask:0>`` (or, image first,
  ``<eos> image <break> [instruction]``) -> text until ``<eos>``, ``<break>`` or a sentinel (captioning and VQA).
* :func:`~cm3leon_lightning.generation.infilling.infill` (:mod:`.infilling`): fill the ``<mask:i>`` spans of
  documents, text or image, in order.

This module imports no Lightning.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from cm3leon_lightning.generation.decoder import Decoder, SamplingSpec
from cm3leon_lightning.generation.sampling import allowed_ids
from cm3leon_lightning.model import CM3Leon
from cm3leon_lightning.tokenization.quantize import autocast_off
from cm3leon_lightning.tokenization.vocab import Document, MultimodalVocab


@dataclass
class ImageGeneration:
    """The result of :func:`generate_image` / :func:`edit_image`.

    Attributes:
        codes: ``(P, N, grid_h * grid_w)`` long image codes in ``[0, n_codes)``: P prompts, N candidates each.
        images: ``(P, N, C, H, W)`` float images in ``[-1, 1]`` decoded by the VQGAN, or None without one.
    """

    codes: Tensor
    images: Tensor | None = None


@dataclass
class GenerationSettings:
    """Text-to-image sampling settings of :func:`generate_image`, as primitives (``CM3LeonModule(generation=...)``).

    Attributes:
        num_samples: candidates N per prompt.
        method: ``greedy``, ``temperature``, ``top_p`` (each with CFG) or ``cd_k`` (paper equation (3)).
        cfg: classifier-free guidance scale ``alpha_c`` of paper equation (2) (1 = no guidance).
        temperature: softmax temperature (0 = greedy).
        top_p: nucleus mass for ``top_p``.
        top_k: optional top-k filter.
        cdk_k: ``k`` of CD-K.
        cdk_alpha: ``alpha`` of CD-K.
        seed: base seed; a prompt without its own seed decodes with ``seed + its global index``.
        compile: compile the decode step (None: on CUDA).
    """

    num_samples: int = 1
    method: str = "top_p"
    cfg: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int | None = None
    cdk_k: int = 8
    cdk_alpha: float = 0.5
    seed: int = 0
    compile: bool | str | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"generation.num_samples must be >= 1, got {self.num_samples}")
        # Validates the sampling fields, naming the bad one.
        SamplingSpec(
            method=self.method, streams=2, cfg=self.cfg, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, cdk_k=self.cdk_k, cdk_alpha=self.cdk_alpha, hi=1,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, object] | None) -> GenerationSettings:
        """Settings from a (possibly partial) dict; unknown keys are an error naming the allowed ones."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"generation: unknown settings {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)  # type: ignore[arg-type]

    def image_kwargs(self) -> dict[str, object]:
        """Keyword arguments of :func:`generate_image`, except ``seed`` (chosen per prompt)."""
        return {k: v for k, v in asdict(self).items() if k != "seed"}


def _device(model: CM3Leon) -> torch.device:
    return model.wte.weight.device


# ------------------------------------------------------------------------------------------------ prompts
def image_prompt(vocab: MultimodalVocab, text_ids: Sequence[int], retrieved: Sequence[Document] = ()) -> list[int]:
    """The text-to-image prompt: the retrieved documents, then ``<eos> caption <break>`` (DESIGN section 3)."""
    out: list[int] = []
    for doc in retrieved:
        out.extend(vocab.document_to_ids(doc))
    return out + vocab.text_to_image_prompt(text_ids)


def unconditional_image_prompt(vocab: MultimodalVocab) -> list[int]:
    """The unconditional CFG stream (paper equation (1)): ``<eos> <mask:0> <break>``, the caption masked.

    Paper section 3.1 replaces the text "with the mask token from the CM3 objective". The CM3 objective masks a whole
    caption as the first sentinel, so training holds exactly ``<eos> <mask:0> <break> image ...``; the plain
    ``<mask>`` id occurs in no training example (measured in the demo: guidance towards ``<mask>`` gave no gain over
    no guidance, ``<mask:0>`` did; docs/architecture.md). Retrieved documents are left out too: they were retrieved
    for the text, so they are part of the condition.
    """
    return [vocab.eos_id, vocab.sentinel_id(0), vocab.break_id]


SETTING_METHODS: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature", "top_p", "cd_k"),
    "top_k": ("temperature", "top_p", "cd_k"),
    "top_p": ("top_p",),
    "cfg": ("greedy", "temperature", "top_p"),
    "cdk_k": ("cd_k",),
    "cdk_alpha": ("cd_k",),
}
"""The decoding methods that read each sampling setting (greedy takes an argmax; CD-K guides by ``cdk_k`` /
``cdk_alpha``, not ``cfg``): ``cm3leon generate`` and ``cm3leon serve`` refuse a setting its method would ignore."""


def unread_settings(settings: GenerationSettings) -> list[str]:
    """``generation.<field>=<value> (read by <methods>)`` for each sampling setting of ``settings`` that differs from
    its default and that ``settings.method`` ignores (:data:`SETTING_METHODS`): ``cm3leon predict`` with
    ``generation.method cd_k`` and ``generation.cfg 5`` decoded without the guidance it was asked for."""
    defaults = GenerationSettings()
    return [
        f"generation.{name}={getattr(settings, name)!r} (read by {', '.join(methods)})"
        for name, methods in SETTING_METHODS.items()
        if settings.method not in methods and getattr(settings, name) != getattr(defaults, name)
    ]


TEXT_LAYOUTS = ("infill", "image_first")


def check_text_ids(vocab: MultimodalVocab, ids: Sequence[int], what: str) -> None:
    """Raise ValueError naming ``what`` unless every id is a text id, in ``[0, n_text)``.

    :meth:`~MultimodalVocab.validate_ids` accepts image codes too: an instruction from a tokenizer larger than the
    vocabulary's text range put image codes in the prompt's text, silently (a caption's ids were refused).
    """
    vocab.validate_ids(ids, what)
    bad = next((int(i) for i in ids if int(i) >= vocab.n_text), None)
    if bad is not None:
        raise ValueError(
            f"{what}: id {bad} is not a text id; text ids lie in [0, {vocab.n_text}), the rest are image codes"
        )


def caption_prompt(
    vocab: MultimodalVocab, codes: Sequence[int], instruction: Sequence[int] = (), layout: str = "infill"
) -> list[int]:
    """Image-to-text prompt (DESIGN section 3); for plain captioning the instruction is empty.

    ``infill``: ``<eos> [instruction] <mask:0> <break> image <infill> <mask:0>``, the answer is the infilled span
    (what CM3 masking of a caption-first document trains). ``image_first``: ``<eos> image <break> [instruction]``,
    the answer continues the text (what documents written image first train: ``image_first_prob`` of the data
    module, the input-then-output order of instruction tuning).
    """
    if layout not in TEXT_LAYOUTS:
        raise ValueError(f"layout must be one of {TEXT_LAYOUTS}, got {layout!r}")
    check_text_ids(vocab, list(instruction), "instruction")
    image = vocab.codes_to_ids(codes).tolist()
    if layout == "image_first":
        return [vocab.eos_id, *image, vocab.break_id, *instruction]
    text = [vocab.eos_id, *instruction, vocab.sentinel_id(0), vocab.break_id]
    return text + image + [vocab.infill_id, vocab.sentinel_id(0)]


def stop_ids(vocab: MultimodalVocab) -> list[int]:
    """Tokens that end a generated text span: ``<eos>``, ``<break>`` and the sentinels."""
    return [vocab.eos_id, vocab.break_id, *vocab.sentinel_ids]


def cut_at_stop(rows: Tensor, stops: Sequence[int]) -> list[list[int]]:
    """Each row of ``(R, n)`` ids up to (excluding) its first stop id."""
    stop_set, out = set(stops), []
    for row in rows.tolist():
        end = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(row[:end])
    return out


def check_vocab(model: CM3Leon, vocab: MultimodalVocab) -> None:
    """Raise ValueError when the model's vocabulary size is not the vocabulary's padded size."""
    if model.config.vocab_size != vocab.padded_size:
        raise ValueError(
            f"vocabulary mismatch: the model has vocab_size {model.config.vocab_size}, but {vocab!r} "
            f"needs padded_size {vocab.padded_size}"
        )


def image_codes(vocab: MultimodalVocab, image: Tensor | Sequence[int], what: str = "an image") -> list[int]:
    """One image's codes as a list, checked against the grid size and the code range (errors name ``what``)."""
    codes = [int(c) for c in torch.as_tensor(image).reshape(-1).tolist()]
    if len(codes) != vocab.image_tokens:
        raise ValueError(f"{what} has {len(codes)} codes; expected grid_h*grid_w = {vocab.image_tokens}")
    try:
        vocab.codes_to_ids(codes)  # raises on a code outside [0, n_codes)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    return codes


def _decode_codes(vqgan: nn.Module | None, codes: Tensor) -> Tensor | None:
    """``(P, N, h*w)`` codes -> ``(P, N, C, H, W)`` images in the VQGAN's own dtype (autocast off: a caller's
    mixed precision, such as an evaluation callback's, would decode pixels in bfloat16)."""
    if vqgan is None:
        return None
    device = next(vqgan.parameters()).device
    with autocast_off(device.type):
        flat = vqgan.decode(codes.flatten(0, 1).to(device))  # (P*N, C, H, W)
    return flat.view(*codes.shape[:2], *flat.shape[1:])


def _image_spec(vocab: MultimodalVocab, **kwargs: object) -> SamplingSpec:
    return SamplingSpec(lo=vocab.n_text, hi=vocab.size, **kwargs)  # only image codes can be sampled


def _run_image(
    model: CM3Leon,
    vocab: MultimodalVocab,
    spec: SamplingSpec,
    streams: list[list[list[int]]],
    num_samples: int,
    seed: int | None,
    compile: bool | str | None,
) -> Tensor:
    """Decode exactly ``grid_h * grid_w`` codes for ``streams[s][p]`` prompts; returns ``(P, N, h*w)`` codes."""
    rows = [prompt for stream in streams for prompt in stream for _ in range(num_samples)]  # stream-major
    with torch.no_grad():
        dec = Decoder(model, spec, rows, vocab.image_tokens, seed=seed, compile=compile)
        out = dec.run(dec.prefill(), vocab.image_tokens)  # (P*N, h*w)
    return (out - vocab.n_text).view(len(streams[0]), num_samples, vocab.image_tokens)


# ------------------------------------------------------------------------------------------------ text -> image
def generate_image(
    model: CM3Leon,
    vocab: MultimodalVocab,
    prompts: Sequence[Sequence[int]],
    *,
    retrieved: Sequence[Sequence[Document]] | None = None,
    num_samples: int = 1,
    method: str = "top_p",
    cfg: float = 3.0,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int | None = None,
    cdk_k: int = 8,
    cdk_alpha: float = 0.5,
    seed: int | None = None,
    vqgan: nn.Module | None = None,
    compile: bool | str | None = None,
    unconditional: Sequence[int] | None = None,
) -> ImageGeneration:
    """Generate ``num_samples`` images for each caption (paper section 3.1).

    All guidance streams and candidates of all prompts run as one batch: ``2 * P * N`` rows with CFG. The
    conditional stream sees ``[retrieved docs] <eos> caption <break>``, the unconditional one
    ``<eos> <mask:0> <break>`` (:func:`unconditional_image_prompt`). With ``cfg == 1`` (and not CD-K) the
    unconditional stream is skipped, since equation (2) then equals conditional sampling.

    Args:
        model: the transformer (any dtype/device; its KV cache is (re)allocated).
        vocab: the vocabulary the model was trained with.
        prompts: P captions as text-tokenizer ids.
        retrieved: optional, for each prompt, retrieved documents placed before it (retrieval-augmented
            generation, paper section 2.1).
        num_samples: candidates N per prompt (re-rank them with :func:`~cm3leon_lightning.generation.rerank`).
        method: ``greedy``, ``temperature``, ``top_p`` (each with CFG) or ``cd_k`` (equation (3)).
        cfg: CFG scale ``alpha_c`` (1 = no guidance).
        temperature: softmax temperature (0 = greedy).
        top_p: nucleus mass for ``top_p``.
        top_k: optional top-k filter.
        cdk_k: ``k`` of CD-K.
        cdk_alpha: ``alpha`` of CD-K.
        seed: seed of the sampling generator; the same seed, prompts and settings give the same samples (one
            generator draws for every row, so a prompt's samples change with the other prompts of the call, and a
            candidate's with ``num_samples``: decode a prompt alone, as ``cm3leon predict`` and the server do for
            seeded requests, to make its samples its own).
        vqgan: optional image tokenizer with ``decode(codes) -> images``; then ``images`` is filled.
        compile: how the decode step runs: None (compiled on CUDA), a bool, or a mode of
            :data:`~cm3leon_lightning.generation.graphs.MODES`.
        unconditional: the unconditional stream's prompt ids (default :func:`unconditional_image_prompt`), e.g.
            ``<eos> <mask> <break>`` for a model trained with caption dropout to ``<mask>``.

    Returns:
        :class:`ImageGeneration` with ``(P, N, grid_h * grid_w)`` codes.
    """
    check_vocab(model, vocab)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not prompts:
        raise ValueError("generate_image needs at least one prompt")
    if retrieved is not None and len(retrieved) != len(prompts):
        raise ValueError(f"retrieved has {len(retrieved)} entries; expected one per prompt ({len(prompts)})")
    docs = retrieved if retrieved is not None else [()] * len(prompts)
    cond = []
    for i, (p, d) in enumerate(zip(prompts, docs)):  # errors name the prompt: which of a batch was not said
        check_text_ids(vocab, list(p), f"prompts[{i}]")
        try:
            cond.append(image_prompt(vocab, p, d))
        except ValueError as err:
            raise ValueError(f"prompts[{i}]{'' if retrieved is None else f' / retrieved[{i}]'}: {err}") from None
    guided = method == "cd_k" or cfg != 1.0
    uncond = list(unconditional) if unconditional is not None else unconditional_image_prompt(vocab)
    if not uncond:
        raise ValueError("unconditional must hold at least one token, e.g. <eos> <mask:0> <break>")
    vocab.validate_ids(uncond, "unconditional")
    streams = [cond, [uncond] * len(prompts)] if guided else [cond]
    spec = _image_spec(
        vocab, method=method, streams=len(streams), cfg=cfg, temperature=temperature, top_p=top_p, top_k=top_k,
        cdk_k=cdk_k, cdk_alpha=cdk_alpha,
    )  # fmt: skip
    codes = _run_image(model, vocab, spec, streams, num_samples, seed, compile)
    return ImageGeneration(codes, _decode_codes(vqgan, codes))


def edit_image(
    model: CM3Leon,
    vocab: MultimodalVocab,
    source: Tensor | Sequence[Sequence[int]],
    instructions: Sequence[Sequence[int]],
    task_prefix: Sequence[int],
    *,
    text_cfg: float = 7.5,
    image_cfg: float = 1.5,
    num_samples: int = 1,
    method: str = "top_p",
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    vqgan: nn.Module | None = None,
    compile: bool | str | None = None,
) -> ImageGeneration:
    """Text-guided image editing with separate text and image guidance (paper section 4.1, table 5).

    Prompt (the InstructPix2Pix template): ``<eos> prefix <break> source image <break> instruction <break>``. Three
    streams: full; image only (the instruction masked as ``<mask:0>``); none (image and instruction masked as
    ``<mask:0>`` and ``<mask:1>``, the task prefix kept; the sentinels CM3 masking gives whole segments), combined by
    :func:`~cm3leon_lightning.generation.sampling.dual_cfg_logits` (paper: image 1.5, text 7.5). With both scales
    1 only the full stream runs, as :func:`generate_image` skips its unconditional stream at ``cfg == 1``: the
    guidance then equals conditional sampling.

    Args:
        source: P source images' codes, ``(P, grid_h * grid_w)``.
        instructions: P edit instructions (text ids).
        task_prefix: text ids of the task prefix, e.g. "Edit first image following the instruction".
        text_cfg: text guidance scale.
        image_cfg: image guidance scale.
        Other arguments as :func:`generate_image`.
    """
    check_vocab(model, vocab)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if len(source) == 0:
        raise ValueError("edit_image needs at least one source image")
    if len(source) != len(instructions):
        raise ValueError(f"{len(source)} source images but {len(instructions)} instructions; give one per image")
    if method == "cd_k":
        raise ValueError("edit_image: method must be 'greedy', 'temperature' or 'top_p' (CD-K contrasts two streams)")
    check_text_ids(vocab, list(task_prefix), "task_prefix")
    head = [vocab.eos_id, *task_prefix, vocab.break_id]
    full, image_only = [], []
    for k, (img, instr) in enumerate(zip(source, instructions)):
        check_text_ids(vocab, list(instr), "instruction")
        ids = vocab.codes_to_ids(image_codes(vocab, img, f"source[{k}]")).tolist()
        full.append(head + ids + [vocab.break_id, *instr, vocab.break_id])
        image_only.append(head + ids + [vocab.break_id, vocab.sentinel_id(0), vocab.break_id])
    none = [head + [vocab.sentinel_id(0), vocab.break_id, vocab.sentinel_id(1), vocab.break_id]] * len(full)
    # Both scales 1: dual guidance is the full stream (up to rounding), at three times the rows.
    streams = [full, image_only, none] if (text_cfg, image_cfg) != (1.0, 1.0) else [full]
    spec = _image_spec(
        vocab, method=method, streams=len(streams), cfg=text_cfg, image_cfg=image_cfg, temperature=temperature,
        top_p=top_p,
    )  # fmt: skip
    codes = _run_image(model, vocab, spec, streams, num_samples, seed, compile)
    return ImageGeneration(codes, _decode_codes(vqgan, codes))


# ------------------------------------------------------------------------------------------------ image -> text
def text_spec(method: str, temperature: float, top_p: float, hi: int) -> SamplingSpec:
    """The sampling rule of text decoding (one stream, ids ``[0, hi)``).

    Raises:
        ValueError: a method other than ``greedy``, ``temperature`` or ``top_p`` (guidance is for images).
    """
    if method not in ("greedy", "top_p", "temperature"):
        raise ValueError(f"text decoding method must be 'greedy', 'temperature' or 'top_p', got {method!r}")
    return SamplingSpec(method=method, streams=1, temperature=temperature, top_p=top_p, lo=0, hi=hi)


def generate_text(
    model: CM3Leon,
    vocab: MultimodalVocab,
    images: Tensor | Sequence[Sequence[int]],
    instruction: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    max_new_tokens: int = 32,
    method: str = "greedy",
    temperature: float = 1.0,
    top_p: float = 0.9,
    seed: int | None = None,
    check_every: int = 8,
    compile: bool | str | None = None,
    layout: str = "infill",
) -> list[list[int]]:
    """Caption images or answer questions about them (paper section 4.2).

    Prompt per image (:func:`caption_prompt`): ``<eos> [instruction] <mask:0> <break> image <infill> <mask:0>``, the
    answer being the infilled span, or with ``layout="image_first"`` ``<eos> image <break> [instruction]``, the
    answer continuing the text (for models trained on image-first documents). Only text ids can be sampled
    (never image codes, padding rows, ``<pad>``, ``<mask>`` or ``<infill>``). All images decode as one batch;
    every ``check_every`` steps one host sync ends the loop once every row has emitted ``<eos>``, ``<break>`` or
    a sentinel.

    Args:
        images: ``(B, grid_h * grid_w)`` codes, or B code lists.
        instruction: None (captioning), one instruction (text ids) for all images, or one per image.
        max_new_tokens: the most tokens per answer.
        method: ``greedy``, ``temperature`` or ``top_p``.
        seed: seed of the sampling generator; as in :func:`generate_image`, one generator draws for every row, so
            a sampled answer changes with the other images of the call (greedy answers do not).
        layout: ``infill`` or ``image_first`` (see above).

    Returns:
        B answers as text-tokenizer ids, without the stop token (decode with ``TextTokenizer.decode``).
    """
    check_vocab(model, vocab)
    if max_new_tokens < 1 or check_every < 1:
        raise ValueError(f"max_new_tokens and check_every must be >= 1, got {max_new_tokens} and {check_every}")
    codes = [image_codes(vocab, img, f"images[{k}]") for k, img in enumerate(images)]
    if not codes:
        raise ValueError("generate_text needs at least one image")
    if instruction is None or len(instruction) == 0:
        per_image: list[Sequence[int]] = [[]] * len(codes)
    elif isinstance(instruction[0], numbers.Integral) or getattr(instruction[0], "ndim", None) == 0:
        per_image = [instruction] * len(codes)  # type: ignore[list-item]
    else:
        per_image = list(instruction)  # type: ignore[arg-type]
        if len(per_image) != len(codes):
            raise ValueError(f"{len(per_image)} instructions for {len(codes)} images; give one, or one per image")
    rows = [caption_prompt(vocab, c, i, layout) for c, i in zip(codes, per_image)]
    spec = text_spec(method, temperature, top_p, hi=vocab.n_text)  # text ids only: the head's first rows
    allowed = allowed_ids(vocab, model.config.vocab_size, "text", _device(model))[: vocab.n_text]
    with torch.no_grad():
        dec = Decoder(model, spec, rows, max_new_tokens, seed=seed, allowed=allowed, compile=compile)
        out = dec.run(dec.prefill(), max_new_tokens, stop_ids(vocab), check_every)
    return cut_at_stop(out, stop_ids(vocab))
