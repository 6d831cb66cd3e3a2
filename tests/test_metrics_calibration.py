import itertools

import numpy as np
import pytest
from PIL import Image

from keras_jem import metrics


def _reference_ece(confidences, correct, num_bins):
    """The plain loop of the reference code (bins `(lower, upper]`)."""
    edges = np.linspace(0, 1, num_bins + 1)
    ece = 0.0
    for lower, upper in itertools.pairwise(edges):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidences[in_bin].mean())
    return ece


def test_ece_hand_computed():
    # 10 bins: (0.8, 0.9] holds two right answers at 0.9 -> gap 0.1; (0.5, 0.6] holds one right
    # and one wrong at 0.6 -> gap 0.1; (0.2, 0.3] holds one wrong at 0.3 -> gap 0.3.
    # ECE = (2 * 0.1 + 2 * 0.1 + 1 * 0.3) / 5 = 0.14.
    result = metrics.expected_calibration_error(
        confidences=[0.9, 0.9, 0.6, 0.6, 0.3], correct=[1, 1, 1, 0, 0], num_bins=10
    )
    assert result["ece"] == pytest.approx(0.14, abs=1e-12)
    assert result["bin_count"][8] == 2 and result["bin_count"][5] == 2
    assert result["bin_count"][2] == 1 and sum(result["bin_count"]) == 5
    assert result["bin_accuracy"][5] == pytest.approx(0.5)
    assert result["bin_confidence"][8] == pytest.approx(0.9)
    assert result["bin_accuracy"][0] is None  # empty bins are None
    assert len(result["bin_edges"]) == 11
    assert result["accuracy"] == pytest.approx(0.6)


def test_ece_from_probabilities_matches_confidences():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    from_probs = metrics.expected_calibration_error(probabilities, labels, num_bins=5)
    from_conf = metrics.expected_calibration_error(
        confidences=[0.9, 0.8, 0.6, 0.55], correct=[1, 0, 1, 1], num_bins=5
    )
    assert from_probs["ece"] == pytest.approx(from_conf["ece"])
    assert from_probs["bin_count"] == from_conf["bin_count"]


def test_ece_default_20_bins_matches_reference_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, size=500)
    result = metrics.expected_calibration_error(probabilities, labels)
    assert result["num_bins"] == 20
    confidences = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    assert result["ece"] == pytest.approx(_reference_ece(confidences, correct, 20), abs=1e-12)


def test_ece_bin_edges_are_right_closed():
    result = metrics.expected_calibration_error(
        confidences=[0.05, 0.0, 1.0], correct=[1, 1, 1], num_bins=20
    )
    assert result["bin_count"][0] == 2  # 0.05 and 0 in the first bin (0, 0.05]
    assert result["bin_count"][19] == 1


def test_ece_perfect_calibration_is_zero():
    confidences = np.repeat([0.25, 0.75], 4)
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.expected_calibration_error(
        confidences=confidences, correct=correct, num_bins=4
    )["ece"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"probabilities": [[3.0, -1.0]], "labels": [0]}, "pass probabilities, not logits"),
        ({"probabilities": [[0.5, 0.5]], "labels": [0, 1]}, "shape"),
        ({"confidences": [0.5], "correct": [1], "labels": [1]}, "not both"),
        ({"confidences": [0.5]}, "neither pair"),
        ({"confidences": [0.5], "correct": [1], "num_bins": 0}, "num_bins"),
    ],
)
def test_ece_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.expected_calibration_error(**kwargs)


def test_reliability_diagram_png(tmp_path):
    rng = np.random.default_rng(1)
    result = metrics.expected_calibration_error(
        confidences=rng.uniform(0.1, 1, 200), correct=rng.uniform(size=200) < 0.7
    )
    path = metrics.reliability_diagram(result, tmp_path / "sub" / "reliability.png", title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
    with pytest.raises(ValueError, match="expected_calibration_error"):
        metrics.reliability_diagram({"ece": 0.1}, tmp_path / "x.png")
