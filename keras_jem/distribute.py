"""Training on several devices and machines with `tf.distribute`.

Every JEM-family model trains under TensorFlow's own strategies with global-batch semantics (the
dataset yields the global batch; each of the `R` replicas gets `batch / R` examples):

```python
strategy = keras_jem.distribute.create_strategy("mirrored")       # all local GPUs
with keras_jem.distribute.construction_scope(strategy):
    model = keras_jem.JEM(backbone=..., num_classes=10)
with strategy.scope():
    model.build((None, 32, 32, 3))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=False)
    model.fit(train_ds, epochs=..., steps_per_epoch=...)
```

What the library does per replica (see `ReplayBuffer` and `keras_jem.sampling.noise`): the
hand-written loss terms are divided by the replica count, SGLD noise and buffer draws fold the
replica id into their seeds, each replica continues chains from its own shard of the replay
buffer, and the chains written back are all-gathered so that every copy of the buffer stays
identical (nothing is lost or duplicated, and a checkpoint restores onto any replica count).

`MultiWorkerMirroredStrategy` needs two things with Keras 3 `fit` (keras-team/keras#20585):

- the model object must be constructed *outside* the strategy scope (`construction_scope` does
  this), with its variables created inside it (`build`, `compile`) and `fit` called inside it.
  A model constructed under the scope makes Keras reduce the first (nested, per-replica) data
  batch with `strategy.reduce`, which the collective strategy rejects ("Attempt to convert a
  value (PerReplica...) to a Tensor");
- the step's logs must not be scalars: Keras reduces them across workers with
  `strategy.reduce("MEAN", value, axis=0)`, which fails on 0-d tensors (tensorflow#72388).
  `replica_logs` gives them a leading axis of 1 in multi-worker mode; models call it on the dict
  they return from `train_step`/`test_step`.
"""

import contextlib
import json
import logging
import os

logger = logging.getLogger("keras_jem.distribute")

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class ClusterConfigError(ValueError):
    """`TF_CONFIG` does not describe a usable cluster."""


# === TF_CONFIG ===


def parse_tf_config(text=None):
    """Parses and checks `TF_CONFIG` (the env variable when `text` is None).

    Returns:
        None when `TF_CONFIG` is unset or empty, else a dict with `cluster` (job -> list of
        "host:port"), `task_type`, `task_index`, `num_workers` (chief + workers), `worker_index`
        (the task's position among them, chief first) and `is_chief`.

    Raises:
        ClusterConfigError: with what is wrong and an example of a valid value.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text or not text.strip():
        return None
    example = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')

    def fail(message):
        raise ClusterConfigError(f"Invalid TF_CONFIG: {message}. Expected e.g. {example}. "
                                 f"Received: {text}")

    # The checks are the project's: TFConfigClusterResolver reads only the environment and
    # checks nothing (bad JSON is a bare JSONDecodeError, a wrong index or a duplicate address
    # a hang or a gRPC error at the first collective). The parsed cluster is TF's ClusterSpec,
    # and a running strategy is asked through its own resolver (`worker_info`).
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        fail(f"not valid JSON ({error})")
    if not isinstance(config, dict):
        fail("it must be a JSON object")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        fail("it needs a non-empty 'cluster' object mapping job names to address lists")
    addresses = []
    for job, tasks in cluster.items():
        if job not in ("chief", "worker", "evaluator", "ps"):
            fail(f"unknown job {job!r} in 'cluster' (use 'chief' and 'worker')")
        if job == "ps":
            fail("parameter servers ('ps') are not supported; MultiWorkerMirroredStrategy "
                 "uses only 'chief' and 'worker' jobs")
        if not isinstance(tasks, list) or not tasks:
            fail(f"cluster[{job!r}] must be a non-empty list of 'host:port' strings")
        if job == "chief" and len(tasks) != 1:
            fail(f"there must be exactly one chief, found {len(tasks)}")
        for address in tasks:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                fail(f"address {address!r} of job {job!r} is not 'host:port'")
            addresses.append(str(address))
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        fail(f"addresses used by more than one task: {', '.join(duplicates)}")
    if "worker" not in cluster and "chief" not in cluster:
        fail("the cluster has no 'worker' (or 'chief') job")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        fail("it needs a 'task' object with 'type' and 'index' (this process's role)")
    task_type, task_index = task["type"], task["index"]
    if task_type not in cluster:
        fail(f"task type {task_type!r} is not a job of the cluster ({', '.join(cluster)})")
    if not isinstance(task_index, int) or not 0 <= task_index < len(cluster[task_type]):
        fail(f"task index {task_index!r} is out of range for job {task_type!r}, which has "
             f"{len(cluster[task_type])} task(s)")
    if task_type == "evaluator":
        fail("the 'evaluator' task is not supported by trainers.fit")
    import tensorflow as tf

    # TensorFlow's own structure for the cluster (what TFConfigClusterResolver builds).
    spec = tf.train.ClusterSpec({job: tasks for job, tasks in cluster.items()
                                 if job != "evaluator"})
    worker_index, num_workers = _position(spec, task_type, task_index)
    return {
        "cluster": spec.as_dict(),
        "task_type": task_type,
        "task_index": task_index,
        "num_workers": num_workers,
        "worker_index": worker_index,
        "is_chief": worker_index == 0,
    }


def _position(spec, task_type, task_index):
    """`(worker_index, num_workers)`: the chief first, then the workers, in a `ClusterSpec`."""
    chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
    workers = spec.num_tasks("worker") if "worker" in spec.jobs else 0
    return (task_index if task_type == "chief" else chiefs + task_index), chiefs + workers


def _strategy_resolver(strategy):
    """The `TFConfigClusterResolver` a `MultiWorkerMirroredStrategy` runs with, else None."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    return strategy.cluster_resolver


