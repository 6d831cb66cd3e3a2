"""Training-speed and memory benchmark of the keras-jem models on synthetic data.

```
python -m tools.bench --model jem --backbone wrn-16-2 --jit_compile both
python -m tools.bench --model jem,softmax --backbone wrn-28-10 --iterations 3 --warmup 1
python -m tools.bench --model all --backbone wrn-16-2 --json bench.jsonl
python -m tools.bench --model jem,torch_jem --backbone wrn-16-2 --streams two \
    --torch_python /path/to/venv/bin/python
```

Every configuration (model x backbone x `--jit_compile` setting) runs in its own subprocess, so
peak RSS values are separate, and prints one JSON line (also appended to `--json`). A table
follows at the end. Per configuration:

- `iteration_s`: median seconds of one training iteration (`model.train_function`, the function
  `fit` runs, on a fixed synthetic batch) over `--iterations` after `--warmup` iterations;
  `images_per_s` = batch / iteration_s; `iteration_cpu_s`: median process CPU seconds (a
  cross-check on a machine shared with other jobs).
- Then, interleaved round-robin `--ref_iterations` times so that their ratios are taken under
  the same load: the training iteration again (`ref_iteration_s`), the sampler alone
  (`sampler_s`: K steps from the batch, without the replay buffer; `sampler_step_s` =
  sampler_s / K; `sampling_share` = sampler_s / ref_iteration_s), K standalone passes
  (`standalone_s`: forward + gradient with respect to the input, no tape over the weights, same
  model and batch), one plain softmax-classifier training step (`classifier_step_s`: same
  backbone and optimizer, batch `--batch_size`) and the same step on as many images as the
  model's loss sees (`classifier_step_loss_batch_s`; data + samples: 2x batch, 3x with
  `--streams two`).
- Ratios against the issue-7 targets: `sampler_ratio` = sampler_s / standalone_s (<= 1.1),
  `iteration_ratio` = ref_iteration_s / (sampler_s + classifier_step_s) (<= 1.05), and
  `iteration_overhead_ratio` = ref_iteration_s / (sampler_s + classifier_step_loss_batch_s):
  the cost of buffer, losses and bookkeeping beyond the passes the loss needs anyway.
- `peak_rss_mb`: peak resident memory of the process after the timed training iterations (read
  before the reference measurements, which could only raise it); `device_peak_mb` on a GPU.
  With a `softmax` row of the same backbone in the same run, the table adds the memory ratio
  peak RSS / (softmax peak RSS + buffer) (target <= 1.5 for WRN-28-10 at batch 64).
- `train_step_traces` / `retraces_after_warmup`: Python executions of `train_step` (tracing);
  `backbone_traces_per_step`: backbone graphs built per trace (1 for the in-graph sampler loop
  + the loss's forward passes; K more would mean a Python-unrolled sampler).

`--model torch_jem` runs a minimal PyTorch JEM iteration (`tools/torch_jem.py`, WRN backbones,
SGLD, replay buffer, Adam; written for this benchmark) as a same-machine baseline, in the Python
given by `--torch_python` (or `$KERAS_JEM_TORCH_PYTHON`; default: this Python if it imports torch).
`gmmc`/`igebm` rows need `keras_jem.GMMC`/`keras_jem.IGEBM`; otherwise the row says
"not available".
"""

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "
MODELS = ("jem", "jempp", "sadajem", "gmmc", "igebm", "softmax", "torch_jem")
DEFAULT_MODELS = ("jem", "jempp", "sadajem", "gmmc", "igebm", "softmax")
BACKBONES = ("wrn-16-2", "wrn-28-10", "wrn-16-8", "small_cnn", "sn_resnet")
# Models are built by the trainers' factory from their CIFAR-10 presets (`trainers/presets.py`:
# sampler, buffer, SAM, norm), with these bench choices on top so that timings stay comparable
# run to run: no weight decay, GMMC with its generative loss from the first step, PyTorch's JEM
# and the softmax reference on JEM's settings.
PRESET_DATASET = "cifar10"
PRESET_OF = {"torch_jem": "jem", "softmax": "jem"}


def trainer_config(model, num_steps=None, buffer_size=None, norm="auto"):
    """The trainers' resolved config of `model` with the bench's overrides."""
    from trainers import presets

    name = PRESET_OF.get(model, model)
    overrides = {"weight_decay": 0.0, "seed": 0, "num_steps": num_steps,
                 "buffer_size": buffer_size, "norm": None if norm == "auto" else norm}
    if name == "gmmc":
        overrides["mode"] = "generative"
    return presets.resolve(name, PRESET_DATASET, overrides)


