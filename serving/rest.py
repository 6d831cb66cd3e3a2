"""TF Serving's REST API (`/v1/models/...`) on a bounded, optionally TLS, HTTP server."""

import base64
import http.server
import json
import logging
import re
import select
import socket
import sys
import threading
import time
import urllib.parse

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2

from serving.errors import HTTP_STATUS
from serving.errors import ServingError
from serving.errors import internal
from serving.errors import invalid
from serving.tensors import numpy_to_tensor_proto

logger = logging.getLogger("serving.rest")


def _json_value(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    return value


def _to_json(array):
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        flat = [_json_value(v) for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim else flat[0]
    return array.tolist()


def _from_json(value, dtype_enum, name):
    """JSON value (nested lists, {"b64": ...}) -> numpy array of the signature's dtype."""
    dtype = tf.dtypes.as_dtype(dtype_enum)
    if dtype == tf.string:

        def convert(v):
            if isinstance(v, list):
                return [convert(x) for x in v]
            if isinstance(v, dict) and set(v) == {"b64"}:
                return base64.b64decode(v["b64"])
            if isinstance(v, str):
                return v.encode("utf-8")
            raise invalid(
                f"Input '{name}' expects strings or {{\"b64\": ...}}; received {str(v)[:100]}."
            )

        return np.array(convert(value), dtype=object)
    try:
        return np.array(value, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError, OverflowError):
        raise invalid(
            f"Input '{name}' could not be read as a {dtype.name} tensor: expected a (nested) "
            "list of numbers of one rectangular shape."
        ) from None


def _feature_from_json(value, key):
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, dict) and set(v) == {"b64"} for v in values):
        data = [base64.b64decode(v["b64"]) for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    if all(isinstance(v, str) for v in values):
        data = [v.encode("utf-8") for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    raise invalid(
        f"Feature '{key[:100]}' must be a number, a string, {{\"b64\": ...}} or a flat list of "
        f"one of these; received {str(value)[:100]}."
    )


def _example_from_json(obj, index):
    if not isinstance(obj, dict):
        raise invalid(
            f"examples[{index}] must be a JSON object of features; received {str(obj)[:100]}."
        )
    example = tf.train.Example()
    for key, value in obj.items():
        example.features.feature[key].CopyFrom(_feature_from_json(value, key))
    return example


def _message_to_dict(message):
    try:
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, including_default_value_fields=True
        )


class RestApi:
    """TF Serving's REST API (`/v1/models/...`) over a `ServingCore`.

    Args:
        core: the `ServingCore`.
        timeout: seconds a request may wait for its batch and run.
    """

    _PATH = re.compile(
        r"^/v1/models/(?P<name>[^/:]+)"
        r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
        r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?$"
    )

    def __init__(self, core, timeout=300.0):
        self.core = core
        self.timeout = timeout

    def handle(self, method, path, body):
        """Returns (HTTP status, JSON-serializable body)."""
        try:
            return 200, self._dispatch(method, urllib.parse.unquote(path.split("?")[0]), body)
        except ServingError as e:
            return HTTP_STATUS.get(e.code, 500), {"error": e.message}
        except Exception as e:  # noqa: BLE001
            return 500, {"error": internal(e, f"REST {method}").message}

    def _model_spec(self, spec, match):
        spec.name = match["name"]
        if match["version"] is not None:
            spec.version.value = int(match["version"][:18])
        elif match["label"] is not None:
            spec.version_label = match["label"]

    def _dispatch(self, method, path, body):
        match = self._PATH.match(path)
        if match is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Malformed request: {method} {path[:200]}. Expected GET /v1/models/<name>"
                "[/versions/<v>|/labels/<l>][/metadata] or POST .../<name>[...]:predict|:classify.",
            )
        verb = match["verb"]
        if method == "GET" and verb is None:
            if match["metadata"]:
                return self._metadata(match)
            return self._status(match)
        if method == "POST" and verb is not None:
            try:
                payload = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise invalid(f"The request body is not valid JSON: {str(e)[:200]}") from None
            if not isinstance(payload, dict):
                raise invalid("The request body must be a JSON object.")
            if verb == "predict":
                return self._predict(match, payload)
            if verb == "classify":
                return self._classify(match, payload)
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented.")
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Unsupported method {method} for {path[:200]}: GET status/metadata, POST :predict "
            "or :classify.",
        )

    def _status(self, match):
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, match)
        return _message_to_dict(self.core.get_model_status(request))

    def _metadata(self, match):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, match)
        response = self.core.get_model_metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": {
                "name": response.model_spec.name,
                "signature_name": "",
                "version": str(response.model_spec.version.value),
            },
            "metadata": {
                "signature_def": json_format.MessageToDict(
                    signature_map, preserving_proto_field_name=True
                )
            },
        }

    def _predict(self, match, payload):
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, match)
        request.model_spec.signature_name = str(payload.get("signature_name", "") or "")
        servable = self.core.manager.resolve(request.model_spec)
        signature = servable.signature(request.model_spec.signature_name)
        if ("instances" in payload) == ("inputs" in payload):
            raise invalid(
                'The request must hold exactly one of "instances" (row format) or "inputs" '
                "(columnar format)."
            )
        row_format = "instances" in payload
        data = payload["instances"] if row_format else payload["inputs"]
        keys = sorted(signature.inputs)
        if row_format:
            if not isinstance(data, list):
                raise invalid('"instances" must be a list with one entry per row.')
            if len(keys) == 1 and not (data and isinstance(data[0], dict)):
                columns = {keys[0]: data}
            else:
                if not all(isinstance(row, dict) for row in data):
                    raise invalid(f'Each entry of "instances" must be an object with keys {keys}.')
                columns = {k: [row.get(k) for row in data] for k in {k for r in data for k in r}}
        else:
            if isinstance(data, dict):
                columns = data
            elif len(keys) == 1:
                columns = {keys[0]: data}
            else:
                raise invalid(f'"inputs" must be an object with keys {keys}.')
        for key, value in columns.items():
            if key not in signature.inputs:
                raise invalid(
                    f"Unknown input '{str(key)[:100]}' for signature '{signature.key}'; expected "
                    f"{signature.describe_inputs()}."
                )
            array = _from_json(value, signature.inputs[key][0], key)
            numpy_to_tensor_proto(array, request.inputs[key], tensor_content=True)
        _, _, outputs = self.core.predict_outputs(request, self.timeout)
        if not row_format:
            if len(outputs) == 1:
                return {"outputs": _to_json(next(iter(outputs.values())))}
            return {"outputs": {k: _to_json(v) for k, v in outputs.items()}}
        if len(outputs) == 1:
            return {"predictions": _to_json(next(iter(outputs.values())))}
        rows = len(next(iter(outputs.values())))
        return {
            "predictions": [{k: _to_json(v[i]) for k, v in outputs.items()} for i in range(rows)]
        }

    def _classify(self, match, payload):
        request = classification_pb2.ClassificationRequest()
        self._model_spec(request.model_spec, match)
        request.model_spec.signature_name = str(payload.get("signature_name", "") or "")
        examples = payload.get("examples")
        if not isinstance(examples, list):
            raise invalid('The request must hold "examples": a list of feature objects.')
        if "context" in payload:
            target = request.input.example_list_with_context
            target.context.CopyFrom(_example_from_json(payload["context"], "context"))
        else:
            target = request.input.example_list
        for i, obj in enumerate(examples):
            target.examples.append(_example_from_json(obj, i))
        response = self.core.classify(request, self.timeout)
        return {
            "results": [
                [[c.label, c.score] for c in result.classes]
                for result in response.result.classifications
            ]
        }


