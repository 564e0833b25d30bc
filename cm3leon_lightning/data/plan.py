"""Which samples each rank and data-loader worker reads in an epoch: pure functions of the manifest's counts.

Exact mode (every sample once per epoch, equal batch counts on every rank):

1. The shards are put in a per-epoch order (a permutation seeded by ``(seed, epoch)`` when shuffling), and their
   samples concatenated into one global stream of N samples.
2. Rank r gets a contiguous range of that stream; the ranges differ in size by at most one sample
   (``N // W`` or ``N // W + 1``).
3. Every rank yields the same number of batches, ``P = ceil(ceil(N / W) / E)`` with E examples per batch. The
   remainder rule: a rank's batches that run out of samples are filled with padding rows (all ``<pad>``, which the
   loss ignores), so every sample is seen exactly once and no rank waits on another at the epoch's end.
4. Inside a rank, PyTorch's DataLoader takes batch j from worker ``j % K``; so worker k yields
   ``len(range(k, P, K))`` batches, and its samples are the next contiguous slice of the rank's range.

Reading is by shard: a worker's slice is a list of :class:`Piece` (a shard and a sample range in it), almost always
whole shards. Pieces are grouped in windows of ``shuffle_shards`` pieces that are read into memory and permuted
(seeded by ``(seed, epoch, rank, worker, window)``); a position in a worker's stream is ``(window, offset)``, so a
resumed worker skips earlier windows without reading them.

Resampled mode (very large data): each worker draws whole shards with replacement from its own seeded generator;
the epoch's nominal length is still ``ceil(N / (W * E))`` batches per rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLE_STREAM = 0x5E5A  # distinct seed-sequence tag for resampled shard draws
SHUFFLE_STREAM = 0x5F1E  # ... for within-window permutations


@dataclass(frozen=True)
class Piece:
    """Samples ``[start, stop)`` (in stored order) of shard ``shard``."""

    shard: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """Number of samples."""
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) slot yields in one epoch.

    Attributes:
        num_batches: batches this worker yields (padding rows once its samples run out).
        pieces: its samples in reading order (exact mode); empty in resampled mode.
        num_samples: the number of samples in ``pieces``.
    """

    num_batches: int
    pieces: tuple[Piece, ...]
    num_samples: int


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: a permutation seeded by ``(seed, epoch)``, or ``0..S-1`` without shuffling."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches per worker when the DataLoader takes batch j from worker ``j % K``."""
    k = max(1, num_workers)
    return [len(range(w, num_batches, k)) for w in range(k)]


def batches_per_rank(num_samples: int, world_size: int, examples_per_batch: int) -> int:
    """``ceil(ceil(N / W) / E)``: the number of batches every rank yields per epoch."""
    per_rank = -(-num_samples // world_size)
    return -(-per_rank // examples_per_batch)


def rank_ranges(num_samples: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges of the global stream, sizes ``N // W`` or ``N // W + 1``."""
    base, extra = divmod(num_samples, world_size)
    out, start = [], 0
    for r in range(world_size):
        size = base + (r < extra)
        out.append((start, start + size))
        start += size
    return out


def slice_pieces(counts: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[Piece]:
    """Pieces covering ``[start, stop)`` of the stream that concatenates the shards ``order``."""
    pieces, pos = [], 0
    for s in order:
        lo, hi = max(start, pos), min(stop, pos + counts[s])
        if lo < hi:
            pieces.append(Piece(s, lo - pos, hi - pos))
        pos += counts[s]
        if pos >= stop:
            break
    return pieces


def exact_plan(
    counts: Sequence[int],
    world_size: int,
    num_workers: int,
    examples_per_batch: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
) -> list[list[WorkerPlan]]:
    """Exact-mode plan: ``plan[rank][worker]`` (see the module docstring for the rules).

    Args:
        counts: samples per shard (the manifest's counts, in manifest order).
        world_size: number of ranks W.
        num_workers: DataLoader workers per rank (0 counts as one).
        examples_per_batch: examples per batch E (batch size times examples packed per row).
        seed: base seed of the shard permutation.
        epoch: the epoch (changes the permutation).
        shuffle: permute the shards per epoch.
    """
    if world_size < 1 or examples_per_batch < 1:
        raise ValueError(f"world_size ({world_size}) and examples_per_batch ({examples_per_batch}) must be >= 1")
    n = int(sum(counts))
    order = shard_order(len(counts), seed, epoch, shuffle)
    p = batches_per_rank(n, world_size, examples_per_batch)
    plan = []
    for start, stop in rank_ranges(n, world_size):
        workers, pos = [], start
        for nb in worker_batch_counts(p, num_workers):
            end = min(stop, pos + nb * examples_per_batch)
            pieces = tuple(slice_pieces(counts, order, pos, end))
            workers.append(WorkerPlan(num_batches=nb, pieces=pieces, num_samples=end - pos))
            pos = end
        plan.append(workers)
    return plan


def resampled_plan(
    counts: Sequence[int], world_size: int, num_workers: int, examples_per_batch: int
) -> list[list[WorkerPlan]]:
    """Resampled-mode plan: only the batch counts (nominal epoch ``ceil(N / (W * E))`` batches per rank)."""
    p = batches_per_rank(int(sum(counts)), world_size, examples_per_batch)
    return [[WorkerPlan(nb, (), 0) for nb in worker_batch_counts(p, num_workers)] for _ in range(world_size)]


def resampled_pieces(counts: Sequence[int], seed: int, epoch: int, rank: int, worker: int) -> Iterator[Piece]:
    """Endless whole-shard draws with replacement for one (rank, worker), seeded by all four numbers."""
    rng = np.random.default_rng([seed, epoch, rank, worker, RESAMPLE_STREAM])
    while True:
        s = int(rng.integers(len(counts)))
        yield Piece(s, 0, int(counts[s]))


def windows(pieces: Iterator[Piece] | Sequence[Piece], size: int) -> Iterator[list[Piece]]:
    """Consecutive groups of ``size`` pieces (the last one may be shorter)."""
    group: list[Piece] = []
    for piece in pieces:
        group.append(piece)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def window_permutation(n: int, seed: int, epoch: int, rank: int, worker: int, window: int, shuffle: bool) -> np.ndarray:
    """Reading order of a window's ``n`` samples: seeded permutation, or identity without shuffling."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, rank, worker, window, SHUFFLE_STREAM]).permutation(n)
