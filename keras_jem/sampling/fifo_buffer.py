"""The first-in-first-out replay buffer of 8-bit samples (the official IGEBM code's)."""

import keras
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.replay_buffer import ReplayBuffer
from keras_jem.sampling.replay_buffer import _replica

#: Quantisation levels of the stored samples (8 bits).
LEVELS = 256


@keras.saving.register_keras_serializable(package="keras_jem")
class FIFOReplayBuffer(ReplayBuffer):
    """A ring of the most recent chain end states, stored as 8-bit images (IGEBM's buffer).

    The official IGEBM training loop (`openai/ebm_code_release`, `train.py`) keeps no persistent
    chains: it appends every iteration's final samples to a first-in-first-out buffer of
    `uint8` images (the oldest are overwritten), and starts each new batch of chains from
    images drawn uniformly *with replacement* from it, dequantised, except a fraction
    `reinit_probability` (0.05) of them that start from uniform noise. Until the buffer holds
    more than a batch, every chain starts from noise.

    Here the ring is a `uint8` Keras variable `images` of shape `(size, *image_shape)` and an
    `int64` variable `num_written` counts the images ever written, so both are saved with the
    model. Images in `value_range` are quantised to the codes `0..255` as the official code
    quantises [0, 1]:

    ```
    p = (x - low) / (high - low)                     # on [0, 1]
    code = min(floor(256 * clip(p, 0, 1)), 255)      # stored
    x = low + (high - low) * (code + U(0, 1)) / 256  # drawn (dequantised)
    ```

    `stored_images()` returns the bin centres (`U(0, 1)` replaced by 0.5).

    It has the interface of `ReplayBuffer` that the models use: `draw` returns the ring
    positions it drew (for information: `write` ignores them and appends), and `write`
    all-gathers the samples of every `tf.distribute` replica and appends them to every copy of
    the ring, so no replica's samples are lost and the copies stay identical. Each replica draws
    with its own seed (the replica id is folded in). The buffer is class-agnostic, as the
    official one: class-conditional draws (`labels`) and the informative Gaussian-mixture init
    are not supported (use `ReplayBuffer` for them).

    Args:
        size: capacity of the ring (the IGEBM paper and keras-jem's presets: 10000; the
            official `train.py` uses 50000).
        initialization: `"uniform"`, the only fresh start of this buffer.
        reinit_probability: probability that a chain starts from uniform noise although the
            buffer holds enough images (0.05).
        value_range: `(low, high)` of the data, mapped onto the 256 codes.
        **kwargs: other `ReplayBuffer` arguments (`num_classes`, `seed`, ...; `num_classes`
            is accepted and ignored by the draws).

    Example:

    >>> buffer = FIFOReplayBuffer(size=10000)
    >>> buffer.build((32, 32, 3))
    >>> _, x0, restarted = buffer.draw(128, seed=tf.constant([0, 1], "int64"))
    >>> buffer.write(None, sampler(model, x0))      # appended at the ring position
    """

    def __init__(self, size=10000, initialization="uniform", reinit_probability=0.05, **kwargs):
        if initialization != "uniform":
            raise ValueError(
                "FIFOReplayBuffer starts chains from uniform noise only: it stores recent "
                "samples, not chains drawn from a class mixture. Received: "
                f"initialization={initialization!r}. Use initialization='uniform', or the "
                "persistent ReplayBuffer (a model's buffer_type='persistent') for the "
                "Gaussian-mixture init."
            )
        super().__init__(size=size, initialization=initialization,
                         reinit_probability=reinit_probability, **kwargs)

    def build(self, image_shape):
        image_shape = self._set_image_shape(image_shape)
        self.images = self.add_weight(
            name="images", shape=(self.size,) + image_shape, dtype="uint8",
            initializer="zeros", trainable=False, autocast=False,
        )
        self.num_written = self.add_weight(
            name="num_written", shape=(), dtype="int64", initializer="zeros", trainable=False,
            autocast=False,
        )
        self.built = True

    # === Quantisation ===

    def encode(self, images):
        """`uint8` codes of float images in `value_range` (clipped to it first).

        The official `compress_x_mod` computes `uint8(256 * clip(p, 0, 1))`, which wraps the
        top value p = 1 to 0 (256 overflows 8 bits); here it is clipped to 255.
        """
        low, high = self.value_range
        p = (tf.cast(images, tf.float32) - low) / (high - low)
        codes = tf.floor(LEVELS * tf.clip_by_value(p, 0.0, 1.0))
        return tf.cast(tf.minimum(codes, LEVELS - 1), tf.uint8)

    def decode(self, codes, offsets=0.5):
        """Float images in `value_range` from `uint8` codes: `low + (high - low) * (code +
        offset) / 256`, with `offsets` in [0, 1) (U(0, 1) when drawing; 0.5: bin centres)."""
        low, high = self.value_range
        p = (tf.cast(codes, tf.float32) + offsets) / LEVELS
        return low + (high - low) * p

    # === Chains ===

    def num_stored(self):
        """The number of images in the ring (`min(num_written, size)`), an int64 tensor."""
        return tf.minimum(tf.convert_to_tensor(self.num_written), self.size)

    def stored_images(self):
        """The stored images, float32 in `value_range` (bin centres), in ring order."""
        return self.decode(tf.convert_to_tensor(self.images)[: self.num_stored()])

    def reset(self, seed=None):
        """Empties the ring: the next draws start from uniform noise."""
        del seed  # nothing random: kept for the interface of ReplayBuffer.reset
        self.images.assign(tf.zeros(self.images.shape, tf.uint8))
        self.num_written.assign(0)

    def draw(self, batch_size, labels=None, seed=None):
        """Draws chain starts: stored images (with replacement) or uniform noise.

        Args:
            batch_size: number of chains (a Python int or a scalar int tensor).
            labels: must be None (the buffer is class-agnostic).
            seed: stateless seed, int64 `(2,)`.

        Returns:
            `(indices, images, reinitialized)`: the ring positions drawn `(batch_size,)` (for
            information; `write` appends), the starting images, and a boolean mask of the
            chains that start from uniform noise: all of them until the ring holds more than
            `batch_size` images, else about `reinit_probability` of them.
        """
        if labels is not None:
            raise ValueError(
                "FIFOReplayBuffer is class-agnostic (as the official IGEBM buffer): it cannot "
                "draw chains by label. Received labels. Pass labels=None, or use the "
                "persistent ReplayBuffer (buffer_type='persistent') for class blocks."
            )
        self._check_draw(batch_size, None)
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        replica, replicas = _replica()
        if replicas > 1:
            # Every replica holds the same ring: draw differently on each.
            seed = noise.fold_in(seed, 1 + tf.cast(replica, tf.int64))
        stored = self.num_stored()
        shape = (batch_size,)
        indices = tf.random.stateless_uniform(
            shape, noise.fold_in(seed, 0), minval=0, maxval=tf.maximum(stored, 1),
            dtype=tf.int64)
        codes = tf.gather(self.images, indices)
        images = self.decode(
            codes, tf.random.stateless_uniform(tf.shape(codes), noise.fold_in(seed, 1)))
        # Official train.py: buffer samples only once it holds more than a batch.
        too_few = stored <= tf.cast(batch_size, tf.int64)
        reinitialized = tf.logical_or(
            tf.random.stateless_uniform(shape, noise.fold_in(seed, 2)) < self.reinit_probability,
            too_few)
        fresh = self.fresh_samples(batch_size, seed=noise.fold_in(seed, 3))
        images = tf.where(reinitialized[:, None, None, None], fresh, images)
        return tf.cast(indices, tf.int32), images, reinitialized

    def write(self, indices, images):
        """Appends `images` (quantised) at the ring position; `indices` are ignored.

        Under `tf.distribute` the samples of every replica are all-gathered (in replica order)
        and appended to every copy of the ring. When more images than `size` arrive at once,
        only the last `size` are kept.
        """
        del indices  # a FIFO appends
        images = tf.stop_gradient(tf.convert_to_tensor(images))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            images = context.all_gather(images, axis=0)
        codes = self.encode(images)
        count = tf.shape(codes, out_type=tf.int64)[0]
        keep = tf.minimum(count, self.size)
        codes = codes[count - keep:]
        start = tf.convert_to_tensor(self.num_written) + count - keep
        positions = (start + tf.range(keep, dtype=tf.int64)) % self.size
        self.images.value.scatter_update(tf.IndexedSlices(codes, positions))
        self.num_written.assign_add(count)