def worker_info(strategy=None):
    """`(worker_index, num_workers, is_chief)` of this process (0, 1, True when single-worker).

    With a `MultiWorkerMirroredStrategy`, read from the cluster resolver the strategy runs with
    (TensorFlow's parse of `TF_CONFIG`); without a strategy, from `parse_tf_config`.
    """
    if strategy is not None:
        resolver = _strategy_resolver(strategy)
        if resolver is None or resolver.task_type is None or not resolver.cluster_spec().jobs:
            return 0, 1, True  # not multi-worker, or MultiWorkerMirroredStrategy on one machine
        worker_index, num_workers = _position(resolver.cluster_spec(), resolver.task_type,
                                              resolver.task_id)
        return worker_index, num_workers, worker_index == 0
    info = parse_tf_config()
    if info is None:
        return 0, 1, True
    return info["worker_index"], info["num_workers"], info["is_chief"]


# === Strategies ===


def configure_cpu_devices(num_devices):
    """Splits the CPU into `num_devices` logical devices (testing replicas without GPUs).

    Must run before TensorFlow initialises its devices (before the first op).
    """
    import tensorflow as tf

    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"`num_devices` must be positive. Received: {num_devices}")
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as error:
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) == num_devices:
            return [d.name for d in logical]
        raise RuntimeError(
            f"Cannot split the CPU into {num_devices} logical devices: TensorFlow is already "
            f"initialised with {len(logical)}. Call `configure_cpu_devices` before any "
            "TensorFlow op runs (e.g. first thing in the script)."
        ) from error
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def create_strategy(name="default", num_devices=None, tpu=None):
    """Creates a `tf.distribute.Strategy` from its name.

    Args:
        name: `"default"` (one device), `"mirrored"` (all local GPUs, or `num_devices` logical
            CPUs), `"multi_worker"` (`MultiWorkerMirroredStrategy` over the cluster of
            `TF_CONFIG`) or `"tpu"` (`TPUStrategy`).
        num_devices: optional number of replicas for `"mirrored"`: the first `num_devices`
            GPUs, or, on a machine without GPUs, the CPU split into that many logical devices
            (for tests; then it must be called before TensorFlow initialises).
        tpu: TPU name or address for `"tpu"` (default: `TPU_NAME`, or the local TPU).

    Returns:
        The strategy. Its `num_replicas_in_sync` is the number of replicas a global batch is
        split over.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}. Expected one of: {', '.join(STRATEGIES)}.")
    if num_devices is not None and int(num_devices) < 1:
        raise ValueError(f"`num_devices` must be positive. Received: {num_devices}")
    cluster = parse_tf_config()
    if name != "multi_worker" and cluster is not None and cluster["num_workers"] > 1:
        logger.warning("TF_CONFIG describes %d workers but the strategy is %r: TF_CONFIG is "
                       "ignored; use the 'multi_worker' strategy to train on the cluster.",
                       cluster["num_workers"], name)
    import tensorflow as tf

    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as error:
            raise RuntimeError(
                f"No TPU found ({error}). The 'tpu' strategy needs a TPU VM or a TPU named by "
                "--tpu / the TPU_NAME environment variable; use 'mirrored' for GPUs."
            ) from error
        return tf.distribute.TPUStrategy(resolver)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = None
        if num_devices is not None:
            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                if int(num_devices) > len(gpus):
                    raise ValueError(f"--num_devices={num_devices} but only {len(gpus)} GPU(s) "
                                     "are visible.")
                devices = [f"/gpu:{i}" for i in range(int(num_devices))]
            else:
                devices = configure_cpu_devices(num_devices)
        return tf.distribute.MirroredStrategy(devices)
    if num_devices is not None:
        raise ValueError("--num_devices applies to the 'mirrored' strategy; 'multi_worker' uses "
                         "every GPU of each worker (or one CPU replica per worker).")
    if cluster is None:
        logger.warning("TF_CONFIG is not set: MultiWorkerMirroredStrategy runs on this machine "
                       "only. Set TF_CONFIG on every worker to train on several machines.")
    # The resolver TensorFlow would pick by default, named so that `worker_info` and
    # `is_multi_worker` read the very cluster the strategy runs on.
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver())


def num_replicas(strategy=None):
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


def is_multi_worker(strategy):
    """True for a `MultiWorkerMirroredStrategy` spanning more than one worker."""
    return _strategy_resolver(strategy) is not None and worker_info(strategy)[1] > 1


def uses_cpu_replicas(strategy):
    """True when `strategy` runs several replicas and no GPU/TPU is visible."""
    import tensorflow as tf

    if num_replicas(strategy) < 2:
        return False
    return not (tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def construction_scope(strategy):
    """The context in which to *construct* a model object (not build it) for `strategy`.

    `strategy.scope()` for single-worker strategies. For `MultiWorkerMirroredStrategy` it is a
    null context: Keras 3 remembers the strategy a model was constructed under and then
    reduces the first data batch with `strategy.reduce`, which fails on multi-worker
    collectives (keras-team/keras#20585). Build and compile the model, and call `fit`, inside
    `strategy.scope()` in every case so its weights, buffer and optimizer are mirrored.
    """
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return contextlib.nullcontext()
    return strategy.scope()


def check_global_batch(batch_size, replicas, name="batch_size"):
    """Raises a ValueError unless the global `batch_size` splits evenly over `replicas`."""
    if replicas > 1 and batch_size % replicas:
        lower = batch_size - batch_size % replicas
        raise ValueError(
            f"--{name}={batch_size} is the global batch, split over {replicas} replicas, but it "
            f"is not divisible by {replicas}: the replicas would get unequal batches and the "
            f"loss would be mis-scaled. Use a multiple of {replicas}, e.g. {lower or replicas} "
            f"or {lower + replicas}."
        )


# === In-graph helpers ===


def replica_logs(logs):
    """Makes a step's logs reducible by Keras under every strategy.

    In multi-worker mode each scalar gets a leading axis of 1, because Keras reduces logs
    across workers with `strategy.reduce("MEAN", value, axis=0)` (tensorflow#72388); the result
    is the mean over all replicas, identical on every worker. Elsewhere `logs` is returned
    unchanged.
    """
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return logs
    if not is_multi_worker(tf.distribute.get_strategy()):
        return logs
    return {k: tf.reshape(v, (1,)) if len(getattr(v, "shape", ())) == 0 else v
            for k, v in logs.items()}


def gather_from_replicas(strategy, values):
    """A list of Python ints (equal within a worker) from every replica, concatenated.

    Used to check which checkpoints all workers of a multi-worker run hold.
    """
    import tensorflow as tf

    values = [int(v) for v in values]
    if num_replicas(strategy) == 1:
        return values
    per_replica = strategy.run(lambda: tf.constant(values, tf.int64))
    return [int(v) for v in strategy.gather(per_replica, axis=0).numpy().tolist()]


def shard_by_data(dataset):
    """`dataset` with DATA auto-sharding: each worker keeps its part of every global batch.

    In-memory datasets (`from_tensor_slices`, `range`) have no files to shard by; saying so
    avoids the FILE-sharding attempt and its warnings under `MultiWorkerMirroredStrategy`.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return dataset.with_options(options)
