"""Serving keras-jem models over the TensorFlow Serving gRPC/REST APIs.

- `serving.server`: an embedded model server (`python -m serving.server --model_base_path models`)
  implementing `tensorflow.serving.PredictionService` (Predict, Classify, GetModelMetadata),
  `ModelService` (GetModelStatus) and `grpc.health.v1`, with version polling, server-side
  batching, TLS and a REST endpoint compatible with TF Serving's. Use it where the official
  `tensorflow_model_server` binary is not available; both speak the same API. Its parts:
  `tensors`, `signatures`, `batching`, `servable`, `model_manager`, `core`, `grpc_services`,
  `rest`, `http_server`, `config`, `cli` (docs/serving.md: limits, security, health, TLS).
- `serving.client`: `ServingClient` and the `python -m serving.client` command line.
- `serving/configs/`: configuration files for the official TF Serving Docker image.

Exports are written by `keras_jem.export.export_serving_model` / `python -m trainers.export`.
The modules are not imported here so that importing `serving` stays cheap.
"""
