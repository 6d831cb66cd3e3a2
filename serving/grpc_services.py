"""The gRPC services: TF Serving's PredictionService and ModelService, and grpc.health.v1."""

import asyncio
import logging

import grpc
from google.protobuf import message
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

from serving.errors import ServingError
from serving.errors import internal
from serving.errors import invalid

logger = logging.getLogger("serving.grpc")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _timeout(context, cap=3600.0):
    """Seconds left before the client's deadline (gRPC reports a huge number when none)."""
    remaining = context.time_remaining()
    return cap if remaining is None else max(0.0, min(remaining, cap))


class _Malformed:
    """What the request deserializer returns for bytes that are not the expected message."""

    def __init__(self, message_type, error):
        self.message_type, self.error = message_type, error


def _deserializer(message_type):
    # grpc.aio answers a deserializer exception with UNKNOWN and the exception's text; a
    # malformed message is the client's error: INVALID_ARGUMENT, with no internal text.
    def deserialize(data):
        try:
            return message_type.FromString(data)
        except message.DecodeError as e:
            return _Malformed(message_type, e)

    return deserialize


def _grpc_call(method):
    """Wraps an async servicer method: a ServingError becomes the call's gRPC status; any
    other exception is logged and answered INTERNAL without its text."""

    async def handler(self, request, context):
        try:
            if isinstance(request, _Malformed):
                raise invalid(
                    f"The request is not a valid {request.message_type.DESCRIPTOR.full_name} "
                    "message (protobuf decoding failed)."
                )
            return await method(self, request, context)
        except ServingError as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 (a cancelled call is not one)
            error = internal(e, method.__name__)
            await context.abort(error.code, error.message)

    handler.__name__ = method.__name__
    return handler


def _unimplemented(name, message):
    """A servicer method that answers every call UNIMPLEMENTED with `message`."""

    async def method(self, request, context):
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, message)

    method.__name__ = name
    return _grpc_call(method)


_METHODS = {
    "tensorflow.serving.PredictionService": {
        "Predict": (predict_pb2.PredictRequest, "prediction"),
        "Classify": (classification_pb2.ClassificationRequest, "prediction"),
        "GetModelMetadata": (get_model_metadata_pb2.GetModelMetadataRequest, "prediction"),
        "Regress": (regression_pb2.RegressionRequest, "prediction"),
        "MultiInference": (inference_pb2.MultiInferenceRequest, "prediction"),
    },
    "tensorflow.serving.ModelService": {
        "GetModelStatus": (get_model_status_pb2.GetModelStatusRequest, "model"),
        "HandleReloadConfigRequest": (model_management_pb2.ReloadConfigRequest, "model"),
    },
}


def add_services(server, core):
    """Register PredictionService and ModelService on a `grpc.aio` server, with request
    deserializers that turn undecodable bytes into INVALID_ARGUMENT."""
    servicers = {"prediction": PredictionServicer(core), "model": ModelServicer(core)}
    for service, methods in _METHODS.items():
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicers[owner], name),
                request_deserializer=_deserializer(request_type),
                response_serializer=lambda response: response.SerializeToString(),
            )
            for name, (request_type, owner) in methods.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` over a `ServingCore` (asyncio handlers)."""

    def __init__(self, core):
        self.core = core

    @_grpc_call
    async def Predict(self, request, context):
        return await self.core.predict_async(request, _timeout(context))

    @_grpc_call
    async def Classify(self, request, context):
        return await self.core.classify_async(request, _timeout(context))

    @_grpc_call
    async def GetModelMetadata(self, request, context):
        return self.core.get_model_metadata(request)

    Regress = _unimplemented(
        "Regress",
        "Regress is not implemented: keras-jem models are classifiers. Use Classify or Predict.",
    )
    MultiInference = _unimplemented(
        "MultiInference",
        "MultiInference is not implemented by this server; send Classify or Predict requests.",
    )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService` (GetModelStatus) over a `ServingCore`."""

    def __init__(self, core):
        self.core = core

    @_grpc_call
    async def GetModelStatus(self, request, context):
        return self.core.get_model_status(request)

    HandleReloadConfigRequest = _unimplemented(
        "HandleReloadConfigRequest",
        "HandleReloadConfigRequest is not implemented; the server polls the model "
        "directories instead (--poll_seconds).",
    )


class ModelHealth:
    """The standard `grpc.health.v1.Health` service, one entry per model.

    The service name "" is the whole server (SERVING until shutdown starts); each model name
    is SERVING while at least one of its versions is loaded, NOT_SERVING otherwise, so that a
    load balancer or a Kubernetes gRPC probe (`service: jem`) sees when a model can answer.

    Args:
        loop: the server's asyncio event loop (the health servicer lives on it).
    """

    def __init__(self, loop):
        self.loop = loop
        self.servicer = health.aio.HealthServicer()

    def add_to_server(self, server):
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def set_model(self, name, serving):
        """Set a model's status; callable from any thread."""
        status = SERVING if serving else NOT_SERVING
        future = asyncio.run_coroutine_threadsafe(self.servicer.set(name, status), self.loop)
        future.result(10)

    def shutdown(self):
        """Every service NOT_SERVING from now on (callable from any thread)."""
        asyncio.run_coroutine_threadsafe(
            self.servicer.enter_graceful_shutdown(), self.loop
        ).result(10)
