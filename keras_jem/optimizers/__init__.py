"""Optimizer-side training rules: SAM and ASAM, and the papers' learning-rate schedule."""

from keras_jem.optimizers.sam import SAM
from keras_jem.optimizers.schedules import WarmupPiecewiseConstant
from keras_jem.optimizers.sharpness_aware_model import SharpnessAwareModel
from keras_jem.optimizers.clipped_adam import ClippedAdam
