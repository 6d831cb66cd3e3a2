"""An embedded TensorFlow-Serving-compatible model server: lifecycle and command line.

```
python -m serving.server --model_base_path models --port 8500 --rest_port 8501
python -m serving.server --model_base_path models --enable_batching --max_batch_size 32 \
    --batch_timeout_ms 2
python -m serving.server --model_config_file serving/configs/model_config.pbtxt
python -m serving.server --model_name jem --model_base_path models/jem   # TF Serving style
python -m serving.server --model_base_path models --host 0.0.0.0 \
    --ssl_cert_file server.crt --ssl_key_file server.key                # exposed, with TLS
```

Every subdirectory of `--model_base_path` is a model, served under its directory name; every
integer-named subdirectory of a model is a version (a SavedModel, as written by
`python -m trainers.export`). The newest version that loads is served (or the versions chosen by a
`model_version_policy` in `--model_config_file`, the same text-proto file the official
`tensorflow_model_server` takes). The directories are polled every `--poll_seconds`: a new version
is loaded and then replaces the old one without a restart; a version that fails to load is retried
with backoff (`--max_num_load_retries`), and again when its files change; a base path that cannot
be listed keeps the loaded versions served for `--unload_after_missed_polls` polls.

gRPC: `tensorflow.serving.PredictionService` (`Predict`, `Classify`, `GetModelMetadata`;
`Regress` and `MultiInference` answer UNIMPLEMENTED), `tensorflow.serving.ModelService`
(`GetModelStatus`) and `grpc.health.v1.Health` (per model name), with the official
`tensorflow-serving-api` messages, so clients written for TF Serving work unchanged. REST
(`--rest_port`): `GET /v1/models/<name>[/versions/<v>|/labels/<l>]` (status), `GET .../metadata`,
`POST ...:predict` and `POST ...:classify`, as in TF Serving.

Safe defaults: the server binds 127.0.0.1 (`--host 0.0.0.0` to expose it), every request tensor
is checked on its declaration before anything is allocated, concurrent RPCs, streams, queued
requests and REST connections are bounded (excess gets RESOURCE_EXHAUSTED / 429 at once), and
error messages name what was wrong with the request, never internal exception text.
docs/serving.md has the details and what differs from TF Serving.

The package, by responsibility: `tensors` (TensorProto <-> numpy with limits), `signatures`
(validation and execution), `batching`, `servable` (one loaded version), `model_manager`
(versions, polling, retries), `core` (request logic), `grpc_services` (+ health), `rest` (the
JSON API), `http_server` (bounded HTTP/HTTPS), `config` (TF Serving's text-proto files), `cli`
and this module (lifecycle).
"""

import concurrent.futures
import logging
import os
import ssl
import sys
import tempfile
import threading
import time

import grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.batching import Batcher  # noqa: F401 (public name of the old single module)
from serving.batching import BatchingOptions
from serving.batching import EventLoopThread
from serving.config import read_batching_parameters_file  # noqa: F401
from serving.config import read_model_config_file
from serving.config import read_ssl_config_file
from serving.core import ServingCore
from serving.errors import ServingError  # noqa: F401
from serving.grpc_services import ModelHealth
from serving.grpc_services import ModelServicer  # noqa: F401
from serving.grpc_services import PredictionServicer  # noqa: F401
from serving.grpc_services import add_services
from serving.http_server import RestServer
from serving.http_server import make_handler
from serving.model_manager import ModelManager
from serving.model_manager import ServableVersion  # noqa: F401
from serving.rest import RestApi
from serving.signatures import Signature  # noqa: F401
from serving.tensors import numpy_to_tensor_proto  # noqa: F401
from serving.tensors import tensor_proto_to_numpy  # noqa: F401

logger = logging.getLogger("serving.server")

_EventLoopThread = EventLoopThread  # the old private name, used by tests and tools


