"""Saliency maps (vanilla gradient, SmoothGrad) with tf-keras-vis, and measures of what they show.

JEM-style models are expected to have more perceptually aligned input gradients than a softmax
classifier. This module draws the maps and measures them:

- `saliency_maps`: per-image maps of the predicted (or given) class, by `tf_keras_vis.saliency.
  Saliency` on a functional wrapper of any keras-jem model (tf-keras-vis needs a functional
  model; `functional_wrapper` builds `keras.Model([inputs], model(inputs))`).
- `deletion_curve`: the accuracy when the most salient pixels are replaced by a fill value,
  against the same fractions of random pixels (a faithful map makes accuracy fall faster).
- `object_alignment`: how well a map singles out the object's pixels (the AUROC of the map as a
  score of object against background pixels: 0.5 is unrelated, 1 is a perfect outline).
- `saliency_figure`, `deletion_figure` and `run_saliency_task`: the side-by-side picture of
  several models' maps for the same images, the curves, and a JSON of the numbers.

Example:

>>> maps = saliency_maps(model, images, method="smoothgrad")
>>> curve = deletion_curve(model, images, labels, maps)
>>> result = run_saliency_task({"softmax": baseline, "JEM": jem}, images, labels, "report/")
"""

import json
import os

import keras
import numpy as np

from keras_jem.metrics import _figures

METHODS = ("vanilla", "smoothgrad")
DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)


def functional_wrapper(model, image_shape=None):
    """A functional `keras.Model([inputs], model(inputs))` around any model (tf-keras-vis needs one).

    The input is a one-element list so that tf-keras-vis, which calls the model on a list of
    inputs, matches its structure.

    Args:
        model: a keras-jem model (or any Keras model mapping images to logits).
        image_shape: `(height, width, channels)`; default `model.image_shape`.
    """
    image_shape = image_shape or getattr(model, "image_shape", None)
    if image_shape is None:
        raise ValueError(
            "`functional_wrapper` needs the image shape: pass `image_shape=(height, width, "
            "channels)` or build the model first. Received: image_shape=None"
        )
    inputs = keras.Input(tuple(image_shape))
    return keras.Model([inputs], model(inputs))


def _check_images(images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(
            "`images` must be a batch (num_images, height, width, channels). Received shape "
            f"{images.shape}"
        )
    return images


def predict_classes(model, images, batch_size=256):
    """Arg-max class of `model`'s logits for every image."""
    from keras_jem.metrics import classification

    return np.argmax(classification.predict_logits(model, images, batch_size=batch_size), -1)


def saliency_maps(
    model,
    images,
    labels=None,
    method="smoothgrad",
    smooth_samples=20,
    smooth_noise=0.2,
    batch_size=64,
):
    """Saliency maps of the predicted class (or of `labels`) with tf-keras-vis.

    The vanilla map is `max over channels |d logit_c / d x|`; SmoothGrad averages it over
    `smooth_samples` copies of the image with Gaussian noise of standard deviation
    `smooth_noise * (max - min)` of the image (Smilkov et al. 2017). tf-keras-vis scales every
    map to [0, 1].

    Args:
        model: a keras-jem model (its logits are the scores).
        images: `(num_images, height, width, channels)` in the model's input range.
        labels: optional classes whose logit is explained; default the predicted class.
        method: "vanilla" or "smoothgrad".
        smooth_samples: noisy copies per image (SmoothGrad).
        smooth_noise: relative noise level (SmoothGrad).
        batch_size: images per tf-keras-vis call.

    Returns:
        float32 `(num_images, height, width)` maps in [0, 1].
    """
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    images = _check_images(images)
    if labels is None:
        labels = predict_classes(model, images)
    labels = np.asarray(labels).reshape(-1).astype(int)
    if len(labels) != len(images):
        raise ValueError(
            f"`labels` must hold one class per image: {len(images)} images, {len(labels)} labels."
        )
    saliency = Saliency(functional_wrapper(model, images.shape[1:]), clone=False)
    smooth = {"smooth_samples": int(smooth_samples), "smooth_noise": float(smooth_noise)}
    maps = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        score = CategoricalScore(labels[start:start + batch_size].tolist())
        maps.append(np.asarray(saliency(score, batch, **(smooth if method == "smoothgrad"
                                                         else {}))))
    return np.concatenate(maps).astype(np.float32).reshape(images.shape[:3])


def _remove(images, order, count, fill_value):
    """Copies of `images` with the first `count` pixels of each row of `order` set to fill."""
    removed = images.reshape(len(images), -1, images.shape[-1]).copy()
    rows = np.arange(len(images))[:, None]
    removed[rows, order[:, :count]] = fill_value
    return removed.reshape(images.shape)


def deletion_curve(
    model,
    images,
    labels,
    maps,
    fractions=DEFAULT_FRACTIONS,
    fill_value=None,
    num_random=3,
    seed=0,
    batch_size=256,
):
    """Accuracy when the most salient pixels are removed, against removing random pixels.

    For each fraction `f`, the `round(f * height * width)` pixels of each image with the largest
    map values (all channels of a pixel) are set to `fill_value`, and the model's accuracy on
    `labels` is measured; the same for random pixels (averaged over `num_random` draws). The
    areas under both curves (trapezoid over `fractions`) summarise them: a map that finds what
    the model relies on has `salient_auc` well below `random_auc`.

    Args:
        model: the model whose accuracy is measured.
        images: `(num_images, height, width, channels)`.
        labels: the true classes.
        maps: `(num_images, height, width)` saliency maps (any scale; only the order counts).
        fractions: increasing fractions of the pixels to remove, in [0, 1].
        fill_value: the value of a removed pixel; default the mean pixel value of `images`.
        num_random: random orders averaged for the baseline curve.
        seed: seed of the random orders.
        batch_size: prediction batch size.

    Returns:
        A dict with `fractions`, `salient_accuracy`, `random_accuracy` (lists), `salient_auc`,
        `random_auc` and `fill_value`.
    """
    images = _check_images(images)
    labels = np.asarray(labels).reshape(-1)
    maps = np.asarray(maps, np.float32)
    if maps.shape != images.shape[:3] or len(labels) != len(images):
        raise ValueError(
            f"`maps` must have shape (num_images, height, width) = {images.shape[:3]} and "
            f"`labels` one entry per image. Received maps {maps.shape}, labels {labels.shape}"
        )
    fractions = [float(f) for f in fractions]
    if any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"`fractions` must increase within [0, 1]. Received: {fractions}")
    fill_value = float(np.mean(images)) if fill_value is None else float(fill_value)
    num_pixels = images.shape[1] * images.shape[2]
    # Stable sort of -map: ties keep the pixel order (deterministic).
    salient_order = np.argsort(-maps.reshape(len(maps), -1), axis=1, kind="stable")
    rng = np.random.default_rng(seed)
    random_orders = [np.argsort(rng.random((len(images), num_pixels)), axis=1)
                     for _ in range(num_random)]

    def accuracy(batch):
        return float(np.mean(predict_classes(model, batch, batch_size) == labels))

    salient, random = [], []
    for fraction in fractions:
        count = round(fraction * num_pixels)
        salient.append(accuracy(_remove(images, salient_order, count, fill_value)))
        random.append(float(np.mean([accuracy(_remove(images, order, count, fill_value))
                                     for order in random_orders])))
    return {
        "fractions": fractions,
        "salient_accuracy": salient,
        "random_accuracy": random,
        "salient_auc": _trapezoid(salient, fractions),
        "random_auc": _trapezoid(random, fractions),
        "fill_value": fill_value,
    }


