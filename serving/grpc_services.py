"""The gRPC services: TF Serving's PredictionService and ModelService, and grpc.health.v1."""

import asyncio
import logging

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.errors import ServingError
from serving.errors import internal

logger = logging.getLogger("serving.grpc")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _timeout(context, cap=3600.0):
    """Seconds left before the client's deadline (gRPC reports a huge number when none)."""
    remaining = context.time_remaining()
    return cap if remaining is None else max(0.0, min(remaining, cap))


def _grpc_call(method):
    """Wraps an async servicer method: a ServingError becomes the call's gRPC status; any
    other exception is logged and answered INTERNAL without its text."""

    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # noqa: BLE001 (a cancelled call is not one)
            error = internal(e, method.__name__)
            await context.abort(error.code, error.message)

    handler.__name__ = method.__name__
    return handler


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

    @_grpc_call
    async def Regress(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            "Regress is not implemented: keras-jem models are classifiers. Use Classify or "
            "Predict.",
        )

    @_grpc_call
    async def MultiInference(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            "MultiInference is not implemented by this server; send Classify or Predict "
            "requests.",
        )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService` (GetModelStatus) over a `ServingCore`."""

    def __init__(self, core):
        self.core = core

    @_grpc_call
    async def GetModelStatus(self, request, context):
        return self.core.get_model_status(request)

    @_grpc_call
    async def HandleReloadConfigRequest(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
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