# === Configurations ===


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="jem",
                        help=f"comma-separated list of {', '.join(MODELS)}, or 'all' "
                             f"({', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--backbone", default="wrn-16-2",
                        help=f"comma-separated list of {', '.join(BACKBONES)}")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--num_steps", type=int, default=None,
                        help="sampler steps K (JEM++: outer steps M); default: the model's "
                             "CIFAR-10 preset (trainers/presets.py)")
    parser.add_argument("--jit_compile", default="both", choices=("on", "off", "both"))
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--ref_iterations", type=int, default=None,
                        help="repetitions of the reference measurements (default: "
                             "min(iterations, 3))")
    parser.add_argument("--strategy", default="default",
                        choices=("default", "one_device", "mirrored"),
                        help="tf.distribute strategy (mirrored: all local devices)")
    parser.add_argument("--mixed_precision", default=None,
                        choices=("mixed_float16", "mixed_bfloat16"))
    parser.add_argument("--norm", default="auto",
                        help="backbone normalisation: auto (the model's CIFAR-10 preset: "
                             "JEM++/SADA-JEM batch, others none), none, batch, group, instance, "
                             "layer")
    parser.add_argument("--streams", default="one", choices=("one", "two"),
                        help="one: (x, y) batches (the likelihood term reuses x); two: "
                             "{'images', 'px_images'} batches (separate likelihood batch, as "
                             "the PyTorch references)")
    parser.add_argument("--buffer_size", type=int, default=10000)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--threads", default=None,
                        help="INTER,INTRA op threads (tf.config.threading / torch)")
    parser.add_argument("--onednn", default="default", choices=("default", "on", "off"),
                        help="TF_ENABLE_ONEDNN_OPTS for the TensorFlow workers")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment variable of the workers (repeatable), e.g. "
                             "XLA_FLAGS=...")
    parser.add_argument("--no_references", action="store_true",
                        help="skip the standalone-pass and classifier-step references")
    parser.add_argument("--torch_python", default=None,
                        help="Python with torch for --model torch_jem")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the list of configurations this many times in turn (the "
                             "table shows medians over rounds: fairer on a shared machine)")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="seconds per configuration")
    parser.add_argument("--json", default=None, help="append one JSON line per configuration")
    parser.add_argument("--in_process", action="store_true",
                        help="run TensorFlow configurations in this process (peak RSS is then "
                             "shared between them)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "image_size", "channels", "iterations", "num_classes", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive; received {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; received {args.warmup}")
    if args.num_steps is not None and args.num_steps < 1:
        parser.error(f"--num_steps must be positive; received {args.num_steps}")
    return args


def _split(value, allowed, name, all_values=None):
    items = [v.strip().lower() for v in value.split(",") if v.strip()]
    if all_values and items == ["all"]:
        return list(all_values)
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise SystemExit(
            f"tools.bench: unknown --{name} {', '.join(unknown) or value!r}; "
            f"expected a comma-separated list of {', '.join(allowed)}"
            + (" or 'all'" if all_values else "")
        )
    return items


def expand_configs(args):
    """One dict per (model, backbone, jit_compile) in the order they run."""
    models = _split(args.model, MODELS, "model", DEFAULT_MODELS)
    backbones = _split(args.backbone, BACKBONES, "backbone")
    jits = {"on": [True], "off": [False], "both": [False, True]}[args.jit_compile]
    threads = None
    if args.threads:
        try:
            threads = [int(v) for v in args.threads.split(",")]
            assert len(threads) == 2 and min(threads) >= 0
        except (ValueError, AssertionError):
            raise SystemExit(
                f"tools.bench: --threads must be INTER,INTRA (two integers >= 0); "
                f"received {args.threads!r}"
            )
    configs = []
    for backbone in backbones:
        for model in models:
            preset = trainer_config(model, args.num_steps, args.buffer_size, args.norm.lower())
            for jit in jits if model != "torch_jem" else [None]:
                configs.append({
                    "model": model,
                    "backbone": backbone,
                    "batch_size": args.batch_size,
                    "image_size": args.image_size,
                    "channels": args.channels,
                    "num_classes": args.num_classes,
                    "num_steps": None if model == "softmax" else preset["num_steps"],
                    "jit_compile": jit,
                    "iterations": args.iterations,
                    "warmup": args.warmup,
                    "ref_iterations": args.ref_iterations or min(args.iterations, 3),
                    "strategy": args.strategy,
                    "mixed_precision": args.mixed_precision,
                    "norm": preset["norm"],
                    "streams": args.streams,
                    "buffer_size": args.buffer_size,
                    "learning_rate": args.learning_rate,
                    "threads": threads,
                    "onednn": args.onednn,
                    "env": list(args.env),
                    "references": not args.no_references,
                })
    return configs


