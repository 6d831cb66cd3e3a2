"""Tests of the embedded model server (serving.server) and the client (serving.client)."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

import keras_jem
from keras_jem import export
from serving import client as client_lib
from serving import server as server_lib

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_REQUEST_ROWS = 64
LOGIT_ATOL = 1e-4


def make_model(seed):
    """A small JEM with hand-set weights: N(0, (2 / sqrt(fan_in))^2), twice the He scale, so
    that different images get logits several units apart (up to about 30): a swapped,
    transposed or zeroed input misses the expected answer by more than 1000x the tolerance
    (`test_the_model_tells_inputs_apart` checks that margin). With Keras's default init, the
    logits of different images differ by about 3e-4, too close to a 1e-5 tolerance."""
    keras.utils.set_random_seed(seed)
    model = keras_jem.JEM(
        backbone=keras_jem.backbones.SmallCNN(filters=(8, 16), feature_dim=16),
        num_classes=NUM_CLASSES,
        buffer_size=100,
    )
    model(np.zeros((1,) + IMAGE_SHAPE, "float32"))
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        fan_in = int(np.prod(weight.shape[:-1])) if len(weight.shape) > 1 else 1
        weight.assign(rng.normal(0.0, 2.0 / np.sqrt(fan_in), weight.shape).astype("float32"))
    return model


def logits_of(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def assert_logits(response, model, images):
    """The served logits and probabilities against the Keras model's, at a tolerance far
    below the gap between different inputs' logits."""
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["logits"]), logits_of(model, images),
        rtol=1e-5, atol=LOGIT_ATOL,
    )
    np.testing.assert_allclose(
        tf.make_ndarray(response.outputs["probabilities"]), probabilities(model, images),
        atol=1e-5,
    )


def probabilities(model, images):
    return keras.ops.convert_to_numpy(keras.ops.softmax(model(images, training=False)))


def random_images(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + IMAGE_SHAPE).astype("float32")


def predict_request(images, model="jem", signature="", version=None, label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def tensor_proto(dtype, shape, **fields):
    """A `TensorProto` of `dtype` declaring `shape`, with `fields` (e.g. `float_val=[1.0]`,
    `tensor_content=b"..."`) as given: it need not match the shape."""
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    for name, values in fields.items():
        if name == "tensor_content":
            proto.tensor_content = values
        else:
            getattr(proto, name).extend(values)
    return proto


def classify_request(examples, model="jem", signature="classify"):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.input.example_list.examples.extend(examples)
    return request


def wait_for(condition, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


class Stubs:
    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def versions(self, name="jem"):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        response = self.model.GetModelStatus(request, timeout=10)
        return {s.version: s for s in response.model_version_status}


@pytest.fixture(scope="module")
def models():
    return {"jem": make_model(0), "other": make_model(1)}


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    export.export_serving_model(models["jem"], base / "jem", ood_threshold=2.3)
    export.export_serving_model(models["other"], base / "other", warmup=False)
    config = base / "model_config.pbtxt"
    config.write_text(
        'model_config_list {\n'
        '  config { name: "jem" base_path: "jem" model_platform: "tensorflow"\n'
        '           version_labels { key: "stable" value: 1 }\n'
        '           version_labels { key: "canary" value: 7 } }\n'
        '  config { name: "other" base_path: "other" model_platform: "tensorflow" }\n'
        '}\n'
    )
    server = server_lib.ModelServer(
        model_config_file=str(config), port=0, rest_port=0, host="127.0.0.1",
        batching=server_lib.BatchingOptions(max_batch_size=16, batch_timeout_ms=20),
        max_request_batch_size=MAX_REQUEST_ROWS, poll_seconds=0, max_message_mb=1,
    )
    server.start()
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def stubs(served):
    stubs = Stubs(served.port)
    yield stubs
    stubs.channel.close()


def assert_healthy(stubs, models):
    images = random_images(2, seed=99)
    response = stubs.prediction.Predict(predict_request(images), timeout=10)
    assert_logits(response, models["jem"], images)


def test_predict(stubs, models):
    images = random_images(3)
    response = stubs.prediction.Predict(predict_request(images), timeout=10)
    assert response.model_spec.name == "jem"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert sorted(response.outputs) == ["classes", "logits", "probabilities"]
    assert_logits(response, models["jem"], images)
    expected = probabilities(models["jem"], images)
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["classes"]), expected.argmax(-1)
    )
    # Typed fields by default, as TF Serving answers (some clients read float_val directly).
    logits = response.outputs["logits"]
    assert not logits.tensor_content and len(logits.float_val) == 3 * NUM_CLASSES
    np.testing.assert_allclose(np.reshape(logits.float_val, (3, NUM_CLASSES)),
                               logits_of(models["jem"], images), rtol=1e-5, atol=LOGIT_ATOL)
    assert list(response.outputs["classes"].int64_val) == list(expected.argmax(-1))
    # Several models by name.
    response = stubs.prediction.Predict(predict_request(images, model="other"), timeout=10)
    assert_logits(response, models["other"], images)


