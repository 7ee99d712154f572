"""The quality figures that see what alignment cannot: FID with the oracle's features, and the style metric."""

from PIL import ImageFilter

from distillery.distill.evaluation.fid import FLOOR_SEED, FidReference, renders
from distillery.distill.methods.style import stripe_score, style_strength
from distillery.distill.toy.data import sample


def test_fid_sees_a_one_pixel_blur_that_alignment_cannot():
    reference = FidReference.of_renders(1000)
    floor = reference.floor(1000)
    fresh = renders(1000, FLOOR_SEED)
    blurred = reference.fid([im.filter(ImageFilter.GaussianBlur(1)) for im in fresh])
    assert blurred > 5 * floor, (blurred, floor)
    assert reference.fid(fresh) == floor  # the reference's features are kept; only the generated side resets


def test_fid_of_a_set_against_itself_is_near_zero():
    images = renders(300, 123)
    assert FidReference(images).fid(images) < 1.0


def test_stripe_score_tells_the_style_from_plain_images_and_strength_spans_zero_to_one():
    plain = [sample(i).image for i in range(200)]
    striped = [sample(i, stripes=True).image for i in range(200)]
    p, s = stripe_score(plain), stripe_score(striped)
    assert s > 3 * p, (p, s)
    assert style_strength(plain, p, s) == 0 and abs(style_strength(striped, p, s) - 1) < 1e-9
    other = [sample(1000 + i, stripes=True).image for i in range(200)]  # unseen seeds: still styled
    assert style_strength(other, p, s) > 0.8
