"""A lean gRPC load generator and a do-nothing gRPC server, for `tools/bench_serving.py`.

Both work on raw bytes and import neither TensorFlow nor the TF Serving protos, so they start in
a fraction of a second and spend as little CPU per request as Python gRPC allows. On a machine
where the load generator shares the cores with the server (loopback), every CPU-second the
clients spend is taken from the server, so the clients must be as cheap as they can be.

- `load`: `--clients` concurrent clients (coroutines on one asyncio loop, each with its own
  channel, i.e. its own HTTP/2 connection) send one pre-serialized request back to back. After
  `--warmup` seconds the window of `--seconds` opens; calls started in it are counted (at most
  `--max_requests`). It prints `WINDOW_START` and `WINDOW_END` lines as the window opens and
  closes (so that a caller can read the server's CPU time at those moments), then one JSON line:
  requests, seconds, latencies (ms, sorted), errors, and the load generator's own CPU seconds in
  the window.
- `floor`: a server that answers every call of `--method` with the bytes of `--response`,
  without reading the request. What it sustains is what Python gRPC alone costs on this
  machine: the ceiling of any Python server that does work per request.

```
python tools/grpc_load.py load --target 127.0.0.1:8500 --request predict.bin --clients 32
python tools/grpc_load.py floor --port 8600 --response response.bin
```
"""

import argparse
import asyncio
import json
import sys
import time

import grpc

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
# Channel and server options: room for large image batches in either direction.
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
]


async def _load(args, request):
    # One connection per client, as separate client processes would have.
    options = [*MESSAGE_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(args.target, options=options)
                for _ in range(args.clients)]
    calls = [channel.unary_unary(args.method) for channel in channels]
    latencies, errors = [], []
    clock = time.perf_counter
    state = {"start": None, "stop": None, "cpu": None}

    async def client(call):
        while True:
            began = clock()
            if state["stop"] is not None and began >= state["stop"]:
                return
            try:
                await call(request, timeout=args.timeout)
            except grpc.aio.AioRpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                continue
            if state["start"] is not None and began >= state["start"]:
                if len(latencies) >= args.max_requests:
                    return
                latencies.append(clock() - began)

    async def window():
        await asyncio.sleep(args.warmup)
        state["start"] = clock()
        state["stop"] = state["start"] + args.seconds
        state["cpu"] = time.process_time()
        print("WINDOW_START", flush=True)

    try:
        # Connect every channel before the clock starts.
        try:
            await asyncio.wait_for(
                asyncio.gather(*(channel.channel_ready() for channel in channels)),
                args.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise SystemExit(
                f"grpc_load: could not connect to {args.target} within "
                f"{args.connect_timeout} s; is the server running?"
            ) from None
        opener = asyncio.ensure_future(window())
        clients = [asyncio.ensure_future(client(call)) for call in calls]
        await opener
        await asyncio.wait(clients, timeout=args.seconds + args.timeout + 5)
        for task in clients:
            task.cancel()
        end = min(clock(), state["stop"])
        cpu = time.process_time() - state["cpu"]
        print("WINDOW_END", flush=True)
    finally:
        for channel in channels:
            await channel.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": end - state["start"],
        "latencies_ms": [1000.0 * value for value in latencies],
        "errors": sorted(set(errors))[:10],
        "num_errors": len(errors),
        "client_cpu_s": cpu,
    }


async def _floor(args, response):
    async def answer(request, context):
        return response

    handler = grpc.unary_unary_rpc_method_handler(answer)
    service, method = args.method.strip("/").split("/")
    server = grpc.aio.server(options=[*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: handler})]
    )
    if not server.add_insecure_port(f"{args.host}:{args.port}"):
        raise SystemExit(f"grpc_load floor: cannot bind {args.host}:{args.port}")
    await server.start()
    print(f"FLOOR_READY {args.host}:{args.port}", flush=True)
    await server.wait_for_termination()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="send a request back to back from N clients")
    load.add_argument("--target", required=True, help="host:port of the server")
    load.add_argument("--request", required=True, help="file with the serialized request")
    load.add_argument("--method", default=PREDICT_METHOD)
    load.add_argument("--clients", type=int, default=1)
    load.add_argument("--seconds", type=float, default=5.0, help="length of the window")
    load.add_argument("--warmup", type=float, default=0.5, help="seconds before the window")
    load.add_argument("--max_requests", type=int, default=100000)
    load.add_argument("--timeout", type=float, default=60.0, help="deadline of each call")
    load.add_argument("--connect_timeout", type=float, default=30.0,
                      help="seconds to wait for the connections")
    floor = commands.add_parser("floor", help="answer every call with fixed bytes")
    floor.add_argument("--port", type=int, required=True)
    floor.add_argument("--host", default="127.0.0.1")
    floor.add_argument("--response", required=True, help="file with the serialized response")
    floor.add_argument("--method", default=PREDICT_METHOD)
    args = parser.parse_args(argv)
    if args.command == "load":
        if args.clients < 1 or args.seconds <= 0 or args.warmup < 0:
            parser.error("--clients must be >= 1, --seconds > 0 and --warmup >= 0")
        with open(args.request, "rb") as f:
            request = f.read()
        result = asyncio.run(_load(args, request))
        print(json.dumps(result), flush=True)
    else:
        with open(args.response, "rb") as f:
            response = f.read()
        try:
            asyncio.run(_floor(args, response))
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