def test_the_model_tells_inputs_apart(models):
    """The guard behind every comparison above: a crossed, transposed, zeroed or other-model
    answer misses by at least 1000x the tolerance."""
    images = random_images(12, seed=0)
    logits = logits_of(models["jem"], images)
    wrong = {
        "rows swapped": logits[::-1],
        "transposed": logits_of(models["jem"], images.transpose(0, 2, 1, 3)),
        "zeroed": logits_of(models["jem"], np.zeros_like(images)),
        "other model": logits_of(models["other"], images),
        "next rows": np.roll(logits, 1, axis=0),
    }
    tolerance = 1e-5 * np.abs(logits).max(axis=-1) + LOGIT_ATOL  # as in assert_logits
    for name, value in wrong.items():
        gap = (np.abs(value - logits).max(axis=-1) / tolerance).min()
        assert gap > 1000, (name, gap)


def test_predict_ood_score_and_output_filter(stubs, models):
    images = random_images(4, seed=1)
    request = predict_request(images, signature="ood_score")
    request.output_filter.extend(["log_px", "is_ood"])
    response = stubs.prediction.Predict(request, timeout=10)
    assert sorted(response.outputs) == ["is_ood", "log_px"]
    logits = keras.ops.convert_to_numpy(models["jem"](images))
    log_px = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["log_px"]), log_px, atol=1e-5)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["is_ood"]), log_px < 2.3)


def test_version_label(stubs):
    response = stubs.prediction.Predict(
        predict_request(random_images(1), label="stable"), timeout=10
    )
    assert response.model_spec.version.value == 1


def test_classify_field_by_field(stubs, models):
    images = random_images(3, seed=2)
    response = stubs.prediction.Classify(
        classify_request([export.make_example(image) for image in images]), timeout=10
    )
    assert response.model_spec.name == "jem"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "classify"
    classifications = response.result.classifications
    assert len(classifications) == 3
    expected = probabilities(models["jem"], images)
    for i, result in enumerate(classifications):
        assert [c.label for c in result.classes] == [str(k) for k in range(NUM_CLASSES)]
        np.testing.assert_allclose([c.score for c in result.classes], expected[i], atol=1e-5)


def test_classify_with_context(stubs, models):
    image = random_images(1, seed=3)[0]
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "jem"
    request.model_spec.signature_name = "classify"
    request.input.example_list_with_context.context.CopyFrom(export.make_example(image))
    request.input.example_list_with_context.examples.add()
    response = stubs.prediction.Classify(request, timeout=10)
    np.testing.assert_allclose(
        [c.score for c in response.result.classifications[0].classes],
        probabilities(models["jem"], image[None])[0],
        atol=1e-5,
    )


def test_get_model_metadata(stubs):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "jem"
    response = stubs.prediction.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert sorted(signature_map.signature_def) == ["classify", "ood_score", "serving_default"]
    images = signature_map.signature_def["serving_default"].inputs["images"]
    assert [d.size for d in images.tensor_shape.dim] == [-1, 8, 8, 1]
    assert images.dtype == tf.float32.as_datatype_enum


