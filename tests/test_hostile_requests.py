"""Hostile requests against a running `python -m serving.server`: each gets a proper status
within a second, the server stays up and its memory stays bounded.

The cases of issue 15 (a tiny message declaring a huge tensor, a decompression bomb, a flood of
concurrent calls, a malformed tf.Example in a batch, slow and malformed REST clients), then
randomly mutated valid requests (seeded; 3000 of them with `--run_large`).
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import predict_pb2

from keras_jem import export
from tests.test_export import png_bytes
from tests.test_serving import IMAGE_SHAPE
from tests.test_serving import logits_of
from tests.test_serving import make_model
from tests.test_serving import predict_request
from tests.test_serving import random_images
from tests.test_serving import tensor_proto
from tests.test_serving import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = "/tensorflow.serving.PredictionService/Predict"
CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
MAX_ROWS = 64
RSS_GROWTH_LIMIT = 300 * 2**20  # bytes the server may grow by over the whole suite
ANSWER_SECONDS = 1.0
PROPER = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return make_model(0)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    export.export_serving_model(model, base / "jem")  # warmup: first calls are not traced
    port, rest_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model_base_path", str(base),
         "--port", str(port), "--rest_port", str(rest_port), "--poll_seconds", "0",
         "--max_request_batch_size", str(MAX_ROWS), "--max_message_mb", "4",
         "--enable_batching", "--max_batch_size", "8", "--batch_timeout_ms", "2",
         "--max_concurrent_rpcs", "16", "--rest_timeout_seconds", "1",
         "--rest_max_connections", "8"],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    ready = wait_for(lambda: any("REST server listening" in line for line in lines)
                     or process.poll() is not None, timeout=180)
    assert ready and process.poll() is None, "".join(lines)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    state = {"process": process, "channel": channel, "port": port, "rest_port": rest_port,
             "lines": lines, "psutil": psutil.Process(process.pid)}
    _check_alive(state, model)  # warm, then measure the baseline
    state["rss0"] = state["psutil"].memory_info().rss
    yield state
    channel.close()
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def _call(state, method, payload, timeout=10.0):
    """Send raw bytes; returns (status code, details, seconds)."""
    call = state["channel"].unary_unary(method)
    start = time.monotonic()
    try:
        call(payload, timeout=timeout)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    return code, details, time.monotonic() - start


def _check_alive(state, model):
    assert state["process"].poll() is None, "".join(state["lines"][-50:])
    images = random_images(2, seed=123)
    call = state["channel"].unary_unary(
        PREDICT, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=predict_pb2.PredictResponse.FromString,
    )
    response = call(predict_request(images), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["logits"]),
                               logits_of(model, images), rtol=1e-5, atol=1e-4)


def _check_memory(state):
    growth = state["psutil"].memory_info().rss - state["rss0"]
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.0f} MB"


def _declared(shape, dtype=types_pb2.DT_FLOAT, **values):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "jem"
    request.inputs["images"].CopyFrom(tensor_proto(dtype, shape, **values))
    return request


def _classify(*examples):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "jem"
    request.model_spec.signature_name = "classify"
    request.input.example_list.examples.extend(examples)
    return request


HOSTILE = {
    # A tiny message declaring a huge tensor: refused on the declaration.
    "declares 8388608 rows": (PREDICT, lambda: _declared([8388608, 8, 8, 1], float_val=[1.0]),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 64 per request"),
    "declares 2^32 floats": (PREDICT, lambda: _declared([2**32], float_val=[1.0]),
                             grpc.StatusCode.INVALID_ARGUMENT, "expected"),
    "declares huge fixed dims": (PREDICT, lambda: _declared([1, 2**31, 2**31, 1], float_val=[1]),
                                 grpc.StatusCode.INVALID_ARGUMENT, r"expected \[-1, 8, 8, 1\]"),
    "declares 2^62 x 2^62": (PREDICT, lambda: _declared([2**62, 2**62, 8, 1]),
                             grpc.StatusCode.INVALID_ARGUMENT, "expected"),
    "negative dimension": (PREDICT, lambda: _declared([-5, 8, 8, 1], float_val=[1.0]),
                           grpc.StatusCode.INVALID_ARGUMENT, ">= 0"),
    "more values than elements": (PREDICT, lambda: _declared([1, 8, 8, 1], float_val=[0] * 65),
                                  grpc.StatusCode.INVALID_ARGUMENT, "65 values"),
    "content size mismatch": (PREDICT, lambda: _declared([1, 8, 8, 1], tensor_content=b"\0" * 7),
                              grpc.StatusCode.INVALID_ARGUMENT, "needs 256"),
    "rank 40": (PREDICT, lambda: _declared([1] * 40, float_val=[0.0]),
                grpc.StatusCode.INVALID_ARGUMENT, "rank 40"),
    "string tensor as images": (PREDICT, lambda: _declared([1], types_pb2.DT_STRING,
                                                           string_val=[b"x" * 1000]),
                                grpc.StatusCode.INVALID_ARGUMENT, "DT_STRING; expected DT_FLOAT"),
    # A decompression bomb: the exported graph refuses it from the PNG header.
    "png 16000x16000 bomb": (CLASSIFY, lambda: _classify(export.make_example(_bomb())),
                             grpc.StatusCode.INVALID_ARGUMENT, "at most 4096 x 4096 pixels"),
    "png header claims 2^31": (CLASSIFY, lambda: _classify(export.make_example(
        png_bytes(0, 0, declared=(2**31 - 1, 2**31 - 1)))),
        grpc.StatusCode.INVALID_ARGUMENT, "at most 4096 x 4096 pixels"),
    "gif": (CLASSIFY, lambda: _classify(export.make_example(b"GIF89a\xff\xff\xff\xff" + b"\0" * 64)),
            grpc.StatusCode.INVALID_ARGUMENT, "not a PNG, JPEG or BMP"),
    "truncated jpeg": (CLASSIFY, lambda: _classify(export.make_example(b"\xff\xd8\xff\xe0\0")),
                       grpc.StatusCode.INVALID_ARGUMENT, ""),
    "65 examples": (CLASSIFY, lambda: _classify(*[export.make_example(np.zeros(IMAGE_SHAPE))] * 65),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 64"),
    "huge model name": (PREDICT, lambda: _named("x" * 100000),
                        grpc.StatusCode.NOT_FOUND, "Servable not found"),
}

_BOMB = []


def _bomb():
    if not _BOMB:
        _BOMB.append(png_bytes(16000, 16000))  # about 250 KB, 256 MB decoded
    return _BOMB[0]


def _named(name):
    request = predict_request(random_images(1))
    request.model_spec.name = name
    return request


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_request(server, model, case):
    method, make, code, pattern = HOSTILE[case]
    got, details, seconds = _call(server, method, make().SerializeToString())
    assert got == code, (got, details)
    import re

    assert re.search(pattern, details), details
    assert seconds < ANSWER_SECONDS, seconds
    if "Servable not found" in details:  # the error names the request, not the served models
        assert len(details) < 300


def test_errors_do_not_list_other_models(server):
    code, details, _ = _call(server, PREDICT, _named("nope").SerializeToString())
    assert code == grpc.StatusCode.NOT_FOUND and "jem" not in details


def test_flood_gets_answers_or_resource_exhausted_at_once(server, model):
    """48 concurrent calls against --max_concurrent_rpcs 16: each is answered or refused."""
    request = predict_request(random_images(4, seed=5)).SerializeToString()
    results = [None] * 48

    def send(i):
        results[i] = _call(server, PREDICT, request, timeout=30)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    codes = [r[0] for r in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= 1
    refused = [r[2] for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(seconds < ANSWER_SECONDS for seconds in refused), refused
    _check_alive(server, model)


def test_one_bad_example_among_concurrent_good_ones(server, model):
    good = [_classify(export.make_example(image)) for image in random_images(7, seed=6)]
    bad = _classify(export.make_example(np.zeros(5)))
    requests = good[:3] + [bad] + good[3:]
    results = [None] * len(requests)

    def send(i):
        call = server["channel"].unary_unary(
            CLASSIFY, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=classification_pb2.ClassificationResponse.FromString,
        )
        try:
            results[i] = call(requests[i], timeout=30)
        except grpc.RpcError as e:
            results[i] = e.code()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results[3] == grpc.StatusCode.INVALID_ARGUMENT
    images = random_images(7, seed=6)
    expected = tf.nn.softmax(logits_of(model, images)).numpy()
    for i, result in enumerate(results[:3] + results[4:]):
        scores = [c.score for c in result.result.classifications[0].classes]
        np.testing.assert_allclose(scores, expected[i], atol=1e-5)


def test_rest_hostile_clients(server):
    rest = server["rest_port"]
    url = f"http://127.0.0.1:{rest}/v1/models/jem:predict"

    def post(body, headers=None):
        request = urllib.request.Request(url, data=body, headers=headers or {})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, time.monotonic() - start
        except urllib.error.HTTPError as e:
            return e.code, time.monotonic() - start

    for body, status in ((b"[" * 100000 + b"]" * 100000, 400), (b"{not json", 400),
                         (json.dumps({"instances": [[1e400]]}).encode(), 400),
                         (json.dumps({"instances": "x" * 1000}).encode(), 400)):
        got, seconds = post(body)
        assert got == status and seconds < ANSWER_SECONDS
    # A body larger than --max_message_mb is refused from its Content-Length.
    with socket.create_connection(("127.0.0.1", rest), timeout=5) as sock:
        sock.sendall(b"POST /v1/models/jem:predict HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 99999999999\r\n\r\n")
        assert b" 413 " in sock.recv(4096)
    # A slow client (half a request line) is dropped after --rest_timeout_seconds (1 s).
    with socket.create_connection(("127.0.0.1", rest), timeout=5) as sock:
        sock.sendall(b"GET /v1/mod")
        start = time.monotonic()
        assert sock.recv(4096) == b""
        assert time.monotonic() - start < 3
    got, _ = post(json.dumps({"instances": random_images(1).tolist()}).encode())
    assert got == 200


def _mutate(data, rng):
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(0, 6))
        position = int(rng.integers(0, max(1, len(data))))
        if kind == 0 and data:  # flip a byte
            data[position] ^= int(rng.integers(1, 256))
        elif kind == 1:  # insert random bytes
            data[position:position] = rng.integers(0, 256, int(rng.integers(1, 16))).astype(
                np.uint8).tobytes()
        elif kind == 2:  # delete a span
            del data[position:position + int(rng.integers(1, 32))]
        elif kind == 3:  # truncate
            del data[position:]
        elif kind == 4:  # duplicate a span
            data[position:position] = data[position:position + int(rng.integers(1, 64))]
        else:  # a maximal varint (huge lengths and sizes)
            data[position:position] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    return bytes(data)


def _seed_requests():
    images = random_images(2, seed=7)
    predict = predict_request(images)
    short = _declared([3, 8, 8, 1], float_val=[0.25])
    classify = _classify(export.make_example(images[0]),
                         export.make_example(png_bytes(8, 8)))
    return [(PREDICT, predict.SerializeToString()), (PREDICT, short.SerializeToString()),
            (CLASSIFY, classify.SerializeToString())]


def _fuzz(server, model, count, seed):
    rng = np.random.default_rng(seed)
    seeds = _seed_requests()
    slow, bad = [], []
    for i in range(count):
        method, data = seeds[i % len(seeds)]
        payload = _mutate(data, rng)
        code, details, seconds = _call(server, method, payload)
        if seconds >= ANSWER_SECONDS:
            slow.append((i, code, seconds))
        if code not in PROPER:
            bad.append((i, code, details[:200]))
        if i % 50 == 49:
            assert server["process"].poll() is None
    assert not bad, bad
    assert not slow, slow
    _check_alive(server, model)
    _check_memory(server)


def test_mutated_requests(server, model):
    _fuzz(server, model, count=150, seed=15)


@pytest.mark.large
def test_mutated_requests_long(server, model):
    _fuzz(server, model, count=3000, seed=1500)


def test_server_still_up_and_bounded(server, model):
    """Last in the file: after every case above, the same server answers correctly."""
    _check_alive(server, model)
    _check_memory(server)
