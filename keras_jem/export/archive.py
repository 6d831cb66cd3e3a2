"""`build_export_archive`: the serving endpoints of a model as a `keras.export.ExportArchive`."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem.export.examples import DEFAULT_MAX_ENCODED_IMAGE_SIZE
from keras_jem.export.examples import check_max_size
from keras_jem.export.examples import parse_examples

SERVING_DEFAULT = "serving_default"
CLASSIFY = "classify"
OOD_SCORE = "ood_score"


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
    image_shape, num_classes = model_geometry(model)
    class_names = check_class_names(class_names, num_classes)
    max_size = check_max_size(max_encoded_image_size)
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
        images = parse_examples(inputs, image_shape, image_size, image_feature_key, max_size)
        _, probabilities = predict(images)
        batch_size = tf.shape(probabilities)[0]
        classes = tf.tile(class_names_tensor[tf.newaxis, :], tf.stack([batch_size, 1]))
        return {"classes": classes, "scores": probabilities}

    archive = keras.export.ExportArchive()
    archive.add_endpoint(SERVING_DEFAULT, serving_default, input_signature=[image_spec])
    archive.add_endpoint(CLASSIFY, classify, input_signature=[examples_spec])
    archive.add_endpoint(OOD_SCORE, ood_score, input_signature=[image_spec])
    return archive


def model_geometry(model):
    """`(image_shape, num_classes)` of a built keras_jem model, checked for export.

    Args:
        model: the model to export.

    Returns:
        A tuple `((H, W, C), num_classes)` of ints.
    """
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


def check_class_names(class_names, num_classes):
    """The class names as `num_classes` strings (the indices as strings when `None`).

    Args:
        class_names: `None` or a sequence of `num_classes` names.
        num_classes: the model's number of classes.
    """
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(
            f"Expected {num_classes} class names (one per class), received {len(class_names)}: "
            f"{class_names}"
        )
    return class_names