def test_get_model_status(stubs):
    versions = stubs.versions()
    assert list(versions) == [1]
    assert versions[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert versions[1].status.error_code == 0


def _example_with(feature):
    return tf.train.Example(features=tf.train.Features(feature={"image": feature}))


BAD_PREDICT = {
    "channels": (
        lambda: predict_request(random_images(2).repeat(3, axis=-1)),
        grpc.StatusCode.INVALID_ARGUMENT, "3 channels; the model takes 1",
    ),
    "height_width": (
        lambda: predict_request(np.zeros((2, 9, 8, 1), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT, r"shape \[2, 9, 8, 1\]; expected \[-1, 8, 8, 1\]",
    ),
    "no_batch_dim": (
        lambda: predict_request(np.zeros((8, 8, 1), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT, "Add the batch dimension",
    ),
    "float64": (
        lambda: predict_request(np.zeros((2, 8, 8, 1), np.float64)),
        grpc.StatusCode.INVALID_ARGUMENT, "DT_DOUBLE; expected DT_FLOAT",
    ),
    "uint8": (
        lambda: predict_request(np.zeros((2, 8, 8, 1), np.uint8)),
        grpc.StatusCode.INVALID_ARGUMENT, "DT_UINT8; expected DT_FLOAT",
    ),
    "nan": (
        lambda: predict_request(np.full((2, 8, 8, 1), np.nan, np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite",
    ),
    "inf": (
        lambda: predict_request(np.full((1, 8, 8, 1), np.inf, np.float32), signature="ood_score"),
        grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite",
    ),
    "empty_batch": (
        lambda: predict_request(np.zeros((0, 8, 8, 1), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT, "empty batch",
    ),
    "oversized_batch": (
        lambda: predict_request(np.zeros((MAX_REQUEST_ROWS + 1, 8, 8, 1), np.float32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 64 per request",
    ),
    "oversized_message": (
        lambda: predict_request(np.zeros((5000, 8, 8, 1), np.float32)),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "",
    ),
    "truncated_tensor_content": (
        lambda: _truncated(predict_request(random_images(2))),
        grpc.StatusCode.INVALID_ARGUMENT, "not a valid TensorProto",
    ),
    "unknown_model": (
        lambda: predict_request(random_images(1), model="nope"),
        grpc.StatusCode.NOT_FOUND, r"Servable not found for request: Latest\(nope\)",
    ),
    "unknown_version": (
        lambda: predict_request(random_images(1), version=42),
        grpc.StatusCode.NOT_FOUND, r"Specific\(jem, 42\).*Served versions of jem: \[1\]",
    ),
    "unknown_label": (
        lambda: predict_request(random_images(1), label="beta"),
        grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: beta",
    ),
    "label_of_unloaded_version": (
        lambda: predict_request(random_images(1), label="canary"),
        grpc.StatusCode.NOT_FOUND, r"Specific\(jem, 7\)",
    ),
    "unknown_signature": (
        lambda: predict_request(random_images(1), signature="nope"),
        grpc.StatusCode.FAILED_PRECONDITION, 'signature key "nope" not found',
    ),
    "missing_model_name": (
        lambda: predict_request(random_images(1), model=""),
        grpc.StatusCode.INVALID_ARGUMENT, "model_spec.name is empty",
    ),
    "wrong_input_key": (
        lambda: _renamed_input(predict_request(random_images(1))),
        grpc.StatusCode.INVALID_ARGUMENT, r"Sent extra: \['pixels'\]. Missing but required",
    ),
    "unknown_output_filter": (
        lambda: _with_filter(predict_request(random_images(1)), "nope"),
        grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: nope",
    ),
    "garbage_example_via_predict": (
        lambda: _string_request([b"not an example"]),
        grpc.StatusCode.INVALID_ARGUMENT, "Could not parse example input",
    ),
}

BAD_CLASSIFY = {
    "short_float_list": (
        lambda: classify_request([export.make_example(np.zeros(5))]),
        grpc.StatusCode.INVALID_ARGUMENT, "exactly 64 values",
    ),
    "missing_feature": (
        lambda: classify_request([tf.train.Example()]),
        grpc.StatusCode.INVALID_ARGUMENT, "exactly 64 values",
    ),
    "int64_feature": (
        lambda: classify_request(
            [_example_with(tf.train.Feature(int64_list=tf.train.Int64List(value=[1] * 64)))]
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "Data types don't match",
    ),
    "not_an_image": (
        lambda: classify_request([export.make_example(b"GIF89a?")]),
        grpc.StatusCode.INVALID_ARGUMENT, "",
    ),
    "nan_pixels": (
        lambda: classify_request([export.make_example(np.full(IMAGE_SHAPE, np.nan))]),
        grpc.StatusCode.INVALID_ARGUMENT, "must be finite",
    ),
    "no_examples": (
        lambda: classify_request([]),
        grpc.StatusCode.INVALID_ARGUMENT, "empty",
    ),
    "predict_signature": (
        lambda: classify_request([export.make_example(np.zeros(IMAGE_SHAPE))], signature=""),
        grpc.StatusCode.INVALID_ARGUMENT, "does not follow the Classify contract",
    ),
    "oversized": (
        lambda: classify_request(
            [export.make_example(np.zeros(IMAGE_SHAPE))] * (MAX_REQUEST_ROWS + 1)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 64",
    ),
}


def _truncated(request):
    request.inputs["images"].tensor_content = request.inputs["images"].tensor_content[:-4]
    return request


def _renamed_input(request):
    request.inputs["pixels"].CopyFrom(request.inputs.pop("images"))
    return request


def _with_filter(request, name):
    request.output_filter.append(name)
    return request


def _string_request(values):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "jem"
    request.model_spec.signature_name = "classify"
    request.inputs["inputs"].CopyFrom(tf.make_tensor_proto(values, dtype=tf.string))
    return request


@pytest.mark.parametrize("case", sorted(BAD_PREDICT))
def test_bad_predict_requests(stubs, models, case):
    make, code, message = BAD_PREDICT[case]
    with pytest.raises(grpc.RpcError) as info:
        stubs.prediction.Predict(make(), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert re.search(message, info.value.details()), info.value.details()
    assert_healthy(stubs, models)


@pytest.mark.parametrize("case", sorted(BAD_CLASSIFY))
def test_bad_classify_requests(stubs, models, case):
    make, code, message = BAD_CLASSIFY[case]
    with pytest.raises(grpc.RpcError) as info:
        stubs.prediction.Classify(make(), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert re.search(message, info.value.details()), info.value.details()
    assert_healthy(stubs, models)


def test_other_bad_requests(stubs, models):
    def code_of(call, request):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        return info.value.code(), info.value.details()

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["weights"])
    request.model_spec.name = "jem"
    code, details = code_of(stubs.prediction.GetModelMetadata, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "signature_def" in details
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "nope"
    assert code_of(stubs.model.GetModelStatus, request)[0] == grpc.StatusCode.NOT_FOUND
    request.model_spec.name = "jem"
    request.model_spec.version.value = 5
    assert code_of(stubs.model.GetModelStatus, request)[0] == grpc.StatusCode.NOT_FOUND
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "jem"
    assert code_of(stubs.prediction.Regress, regress)[0] == grpc.StatusCode.UNIMPLEMENTED
    multi = inference_pb2.MultiInferenceRequest()
    assert code_of(stubs.prediction.MultiInference, multi)[0] == grpc.StatusCode.UNIMPLEMENTED
    assert_healthy(stubs, models)


def test_client_disconnect_mid_request(stubs, models):
    images = random_images(MAX_REQUEST_ROWS, seed=4)
    for _ in range(3):
        future = stubs.prediction.Predict.future(predict_request(images), timeout=10)
        future.cancel()
    with pytest.raises(grpc.RpcError) as info:
        stubs.prediction.Predict(predict_request(images), timeout=0.0005)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_healthy(stubs, models)


def test_concurrent_clients_get_their_own_answers(served, stubs, models):
    """Threads send different images at once; the batcher merges them and every answer must
    match the sender's own images."""
    num_threads, per_thread = 12, 3
    barrier = threading.Barrier(num_threads)
    errors, checked = [], []
    batches_before = served.stats()["batchers"]["jem/1/serving_default"]["batches"]

    def worker(index):
        try:
            channel_stubs = Stubs(served.port)
            barrier.wait(timeout=30)
            for step in range(per_thread):
                rows = 1 + (index + step) % 3
                images = random_images(rows, seed=1000 * index + step)
                response = channel_stubs.prediction.Predict(predict_request(images), timeout=30)
                assert_logits(response, models["jem"], images)
                checked.append(rows)
            channel_stubs.channel.close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(checked) == num_threads * per_thread
    batches = served.stats()["batchers"]["jem/1/serving_default"]["batches"] - batches_before
    assert batches < num_threads * per_thread, "the batcher never merged concurrent requests"


def test_a_request_that_fills_a_batch_skips_the_batch_queue(served, stubs, models):
    def batches():
        return served.stats()["batchers"]["jem/1/serving_default"]["batches"]

    before = batches()
    for rows in (16, 40):  # max_batch_size is 16
        images = random_images(rows, seed=rows)
        response = stubs.prediction.Predict(predict_request(images), timeout=30)
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]),
                                   probabilities(models["jem"], images), atol=1e-5)
    assert batches() == before
    stubs.prediction.Predict(predict_request(random_images(15, seed=15)), timeout=30)
    assert batches() == before + 1


class _FakeSignature:
    """Doubles its input; fails (INVALID_ARGUMENT) on negative values, like a graph check."""

    key = "fake"

    def __init__(self):
        self.batch_sizes = []

    def run(self, arrays):
        x = arrays["x"]
        self.batch_sizes.append(len(x))
        if (x < 0).any():
            raise server_lib.ServingError(grpc.StatusCode.INVALID_ARGUMENT, "negative input")
        time.sleep(0.002)
        return {"y": 2 * x, "rows": np.arange(len(x))}


@pytest.fixture
def event_loop_thread():
    runner = server_lib._EventLoopThread(name="test-loop")
    yield runner
    runner.stop()


@pytest.mark.parametrize("num_threads", [1, 0])
def test_batcher_splits_results_and_isolates_failures(event_loop_thread, num_threads):
    signature = _FakeSignature()
    batcher = server_lib.Batcher(signature, max_batch_size=8, timeout=0.05,
                                 num_threads=num_threads, loop=event_loop_thread.loop)
    barrier = threading.Barrier(10)
    results = {}

    def send(i):
        rows = 1 + i % 4
        x = np.full((rows, 2), float(i)) if i != 7 else -np.ones((rows, 2))
        barrier.wait(timeout=30)
        future = batcher.submit_threadsafe({"x": x}, rows)
        try:
            results[i] = (x, future.result(30), None)
        except server_lib.ServingError as e:
            results[i] = (x, None, e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 10
    for i, (x, outputs, error) in results.items():
        if i == 7:
            assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "negative" in error.message
        else:
            assert error is None
            np.testing.assert_array_equal(outputs["y"], 2 * x)
            np.testing.assert_array_equal(outputs["rows"].shape, (len(x),))
    assert max(signature.batch_sizes) <= 8
    assert batcher.num_batches < 10  # requests were merged
    batcher.stop()
    # After stop, requests are still answered (run alone).
    outputs = batcher.submit_threadsafe({"x": np.ones((1, 2))}, 1).result(10)
    assert outputs["y"][0, 0] == 2.0


class _SlowSignature:
    key = "slow"

    def __init__(self, seconds):
        self.seconds = seconds
        self.batch_sizes = []
        self.started = threading.Event()

    def run(self, arrays):
        self.batch_sizes.append(len(arrays["x"]))
        self.started.set()
        time.sleep(self.seconds)
        return {"y": arrays["x"] + 1}


def test_batcher_grows_the_open_batch_while_its_thread_is_busy(event_loop_thread):
    """The first request runs alone (timeout 1 ms); the next ones arrive while it runs, so
    they must go out together as soon as the thread is free, not as 1-row batches."""
    signature = _SlowSignature(0.6)
    batcher = server_lib.Batcher(signature, max_batch_size=16, timeout=0.001, num_threads=1,
                                 loop=event_loop_thread.loop)
    first = batcher.submit_threadsafe({"x": np.zeros((1, 1))}, 1)
    assert signature.started.wait(10)  # the first request is running
    rest = [batcher.submit_threadsafe({"x": np.full((1, 1), float(i))}, 1) for i in range(1, 6)]
    assert first.result(10)["y"][0, 0] == 1.0
    for i, future in enumerate(rest, start=1):
        assert future.result(10)["y"][0, 0] == i + 1.0
    assert signature.batch_sizes == [1, 5]
    batcher.stop()


def test_batcher_queue_limit_answers_unavailable(event_loop_thread):
    signature = _SlowSignature(0.6)
    batcher = server_lib.Batcher(signature, max_batch_size=2, timeout=0.001, num_threads=1,
                                 max_enqueued_rows=4, loop=event_loop_thread.loop)
    futures = [batcher.submit_threadsafe({"x": np.zeros((1, 1))}, 1)]
    assert signature.started.wait(10)  # the first request is running
    futures += [batcher.submit_threadsafe({"x": np.zeros((1, 1))}, 1) for _ in range(7)]
    outcomes = []
    for future in futures:
        try:
            future.result(10)
            outcomes.append("ok")
        except server_lib.ServingError as e:
            outcomes.append(e.code)
    # One runs at once, four wait; the rest are refused rather than queued without bound.
    assert outcomes.count("ok") == 5
    assert outcomes.count(grpc.StatusCode.UNAVAILABLE) == 3
    batcher.stop()


def test_rest_api(served, models):
    url = f"http://127.0.0.1:{served.rest_port}/v1/models"

    def call(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, data=data),
                                        timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert call("/jem") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]})
    status, metadata = call("/jem/metadata")
    assert status == 200 and metadata["model_spec"]["version"] == "1"
    assert "ood_score" in metadata["metadata"]["signature_def"]["signature_def"]

    images = random_images(2, seed=5)
    expected = probabilities(models["jem"], images)
    status, body = call("/jem:predict", {"instances": images.tolist()})
    assert status == 200
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], expected,
                               atol=1e-5)
    status, body = call("/jem/versions/1:predict",
                        {"signature_name": "ood_score", "inputs": {"images": images.tolist()}})
    assert status == 200 and sorted(body["outputs"]) == ["energy", "is_ood", "log_px",
                                                          "max_softmax"]
    status, body = call("/jem/labels/stable:classify", {
        "signature_name": "classify",
        "examples": [{"image": [float(v) for v in image.reshape(-1)]} for image in images],
    })
    assert status == 200
    np.testing.assert_allclose([[s for _, s in r] for r in body["results"]], expected, atol=1e-5)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    status, body = call("/jem:classify", {"signature_name": "classify", "examples": [
        {"image/encoded": {"b64": base64.b64encode(png.getvalue()).decode()}}]})
    assert status == 200 and len(body["results"][0]) == NUM_CLASSES

    status, body = call("/nope")
    assert status == 404 and "nope" in body["error"]
    status, body = call("/jem:predict", {"instances": [[[[0.0]] * 8] * 8] * 1 + [[1.0]]})
    assert status == 400 and "error" in body
    status, body = call("/jem:predict", {"instances": np.zeros((1, 8, 8, 3)).tolist()})
    assert status == 400 and "channels" in body["error"]
    assert call("/jem")[0] == 200


def test_client_class(served, models):
    images = random_images(3, seed=6)
    expected = probabilities(models["jem"], images)
    with client_lib.ServingClient(f"127.0.0.1:{served.port}", "jem") as client:
        assert client.image_shape() == IMAGE_SHAPE
        assert client.status()[0]["state"] == "AVAILABLE"
        np.testing.assert_allclose(client.predict(images)["probabilities"], expected, atol=1e-5)
        assert sorted(client.ood(images)) == ["energy", "is_ood", "log_px", "max_softmax"]
        top = client.classify(images)
        assert [r[0][0] for r in top] == [str(k) for k in expected.argmax(-1)]
    with client_lib.ServingClient(f"127.0.0.1:{served.port}", "jem", version=3) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.predict(images)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_images(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(tmp_path / "white.png")
    np.save(tmp_path / "batch.npy", np.zeros((2, 8, 8, 1), np.uint8))
    images, names = client_lib.load_images(
        [str(tmp_path / "white.png"), str(tmp_path / "batch.npy")], IMAGE_SHAPE
    )
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images[0], 1.0)
    np.testing.assert_allclose(images[1:], -1.0)
    assert names[1].endswith("batch.npy[0]")
    with pytest.raises(ValueError, match="expected"):
        np.save(tmp_path / "bad.npy", np.zeros((8, 8, 3), np.float32))
        client_lib.load_images([str(tmp_path / "bad.npy")], IMAGE_SHAPE)


def test_new_version_and_corrupt_versions(models, tmp_path):
    base = tmp_path / "models"
    export.export_serving_model(models["jem"], base / "jem", warmup=False)
    # A corrupt newest version at start-up: the newest valid one is served instead.
    (base / "jem" / "2").mkdir()
    (base / "jem" / "2" / "saved_model.pb").write_bytes(b"\x00garbage")
    server = server_lib.ModelServer(str(base), port=0, host="127.0.0.1", poll_seconds=0.2)
    server.start()
    stubs = Stubs(server.port)
    try:
        versions = stubs.versions()
        assert versions[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert versions[2].state == get_model_status_pb2.ModelVersionStatus.END
        assert versions[2].status.error_code != 0 and versions[2].status.error_message
        images = random_images(2, seed=7)
        response = stubs.prediction.Predict(predict_request(images), timeout=10)
        assert response.model_spec.version.value == 1

        # A half-written version (no variables yet) is skipped and does not take v1 down.
        half = base / "jem" / "3"
        shutil.copytree(base / "jem" / "1", half)
        shutil.rmtree(half / "variables")
        assert wait_for(lambda: 3 in stubs.versions())
        assert stubs.versions()[3].state == get_model_status_pb2.ModelVersionStatus.END
        assert stubs.prediction.Predict(predict_request(images), timeout=10).model_spec.version \
            .value == 1

        # The half-written version is retried once its files change (the copy completes).
        shutil.copytree(base / "jem" / "1" / "variables", half / "variables")
        assert wait_for(lambda: _state(stubs, 3) == "AVAILABLE")
        assert stubs.prediction.Predict(predict_request(images), timeout=10).model_spec.version \
            .value == 3
        # The default policy serves the latest version only: v1 is retired.
        assert _state(stubs, 1) == "END"
        with pytest.raises(grpc.RpcError) as info:
            stubs.prediction.Predict(predict_request(images, version=1), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # A new version, written atomically by the exporter, is picked up without restart.
        path = export.export_serving_model(models["other"], base / "jem", warmup=False)
        assert os.path.basename(path) == "4"
        assert wait_for(lambda: _state(stubs, 4) == "AVAILABLE")
        response = stubs.prediction.Predict(predict_request(images), timeout=10)
        assert response.model_spec.version.value == 4
        np.testing.assert_allclose(
            tf.make_ndarray(response.outputs["probabilities"]),
            probabilities(models["other"], images),
            atol=1e-5,
        )
        # A new model directory is discovered as a new model name.
        export.export_serving_model(models["jem"], base / "late", warmup=False)
        assert wait_for(lambda: _available(stubs, "late"))
    finally:
        stubs.channel.close()
        server.stop(grace=1)


def _state(stubs, version, name="jem"):
    status = stubs.versions(name).get(version)
    return None if status is None else get_model_status_pb2.ModelVersionStatus.State.Name(
        status.state
    )


def _available(stubs, name):
    try:
        return any(
            s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
            for s in stubs.versions(name).values()
        )
    except grpc.RpcError:
        return False


def test_shipped_config_files():
    configs = server_lib.read_model_config_file(os.path.join(REPO, "serving", "configs",
                                                             "model_config.pbtxt"))
    assert [(c.name, c.base_path) for c in configs] == [("jem", "/models/jem")]
    assert configs[0].model_version_policy.latest.num_versions == 1
    values = server_lib.read_batching_parameters_file(
        os.path.join(REPO, "serving", "configs", "batching_parameters.pbtxt")
    )
    assert values == {"max_batch_size": 32, "batch_timeout_micros": 2000,
                      "max_enqueued_batches": 100, "num_batch_threads": 2}


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_and_client_cli(models, tmp_path, capsys):
    """`python -m serving.server` serves, `python -m serving.client` answers on a PNG, and
    SIGTERM shuts the server down cleanly."""
    base = tmp_path / "models"
    export.export_serving_model(models["jem"], base / "jem")
    pixels = np.random.default_rng(8).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    port = _free_port()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model_base_path", str(base),
         "--host", "127.0.0.1", "--port", str(port), "--poll_seconds", "1",
         "--max_batch_size", "8", "--batch_timeout_ms", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("gRPC server listening" in l for l in lines) or
                        server.poll() is not None, timeout=120), "".join(lines)
        assert server.poll() is None, "".join(lines)
        argv = ["classify", "--target", f"127.0.0.1:{port}", "--model", "jem", "--json",
                str(tmp_path / "digit.png"), "--top_k", "2"]
        assert client_lib.main(argv) == 0
        output = json.loads(capsys.readouterr().out)
        images, _ = client_lib.load_images([str(tmp_path / "digit.png")], IMAGE_SHAPE)
        expected = probabilities(models["jem"], images)[0]
        assert len(output) == 1 and len(output[0]["classes"]) == 2
        assert output[0]["classes"][0]["label"] == str(expected.argmax())
        assert output[0]["classes"][0]["score"] == pytest.approx(expected.max(), abs=1e-5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, "".join(lines)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    reader.join(timeout=10)
    assert any("shutting down" in l for l in lines), "".join(lines)