# === Measurement helpers (TensorFlow workers) ===


def _median(values):
    return statistics.median(values) if values else None


def timed(fn, repeats):
    """Median wall and process-CPU seconds of `fn()` over `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return _median(walls), _median(cpus), walls


def peak_rss_mb():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def current_rss_mb():
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _device_peak_mb(tf):
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def _to_numpy(tree):
    import tensorflow as tf

    if hasattr(tree, "get_value"):  # Keras' train functions may return a tf Optional.
        tree = tree.get_value()
    for value in tf.nest.flatten(tree):
        if hasattr(value, "numpy"):
            value.numpy()


def build_model(config, strategy):
    """The model of `config`, built and compiled under `strategy`."""
    import keras
    import numpy as np

    from keras_jem import backbones
    from trainers import factory

    name = config["model"]
    norm = None if config["norm"] == "none" else config["norm"]
    image_shape = (config["image_size"], config["image_size"], config["channels"])
    num_classes = config["num_classes"]
    with strategy.scope():
        kwargs = {} if norm is None else {"norm": norm}
        backbone = backbones.get(config["backbone"], **kwargs)
        if name == "softmax":
            model = keras.Sequential(
                [keras.Input(image_shape), backbone,
                 backbones.TorchDense(num_classes, name="class_head")], name="softmax")
        else:
            preset = trainer_config(name, config["num_steps"], config["buffer_size"],
                                    config["norm"])
            model = factory.build_model(preset, num_classes, backbone=backbone)
        if name != "softmax":
            model.build((None,) + image_shape)
            if model.buffer.initialization == "gaussian_mixture":
                rng = np.random.default_rng(0)
                images = rng.uniform(-1, 1, (20 * num_classes,) + image_shape).astype("float32")
                model.adapt_buffer(images, np.arange(len(images)) % num_classes)
        optimizer = keras.optimizers.Adam(config["learning_rate"])
        loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True)
                if name == "softmax" else None)
        model.compile(optimizer=optimizer, loss=loss, jit_compile=bool(config["jit_compile"]))
        # As trainers/fit.py: optimizer variables exist before the first trace (one trace).
        model.optimizer.build(model.trainable_variables)
    return model


def _synthetic_batch(config, batch_size=None, streams=None):
    import numpy as np

    rng = np.random.default_rng(1)
    batch_size = batch_size or config["batch_size"]
    shape = (batch_size, config["image_size"], config["image_size"], config["channels"])
    x = rng.uniform(-1, 1, shape).astype("float32")
    y = rng.integers(0, config["num_classes"], batch_size).astype("int32")
    if (streams or config["streams"]) == "two":
        x = {"images": x, "px_images": rng.uniform(-1, 1, shape).astype("float32")}
    return x, y


def _iterator(batch, strategy):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)
    return iter(dataset)


def _count_calls(obj, method, counter, key):
    """Replaces `obj.method` by a wrapper counting its Python calls (= graph traces)."""
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        counter[key] += 1
        return original(*args, **kwargs)

    object.__setattr__(obj, method, wrapper)


def _loss_images(config):
    if config["model"] == "softmax":
        return config["batch_size"]
    data_streams = 2 if config["streams"] == "two" and config["model"] not in ("gmmc",) else 1
    return config["batch_size"] * (data_streams + 1)


def _classifier_step(config, model, strategy, batch_size):
    """A warmed-up plain classifier training step sharing `model`'s backbone (a callable)."""
    import keras

    from keras_jem import backbones

    image_shape = (config["image_size"], config["image_size"], config["channels"])
    with strategy.scope():
        classifier = keras.Sequential(
            [keras.Input(image_shape), model.backbone,
             backbones.TorchDense(config["num_classes"], name="reference_head")])
        classifier.compile(
            optimizer=keras.optimizers.Adam(config["learning_rate"]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=bool(config["jit_compile"]),
        )
        classifier.optimizer.build(classifier.trainable_variables)
    classifier.make_train_function()
    iterator = _iterator(_synthetic_batch(config, batch_size, streams="one"), strategy)
    step = lambda: _to_numpy(classifier.train_function(iterator))
    step()
    step()
    return step


def interleaved_timings(functions, repeats):
    """Times each of `functions` (name -> callable) `repeats` times, round-robin.

    Interleaving makes the ratios between them robust to a load that drifts during the run
    (the machine is shared). Returns name -> (median wall s, median process-CPU s).
    """
    walls = {name: [] for name in functions}
    cpus = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: (_median(walls[name]), _median(cpus[name])) for name in functions}


