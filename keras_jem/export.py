"""Export a trained model as a TensorFlow Serving SavedModel.

The export holds only what inference needs: the variables read by the forward pass. The replay
buffer (`model.buffer.images`, easily hundreds of MB) and optimizer state are left out, because the
SavedModel is written through `keras.export.ExportArchive` from endpoint functions, never from the
whole model (`model.export()` and `tf.saved_model.save(model)` would save every variable, and the
latter does not load in the session-style loader that TF Serving's C++ server uses).

Layout written by `export_serving_model(model, "models/jem")`:

```
models/jem/1/saved_model.pb
             variables/
             assets.extra/tf_serving_warmup_requests   (TFRecord of PredictionLog)
             assets.extra/keras_jem_export.json        (what was exported, for humans)
```

Endpoints (SignatureDefs):

- `serving_default`: `images` float32 `(batch, H, W, C)` in [-1, 1] -> `logits` float32
  `(batch, K)`, `probabilities` float32 `(batch, K)`, `classes` int64 `(batch,)`.
- `classify`: the TF Serving Classify contract. One input `inputs`: a string vector of serialized
  `tf.Example`s, each holding the image under `image_feature_key` ("image" by default) as a
  `float_list` of H*W*C values in [-1, 1] (row-major HWC order), or under `image/encoded` as PNG /
  JPEG / BMP bytes (decoded, resized to H x W, brought to C channels and scaled to [-1, 1]).
  Before decoding, the graph reads the image's size from its header (`tf.image.extract_jpeg_shape`,
  the PNG IHDR chunk, the BMP header) and refuses with `InvalidArgument` anything larger than
  `max_encoded_image_size` (4096 x 4096 by default), so a 250 KB PNG declaring 16000 x 16000
  pixels is never decoded, in this project's server or in TF Serving's. GIF is refused: its
  header does not say how many frames `decode_image` would decode.
  Outputs `classes` string `(batch, K)` (the class names, in class-index order) and `scores`
  float32 `(batch, K)` (the probabilities of those classes).
- `ood_score`: `images` -> `log_px` (logsumexp of the logits, log p(x) up to a constant; higher is
  more in-distribution), `max_softmax` (higher is more in-distribution), `energy`
  (`model.energy(x)`; lower is more in-distribution), and, when the export was given
  `ood_threshold`, `is_ood` bool (`log_px < ood_threshold`).

Every endpoint rejects non-finite pixels with an `InvalidArgument` error, in any server.
"""

import json
import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

logger = logging.getLogger(__name__)

SERVING_DEFAULT = "serving_default"
CLASSIFY = "classify"
OOD_SCORE = "ood_score"
ENCODED_IMAGE_FEATURE_KEY = "image/encoded"
WARMUP_FILENAME = "tf_serving_warmup_requests"
DEFAULT_MAX_ENCODED_IMAGE_SIZE = 4096
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
    image_shape, num_classes = _model_geometry(model)
    class_names = _check_class_names(class_names, num_classes)
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
    max_height, max_width = _check_max_size(max_encoded_image_size)

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


def build_export_archive(model, ood_threshold=None, image_feature_key="image", class_names=None,
                         max_encoded_image_size=DEFAULT_MAX_ENCODED_IMAGE_SIZE):
    """Build the `keras.export.ExportArchive` with the three serving endpoints.

    The model itself is not tracked: the archive saves only the variables used by the endpoint
    functions, so the replay buffer is not part of the export. Use this to add endpoints of your
    own before `archive.write_out(path)`; `export_serving_model` does versioning and warmup.

    Args:
        model: a built keras_jem model (see `export_serving_model`).
        ood_threshold: optional float threshold on `log_px` adding the `is_ood` output.
        image_feature_key: the `tf.Example` float feature read by `classify`.
        class_names: optional list of `num_classes` class name strings.
        max_encoded_image_size: the largest encoded image `classify` decodes (int or
            `(max_height, max_width)`).

    Returns:
        A `keras.export.ExportArchive` whose first endpoint is `serving_default`.
    """
    image_shape, num_classes = _model_geometry(model)
    class_names = _check_class_names(class_names, num_classes)
    max_size = _check_max_size(max_encoded_image_size)
    height, width, channels = image_shape
    image_size = height * width * channels
    image_spec = tf.TensorSpec((None,) + image_shape, tf.float32, name="images")
    examples_spec = tf.TensorSpec((None,), tf.string, name="inputs")
    class_names_tensor = tf.constant(class_names, dtype=tf.string)

    def check_finite(images):
        return tf.debugging.assert_all_finite(
            images, "images must be finite (no NaN or inf); expected float32 values in [-1, 1]"
        )

    def predict(images):
        images = check_finite(images)
        logits = tf.cast(model(images, training=False), tf.float32)
        return logits, tf.nn.softmax(logits, axis=-1)

    def serving_default(images):
        logits, probabilities = predict(images)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    energy_is_negative_log_px = _energy_is_negative_logsumexp(model)

    def ood_score(images):
        logits, probabilities = predict(images)
        log_px = tf.reduce_logsumexp(logits, axis=-1)
        if energy_is_negative_log_px:
            energy = -log_px  # the same value, without a second forward pass
        else:
            energy = tf.reshape(tf.cast(model.energy(images, training=False), tf.float32), [-1])
        outputs = {
            "log_px": log_px,
            "max_softmax": tf.reduce_max(probabilities, axis=-1),
            "energy": energy,
        }
        if ood_threshold is not None:
            outputs["is_ood"] = tf.less(log_px, tf.constant(ood_threshold, tf.float32))
        return outputs

    def classify(inputs):
        images = _parse_examples(inputs, image_shape, image_size, image_feature_key, max_size)
        _, probabilities = predict(images)
        batch_size = tf.shape(probabilities)[0]
        classes = tf.tile(class_names_tensor[tf.newaxis, :], tf.stack([batch_size, 1]))
        return {"classes": classes, "scores": probabilities}

    archive = keras.export.ExportArchive()
    archive.add_endpoint(SERVING_DEFAULT, serving_default, input_signature=[image_spec])
    archive.add_endpoint(CLASSIFY, classify, input_signature=[examples_spec])
    archive.add_endpoint(OOD_SCORE, ood_score, input_signature=[image_spec])
    return archive


