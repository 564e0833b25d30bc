"""Throughput of :func:`cm3_infill` and :func:`cm3_restore` at the paper's full-scale shapes.

Shapes: vocabulary of 56320 text ids + 8192 image codes, 32x32 = 1024 image tokens per image, ~30 caption tokens,
4 caption-image documents per example (3 retrieved + the query; about 4.2k tokens). Prints examples/s for a
single process; a data loader worker runs one such loop.

Run: ``.venv/bin/python benchmarks/cm3_infill.py [--examples N] [--rate R]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from generation import at_least  # benchmarks/generation.py, beside this script

from cm3leon_lightning.objective.cm3 import cm3_infill, cm3_restore
from cm3leon_lightning.tokenization.vocab import MultimodalVocab


def make_examples(vocab: MultimodalVocab, count: int, docs: int, caption_len: int, seed: int) -> list[np.ndarray]:
    """Random serialized examples of ``docs`` caption-image documents each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        retrieved = []
        for _ in range(docs):
            n = int(rng.integers(caption_len // 2, caption_len * 3 // 2))
            text = rng.integers(vocab.num_special, vocab.n_text, size=n).tolist()
            codes = rng.integers(0, vocab.n_codes, size=vocab.image_tokens).tolist()
            retrieved.append(vocab.caption_image_document(text, codes))
        out.append(np.asarray(vocab.example_to_ids(retrieved[:-1], retrieved[-1]), dtype=np.int64))
    return out


def main() -> None:
    """Time masking and restoring, print examples/s and microseconds per example."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=at_least(1), default=2000)
    parser.add_argument("--docs", type=at_least(1), default=4, help="caption-image documents per example")
    parser.add_argument("--caption-len", type=at_least(1), default=30, help="mean caption tokens")
    parser.add_argument("--rate", type=float, default=1.0)
    args = parser.parse_args()

    vocab = MultimodalVocab(n_text=56320, n_codes=8192, grid_h=32, grid_w=32)
    examples = make_examples(vocab, args.examples, args.docs, args.caption_len, seed=0)
    mean_len = np.mean([len(e) for e in examples])
    rng = np.random.default_rng(0)
    for e in examples[:50]:  # warm-up
        cm3_infill(e, vocab, rng, rate=args.rate)

    t0 = time.perf_counter()
    masked = [cm3_infill(e, vocab, rng, rate=args.rate) for e in examples]
    t_mask = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = [cm3_restore(m, vocab) for m in masked]
    t_restore = time.perf_counter() - t0
    assert all(np.array_equal(a, b) for a, b in zip(examples, restored))

    n = len(examples)
    print(f"examples: {n}, mean length {mean_len:.0f} tokens, rate {args.rate}")
    print(f"cm3_infill : {n / t_mask:10.0f} examples/s  ({1e6 * t_mask / n:6.1f} us/example)")
    print(f"cm3_restore: {n / t_restore:10.0f} examples/s  ({1e6 * t_restore / n:6.1f} us/example)")


if __name__ == "__main__":
    main()