def reference_results(timings, num_steps, loss_images):
    """The result fields derived from `interleaved_timings` (shared with tools/torch_jem.py)."""
    iteration_s = timings["iteration"][0]
    sampler_s, sampler_cpu_s = timings["sampler"]
    result = {
        "ref_iteration_s": iteration_s,
        "sampler_s": sampler_s,
        "sampler_cpu_s": sampler_cpu_s,
        "sampler_step_s": sampler_s / num_steps,
        "sampling_share": sampler_s / iteration_s,
    }
    if "standalone" in timings:
        standalone_s = timings["standalone"][0]
        classifier_s = timings["classifier"][0]
        classifier_loss_s = timings["classifier_loss_batch"][0]
        result.update(
            standalone_s=standalone_s,
            standalone_cpu_s=timings["standalone"][1],
            standalone_pass_s=standalone_s / num_steps,
            classifier_step_s=classifier_s,
            classifier_step_loss_batch_s=classifier_loss_s,
            loss_images=loss_images,
            sampler_ratio=sampler_s / standalone_s,
            iteration_ratio=iteration_s / (sampler_s + classifier_s),
            iteration_overhead_ratio=iteration_s / (sampler_s + classifier_loss_s),
        )
    return result


def run_tensorflow_config(config):
    """Runs one TensorFlow configuration in this process; returns the result dict."""
    import tensorflow as tf

    if config["threads"]:
        inter, intra = config["threads"]
        tf.config.threading.set_inter_op_parallelism_threads(inter)
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    import keras

    import keras_jem  # noqa: F401

    result = {"status": "ok", "tf_version": tf.__version__, "keras_version": keras.__version__}
    if config["mixed_precision"]:
        keras.mixed_precision.set_global_policy(config["mixed_precision"])
    strategy = {
        "default": tf.distribute.get_strategy,
        "one_device": lambda: tf.distribute.OneDeviceStrategy(
            "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"),
        "mirrored": tf.distribute.MirroredStrategy,
    }[config["strategy"]]()
    result["num_replicas"] = strategy.num_replicas_in_sync
    result["rss_base_mb"] = round(current_rss_mb(), 1)
    if tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats("GPU:0")

    model = build_model(config, strategy)
    is_softmax = config["model"] == "softmax"
    backbone = model.layers[0] if is_softmax else model.backbone
    result["parameters"] = int(sum(math.prod(v.shape) for v in model.trainable_variables))
    if not is_softmax:
        images = model.buffer.images  # float32 chains, or a FIFO buffer's uint8 samples
        result["buffer_mb"] = math.prod(images.shape) * tf.as_dtype(images.dtype).size / 2**20

    counter = {"train_step": 0, "backbone": 0}
    _count_calls(model, "train_step", counter, "train_step")
    _count_calls(backbone, "call_from_stem", counter, "backbone")
    model.make_train_function()
    # A plain classifier takes (x, y): the two-stream layout is for the hybrid models.
    batch = _synthetic_batch(config, streams="one" if is_softmax else None)
    iterator = _iterator(batch, strategy)

    def train_iteration():
        _to_numpy(model.train_function(iterator))

    start = time.perf_counter()
    train_iteration()
    result["first_iteration_s"] = round(time.perf_counter() - start, 3)
    result["backbone_traces_per_step"] = counter["backbone"] / max(counter["train_step"], 1)
    for _ in range(max(config["warmup"] - 1, 0)):
        train_iteration()
    traces_after_warmup = counter["train_step"]
    wall, cpu, walls = timed(train_iteration, config["iterations"])
    result.update(
        iteration_s=wall,
        iteration_cpu_s=cpu,
        iteration_all_s=[round(v, 4) for v in walls],
        images_per_s=config["batch_size"] / wall,
        train_step_traces=counter["train_step"],
        retraces_after_warmup=counter["train_step"] - traces_after_warmup,
        peak_rss_mb=round(peak_rss_mb(), 1),
        device_peak_mb=_device_peak_mb(tf),
    )
    if is_softmax:
        result["classifier_step_s"] = wall
        return result

    # === Phase 2: the sampler alone (no buffer) and the references, interleaved with
    # training iterations so that the ratios are taken under the same load ===
    jit = bool(config["jit_compile"])
    sampler = model.sampler
    labels = None
    if getattr(model, "conditional_sampling", False) or getattr(model, "conditional", False):
        labels = tf.constant(batch[1])
    training = bool(getattr(model, "sample_in_training_mode", False))
    x0 = tf.constant(batch[0]["px_images"] if isinstance(batch[0], dict) else batch[0])
    seeds = iter(range(10**6))
    num_steps = int(config["num_steps"])

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def run_sampler(x, seed):
        return sampler(model, x, y=labels, seed=seed, training=training)

    def sample():
        run_sampler(x0, tf.constant([next(seeds), 5], tf.int64)).numpy()

    # K standalone forward + input-gradient passes: no tape over the weights.
    @tf.function(jit_compile=jit, reduce_retracing=True)
    def standalone_pass(x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            energy = tf.reduce_sum(
                tf.cast(model.energy(x, y=labels, training=training), tf.float32))
        return tape.gradient(energy, x)

    def standalone():
        for _ in range(num_steps):
            gradient = standalone_pass(x0)
        gradient.numpy()

    functions = {"iteration": train_iteration, "sampler": sample}
    loss_images = _loss_images(config)
    if config["references"]:
        functions["standalone"] = standalone
        functions["classifier"] = _classifier_step(config, model, strategy,
                                                   config["batch_size"])
        functions["classifier_loss_batch"] = _classifier_step(config, model, strategy,
                                                              loss_images)
    sample()
    standalone_pass(x0).numpy()
    timings = interleaved_timings(functions, config["ref_iterations"])
    result.update(reference_results(timings, num_steps, loss_images))
    result["sampler_traces"] = run_sampler.experimental_get_tracing_count()
    result["retraces_after_warmup"] = counter["train_step"] - traces_after_warmup
    return result


def _round(result):
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


# === Subprocess driver ===


def _torch_python(args):
    candidates = [args.torch_python, os.environ.get("KERAS_JEM_TORCH_PYTHON")]
    for python in candidates:
        if python:
            return python
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    return None


def _worker_env(config):
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if config["onednn"] != "default":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if config["onednn"] == "on" else "0"
    for item in config["env"]:
        key, _, value = item.partition("=")
        env[key] = value
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_config(config, args):
    """Runs `config` in a subprocess (or in-process with --in_process); returns the row."""
    row = dict(config)
    if config["model"] == "torch_jem":
        python = _torch_python(args)
        if python is None:
            row.update(status="not available",
                       error="no Python with torch: pass --torch_python or set "
                             "KERAS_JEM_TORCH_PYTHON")
            return row
        command = [python, os.path.join(REPO, "tools", "torch_jem.py"), json.dumps(config)]
    elif args.in_process:
        try:
            row.update(_round(run_tensorflow_config(config)))
        except Exception as error:  # noqa: BLE001 (report and go on with the next row)
            row.update(status="error", error=f"{type(error).__name__}: {error}")
        return row
    else:
        command = [sys.executable, "-m", "tools.bench", "--_worker", json.dumps(config)]
    try:
        process = subprocess.run(
            command, cwd=REPO, env=_worker_env(config), capture_output=True, text=True,
            timeout=args.timeout, check=False,
        )
    except FileNotFoundError as error:
        row.update(status="not available", error=str(error))
        return row
    except subprocess.TimeoutExpired:
        row.update(status="error", error=f"timed out after {args.timeout:.0f} s")
        return row
    for line in process.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            row.update(json.loads(line[len(RESULT_PREFIX):]))
            return row
    tail = (process.stderr or process.stdout).strip().splitlines()[-5:]
    row.update(status="error",
               error=f"worker exited with {process.returncode}: " + " | ".join(tail))
    return row


def _worker_main(config_json):
    config = json.loads(config_json)
    try:
        result = _round(run_tensorflow_config(config))
    except Exception as error:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        result = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# === Report ===

COLUMNS = (
    ("model", "model", "{}"),
    ("backbone", "backbone", "{}"),
    ("jit", "jit_compile", "{}"),
    ("K", "num_steps", "{}"),
    ("s/iter", "iteration_s", "{:.3f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("s/step", "sampler_step_s", "{:.4f}"),
    ("sampling", "sampling_share", "{:.0%}"),
    ("K passes s", "standalone_s", "{:.3f}"),
    ("clf step s", "classifier_step_s", "{:.3f}"),
    ("smp/pass", "sampler_ratio", "{:.2f}"),
    ("it/(smp+clf)", "iteration_ratio", "{:.2f}"),
    ("it/(smp+clfL)", "iteration_overhead_ratio", "{:.2f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
)


def _cell(row, key, fmt):
    value = row.get(key)
    if key == "jit_compile":
        return {True: "on", False: "off", None: "-"}[value]
    if value is None:
        return "-"
    return fmt.format(value)


def format_table(rows):
    """A plain-text table of the rows, with status notes and memory/baseline ratios."""
    header = [title for title, _, _ in COLUMNS]
    lines = []
    body = []
    for row in rows:
        if row.get("status", "ok") != "ok":
            cells = [_cell(row, k, f) for _, k, f in COLUMNS[:4]]
            cells += [row.get("status", "error") + ": " + str(row.get("error", ""))[:120]]
        else:
            cells = [_cell(row, k, f) for _, k, f in COLUMNS]
        body.append(cells)
    widths = [len(h) for h in header]
    for cells in body:
        if len(cells) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        if len(cells) == len(header):
            lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
        else:
            lines.append("  ".join(c.rjust(w) for c, w in zip(cells[:4], widths)) + "  "
                         + cells[4])
    lines += _summary(rows)
    return "\n".join(lines)


def _summary(rows):
    ok = [r for r in rows if r.get("status") == "ok"]
    notes = []
    key = lambda r: (r["backbone"], r["batch_size"], r["image_size"], r["channels"])
    softmax = {(key(r), r["jit_compile"]): r for r in ok if r["model"] == "softmax"}
    for row in ok:
        if row["model"] in ("softmax", "torch_jem"):
            continue
        reference = softmax.get((key(row), row["jit_compile"]))
        if reference and row.get("buffer_mb") is not None:
            ratio = row["peak_rss_mb"] / (reference["peak_rss_mb"] + row["buffer_mb"])
            notes.append(
                f"memory {row['model']} {row['backbone']} jit={_cell(row, 'jit_compile', '')}: "
                f"peak RSS {row['peak_rss_mb']:.0f} MB / (softmax {reference['peak_rss_mb']:.0f}"
                f" MB + buffer {row['buffer_mb']:.0f} MB) = {ratio:.2f} (target <= 1.5)")
    torch_rows = {key(r): r for r in ok if r["model"] == "torch_jem"}
    for row in ok:
        reference = torch_rows.get(key(row))
        if reference and row["model"] == "jem":
            notes.append(
                f"jem {row['backbone']} jit={_cell(row, 'jit_compile', '')}: "
                f"{row['iteration_s']:.2f} s/iter vs PyTorch {reference['iteration_s']:.2f} "
                f"s/iter = {row['iteration_s'] / reference['iteration_s']:.2f}x "
                f"(streams {row['streams']} vs {reference['streams']}; target <= 1.0)")
    return [""] + notes if notes else []


CONFIG_KEYS = ("model", "backbone", "batch_size", "image_size", "channels", "num_steps",
               "jit_compile", "strategy", "mixed_precision", "norm", "streams", "threads",
               "onednn", "env")


def aggregate(rows):
    """Merges the rows of several `--rounds` per configuration: medians of the numbers."""
    groups = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in CONFIG_KEYS]), []).append(row)
    merged = []
    for group in groups.values():
        ok = [r for r in group if r.get("status") == "ok"]
        if len(group) == 1 or not ok:
            merged.append(group[0])
            continue
        row = dict(ok[0])
        for key, value in ok[0].items():
            if key in CONFIG_KEYS or key == "round":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
                row[key] = _median(values)
        row["rounds"] = len(ok)
        merged.append(row)
    return merged


def main(argv=None):
    args = parse_args(argv)
    if args._worker is not None:
        _worker_main(args._worker)
        return 0
    configs = expand_configs(args)
    command = "python -m tools.bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rows = []
    for round_index in range(args.rounds):
        for config in configs:
            started = time.perf_counter()
            load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            row = run_config(config, args)
            row["command"] = command
            if load_start is not None:
                # The 1-minute load average before and after: high values mean a shared,
                # busy machine and wall times to be taken with care.
                row["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
            row["round"] = round_index
            row["bench_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            line = json.dumps(row, sort_keys=True)
            print(line, flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(line + "\n")
    print()
    print(command)
    print(format_table(aggregate(rows)), flush=True)
    return 0 if all(r.get("status") in ("ok", "not available") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
