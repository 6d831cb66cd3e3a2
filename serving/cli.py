"""The command line of `python -m serving.server`."""

import argparse
import inspect
import logging
import signal
import sys
import threading

import tensorflow as tf
from google.protobuf import text_format

logger = logging.getLogger("serving.server")


# The flags that set the `ModelServer` keyword of the same name, with their help. Their defaults
# (and types) are the constructor's, read from its signature: each default lives in one place.
SERVER_FLAGS = {
    "model_base_path": "directory of models: <model_base_path>/<name>/<version>/ (with "
    "--model_name: the directory of that one model's versions)",
    "model_name": "serve --model_base_path as this single model",
    "model_config_file": "TF Serving model config (text ModelServerConfig: names, base paths, "
    "version policies and labels); replaces --model_base_path",
    "port": "gRPC port",
    "rest_port": "REST port (TF Serving uses 8501); off by default",
    "host": "interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface, with "
    "TLS then)",
    "max_request_batch_size": "most rows in one request; more gets RESOURCE_EXHAUSTED "
    "(0 = unlimited)",
    "poll_seconds": "seconds between scans for new versions (0 = never)",
    "max_num_load_retries": "retries of a version that failed to load, as TF Serving",
    "load_retry_interval_seconds": "seconds before the first load retry, doubling at each "
    "next one",
    "unload_after_missed_polls": "polls that cannot list a base path before its versions "
    "unload",
    "max_workers": "threads that run unbatched requests",
    "max_queued_requests": "unbatched requests waiting for a thread; more get "
    "RESOURCE_EXHAUSTED",
    "max_concurrent_rpcs": "gRPC calls in progress; more get RESOURCE_EXHAUSTED",
    "max_concurrent_streams": "concurrent gRPC calls per client connection",
    "rest_max_connections": "open REST connections; more get 429",
    "rest_timeout_seconds": "REST connections idle this long are closed",
    "max_message_mb": "largest request (and request tensor) accepted, in MB",
    "tensor_content_outputs": "answer Predict outputs as raw tensor_content bytes instead of "
    "TF Serving's typed fields (float_val, int64_val, ...)",
    "reuse_port": "set SO_REUSEPORT so that several server processes can share --port and "
    "--rest_port (the kernel spreads connections over them)",
    "ssl_cert_file": "PEM certificate (chain): serve gRPC and REST over TLS",
    "ssl_key_file": "PEM private key of --ssl_cert_file",
    "ssl_client_ca_file": "PEM CA bundle: require client certificates signed by it",
    "ssl_config_file": "TF Serving SSL config (text SSLConfig with server_key, server_cert, "
    "custom_ca, client_verify)",
}
# TF Serving's names for the same flags, and types a None default cannot tell.
FLAG_ALIASES = {"rest_port": ("--rest_api_port",),
                "poll_seconds": ("--file_system_poll_wait_seconds",)}
FLAG_TYPES = {"rest_port": int, "max_message_mb": float}

# The flags of `BatchingOptions`' fields (defaults: its own). Any of them turns batching on.
BATCHING_FLAGS = {
    "max_batch_size": "rows per batch",
    "batch_timeout_ms": "wait for more requests at most this long",
    "num_batch_threads": "batches run in parallel per signature, each on its own thread; 0 runs "
    "batches on the event loop's thread, the least overhead for small, fast models",
    "max_enqueued_batches": "queued batches beyond which requests get UNAVAILABLE",
}

# TF Serving's thread-pool flags, each with the TensorFlow call it makes.
THREADING_FLAGS = {
    "tensorflow_intra_op_parallelism": (
        "threads per TensorFlow op", tf.config.threading.set_intra_op_parallelism_threads),
    "tensorflow_inter_op_parallelism": (
        "TensorFlow ops run in parallel", tf.config.threading.set_inter_op_parallelism_threads),
}