def make_handler(api, max_body_bytes):
    """The `BaseHTTPRequestHandler` class serving `api` (bodies up to `max_body_bytes`)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status, body):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.server.closing:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method, body):
            if self.server.closing:
                self._reply(503, {"error": "The server is shutting down; retry elsewhere."})
                return
            with self.server.in_flight():
                self._reply(*api.handle(method, self.path, body))

        def do_GET(self):
            self._serve("GET", None)

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > max_body_bytes:
                self.close_connection = True
                self._reply(
                    413,
                    {"error": f"Request body must be 0..{max_body_bytes} bytes; "
                     f"Content-Length is {str(self.headers.get('Content-Length'))[:40]}."},
                )
                return
            body = self.rfile.read(length)
            if len(body) < length:  # the client went away mid-body
                self.close_connection = True
                return
            self._serve("POST", body)

        def log_message(self, fmt, *args):
            logger.debug("REST %s - %s", self.address_string(), fmt % args)

    return Handler


_TOO_MANY = json.dumps(
    {"error": "Too many open connections to the REST endpoint; retry later."}
).encode()


class RestServer(http.server.ThreadingHTTPServer):
    """A thread-per-connection HTTP server with a bound on connections and a socket timeout.

    Beyond `max_connections` open connections a new one is answered 429 at once and closed
    (without TLS; with TLS it is closed, since answering would need a handshake first); every
    connection times out after `timeout` seconds without progress, so a slow client cannot hold
    a thread forever. `begin_shutdown` stops accepting (the listening socket closes) and
    `wait_idle` waits for the requests in flight.

    Args:
        address: (host, port).
        handler: the request handler class (`make_handler`).
        max_connections: connections served at once.
        timeout: seconds of socket inactivity before a connection is dropped.
        ssl_context: optional `ssl.SSLContext` (server side) for HTTPS.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, max_connections=64, timeout=30.0, ssl_context=None):
        super().__init__(address, handler)
        self.max_connections = int(max_connections)
        self.connection_timeout = float(timeout)
        self.ssl_context = ssl_context
        self.closing = False
        self.num_refused = 0
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._active = 0
        self._idle = threading.Condition()

    def in_flight(self):
        server = self

        class _InFlight:
            def __enter__(self):
                with server._idle:
                    server._active += 1

            def __exit__(self, *exc):
                with server._idle:
                    server._active -= 1
                    server._idle.notify_all()

        return _InFlight()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.num_refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _refuse(self, request):
        try:
            if self.ssl_context is None:
                # Read what the client already sent, so that closing does not reset the
                # connection before it reads the answer.
                if select.select([request], [], [], 0.05)[0]:
                    request.recv(65536)
                request.sendall(
                    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(_TOO_MANY)).encode()
                    + b"\r\n\r\n" + _TOO_MANY
                )
                request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address):
        request.settimeout(self.connection_timeout)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as e:
                logger.debug("TLS handshake with %s failed: %s", client_address, e)
                return
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        # A client that disconnects or times out mid-request is routine, not a server error.
        logger.debug("REST connection from %s ended: %s", client_address, sys.exc_info()[1])

    def begin_shutdown(self):
        """Stop accepting connections; requests on open connections get 503."""
        self.closing = True
        self.shutdown()
        self.server_close()

    def wait_idle(self, timeout):
        """Wait up to `timeout` seconds for the requests in flight; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True
