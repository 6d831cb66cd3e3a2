"""Where and how a run executes: the tf.distribute strategy and its checks, XLA, dtype policy."""

import contextlib

from trainers.factory import ConfigError


def validate_distribution(config, fail):
    """Strategy flags, TF_CONFIG and, when the replica count is known, the global batch."""
    from keras_jem import distribute

    if config.get("num_devices") is not None:
        if config["num_devices"] <= 0:
            fail(f"--num_devices must be positive. Received: {config['num_devices']}")
        if config["strategy"] != "mirrored":
            fail("--num_devices sets the replicas of --strategy mirrored. Received: "
                 f"--strategy {config['strategy']} --num_devices {config['num_devices']}")
    if config["strategy"] == "multi_worker":
        try:
            distribute.parse_tf_config()
        except distribute.ClusterConfigError as error:
            fail(str(error))
    if config.get("num_devices"):
        check_global_batch(config, config["num_devices"], fail)


def check_global_batch(config, replicas, fail):
    from keras_jem import distribute

    for key in ("batch_size", "px_batch_size"):
        if config.get(key):
            try:
                distribute.check_global_batch(config[key], replicas, name=key)
            except ValueError as error:
                fail(str(error))


def jit_compile(config, model, strategy=None):
    setting = config["jit_compile"]
    from keras_jem import distribute

    if strategy is not None and distribute.uses_cpu_replicas(strategy) and setting == "true":
        # MirroredStrategy + jit_compile fails on CPU replicas (a resource on another device).
        print(f"[trainers.fit] XLA is off: jit_compile is not supported with "
              f"{distribute.num_replicas(strategy)} replicas on CPU devices "
              "(--jit_compile true ignored).", flush=True)
        return False
    if setting == "true":
        return True
    if setting == "false":
        return False
    # Keras' own "auto": XLA on accelerators, off on CPU-only machines and under tf.distribute.
    # On CPUs XLA makes every model here slower: a WRN-16-2 JEM iteration took 55 s with it
    # against 5 s with TensorFlow's executor, the digits CNN's sampler 3.5 s against 0.27 s
    # (`python -m tools.bench --jit_compile both`; README, Performance).
    return "auto"


@contextlib.contextmanager
def dtype_policy(name):
    """The global Keras dtype policy `name` ("none": float32) while the model is constructed.

    Layers keep the policy they were created with (and `.keras` files record it), so the global
    policy is restored afterwards.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32" if name in (None, "none") else name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def make_strategy(config):
    """The run's `tf.distribute` strategy; checks the global batch against its replicas."""
    from keras_jem import distribute

    try:
        strategy = distribute.create_strategy(config["strategy"],
                                              num_devices=config.get("num_devices"),
                                              tpu=config.get("tpu"))
    except (ValueError, RuntimeError) as error:
        raise ConfigError(str(error)) from error

    def fail(message):
        raise ConfigError(message)

    replicas = distribute.num_replicas(strategy)
    check_global_batch(config, replicas, fail)
    if replicas > 1:
        worker_index, num_workers, _ = distribute.worker_info(strategy)
        print(f"[trainers.fit] strategy {config['strategy']}: {replicas} replicas"
              + (f" over {num_workers} workers (this is worker {worker_index})"
                 if num_workers > 1 else "")
              + f"; global batch {config['batch_size']}, "
              f"{config['batch_size'] // replicas} per replica.", flush=True)
    return strategy
