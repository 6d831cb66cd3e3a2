"""keras-jem: Joint Energy-based Models in Keras 3.

One network is a classifier and an image generator at once: JEM, JEM++, SADA-JEM, GMMC and
IGEBM, trained with `model.fit`, sampled with `model.sample`, evaluated with `keras_jem.metrics`
and exported for TensorFlow Serving with `keras_jem.export`.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_jem import backbones
from keras_jem import callbacks
from keras_jem import data
from keras_jem import energies
from keras_jem import metrics
from keras_jem import models
from keras_jem import optimizers
from keras_jem import sampling
from keras_jem.batch_norm import reestimate_batch_norm
from keras_jem.models import *

__version__ = "0.1.0"
