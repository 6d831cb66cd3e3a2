"""Two logical CPU devices and a `MirroredStrategy` over them, for the checks scripts.

`tests/distribute_checks.py` and `tests/modes_checks.py` import it, in a fresh interpreter,
before they run any TensorFlow op: the CPU must be split before TensorFlow initialises.
"""

from keras_jem import distribute

distribute.configure_cpu_devices(2)

import keras
import numpy as np
import tensorflow as tf

MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
SINGLE = tf.distribute.get_strategy()
SHAPE = (8, 8, 1)


def numpy(x):
    """A Keras tensor or variable as a numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))
