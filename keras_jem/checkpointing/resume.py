"""`fit_from_backup`: `model.fit` resumed at a `StepBackup`'s epoch and step."""

import logging

logger = logging.getLogger("keras_jem.checkpointing")


def fit_from_backup(model, dataset, backup, epochs, callbacks=(), **kwargs):
    """Runs `model.fit` from the backup's position up to `epochs`; returns the `History`s.

    A backup mid-epoch `e` at step `s` is continued by one `fit` over the remaining
    `steps_per_epoch - s` steps of epoch `e` (`initial_epoch=e`), then one over the following
    epochs. The data stream is resumed by skipping the `global_step` batches already trained on,
    so `dataset` must be infinite and deterministic, as `keras_jem.data.make_train_dataset`
    makes it.

    Pass a function that builds the dataset rather than the dataset itself. A `tf.data`
    pipeline that reshuffles or re-randomizes per iteration (`shuffle(...,
    reshuffle_each_iteration=True)`, `Dataset.random(rerandomize_each_iteration=True)`, as in
    `make_train_dataset`) draws *new* randomness for every iterator made from the same
    `Dataset` object: the second `fit` of a resumed run would train on other batches than the
    uninterrupted run (measured: different batches from the first one on). A fresh `Dataset`
    per `fit` starts from the same randomness as the uninterrupted run's single iterator.

    Args:
        model: a compiled model whose state matches `backup` (call `backup.restore(model)`).
        dataset: a function returning the training dataset (global batches), or the dataset
            itself (then only one `fit` call is guaranteed to see the uninterrupted run's
            batches; a warning says when more are needed).
        backup: the run's `StepBackup` (its `steps_per_epoch` is required); it is added to the
            callbacks unless already there.
        epochs: total number of epochs of the run.
        callbacks: other callbacks.
        **kwargs: other `fit` arguments (`validation_data`, `verbose`, ...).

    Example:

    >>> make_dataset = lambda: keras_jem.data.make_train_dataset(x, y, seed=0)
    >>> backup.restore(model)
    >>> fit_from_backup(model, make_dataset, backup, epochs=200)
    """
    steps = backup.steps_per_epoch
    if not steps:
        raise ValueError("`fit_from_backup` needs a backup with `steps_per_epoch`.")
    make_dataset = dataset if callable(dataset) else (lambda: dataset)
    callbacks = list(callbacks)
    if backup not in callbacks:
        callbacks.append(backup)
    histories = []
    model.stop_training = False
    while backup.epoch < epochs:
        epoch, step = backup.epoch, backup.step
        if histories and not callable(dataset):
            logger.warning("fit_from_backup runs a second `fit` on the same tf.data.Dataset "
                           "object: a pipeline that reshuffles per iteration yields other "
                           "batches than an uninterrupted run would. Pass a function that "
                           "builds the dataset.")
        source = make_dataset()
        data = source.skip(backup.global_step) if backup.global_step else source
        if step:
            logger.info("resuming epoch %d at step %d", epoch + 1, step + 1)
        history = model.fit(
            data, initial_epoch=epoch, epochs=epoch + 1 if step else epochs,
            steps_per_epoch=steps - step, callbacks=callbacks,
            # The pipeline shuffles itself; Keras' default shuffle=True only warns on tf.data.
            shuffle=False, **kwargs,
        )
        histories.append(history)
        if model.stop_training or backup.global_step == (epoch * steps + step):
            break
    return histories