def make_example(image, image_feature_key="image"):
    """Build the `tf.train.Example` that the `classify` endpoint expects for one image.

    Args:
        image: float array `(H, W, C)` in [-1, 1], or `bytes` of an encoded PNG/JPEG image (stored
            under "image/encoded").
        image_feature_key: the feature key the export was made with.

    Returns:
        A `tf.train.Example`.
    """
    if isinstance(image, (bytes, bytearray)):
        feature = {
            ENCODED_IMAGE_FEATURE_KEY: tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[bytes(image)])
            )
        }
    else:
        values = np.asarray(image, dtype=np.float32).reshape(-1)
        feature = {
            image_feature_key: tf.train.Feature(float_list=tf.train.FloatList(value=values))
        }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_warmup_requests(path, image_shape, image_feature_key="image", batch_sizes=(1, 8)):
    """Write TF Serving warmup requests (a TFRecord of `PredictionLog`) to `path`.

    One Predict request per batch size for `serving_default` and `ood_score`, and one Classify
    request, all on mid-grey images. TF Serving replays them at load time with
    `--enable_model_warmup`, and so does `serving.server`.

    Returns:
        The number of records written, or 0 when `tensorflow-serving-api` is not installed.
    """
    try:
        from tensorflow_serving.apis import classification_pb2
        from tensorflow_serving.apis import predict_pb2
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError:
        logger.warning(
            "Not writing warmup requests: the `tensorflow-serving-api` package is missing. "
            "Install it with `pip install keras-jem[serving]`."
        )
        return 0
    records = []
    for signature in (SERVING_DEFAULT, OOD_SCORE):
        for batch_size in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            images = np.zeros((batch_size,) + tuple(image_shape), np.float32)
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
            records.append(
                prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
            )
    request = classification_pb2.ClassificationRequest()
    request.model_spec.signature_name = CLASSIFY
    request.input.example_list.examples.append(
        make_example(np.zeros(image_shape, np.float32), image_feature_key)
    )
    records.append(
        prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=request)
        )
    )
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
        for record in records:
            writer.write(record.SerializeToString())
    return len(records)


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


def _model_geometry(model):
    if not getattr(model, "built", False):
        raise ValueError(
            "The model must be built before export. Call it once on a batch of images, e.g. "
            "`model(np.zeros((1, H, W, C), 'float32'))`, or load a trained model."
        )
    image_shape = getattr(model, "image_shape", None)
    if image_shape is None:
        raise ValueError(
            f"Expected the model to have an `image_shape` attribute (H, W, C); "
            f"{type(model).__name__} has none (or it is None). keras_jem models set it when built."
        )
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"Expected `model.image_shape` to be (H, W, C). Received: {image_shape}")
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(
            f"Expected `model.num_classes` to be a positive int. Received: {num_classes!r}"
        )
    return image_shape, int(num_classes)


def _energy_is_negative_logsumexp(model):
    """Whether `model.energy(x)` is `-logsumexp(model(x))`: the `EnergyModel` classifier energy,
    not overridden (JEM, JEM++, SADA-JEM, GMMC; IGEBM has its own)."""
    from keras_jem.models import EnergyModel

    return isinstance(model, EnergyModel) and type(model).energy is EnergyModel.energy


def _check_class_names(class_names, num_classes):
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(
            f"Expected {num_classes} class names (one per class), received {len(class_names)}: "
            f"{class_names}"
        )
    return class_names


def _check_max_size(max_encoded_image_size):
    """`max_encoded_image_size` (int or pair) -> (max_height, max_width) positive ints."""
    size = max_encoded_image_size
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ValueError(
            "`max_encoded_image_size` must be a positive int or a pair (max_height, max_width) "
            f"of positive ints. Received: {max_encoded_image_size!r}"
        )
    return int(pair[0]), int(pair[1])


