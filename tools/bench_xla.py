"""Does XLA (`jit_compile=True`) make a model's serving forward pass faster on this CPU?

```
python tools/bench_xla.py                 # WRN-16-2 JEM on 32x32x3, random weights
python tools/bench_xla.py --model digits  # SmallCNN JEM on 8x8x1
```

Times the softmax of the model's logits (what `serving_default` computes) as a plain
`tf.function` and as one compiled with XLA, at each batch size, in `--rounds` windows that
alternate between the two so that load from other processes hits both alike. Prints the median
latency and images/s of each, and their largest output difference. Issue 15 asked whether
`jit_compile` endpoints would speed serving up; this measures the model's part of it.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from tools.bench_serving import build_model


def time_calls(function, images, seconds):
    """Latencies (s) of back-to-back calls for `seconds`."""
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        function(images).numpy()
        latencies.append(time.perf_counter() - began)
    return latencies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["wrn", "digits"], default="wrn")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch_sizes takes comma-separated integers; received {args.batch_sizes!r}")
    if min(batch_sizes) < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("batch sizes and --rounds must be >= 1 and --seconds > 0")

    model, shape = build_model(args.model)

    def forward(images):
        return tf.nn.softmax(model(images, training=False), axis=-1)

    functions = {"plain": tf.function(forward), "xla": tf.function(forward, jit_compile=True)}
    print("| batch | function | p50 ms | img/s | max abs diff vs plain |")
    print("|---|---|---|---|---|")
    for batch in batch_sizes:
        images = tf.constant(
            np.random.default_rng(0).uniform(-1, 1, (batch,) + shape).astype("float32"))
        outputs = {name: f(images).numpy() for name, f in functions.items()}
        latencies = {name: [] for name in functions}
        for _ in range(args.rounds):
            for name, function in functions.items():
                latencies[name] += time_calls(function, images, args.seconds)
        for name in functions:
            p50 = float(np.median(latencies[name]))
            diff = float(np.max(np.abs(outputs[name] - outputs["plain"])))
            print(f"| {batch} | {name} | {1000 * p50:.1f} | {batch / p50:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
