"""TF Serving warmup requests written next to an exported SavedModel."""

import logging
import os

import numpy as np
import tensorflow as tf

from keras_jem.export.archive import CLASSIFY
from keras_jem.export.archive import OOD_SCORE
from keras_jem.export.archive import SERVING_DEFAULT
from keras_jem.export.examples import make_example

logger = logging.getLogger(__name__)

WARMUP_FILENAME = "tf_serving_warmup_requests"


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
