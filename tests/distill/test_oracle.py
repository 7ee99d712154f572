"""The oracle is a measuring instrument: validate it on fresh ground-truth renders."""

from distillery.distill.toy.data import sample
from distillery.distill.toy.oracle import ALL_COMBOS, load_oracle


def test_oracle_is_at_least_98_percent_right_on_1000_ground_truth_images():
    oracle = load_oracle()
    samples = [sample(50_000_000 + i, ALL_COMBOS) for i in range(1000)]  # seeds the oracle never trained on
    judged = oracle.classify([s.image for s in samples])
    correct = sum(j == (s.colour, s.shape) for j, s in zip(judged, samples))
    assert correct / len(samples) >= 0.98, correct


def test_oracle_rejects_wrong_labels():
    oracle = load_oracle()
    s = sample(7)
    assert oracle.classify([s.image])[0] == (s.colour, s.shape)
    assert oracle.classify([s.image.transpose(1)])[0][0] == s.colour  # flipped: colour unchanged