def _add_server_flags(add):
    from serving.server import ModelServer

    defaults = {name: p.default for name, p in inspect.signature(ModelServer).parameters.items()}
    for name, text in SERVER_FLAGS.items():
        default = defaults[name]
        names = (f"--{name}", *FLAG_ALIASES.get(name, ()))
        if default is False:
            add(*names, action="store_true", help=text)
            continue
        kind = FLAG_TYPES.get(name, str if default is None else type(default))
        add(*names, type=kind, default=default,
            help=text if default is None else f"{text} (default {default})")


def _add_batching_flags(add):
    from serving.batching import BatchingOptions

    add("--enable_batching", action="store_true",
        help="batch concurrent requests (implied by any batching option below)")
    defaults = BatchingOptions()
    for name, text in BATCHING_FLAGS.items():
        add(f"--{name}", type=type(getattr(defaults, name)), default=None,
            help=f"{text} (default {getattr(defaults, name)})")
    add("--allowed_batch_sizes", default=None,
        help="comma-separated batch sizes to pad batches to, the last = --max_batch_size")
    add("--batch_close_when_idle", action="store_true",
        help="run the open batch as soon as no batch is running instead of waiting "
        "--batch_timeout_ms (less latency at low load; needs --num_batch_threads >= 1)")
    add("--batching_parameters_file", help="TF Serving batching parameters file (text proto)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Serve keras-jem SavedModels over TF Serving's gRPC (and REST) API.",
    )
    add = parser.add_argument
    _add_server_flags(add)
    _add_batching_flags(add)
    add("--no_warmup", action="store_true",
        help="do not replay assets.extra/tf_serving_warmup_requests at load")
    add("--shutdown_grace_seconds", type=float, default=10.0,
        help="on SIGTERM, seconds in-flight requests get to finish (default %(default)s)")
    for name, (text, _) in THREADING_FLAGS.items():
        add(f"--{name}", type=int, default=0, help=f"{text} (0 = TensorFlow's default)")
    add("--log_level", default="INFO", help="logging level (default %(default)s)")
    return parser


def batching_options(args, parser):
    """The `BatchingOptions` the flags ask for, or None when batching is off.

    Flags win over `--batching_parameters_file`; `--batch_close_when_idle` alone (a policy, not
    a batching parameter) does not turn batching on.
    """
    from serving.batching import BatchingOptions

    values = {key: getattr(args, key) for key in BATCHING_FLAGS if getattr(args, key) is not None}
    if args.allowed_batch_sizes:
        try:
            values["allowed_batch_sizes"] = [int(v) for v in args.allowed_batch_sizes.split(",")]
        except ValueError:
            parser.error(f"--allowed_batch_sizes takes integers like 8,16,32; received "
                         f"{args.allowed_batch_sizes!r}")
    if not (args.enable_batching or args.batching_parameters_file or values):
        return None
    values["close_when_idle"] = args.batch_close_when_idle
    if args.batching_parameters_file:
        return BatchingOptions.from_file(args.batching_parameters_file, **values)
    return BatchingOptions(**values)


def main(argv=None):
    from serving.server import ModelServer

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.model_base_path and not args.model_config_file:
        parser.error("pass --model_base_path DIR or --model_config_file FILE")
    # Must happen before TensorFlow runs anything (i.e. before the models load).
    for name, (_, set_threads) in THREADING_FLAGS.items():
        if getattr(args, name):
            set_threads(getattr(args, name))
    try:
        batching = batching_options(args, parser)
        server = ModelServer(
            **{name: getattr(args, name) for name in SERVER_FLAGS},
            batching=batching,
            enable_model_warmup=not args.no_warmup,
        )
    except (ValueError, OSError, text_format.ParseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if batching:
        logger.info("Batching on: %s", batching)
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("Received %s; shutting down.", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    while not stop.wait(1.0):
        pass
    server.stop(grace=args.shutdown_grace_seconds)
    return 0