def _tls_material(ssl_config_file, ssl_cert_file, ssl_key_file, ssl_client_ca_file):
    """(key PEM, cert PEM, client CA PEM or None, require client auth) or None (no TLS)."""
    if ssl_config_file:
        config = read_ssl_config_file(ssl_config_file)
        ca = config["custom_ca"] or None
        return (config["server_key"].encode(), config["server_cert"].encode(),
                ca.encode() if ca else None, bool(config["client_verify"]))
    if not ssl_cert_file and not ssl_key_file:
        if ssl_client_ca_file:
            raise ValueError("--ssl_client_ca_file needs --ssl_cert_file and --ssl_key_file.")
        return None
    if not (ssl_cert_file and ssl_key_file):
        raise ValueError(
            "TLS needs both --ssl_cert_file and --ssl_key_file (PEM files); received only "
            f"{'--ssl_cert_file' if ssl_cert_file else '--ssl_key_file'}."
        )
    with open(ssl_key_file, "rb") as f:
        key = f.read()
    with open(ssl_cert_file, "rb") as f:
        cert = f.read()
    ca = None
    if ssl_client_ca_file:
        with open(ssl_client_ca_file, "rb") as f:
            ca = f.read()
    return key, cert, ca, ca is not None


def _ssl_context(key, cert, ca, require_client_auth):
    """A server-side `ssl.SSLContext` from PEM bytes (for the REST endpoint)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
        key_path, cert_path = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        for path, data in ((key_path, key), (cert_path, cert)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(cert_path, key_path)
    if ca:
        context.load_verify_locations(cadata=ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED if require_client_auth else ssl.CERT_OPTIONAL
    return context


class ModelServer:
    """The embedded model server: gRPC services, optional REST endpoint and a version poller.

    Args:
        model_base_path: directory whose subdirectories are models (or, with `model_name`, the
            directory of that single model's versions, as in TF Serving).
        model_name: serve `model_base_path` itself as one model of this name.
        model_config_file: a TF Serving model config file (overrides the two above).
        port: gRPC port (0 picks a free one; see `.port` after `start()`).
        rest_port: REST port, or None for no REST endpoint (0 picks a free one).
        host: interface to bind; "127.0.0.1" (loopback only) by default, "0.0.0.0" exposes
            the server on every interface.
        batching: batch concurrent requests per model version and signature: a
            `BatchingOptions`, a dict of its fields, or True for its defaults (None or False:
            no batching).
        max_request_batch_size: the most rows one request may hold (0 = unlimited).
        poll_seconds: seconds between scans for new versions (0 = load once, never poll).
        enable_model_warmup: replay each version's warmup requests before serving it.
        max_workers: threads that run unbatched requests (gRPC requests are received and
            answered by one asyncio event loop).
        max_message_mb: the largest gRPC message or REST body accepted; also the largest
            tensor a request may declare.
        tensor_content_outputs: answer Predict outputs as raw `tensor_content` bytes instead of
            TF Serving's typed fields (`float_val`, `int64_val`, ...).
        max_concurrent_rpcs: gRPC calls in progress at once; more get RESOURCE_EXHAUSTED.
        max_concurrent_streams: concurrent calls per client connection (HTTP/2 streams).
        max_queued_requests: unbatched requests waiting for a worker thread; more get
            RESOURCE_EXHAUSTED.
        rest_max_connections: open REST connections; more get 429.
        rest_timeout_seconds: a REST connection idle this long is closed.
        ssl_cert_file, ssl_key_file: PEM certificate chain and key: serve gRPC and REST over
            TLS.
        ssl_client_ca_file: PEM CA bundle: require client certificates signed by it.
        ssl_config_file: TF Serving's `--ssl_config_file` (text SSLConfig), instead of the
            three above.
        max_num_load_retries, load_retry_interval_seconds: retries of a version that failed to
            load, the first after this many seconds, doubling.
        unload_after_missed_polls: consecutive polls that cannot list a base path before its
            versions are unloaded.
        reuse_port: set SO_REUSEPORT on the gRPC and REST sockets, so that several server
            processes can listen on the same ports and the kernel spreads connections over them
            (one process per core without the GIL in common). Off by default: a port already
            in use is then an error, not a silent second server.

    Example:

    ```python
    with ModelServer("models", port=0) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        ...
    ```
    """

    def __init__(
        self,
        model_base_path=None,
        model_name=None,
        model_config_file=None,
        port=8500,
        rest_port=None,
        host="127.0.0.1",
        batching=None,
        max_request_batch_size=1024,
        poll_seconds=2.0,
        enable_model_warmup=True,
        max_workers=64,
        max_message_mb=64,
        tensor_content_outputs=False,
        max_concurrent_rpcs=512,
        max_concurrent_streams=100,
        max_queued_requests=256,
        rest_max_connections=64,
        rest_timeout_seconds=30.0,
        ssl_cert_file=None,
        ssl_key_file=None,
        ssl_client_ca_file=None,
        ssl_config_file=None,
        max_num_load_retries=5,
        load_retry_interval_seconds=2.0,
        unload_after_missed_polls=3,
        reuse_port=False,
    ):
        if model_config_file:
            configs, base = read_model_config_file(model_config_file), None
        elif model_base_path is None:
            raise ValueError("Pass model_base_path (a directory of models) or model_config_file.")
        elif model_name:
            configs = [
                model_server_config_pb2.ModelConfig(
                    name=model_name, base_path=os.path.abspath(model_base_path),
                    model_platform="tensorflow",
                )
            ]
            base = None
        else:
            configs, base = None, os.path.abspath(model_base_path)
            if not os.path.isdir(base):
                raise ValueError(
                    f"--model_base_path {model_base_path} is not a directory. Expected "
                    "<model_base_path>/<model name>/<integer version>/saved_model.pb, as written "
                    "by `python -m trainers.export --export_dir <model_base_path>/<model name>`."
                )
        for name, value, low in (("max_workers", max_workers, 1),
                                 ("max_concurrent_rpcs", max_concurrent_rpcs, 1),
                                 ("max_concurrent_streams", max_concurrent_streams, 1),
                                 ("max_queued_requests", max_queued_requests, 0),
                                 ("rest_max_connections", rest_max_connections, 1)):
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}; received {value}.")
        if batching is True:
            batching = BatchingOptions()
        elif isinstance(batching, dict):
            batching = BatchingOptions(**batching)
        elif batching not in (None, False) and not isinstance(batching, BatchingOptions):
            raise ValueError(
                "`batching` takes a BatchingOptions, a dict of its fields, True (its defaults) "
                f"or None (no batching). Received: {batching!r}"
            )
        batching = batching or None
        self.tls = _tls_material(ssl_config_file, ssl_cert_file, ssl_key_file,
                                 ssl_client_ca_file)
        self.max_message_bytes = int(max_message_mb * 1024 * 1024)
        self.manager = ModelManager(
            configs, base, batching, max_num_load_retries=max_num_load_retries,
            load_retry_interval=load_retry_interval_seconds,
            unload_after_missed_polls=unload_after_missed_polls,
        )
        self.core = ServingCore(
            self.manager, max_request_batch_size, max_tensor_bytes=self.max_message_bytes,
            tensor_content=tensor_content_outputs, max_queued_requests=int(max_queued_requests),
            num_workers=int(max_workers),
        )
        if enable_model_warmup:
            self.manager.warmup = self.core.warmup
        self.host, self.port, self.rest_port = host, port, rest_port
        self.poll_seconds = poll_seconds
        # What `start` hands to grpc.aio.server and to the REST server.
        self._grpc_settings = {
            "options": [
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_concurrent_streams", int(max_concurrent_streams)),
                ("grpc.so_reuseport", int(bool(reuse_port))),
            ],
            "maximum_concurrent_rpcs": int(max_concurrent_rpcs),
        }
        self._rest_settings = {
            "max_connections": int(rest_max_connections),
            "timeout": float(rest_timeout_seconds),
            "reuse_port": bool(reuse_port),
        }
        self.health = None
        self._loop = None
        self._grpc_server = None
        self._http_server = None
        self._threads = []
        self._stop = threading.Event()

    def start(self):
        """Load the models, then start serving; returns self."""
        self._loop = EventLoopThread()
        self.manager.loop = self._loop.loop
        self.health = ModelHealth(self._loop.loop)
        self.manager.on_change = self.health.set_model
        self.core.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.core.num_workers, thread_name_prefix="predict"
        )
        try:
            self.manager.poll()
            if not any(self.manager.served_summary().values()):
                logger.warning("No model version could be loaded yet; waiting for one to appear.")
            self.port = self._loop.call(self._start_grpc(), timeout=60)
        except BaseException:
            self._shutdown_runtime()
            raise
        scheme = "TLS" if self.tls else "plaintext"
        logger.info("gRPC server listening on %s:%d (%s)", self.host, self.port, scheme)
        if self.rest_port is not None:
            api = RestApi(self.core)
            self._http_server = RestServer(
                (self.host, self.rest_port), make_handler(api, self.max_message_bytes),
                ssl_context=_ssl_context(*self.tls) if self.tls else None, **self._rest_settings,
            )
            self.rest_port = self._http_server.server_address[1]
            thread = threading.Thread(
                target=self._http_server.serve_forever, name="rest", daemon=True
            )
            thread.start()
            self._threads.append(thread)
            logger.info("REST server listening on %s:%d (%s)", self.host, self.rest_port,
                        "HTTPS" if self.tls else "HTTP")
        if self.poll_seconds and self.poll_seconds > 0:
            thread = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    async def _start_grpc(self):
        server = grpc.aio.server(**self._grpc_settings)
        add_services(server, self.core)
        self.health.add_to_server(server)
        for name, versions in self.manager.served_summary().items():
            await self.health.servicer.set(
                name, self.health_status(bool(versions))
            )
        address = f"{self.host}:{self.port}"
        try:
            if self.tls:
                key, cert, ca, require = self.tls
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=ca, require_client_auth=require
                )
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"Could not bind the gRPC port {address}.")
        await server.start()
        self._grpc_server = server
        return bound

    @staticmethod
    def health_status(serving):
        from serving.grpc_services import NOT_SERVING
        from serving.grpc_services import SERVING

        return SERVING if serving else NOT_SERVING

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            self.manager.poll()

    def stop(self, grace=5.0):
        """Shut down in order: health NOT_SERVING, REST stops accepting, then in-flight REST
        and gRPC requests get up to `grace` seconds to finish, then the models unload."""
        deadline = time.monotonic() + grace
        self._stop.set()
        if self.health is not None and self._loop is not None:
            try:
                self.health.shutdown()
            except Exception as e:  # noqa: BLE001
                logger.warning("Health service did not switch to NOT_SERVING: %r", e)
        if self._http_server is not None:
            self._http_server.begin_shutdown()
        if self._grpc_server is not None:
            try:  # refuses new calls at once, waits for the ones in flight
                self._loop.call(self._grpc_server.stop(grace), timeout=grace + 5)
            except Exception as e:  # noqa: BLE001
                logger.warning("The gRPC server did not stop cleanly: %r", e)
            self._grpc_server = None
        if self._http_server is not None:
            if not self._http_server.wait_idle(max(0.0, deadline - time.monotonic())):
                logger.warning("REST requests still running after the %.1f s grace period.",
                               grace)
            self._http_server = None
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()) + 5)
        self._threads = []
        self.manager.drain_seconds = max(0.5, deadline - time.monotonic())
        self._shutdown_runtime()
        logger.info("Server stopped.")

    def _shutdown_runtime(self):
        self.manager.stop()  # drains the batchers, on the still-running loop
        if self.core.executor is not None:
            self.core.executor.shutdown(wait=False)
            self.core.executor = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def stats(self):
        """Counters: requests answered, and per batcher the batches and rows it ran."""
        return {
            "requests": self.core.num_requests,
            "batchers": {
                key: {"batches": batcher.num_batches, "rows": batcher.num_rows}
                for key, batcher in self.manager.batchers().items()
            },
        }

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    """`python -m serving.server`: the command line lives in `serving.cli` (imported here, not at
    the top, so that the CLI module may import this one)."""
    from serving import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
