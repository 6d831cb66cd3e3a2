"""TF Serving's REST API (`/v1/models/...`) over a `ServingCore`; the HTTP server is in `http_server`."""

import base64
import json
import logging
import re
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
