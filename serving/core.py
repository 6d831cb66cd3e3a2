"""The request logic shared by the gRPC services and the REST endpoint."""

import logging
import os

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from serving.errors import ServingError
from serving.errors import exhausted
from serving.errors import invalid
from serving.signatures import check_rows
from serving.tensors import DEFAULT_MAX_TENSOR_BYTES
from serving.tensors import numpy_to_tensor_proto

logger = logging.getLogger("serving.core")

WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
DEFAULT_TIMEOUT = 300.0  # seconds; a request without a client deadline never waits longer


class ServingCore:
    """The request handling shared by the gRPC services and the REST endpoint.

    The gRPC handlers run on the server's asyncio loop and use the `*_async` methods; the REST
    handlers and warmup run on their own threads and use the plain ones.

    Args:
        manager: the `ModelManager`.
        max_request_batch_size: the most rows accepted in one request (0 = unlimited).
        executor: the thread pool that runs unbatched requests for the gRPC handlers (None:
            the loop's default executor).
        max_tensor_bytes: the largest tensor a request may declare (`num_elements * itemsize`).
        tensor_content: answer Predict outputs as raw `tensor_content` bytes instead of typed
            fields (`float_val`, ...).
        max_queued_requests: unbatched gRPC requests waiting for a worker thread beyond which
            requests get RESOURCE_EXHAUSTED at once (None: no limit).
        num_workers: the executor's threads (unbatched requests run at once).

    Example:

    ```python
    core = ServingCore(manager, max_request_batch_size=1024)
    response = core.predict(request)
    ```
    """

    def __init__(self, manager, max_request_batch_size=1024, executor=None,
                 max_tensor_bytes=DEFAULT_MAX_TENSOR_BYTES, tensor_content=False,
                 max_queued_requests=None, num_workers=1):
        self.manager = manager
        self.max_request_batch_size = max_request_batch_size
        self.executor = executor
        self.max_tensor_bytes = int(max_tensor_bytes)
        self.tensor_content = bool(tensor_content)
        self.max_queued_requests = max_queued_requests
        self.num_workers = int(num_workers)
        self.num_requests = 0
        self._unbatched = 0  # in flight on the executor (counted on the event loop)

    # --- Predict ---

    def predict(self, request, timeout=DEFAULT_TIMEOUT):
        servable = self.manager.resolve(request.model_spec)
        return self.predict_on(servable, request, timeout)

    def predict_on(self, servable, request, timeout=DEFAULT_TIMEOUT):
        return self._predict_response(*self._predict_outputs(servable, request, timeout))

    def predict_outputs(self, request, timeout=DEFAULT_TIMEOUT):
        """(servable, signature, {output key: numpy}) of a PredictRequest (the REST path)."""
        servable = self.manager.resolve(request.model_spec)
        servable, signature, keys, outputs = self._predict_outputs(servable, request, timeout)
        return servable, signature, {key: outputs[key] for key in keys}

    def _predict_outputs(self, servable, request, timeout):
        signature, output_keys, arrays, rows = self._predict_inputs(servable, request)
        outputs = servable.run(signature, arrays, rows, timeout)
        return servable, signature, output_keys, outputs

    async def predict_async(self, request, timeout=DEFAULT_TIMEOUT):
        servable = self.manager.resolve(request.model_spec)
        signature, output_keys, arrays, rows = self._predict_inputs(servable, request)
        outputs = await self._run_async(servable, signature, arrays, rows, timeout)
        return self._predict_response(servable, signature, output_keys, outputs)

    async def _run_async(self, servable, signature, arrays, rows, timeout):
        if servable.batched(signature, rows):
            return await servable.run_async(signature, arrays, rows, timeout, self.executor)
        if (
            self.max_queued_requests is not None
            and self._unbatched >= self.num_workers + self.max_queued_requests
        ):
            raise exhausted(
                f"The server is running {self.num_workers} requests and has "
                f"{self.max_queued_requests} waiting (--max_workers, --max_queued_requests); "
                "retry later or with fewer concurrent requests."
            )
        self._unbatched += 1
        try:
            return await servable.run_async(signature, arrays, rows, timeout, self.executor)
        finally:
            self._unbatched -= 1

    def _predict_inputs(self, servable, request):
        signature = servable.signature(request.model_spec.signature_name)
        output_keys = list(request.output_filter) or sorted(signature.outputs)
        for key in output_keys:
            if key not in signature.outputs:
                raise invalid(
                    f"output tensor alias not found in signature: {key[:100]}. Outputs expected "
                    f"to be in the set {sorted(signature.outputs)}."
                )
        if len(set(output_keys)) != len(output_keys):
            raise invalid(f"duplicate output tensor alias in output_filter: {output_keys[:16]}")
        arrays, rows = signature.decode_inputs(
            request.inputs, self.max_request_batch_size, self.max_tensor_bytes
        )
        return signature, output_keys, arrays, rows

    def _predict_response(self, servable, signature, output_keys, outputs):
        self.num_requests += 1
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature.key
        for key in output_keys:
            numpy_to_tensor_proto(outputs[key], response.outputs[key], self.tensor_content)
        return response

    # --- Classify ---

    def classify(self, request, timeout=DEFAULT_TIMEOUT):
        servable = self.manager.resolve(request.model_spec)
        return self.classify_on(servable, request, timeout)

    def classify_on(self, servable, request, timeout=DEFAULT_TIMEOUT):
        signature, arrays, rows = self._classify_inputs(servable, request)
        outputs = servable.run(signature, arrays, rows, timeout)
        return self._classify_response(servable, signature, rows, outputs)

    async def classify_async(self, request, timeout=DEFAULT_TIMEOUT):
        servable = self.manager.resolve(request.model_spec)
        signature, arrays, rows = self._classify_inputs(servable, request)
        outputs = await self._run_async(servable, signature, arrays, rows, timeout)
        return self._classify_response(servable, signature, rows, outputs)

    def _classify_inputs(self, servable, request):
        signature = servable.signature(request.model_spec.signature_name)
        inputs = signature.inputs
        if len(inputs) != 1 or next(iter(inputs.values()))[0] != types_pb2.DT_STRING:
            raise invalid(
                f"Signature '{signature.key}' does not follow the Classify contract (exactly one "
                f"DT_STRING input of serialized tf.Example, outputs 'classes' and/or 'scores'); "
                f"it takes {signature.describe_inputs()}. Set model_spec.signature_name to a "
                "classification signature (keras-jem exports name it 'classify'), or use Predict."
            )
        if "classes" not in signature.outputs and "scores" not in signature.outputs:
            raise invalid(
                f"Signature '{signature.key}' has neither a 'classes' nor a 'scores' output; "
                "expected a classification signature (keras-jem exports name it 'classify')."
            )
        serialized = self._serialize_examples(request.input)
        check_rows(len(serialized), self.max_request_batch_size)
        input_key = next(iter(inputs))
        array = np.empty(len(serialized), dtype=object)
        array[:] = serialized
        return signature, {input_key: array}, len(serialized)

    def _classify_response(self, servable, signature, num, outputs):
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for key, value in (("classes", classes), ("scores", scores)):
            if value is not None and (value.ndim != 2 or value.shape[0] != num):
                logger.error("Classification output '%s' of %s has shape %s for %d examples.",
                             key, signature.key, list(value.shape), num)
                raise ServingError(
                    grpc.StatusCode.INTERNAL,
                    f"The model's classification output '{key}' does not have one row per "
                    "example; the server log has the details.",
                )
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                f"The model's 'classes' {list(classes.shape)} and 'scores' "
                f"{list(scores.shape)} differ in shape.",
            )
        self.num_requests += 1
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature.key
        num_classes = (classes if classes is not None else scores).shape[1]
        for i in range(num):
            result = response.result.classifications.add()
            for j in range(num_classes):
                entry = result.classes.add()
                if classes is not None:
                    label = classes[i, j]
                    entry.label = label.decode("utf-8", "replace") if isinstance(
                        label, bytes
                    ) else str(label)
                if scores is not None:
                    entry.score = float(scores[i, j])
        return response

    @staticmethod
    def _serialize_examples(request_input):
        kind = request_input.WhichOneof("kind")
        if kind == "example_list":
            examples = list(request_input.example_list.examples)
            context = None
        elif kind == "example_list_with_context":
            examples = list(request_input.example_list_with_context.examples)
            context = request_input.example_list_with_context.context
        else:
            raise invalid(
                "ClassificationRequest.input is empty: set input.example_list.examples to one "
                "tf.Example per image."
            )
        if not examples:
            raise invalid("The request holds an empty batch (0 examples); send at least one.")
        serialized = []
        for example in examples:
            if context is not None:
                merged = tf.train.Example()
                merged.CopyFrom(context)
                for key, feature in example.features.feature.items():
                    merged.features.feature[key].CopyFrom(feature)
                example = merged
            serialized.append(example.SerializeToString())
        return serialized

    # --- metadata and status ---

    def get_model_metadata(self, request):
        servable = self.manager.resolve(request.model_spec)
        if not request.metadata_field:
            raise invalid(
                "GetModelMetadataRequest must specify at least one metadata_field; the "
                "supported one is 'signature_def'."
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid(
                    f"Metadata field {field[:100]} is not supported; the supported one is "
                    "'signature_def'."
                )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(self, request):
        spec = request.model_spec
        if not spec.name:
            raise invalid("model_spec.name is empty; set it to the name of a served model.")
        choice = spec.WhichOneof("version_choice")
        version = None
        if choice == "version":
            version = spec.version.value
        elif choice == "version_label":
            labels = self.manager.labels(spec.name)
            if spec.version_label not in labels:
                raise invalid(
                    f"Unrecognized servable version label: {spec.version_label[:100]}"
                )
            version = labels[spec.version_label]
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, state, code, message in self.manager.version_states(spec.name, version):
            status = response.model_version_status.add()
            status.version = v
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            status.status.error_code = code
            status.status.error_message = message
        return response

    def warmup(self, servable):
        """Replay `assets.extra/tf_serving_warmup_requests` of a freshly loaded version."""
        path = os.path.join(servable.path, WARMUP_PATH)
        if not os.path.isfile(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = log.WhichOneof("log_type")
            if kind == "predict_log":
                self.predict_on(servable, log.predict_log.request)
            elif kind == "classify_log":
                self.classify_on(servable, log.classify_log.request)
            else:
                logger.warning("Ignoring a %s warmup record (not supported).", kind)
                continue
            count += 1
        logger.info("Model %s version %d: replayed %d warmup requests.", servable.name,
                    servable.version, count)
        return count
