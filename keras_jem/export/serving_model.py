"""`export_serving_model`: a versioned TF Serving SavedModel, published atomically."""

import json
import logging
import os
import shutil
import tempfile

import numpy as np

from keras_jem.export.archive import CLASSIFY
from keras_jem.export.archive import OOD_SCORE
from keras_jem.export.archive import SERVING_DEFAULT
from keras_jem.export.archive import build_export_archive
from keras_jem.export.archive import check_class_names
from keras_jem.export.archive import model_geometry
from keras_jem.export.examples import DEFAULT_MAX_ENCODED_IMAGE_SIZE
from keras_jem.export.examples import ENCODED_IMAGE_FEATURE_KEY
from keras_jem.export.examples import check_max_size
from keras_jem.export.warmup import WARMUP_FILENAME
from keras_jem.export.warmup import write_warmup_requests

logger = logging.getLogger(__name__)

EXPORT_INFO_FILENAME = "keras_jem_export.json"


def export_serving_model(
    model,
    export_dir,
    ood_threshold=None,
    version=None,
    image_feature_key="image",
    class_names=None,
    warmup=True,
    verbose=False,
    max_encoded_image_size=DEFAULT_MAX_ENCODED_IMAGE_SIZE,
):
    """Write a buffer-free TF Serving SavedModel of `model` under `export_dir/<version>/`.

    Versions are integers; by default each export takes the next free one (1, 2, ...), which TF
    Serving and `serving.server` pick up as the newest version. The SavedModel is first written to
    a hidden temporary directory inside `export_dir` and renamed to its integer name only when it
    is complete, so a server polling `export_dir` never sees a half-written version.

    Args:
        model: a built `keras.Model` following the keras_jem model contract:
            `model(x, training=False)` -> logits `(batch, num_classes)`,
            `model.energy(x, training=False)` -> `(batch,)`, `model.image_shape` (H, W, C) and
            `model.num_classes`. Only the variables its forward pass reads are exported.
        export_dir: the model's base path (e.g. `"models/jem"`); created if missing.
        ood_threshold: optional float threshold on `log_px` (e.g. the value at 95% TPR from the
            evaluation suite). When given, `ood_score` also returns `is_ood = log_px < threshold`.
        version: optional integer version. Defaults to one more than the highest existing
            version. Exporting to an existing version raises `FileExistsError`.
        image_feature_key: the `tf.Example` feature holding the flattened float image in the
            `classify` endpoint.
        class_names: optional list of `num_classes` strings returned as `classes` by `classify`.
            Defaults to the class indices as strings ("0", "1", ...).
        warmup: whether to write `assets.extra/tf_serving_warmup_requests` (needs the
            `tensorflow-serving-api` package: `pip install keras-jem[serving]`).
        verbose: whether to print the exported endpoints.
        max_encoded_image_size: the largest encoded image `classify` decodes, as one int (the
            largest height and width) or `(max_height, max_width)`; larger ones are refused
            from their header, before decoding.

    Returns:
        The path (str) of the written version directory.

    Example:

    ```python
    model = keras.saving.load_model("runs/jem/model.keras")
    path = keras_jem.export.export_serving_model(model, "models/jem", ood_threshold=-3.2)
    served = tf.saved_model.load(path)
    served.signatures["serving_default"](images=x)["probabilities"]
    ```
    """
    image_shape, num_classes = model_geometry(model)
    class_names = check_class_names(class_names, num_classes)
    if ood_threshold is not None:
        ood_threshold = float(ood_threshold)
        if not np.isfinite(ood_threshold):
            raise ValueError(f"`ood_threshold` must be a finite float. Received: {ood_threshold}")
    if not isinstance(image_feature_key, str) or not image_feature_key:
        raise ValueError(
            f"`image_feature_key` must be a non-empty string. Received: {image_feature_key!r}"
        )
    if image_feature_key == ENCODED_IMAGE_FEATURE_KEY:
        raise ValueError(
            f"`image_feature_key` cannot be {ENCODED_IMAGE_FEATURE_KEY!r}: that key is reserved "
            "for encoded image bytes. Use e.g. 'image'."
        )
    if version is not None and (not isinstance(version, (int, np.integer)) or version < 0):
        raise ValueError(f"`version` must be a non-negative integer. Received: {version!r}")

    archive = build_export_archive(
        model,
        ood_threshold=ood_threshold,
        image_feature_key=image_feature_key,
        class_names=class_names,
        max_encoded_image_size=max_encoded_image_size,
    )
    max_height, max_width = check_max_size(max_encoded_image_size)

    export_dir = os.fspath(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-export-", dir=export_dir)
    try:
        archive.write_out(tmp_dir, verbose=verbose)
        extra_dir = os.path.join(tmp_dir, "assets.extra")
        os.makedirs(extra_dir, exist_ok=True)
        info = {
            "image_shape": list(image_shape),
            "num_classes": num_classes,
            "class_names": class_names,
            "image_feature_key": image_feature_key,
            "encoded_image_feature_key": ENCODED_IMAGE_FEATURE_KEY,
            "max_encoded_image_size": [max_height, max_width],
            "ood_threshold": ood_threshold,
            "ood_threshold_score": "log_px",
            "signatures": [SERVING_DEFAULT, CLASSIFY, OOD_SCORE],
            "model_class": type(model).__name__,
        }
        with open(os.path.join(extra_dir, EXPORT_INFO_FILENAME), "w") as f:
            json.dump(info, f, indent=2)
        if warmup:
            write_warmup_requests(
                os.path.join(extra_dir, WARMUP_FILENAME), image_shape, image_feature_key
            )
        # mkdtemp creates the directory private (0700); servers may run as another user.
        os.chmod(tmp_dir, 0o755)
        version_dir = _publish(tmp_dir, export_dir, version)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Exported serving model version to %s", version_dir)
    return version_dir


def list_versions(export_dir, missing_ok=True):
    """Sorted integer versions present under `export_dir` (hidden temporary dirs excluded).

    The one version-directory scan of the project: the exporter numbers new versions with it
    and `serving.model_manager` polls with it.

    Args:
        export_dir: a model's base path.
        missing_ok: return `[]` when `export_dir` cannot be listed (missing, not a directory,
            no permission); with False, raise the `OSError` instead, so that a poller can tell
            "no versions" from "could not look".
    """
    try:
        names = os.listdir(export_dir)
    except OSError:
        if missing_ok:
            return []
        raise
    versions = []
    for name in names:
        if name.isascii() and name.isdigit() and os.path.isdir(os.path.join(export_dir, name)):
            versions.append(int(name))
    return sorted(versions)


def _publish(tmp_dir, export_dir, version):
    """Rename the finished `tmp_dir` to its integer version name; returns the final path."""
    if version is not None:
        target = os.path.join(export_dir, str(int(version)))
        if os.path.exists(target):
            raise FileExistsError(
                f"Version {version} already exists at {target}. Pass another `version`, or "
                "`version=None` to take the next free one."
            )
        os.rename(tmp_dir, target)
        return target
    # Another exporter may take the same number between listing and renaming: `os.rename` of a
    # directory onto an existing non-empty directory fails, and we take the next number.
    for _ in range(100):
        existing = list_versions(export_dir)
        target = os.path.join(export_dir, str(existing[-1] + 1 if existing else 1))
        try:
            os.rename(tmp_dir, target)
            return target
        except OSError:
            if not os.path.exists(target):
                raise
    raise RuntimeError(f"Could not find a free version number under {export_dir}.")