def encoded_image_size(contents):
    """(height, width) int64 of an encoded PNG, JPEG or BMP image, read from its header.

    Nothing is decoded: PNG's IHDR chunk and BMP's info header are read with
    `tf.strings.substr` + `tf.io.decode_raw`, JPEG's frame header with
    `tf.image.extract_jpeg_shape`. Any other format (GIF, WebP, garbage) gives (-1, -1).
    Written by hand because TensorFlow has no header reader for PNG and BMP.
    """
    padded = tf.strings.substr(contents + tf.constant(b"\0" * 32), 0, 32)
    header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)

    def big_endian(offset, size):
        value = tf.constant(0, tf.int64)
        for i in range(size):
            value = value * 256 + header[offset + i]
        return value

    def little_endian(offset, size):
        value = tf.constant(0, tf.int64)
        for i in reversed(range(size)):
            value = value * 256 + header[offset + i]
        return value

    def signed32(value):
        return tf.where(value >= 2**31, value - 2**32, value)

    png_signature = tf.constant([137, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82],
                                tf.int64)  # 8-byte signature, then IHDR's length and type
    is_png = tf.reduce_all(tf.equal(header[:16], png_signature))
    is_bmp = tf.logical_and(tf.equal(header[0], 66), tf.equal(header[1], 77))  # "BM"
    is_jpeg = tf.io.is_jpeg(contents)

    def jpeg_size():
        shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return tf.stack([shape[0], shape[1]])

    def header_size():
        png = tf.stack([big_endian(20, 4), big_endian(16, 4)])
        bmp = tf.stack([tf.abs(signed32(little_endian(22, 4))), signed32(little_endian(18, 4))])
        unknown = tf.constant([-1, -1], tf.int64)
        return tf.where(is_png, png, tf.where(is_bmp, bmp, unknown))

    size = tf.cond(is_jpeg, jpeg_size, header_size)
    return size[0], size[1]


def _parse_examples(serialized, image_shape, image_size, image_feature_key, max_size):
    """Serialized `tf.Example` vector -> float32 images `(batch, H, W, C)` in [-1, 1]."""
    height, width, channels = image_shape
    features = tf.io.parse_example(
        serialized,
        {
            image_feature_key: tf.io.RaggedFeature(tf.float32),
            ENCODED_IMAGE_FEATURE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        },
    )
    pixels = features[image_feature_key]
    encoded = features[ENCODED_IMAGE_FEATURE_KEY]
    lengths = pixels.row_lengths()
    has_encoded = tf.strings.length(encoded) > 0
    valid = tf.logical_or(
        tf.equal(lengths, image_size), tf.logical_and(tf.equal(lengths, 0), has_encoded)
    )
    check = tf.debugging.Assert(
        tf.reduce_all(valid),
        [
            (
                f"Each tf.Example must hold either a float_list '{image_feature_key}' of exactly "
                f"{image_size} values (H*W*C = {height}*{width}*{channels}, row-major, in "
                f"[-1, 1]) or the encoded image bytes under '{ENCODED_IMAGE_FEATURE_KEY}'. "
                "Received float counts:"
            ),
            lengths,
        ],
        summarize=16,
    )
    with tf.control_dependencies([check]):
        dense = pixels.to_tensor(shape=[None, image_size])
        dense = tf.reshape(dense, [-1, height, width, channels])

    max_height, max_width = max_size

    def decode_one(contents):
        def decode():
            encoded_height, encoded_width = encoded_image_size(contents)
            known = tf.logical_and(encoded_height > 0, encoded_width > 0)
            check_format = tf.debugging.Assert(
                known,
                [
                    (
                        f"The '{ENCODED_IMAGE_FEATURE_KEY}' bytes are not a PNG, JPEG or BMP "
                        "image with a valid header (GIF is refused: its header does not bound "
                        "the frames decoded). Convert the image to PNG or JPEG."
                    )
                ],
            )
            check_size = tf.debugging.Assert(
                tf.logical_and(encoded_height <= max_height, encoded_width <= max_width),
                [
                    (
                        "The encoded image is larger than this model accepts (at most "
                        f"{max_height} x {max_width} pixels, set at export with "
                        "max_encoded_image_size); resize it before sending. Received height, "
                        "width:"
                    ),
                    encoded_height,
                    encoded_width,
                ],
            )
            with tf.control_dependencies([check_format, check_size]):
                checked = tf.identity(contents)
            image = tf.io.decode_image(
                checked, channels=channels, dtype=tf.uint8, expand_animations=False
            )
            image = tf.image.resize(tf.cast(image, tf.float32), [height, width], antialias=True)
            return tf.reshape(image / 127.5 - 1.0, [height, width, channels])

        return tf.cond(
            tf.strings.length(contents) > 0,
            decode,
            lambda: tf.zeros([height, width, channels], tf.float32),
        )

    def with_decoded():
        decoded = tf.map_fn(
            decode_one,
            encoded,
            fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32),
        )
        return tf.where(has_encoded[:, tf.newaxis, tf.newaxis, tf.newaxis], decoded, dense)

    return tf.cond(tf.reduce_any(has_encoded), with_decoded, lambda: dense)


__all__ = [
    "build_export_archive",
    "export_serving_model",
    "list_versions",
    "make_example",
    "write_warmup_requests",
]
