"""Random seeds that differ across `tf.distribute` replicas.

A `keras.random.SeedGenerator` holds the same state on every replica, so noise drawn from it is
identical on all of them (see keras-team/keras#18426). Samplers instead draw one stateless seed
per call and fold the replica id into it.
"""

import tensorflow as tf


def next_seed(seed_generator):
    """Returns a stateless seed (`int64` tensor of shape `(2,)`) unique to this call and replica.

    Args:
        seed_generator: a `keras.random.SeedGenerator` whose state is advanced by one.
    """
    seed = tf.cast(seed_generator.next(), tf.int64)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        replica_id = tf.cast(context.replica_id_in_sync_group, tf.int64)
        seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
        seed = tf.cast(seed, tf.int64)
    return seed


def fold_in(seed, value):
    """Derives a new stateless seed from `seed` and an integer `value`."""
    return tf.cast(tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64)), tf.int64)
