"""Optimizer-side training rules: SAM and ASAM, coupled weight decay, the papers' schedule,
and IGEBM's clipped Adam."""

from keras_jem.optimizers.clipped_adam import ClippedAdam
from keras_jem.optimizers.gradient_steps import add_coupled_weight_decay
from keras_jem.optimizers.gradient_steps import sharpness_aware_gradients
from keras_jem.optimizers.sam import SAM
from keras_jem.optimizers.schedules import WarmupPiecewiseConstant
from keras_jem.optimizers.sharpness_aware_model import SharpnessAwareModel
