"""ResumableSampler's arguments are checked when it is built, naming the argument."""

from __future__ import annotations

import pytest

from cm3leon_lightning.data.sampling import ResumableSampler


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed_is_refused_when_built(seed: object) -> None:
    """A negative seed failed at the first pass with numpy's bare "expected non-negative integer"."""
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 \(it seeds each epoch's order\), got "):
        ResumableSampler(list(range(4)), 2, seed=seed)  # type: ignore[arg-type]


def test_good_seed_gives_every_index_once() -> None:
    assert sorted(ResumableSampler(list(range(5)), 2, seed=3)) == [0, 1, 2, 3, 4]
