"""SADA-JEM (Yang, Su & Ji, CVPR 2023): sharpness-aware, augmentation kept out of p(x)."""

from typing import ClassVar

import keras

from keras_jem import sampling
from keras_jem.models.jem_pp import JEMPP


@keras.saving.register_keras_serializable(package="keras_jem")
class SADAJEM(JEMPP):
    """SADA-JEM: JEM++ with SAM over the whole loss, plain SGLD and a clean likelihood stream.

    SADA-JEM keeps JEM++'s Gaussian-mixture buffer (`buffer_init="gaussian_mixture"`, call
    `adapt_buffer` before `fit`) and its BatchNorm in training mode while sampling. Differences
    from `JEMPP` (ALGORITHMS.md section 3), as overridable defaults:

    - `sam=SAM(rho=2.0, adaptive=True)` (ASAM, the reference code's default): every step is two
      forward/backward passes over the whole loss (likelihood and cross-entropy), the second at
      perturbed weights, reusing the same samples; the second pass does not update BatchNorm
      statistics.
    - `sampler=SGLD(num_steps=5, step_size=1, noise_scale=0, gradient_clip=1,
      clip_range=(-1, 1))`, unconditional, in place of JEM++'s proximal sampler.
    - `divergence_threshold=1e5`.

    The paper's SGD uses a coupled weight decay of 5e-4: pass it as the model's `weight_decay`
    (through momentum, as PyTorch), not as Keras' decoupled `SGD(weight_decay=...)`.

    Data augmentation belongs to the cross-entropy stream only: train on
    `keras_jem.data.make_train_dataset(..., augment="crop_flip", augment_px=False,
    batch_size=128, px_batch_size=64)`, which yields `{"images": augmented, "px_images": clean}`.

    Args:
        backbone: a `keras_jem.backbones` layer (SADA-JEM uses `WideResNet(norm="batch")`).
        num_classes: number of classes.
        divergence_threshold: loss or energy magnitude reported as `diverged` (the paper's
            guard, 1e5).
        **kwargs: any `JEMPP` (and so `JEM`) argument, e.g. `sam=None` to train without SAM.

    Example (augmented cross-entropy batches of 128, clean likelihood batches of 64):

    >>> train_ds = keras_jem.data.make_train_dataset(train_images, train_labels,
    ...     batch_size=128, px_batch_size=64, augment="crop_flip", augment_px=False)
    >>> model = keras_jem.SADAJEM(keras_jem.backbones.WideResNet(28, 10, norm="batch"), 10,
    ...                           weight_decay=5e-4)             # SAM(rho=2, adaptive) default
    >>> model.adapt_buffer(train_images, train_labels)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> model.fit(train_ds, epochs=200, steps_per_epoch=390)
    """

    default_sampler_class = sampling.SGLD
    default_sampler_config: ClassVar[dict] = {
        "num_steps": 5, "noise_scale": 0.0, "gradient_clip": 1.0, "clip_range": (-1.0, 1.0)}
    default_sam_config: ClassVar[dict] = {"rho": 2.0, "adaptive": True}

    def __init__(self, backbone, num_classes, divergence_threshold=1e5, **kwargs):
        super().__init__(backbone, num_classes, divergence_threshold=divergence_threshold,
                         **kwargs)