def _trapezoid(values, positions):
    # np.trapezoid is NumPy 2 only (np.trapz before): the rule written out.
    values, positions = np.asarray(values, np.float64), np.asarray(positions, np.float64)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(positions)))


def object_masks(images):
    """Object pixels of images on a plain background: above the mid-range of each image.

    Digits and Fashion-MNIST draw bright objects on a dark background; the mask is the pixels
    (channel mean) above `(min + max) / 2` of their image.
    """
    images = _check_images(images)
    gray = images.mean(axis=-1)
    low = gray.min(axis=(1, 2), keepdims=True)
    high = gray.max(axis=(1, 2), keepdims=True)
    return gray > (low + high) / 2


def object_alignment(maps, masks):
    """Mean over images of the AUROC of the map as a score of object against background pixels.

    The AUROC is the probability that a random object pixel has a higher map value than a random
    background pixel (ties count one half): 0.5 for a map unrelated to the object, 1.0 for a map
    that is higher on every object pixel. Images whose mask is all object or all background are
    skipped.

    Args:
        maps: `(num_images, height, width)` saliency maps.
        masks: boolean `(num_images, height, width)` object masks (e.g. `object_masks(images)`).

    Returns:
        A dict with `auroc` (the mean), `per_image` (list, NaN where skipped).
    """
    from scipy import stats

    maps = np.asarray(maps, np.float64)
    masks = np.asarray(masks, bool)
    if maps.shape != masks.shape:
        raise ValueError(f"`maps` and `masks` must have the same shape. Received {maps.shape} and "
                         f"{masks.shape}")
    per_image = []
    for values, mask in zip(maps.reshape(len(maps), -1), masks.reshape(len(masks), -1)):
        num_object, num_background = int(mask.sum()), int((~mask).sum())
        if not num_object or not num_background:
            per_image.append(float("nan"))
            continue
        # Mann-Whitney U from the ranks (average ranks for ties).
        ranks = stats.rankdata(values)
        u_statistic = ranks[mask].sum() - num_object * (num_object + 1) / 2
        per_image.append(float(u_statistic / (num_object * num_background)))
    return {"auroc": float(np.nanmean(per_image)), "per_image": per_image}


