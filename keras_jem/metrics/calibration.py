"""Calibration: expected calibration error with equal-width bins and reliability diagrams."""

import numpy as np

from keras_jem.metrics import _figures


def _confidences_and_correct(probabilities, labels, confidences, correct):
    if probabilities is not None or labels is not None:
        if confidences is not None or correct is not None:
            raise ValueError(
                "Pass either `probabilities` and `labels`, or `confidences` and `correct`, "
                "not both."
            )
        if probabilities is None or labels is None:
            raise ValueError(
                "`probabilities` and `labels` must be passed together. Received: "
                f"probabilities={'set' if probabilities is not None else None}, "
                f"labels={'set' if labels is not None else None}"
            )
        probabilities = np.asarray(probabilities, dtype=np.float64)
        labels = np.asarray(labels).reshape(-1)
        if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
            raise ValueError(
                "Expected `probabilities` of shape (N, num_classes) and `labels` of shape (N,). "
                f"Received: probabilities.shape={probabilities.shape}, labels.shape={labels.shape}"
            )
        confidences = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == labels
    else:
        if confidences is None or correct is None:
            raise ValueError(
                "Pass `probabilities` and `labels`, or `confidences` and `correct`. "
                "Received neither pair complete."
            )
        confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
        correct = np.asarray(correct).reshape(-1).astype(bool)
        if confidences.shape != correct.shape:
            raise ValueError(
                "`confidences` and `correct` must have the same length. Received: "
                f"{confidences.shape[0]} and {correct.shape[0]}"
            )
    if confidences.size == 0:
        raise ValueError("Cannot compute a calibration error on zero examples.")
    if not np.all(np.isfinite(confidences)):
        raise ValueError(
            f"Confidences must be finite. Received {np.sum(~np.isfinite(confidences))} "
            "non-finite values (did the model diverge?)."
        )
    if confidences.min() < 0.0 or confidences.max() > 1.0:
        raise ValueError(
            "Confidences must lie in [0, 1] (pass probabilities, not logits). Received values in "
            f"[{confidences.min():.4g}, {confidences.max():.4g}]"
        )
    return confidences, correct


def expected_calibration_error(
    probabilities=None, labels=None, num_bins=20, confidences=None, correct=None
):
    """Expected calibration error (ECE) with equal-width confidence bins.

    `ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|`, where bin `b` holds the examples
    whose confidence (max class probability) lies in `(b / num_bins, (b + 1) / num_bins]` (the
    first bin also holds confidence 0). JEM++ and SADA-JEM report it with 20 bins.

    Pass either `probabilities` and `labels`, or precomputed `confidences` and `correct`.

    Args:
        probabilities: array `(N, num_classes)` of class probabilities (softmax of the logits).
        labels: int array `(N,)` of true labels.
        num_bins: int, number of equal-width bins on [0, 1]. Defaults to `20`.
        confidences: float array `(N,)` in [0, 1], the confidence of each prediction.
        correct: bool array `(N,)`, whether each prediction is right.

    Returns:
        A dict with `"ece"` (float, a fraction in [0, 1]), `"num_bins"`, `"num_examples"`,
        `"accuracy"`, `"mean_confidence"` and per-bin lists `"bin_edges"` (num_bins + 1),
        `"bin_accuracy"`, `"bin_confidence"` (`None` for empty bins) and `"bin_count"`.

    Example:

    >>> result = expected_calibration_error(
    ...     confidences=[0.9, 0.9, 0.6, 0.6], correct=[1, 1, 1, 0], num_bins=10)
    >>> round(result["ece"], 6)  # bins: |1 - 0.9| * 2/4 + |0.5 - 0.6| * 2/4
    0.1
    """
    num_bins = int(num_bins)
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be a positive integer. Received: num_bins={num_bins}")
    confidences, correct = _confidences_and_correct(probabilities, labels, confidences, correct)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # Bin b is (edges[b], edges[b + 1]]; confidence 0 goes to the first bin.
    bin_index = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, num_bins - 1)
    counts = np.bincount(bin_index, minlength=num_bins)
    correct_sum = np.bincount(bin_index, weights=correct.astype(np.float64), minlength=num_bins)
    confidence_sum = np.bincount(bin_index, weights=confidences, minlength=num_bins)
    nonempty = counts > 0
    bin_accuracy = np.where(nonempty, correct_sum / np.maximum(counts, 1), np.nan)
    bin_confidence = np.where(nonempty, confidence_sum / np.maximum(counts, 1), np.nan)
    gaps = np.abs(bin_accuracy - bin_confidence)
    ece = float(np.sum(counts[nonempty] / confidences.size * gaps[nonempty]))

    def _list(values):
        return [None if np.isnan(v) else float(v) for v in values]

    return {
        "ece": ece,
        "num_bins": num_bins,
        "num_examples": int(confidences.size),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidences.mean()),
        "bin_edges": [float(e) for e in edges],
        "bin_accuracy": _list(bin_accuracy),
        "bin_confidence": _list(bin_confidence),
        "bin_count": [int(c) for c in counts],
    }


def reliability_diagram(calibration, path, title=None):
    """Draw a reliability diagram (per-bin accuracy against confidence) as a PNG.

    Args:
        calibration: the dict returned by `expected_calibration_error`.
        path: output `.png` path; parent folders are created.
        title: optional str; the ECE is appended to it.

    Returns:
        The path written.

    Example:

    >>> result = expected_calibration_error(probs, labels)  # doctest: +SKIP
    >>> reliability_diagram(result, "reliability.png", title="JEM, CIFAR-10")  # doctest: +SKIP
    """
    required = ("bin_edges", "bin_accuracy", "bin_confidence", "bin_count", "ece")
    missing = [key for key in required if key not in calibration]
    if missing:
        raise ValueError(
            "`calibration` must be the dict returned by `expected_calibration_error`. "
            f"Missing keys: {missing}"
        )
    edges = np.asarray(calibration["bin_edges"])
    lefts, width = edges[:-1], np.diff(edges)
    accuracy = np.array([np.nan if v is None else v for v in calibration["bin_accuracy"]])
    confidence = np.array([np.nan if v is None else v for v in calibration["bin_confidence"]])
    nonempty = np.asarray(calibration["bin_count"]) > 0

    figure, axes = _figures.new_figure(figsize=(4.5, 4.5))
    axes.bar(
        lefts[nonempty], accuracy[nonempty], width=width[nonempty], align="edge",
        color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy",
    )
    bottom = np.fmin(accuracy, confidence)[nonempty]
    gap = np.abs(accuracy - confidence)[nonempty]
    axes.bar(
        lefts[nonempty], gap, bottom=bottom, width=width[nonempty], align="edge",
        color="tab:red", alpha=0.35, edgecolor="tab:red", linewidth=0.5, label="gap",
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (max softmax)")
    axes.set_ylabel("accuracy")
    heading = f"ECE = {100.0 * calibration['ece']:.2f}% ({len(lefts)} bins)"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    return _figures.save_figure(figure, path)
