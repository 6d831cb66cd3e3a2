"""keras-jem: Joint Energy-based Models in Keras 3.

One network is a classifier and an image generator at once: JEM, JEM++, SADA-JEM, GMMC and
IGEBM, trained with `model.fit`, sampled with `model.sample`, evaluated with `keras_jem.metrics`
and exported for TensorFlow Serving with `keras_jem.export`.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras_jem import backbones  # noqa: E402
from keras_jem import callbacks  # noqa: E402
from keras_jem import data  # noqa: E402
from keras_jem import energies  # noqa: E402
from keras_jem import metrics  # noqa: E402
from keras_jem import models  # noqa: E402
from keras_jem import optimizers  # noqa: E402
from keras_jem import sampling  # noqa: E402
from keras_jem.models import *  # noqa: E402,F401,F403

__version__ = "0.1.0"
