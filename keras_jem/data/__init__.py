"""Datasets, the two-stream training pipeline and OOD sets for Joint Energy-based Models.

Images are float32 NHWC in [-1, 1]; labels int64.
"""

from keras_jem.data.augmentation import augment
from keras_jem.data.augmentation import random_crop
from keras_jem.data.augmentation import random_flip
from keras_jem.data.idx import IDXFormatError
from keras_jem.data.idx import read_idx
from keras_jem.data.loading import DatasetNotAvailableError
from keras_jem.data.loading import load
from keras_jem.data.ood import available_ood
from keras_jem.data.ood import load_ood
from keras_jem.data.ood import ood_sets_for
from keras_jem.data.pipeline import make_eval_dataset
from keras_jem.data.pipeline import make_train_dataset
from keras_jem.data.pipeline import split_validation
from keras_jem.data.pipeline import steps_per_epoch
from keras_jem.data.preprocessing import match_image_shape
from keras_jem.data.preprocessing import to_model_range
from keras_jem.data.registry import DatasetInfo
from keras_jem.data.registry import available
from keras_jem.data.registry import get_info
