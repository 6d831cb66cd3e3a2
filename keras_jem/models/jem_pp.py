"""JEM++ (Yang & Ji, ICCV 2021): informative init, proximal sampler, BatchNorm."""

import keras

from keras_jem import sampling
from keras_jem.models.jem import JEM


@keras.saving.register_keras_serializable(package="keras_jem")
class JEMPP(JEM):
    """JEM++: JEM with an informative buffer init and the proximal clipped sampler.

    Differences from `JEM` (ALGORITHMS.md section 2), all as defaults that can be overridden:

    - `buffer_init="gaussian_mixture"`: chains start (and restart, with probability
      `reinit_probability`) from per-class Gaussians fitted to the training data. Call
      `model.adapt_buffer(images, labels)` once before `fit`.
    - `sampler=ProximalSGLD(num_steps=10, inner_steps=5, step_size=0.2)`: M full gradients, each
      followed by N clipped steps through the stem conv only, with x kept in [-1, 1] and no noise.
    - `sample_in_training_mode=True`: BatchNorm stays in training mode while sampling, which the
      informative init makes stable (use a backbone with `norm="batch"`).

    The paper trains with SGD (momentum 0.9, lr 0.1, coupled weight decay 4e-4, warm-up 1000
    iterations, lr x0.2 at epochs 50, 100, 125 of 150); see `trainers.presets`. The weight decay
    is the model's `weight_decay` argument (PyTorch's coupled decay, through momentum), not
    Keras' decoupled `SGD(weight_decay=...)`, which is about 10x weaker with momentum 0.9.

    Args:
        backbone: a `keras_jem.backbones` layer (JEM++ uses `WideResNet(norm="batch")`).
        num_classes: number of classes.
        **kwargs: any `JEM` argument.

    Example:

    >>> model = keras_jem.JEMPP(
    ...     backbone=keras_jem.backbones.WideResNet(28, 10, norm="batch"), num_classes=10,
    ...     weight_decay=4e-4)
    >>> model.adapt_buffer(train_images, train_labels)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> model.fit(train_ds, epochs=150, steps_per_epoch=703)
    """

    # ProximalSGLD's own defaults are the paper's (M=10, N=5, step 0.2, clip 1, x in [-1, 1]).
    default_sampler_class = sampling.ProximalSGLD

    def __init__(
        self,
        backbone,
        num_classes,
        sampler=None,
        buffer_init="gaussian_mixture",
        sample_in_training_mode=True,
        **kwargs,
    ):
        super().__init__(
            backbone,
            num_classes,
            sampler=sampler,
            buffer_init=buffer_init,
            sample_in_training_mode=sample_in_training_mode,
            **kwargs,
        )
