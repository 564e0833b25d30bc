"""Synthetic shapes: determinism, the held-out split, captions, and the attribute checker's accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cm3leon_lightning.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELDOUT_PAIRS,
    Scene,
    ShapeSpec,
    caption_attributes,
    check_image,
    detect,
    generate_pairs,
    instruction_texts,
    is_heldout,
    questions,
    recolour,
    render,
)


def test_generation_is_deterministic_and_prefix_stable() -> None:
    a = list(generate_pairs(20, "train", 32, seed=3))
    b = list(generate_pairs(25, "train", 32, seed=3))[:20]
    assert [p.key for p in a] == [p.key for p in b]
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    c = list(generate_pairs(20, "train", 32, seed=4))
    assert [p.caption for p in a] != [p.caption for p in c]
    assert len({p.key for p in a + c}) == 40


def test_heldout_split_is_disjoint_in_colour_shape_pairs() -> None:
    train = list(generate_pairs(400, "train", 32))
    heldout = list(generate_pairs(200, "heldout", 32))
    train_pairs = set().union(*(p.scene.pairs() for p in train))
    assert not train_pairs & HELDOUT_PAIRS
    assert all(is_heldout(p.scene) for p in heldout)
    # The captions agree: no training caption names a held-out pair, every held-out caption names one.
    assert not set().union(*(caption_attributes(p.caption) for p in train)) & HELDOUT_PAIRS
    assert all(caption_attributes(p.caption) & HELDOUT_PAIRS for p in heldout)
    # Both splits use every colour and every shape (held-out pairs are new combinations, not new words).
    for split in (train, heldout):
        used = set().union(*(p.scene.pairs() for p in split))
        assert {c for c, _ in used} == set(COLOURS) and {s for _, s in used} == {"circle", "square", "triangle"}


def test_captions_name_the_scene() -> None:
    for p in generate_pairs(200, "train", 32, seed=5):
        assert caption_attributes(p.caption) == p.scene.pairs()
        for s in p.scene.shapes:
            assert s.colour in p.caption and s.shape in p.caption
        if p.scene.relation:
            assert p.scene.relation in p.caption


@pytest.mark.parametrize("image_size", [32, 64])
def test_checker_is_right_on_at_least_99_percent_of_renders(image_size: int) -> None:
    pairs = list(generate_pairs(600, "train", image_size, seed=7)) + list(
        generate_pairs(300, "heldout", image_size, seed=7)
    )
    right = sum(check_image(p.image, p.scene)["all"] for p in pairs)
    assert right >= 0.99 * len(pairs), f"{right}/{len(pairs)}"


def test_checker_tolerates_mild_noise() -> None:
    rng = np.random.default_rng(0)
    pairs = list(generate_pairs(300, "train", 32, seed=8))
    right = 0
    for p in pairs:
        noisy = np.clip(p.image.astype(float) + rng.normal(0, 10, p.image.shape), 0, 255).astype(np.uint8)
        right += check_image(noisy, p.scene)["all"]
    assert right >= 0.98 * len(pairs)


def test_checker_rejects_wrong_attributes() -> None:
    scene = Scene((ShapeSpec("red", "circle", "large", "left"),))
    img = render(scene, 32)
    assert check_image(img, scene)["all"]
    for wrong, failing in [
        (ShapeSpec("blue", "circle", "large", "left"), "colour"),
        (ShapeSpec("red", "square", "large", "left"), "shape"),
        (ShapeSpec("red", "circle", "small", "left"), "size"),
        (ShapeSpec("red", "circle", "large", "right"), "position"),
    ]:
        verdict = check_image(img, Scene((wrong,)))
        assert not verdict[failing] and not verdict["all"], failing
    blank = np.zeros((32, 32, 3), np.uint8)
    blank[:] = BACKGROUND
    assert detect(blank) == [] and not check_image(blank, scene)["all"]
    two = Scene((ShapeSpec("red", "circle", "small", "top"), ShapeSpec("blue", "square", "small", "bottom")), "above")
    img2 = render(two, 32)
    assert check_image(img2, two)["all"]
    swapped = Scene(two.shapes, "below")
    assert not check_image(img2, swapped)["position"]
    assert not check_image(img2, scene)["count"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        list(generate_pairs(1, "test"))
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        next(generate_pairs(1, seed=-1))
    with pytest.raises(ValueError, match="image_size"):
        render(Scene((ShapeSpec("red", "circle", "large", "left"),)), 8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect(np.zeros((32, 32)))


def test_scene_dict_round_trip():
    from cm3leon_lightning.data.shapes import scene_from_dict, scene_to_dict

    for pair in generate_pairs(20, "train", 32, seed=3):
        d = scene_to_dict(pair.scene)
        assert scene_from_dict(json.loads(json.dumps(d))) == pair.scene


def test_questions_about_one_shape_scenes_and_their_instruction_texts() -> None:
    one = Scene((ShapeSpec("red", "circle", "small", "left"),))
    assert questions(one) == {
        "colour": ("What colour is the shape?", "red"),
        "shape": ("What shape is it?", "circle"),
        "size": ("Is it small or large?", "small"),
        "position": ("Where is the shape?", "left"),
    }
    two = Scene((ShapeSpec("red", "circle", "small", "top"), ShapeSpec("blue", "square", "large", "bottom")), "above")
    assert questions(two) == {}
    texts = instruction_texts("a red circle on the left", one)
    assert len(texts) == 2 + 4 * 3 + len(COLOURS)  # 2 caption templates, 3 VQA templates per question, the edits
    assert texts[:2] == ["a red circle on the left", "Describe the given picture. a red circle on the left"]
    assert "Question: What shape is it? Answer: circle." in texts
    assert "Question: Where is the shape? left" in texts  # the newline template, cleaned as prepare cleans it
    assert "Edit first image following the instruction make it blue" in texts
    assert instruction_texts("two shapes", two) == ["two shapes", "Describe the given picture. two shapes"]


def test_recolour_asks_for_another_colour_of_a_training_combination() -> None:
    scene = Scene((ShapeSpec("red", "circle", "small", "left"),))
    seen = set()
    for seed in range(40):
        instruction, target = recolour(scene, np.random.default_rng(seed))
        (s,) = target.shapes
        assert instruction == f"make it {s.colour}" and s.colour != "red"
        assert (s.shape, s.size, s.position) == ("circle", "small", "left") and not is_heldout(target)
        seen.add(s.colour)
    assert len(seen) >= 3
    with pytest.raises(ValueError, match="one-shape"):
        recolour(Scene((scene.shapes[0], scene.shapes[0]), "above"), np.random.default_rng(0))
