import numpy as np

from distillery.distill.toy.data import COLOURS, HELDOUT_COMBOS, SHAPES, TRAIN_COMBOS, eval_prompts, sample


def test_samples_are_deterministic_per_seed():
    a, b = sample(123), sample(123)
    assert a.caption == b.caption
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.asarray(sample(124).image).tolist() != np.asarray(a.image).tolist()


def test_vocabulary_and_holdout():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4
    assert set(TRAIN_COMBOS).isdisjoint(HELDOUT_COMBOS)
    assert len(TRAIN_COMBOS) + len(HELDOUT_COMBOS) == len(COLOURS) * len(SHAPES)
    seen = {(s.colour, s.shape) for s in (sample(i) for i in range(2000))}
    assert seen == set(TRAIN_COMBOS)  # every training combination appears, no held-out one does


def test_caption_names_colour_and_shape_and_image_shows_the_colour():
    for i in range(50):
        s = sample(i)
        assert s.caption.startswith("a ") and f"{s.colour} {s.shape}" in s.caption
        pixels = np.asarray(s.image).reshape(-1, 3).astype(int)
        dist = np.abs(pixels - np.array(COLOURS[s.colour])).sum(1)
        assert (dist < 30).sum() >= 20  # the shape's colour really is drawn


def test_size_and_background_words_appear():
    captions = [sample(i).caption for i in range(300)]
    assert any(" small " in c for c in captions) and any(" large " in c for c in captions)
    assert any(c.endswith("background") for c in captions) and any(not c.endswith("background") for c in captions)


def test_eval_prompts_use_requested_combos():
    assert {(c, s) for _, c, s in eval_prompts(200, HELDOUT_COMBOS)} <= set(HELDOUT_COMBOS)
