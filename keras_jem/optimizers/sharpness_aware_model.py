"""A model wrapper that trains any Keras model with SAM/ASAM."""

import keras
import tensorflow as tf

from keras_jem.optimizers.gradient_steps import add_coupled_weight_decay
from keras_jem.optimizers.gradient_steps import non_trainable_state  # noqa: F401 (old path)
from keras_jem.optimizers.gradient_steps import sharpness_aware_gradients
from keras_jem.optimizers.sam import SAM
from keras_jem.optimizers.sam import deserialize


@keras.saving.register_keras_serializable(package="keras_jem")
class SharpnessAwareModel(keras.Model):
    """Trains a wrapped model with sharpness-aware minimisation.

    Any compiled Keras loss works: the wrapped model's forward pass and the compiled loss run
    twice per step (at `w` and at `w + e(w)`), and the optimizer applies the second gradients at
    the restored weights. BatchNorm moving statistics are updated only by the first pass, as in
    SADA-JEM (the second pass sees the same batch at perturbed weights).

    The JEM-family models take `sam=SAM(...)` directly, so that the energy terms and the sampler
    share the two passes; this wrapper is for plain classifiers (e.g. the softmax baseline).

    Args:
        model: the Keras model to train.
        sam: a `SAM` instance (default `SAM(rho=0.05)`).
        weight_decay: coupled L2 weight decay added to the gradients before the optimizer
            (PyTorch's `SGD(weight_decay=...)`; see `add_coupled_weight_decay`), 0 for none.

    Example:

    >>> model = SharpnessAwareModel(classifier, sam=SAM(rho=2.0, adaptive=True))
    >>> model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    >>> model.fit(x, y)
    """

    def __init__(self, model, sam=None, weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        if not weight_decay >= 0:
            raise ValueError(
                f"`weight_decay` must be non-negative. Received: weight_decay={weight_decay}")
        self.model = model
        self.sam = deserialize(sam) or SAM()
        self.weight_decay = float(weight_decay)

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def _loss(self, x, y, sample_weight):
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                 training=True)
        return loss, y_pred

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, y_pred = self._loss(x, y, sample_weight)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, variables)

        def perturbed_gradients():
            with tf.GradientTape() as tape:
                perturbed_loss, _ = self._loss(x, y, sample_weight)
                perturbed_loss = self.optimizer.scale_loss(perturbed_loss)
            return tape.gradient(perturbed_loss, variables)

        gradients = sharpness_aware_gradients(
            self.sam, variables, gradients, perturbed_gradients, self.model)
        gradients = add_coupled_weight_decay(
            self.optimizer, gradients, variables, self.weight_decay)
        self.optimizer.apply(gradients, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "sam": keras.saving.serialize_keras_object(self.sam),
                "weight_decay": self.weight_decay,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        config["sam"] = deserialize(config["sam"])
        return cls(**config)