def saliency_figure(images, maps_by_row, path=None, title=None):
    """The images in the first row, then one row of maps per entry of `maps_by_row`.

    Args:
        images: `(num_images, height, width, channels)` in [-1, 1].
        maps_by_row: dict row label -> `(num_images, height, width)` maps.
        path: optional PNG path.
        title: optional figure title.

    Returns:
        The matplotlib `Figure`.
    """
    from keras_jem.metrics import images as image_lib

    images = _check_images(images)
    num_rows, num_cols = 1 + len(maps_by_row), len(images)
    figure, axes = _figures.new_figure(figsize=(0.9 * num_cols + 1.3, 0.95 * num_rows + 0.3),
                                       dpi=80)
    figure.delaxes(axes)
    shown = image_lib.to_uint8(images)
    rows = [("input", shown)] + list(maps_by_row.items())
    for row, (label, values) in enumerate(rows):
        for col in range(num_cols):
            ax = figure.add_subplot(num_rows, num_cols, row * num_cols + col + 1)
            value = values[col]
            if row == 0:
                ax.imshow(value.squeeze(-1) if value.shape[-1] == 1 else value,
                          cmap="gray" if value.shape[-1] == 1 else None, vmin=0, vmax=255)
            else:
                ax.imshow(value, cmap="inferno", vmin=0.0, vmax=max(float(value.max()), 1e-12))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    if path:
        _figures.save_figure(figure, path)
    return figure


def deletion_figure(curves, path=None, title="Deletion curves"):
    """Accuracy against the fraction of pixels removed: salient (solid) and random (dashed).

    Args:
        curves: dict label -> the dict `deletion_curve` returns.
        path: optional PNG path.
        title: the axes title.

    Returns:
        The matplotlib `Figure`.
    """
    figure, axes = _figures.new_figure(figsize=(5.0, 3.6), dpi=80)
    for index, (label, curve) in enumerate(curves.items()):
        color = f"C{index}"
        axes.plot(curve["fractions"], curve["salient_accuracy"], "-o", color=color, markersize=3,
                  label=f"{label}: salient (AUC {curve['salient_auc']:.3f})")
        axes.plot(curve["fractions"], curve["random_accuracy"], "--", color=color,
                  label=f"{label}: random (AUC {curve['random_auc']:.3f})")
    axes.set_xlabel("fraction of pixels removed")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    if path:
        _figures.save_figure(figure, path)
    return figure


def run_saliency_task(
    models,
    images,
    labels,
    output_dir,
    methods=METHODS,
    num_shown=8,
    fractions=DEFAULT_FRACTIONS,
    fill_value=None,
    smooth_samples=20,
    smooth_noise=0.2,
    seed=0,
):
    """Maps, deletion curves and object alignment for several models on the same images.

    Writes `saliency.png` (the first `num_shown` images, then one row per model and method),
    `saliency_deletion.png` (SmoothGrad's deletion curves, or the first method's) and
    `saliency.json` (every number) to `output_dir`.

    Args:
        models: dict name -> model, e.g. `{"softmax": baseline, "JEM": jem}` (same input space).
        images: `(num_images, height, width, channels)` test images (all are measured).
        labels: their true classes.
        output_dir: where the files go.
        methods: saliency methods, among "vanilla" and "smoothgrad".
        num_shown: images drawn in the picture.
        fractions, fill_value: of `deletion_curve`.
        smooth_samples, smooth_noise: of `saliency_maps` (SmoothGrad).
        seed: seed of the random deletion baseline.

    Returns:
        A dict: `metrics` (per model and method: `deletion` curve, `object_auroc`, `accuracy`),
        `figures` (`{"saliency": Figure, "deletion": Figure}`) and `paths`.
    """
    if not models:
        raise ValueError("`models` must map at least one name to a model. Received: {}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"`methods` must be among {METHODS}. Received: {list(methods)}")
    images = _check_images(images)
    labels = np.asarray(labels).reshape(-1)
    masks = object_masks(images)
    metrics, rows, curves = {}, {}, {}
    curve_method = "smoothgrad" if "smoothgrad" in methods else methods[0]
    for name, model in models.items():
        predicted = predict_classes(model, images)
        metrics[name] = {"accuracy": float(np.mean(predicted == labels))}
        for method in methods:
            maps = saliency_maps(model, images, labels=predicted, method=method,
                                 smooth_samples=smooth_samples, smooth_noise=smooth_noise)
            curve = deletion_curve(model, images, labels, maps, fractions=fractions,
                                   fill_value=fill_value, seed=seed)
            metrics[name][method] = {
                "deletion": curve,
                "object_auroc": object_alignment(maps, masks)["auroc"],
            }
            rows[f"{name}\n{method}"] = maps[:num_shown]
            if method == curve_method:
                curves[name] = curve
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "saliency": os.path.join(output_dir, "saliency.png"),
        "deletion": os.path.join(output_dir, "saliency_deletion.png"),
        "json": os.path.join(output_dir, "saliency.json"),
    }
    figures = {
        "saliency": saliency_figure(images[:num_shown], rows, paths["saliency"]),
        "deletion": deletion_figure(curves, paths["deletion"],
                                    title=f"Deletion curves ({curve_method}, "
                                          f"{len(images)} images)"),
    }
    with open(paths["json"], "w") as f:
        json.dump({"num_images": len(images), "metrics": metrics}, f, indent=2)
    return {"metrics": metrics, "figures": figures, "paths": paths}
