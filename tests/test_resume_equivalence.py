"""Resume equivalence: a run killed mid-epoch and resumed ends exactly where an uninterrupted run
with the same seed ends (weights, replay buffer, optimizer state, random state).

The resume tests of `test_fault_tolerance.py` check *where* a resumed run starts (position,
weights, seeds); only the end state shows that it also trains on the *same batches*: a resumed
run that replayed its interrupted epoch's data from the beginning, or skipped batches, lands
elsewhere. The `python -m trainers.fit` version (SIGKILL mid-epoch, same command again) is
`test_fault_tolerance.test_sigkill_mid_epoch_then_same_command_resumes_...`, which also
compares against an uninterrupted run.
"""

import keras
import numpy as np

from keras_jem import checkpointing
from keras_jem import data
from tests import testing

STEPS, EPOCHS, SAVE_FREQ = 5, 3, 2
KILLED_AFTER = 8  # global step: epoch 1, step 3; the newest backup is at step 7 (epoch 1, step 2)


def make_run():
    """A fresh tiny JEM (Adam, SGLD with buffer reinit) and the real two-stream digits pipeline:
    shuffled, cropped and noised with its own seed, so every batch is different."""
    keras.utils.set_random_seed(3)
    images, labels = testing.load_digits(num_examples=160)

    def dataset():
        return data.make_train_dataset(images, labels, batch_size=16, augment="crop",
                                       augment_px=True, noise_scale=0.03, seed=3)

    model = testing.make_model(buffer_size=40, sampler=testing.tiny_sgld(num_steps=2),
                               reinit_probability=0.3)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model, dataset


def final_state(model):
    return {
        "weights": [testing.to_numpy(v).copy() for v in model.trainable_variables],
        "buffer": testing.to_numpy(model.buffer.images).copy(),
        "optimizer": [testing.to_numpy(v).copy() for v in model.optimizer.variables],
        "seeds": [testing.to_numpy(v).tolist()
                  for v in checkpointing.seed_generator_states(model)],
    }


class Killed(Exception):
    pass


class Kill(keras.callbacks.Callback):
    """Raises right after global step `step`: `fit` ends at once, with no epoch-end callback
    and no backup, so the steps trained since the last backup are lost, as with SIGKILL.
    (`stop_training` would end the epoch, and the backup would save at its end.)"""

    def __init__(self, backup, step):
        super().__init__()
        self.backup, self.step = backup, step

    def on_train_batch_end(self, batch, logs=None):
        if self.backup.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


class ResumeEquivalenceTest(testing.TestCase):
    def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(self):
        model, dataset = make_run()
        backup = checkpointing.StepBackup(self.get_temp_dir() + "/straight", save_freq=SAVE_FREQ,
                                          steps_per_epoch=STEPS)
        checkpointing.fit_from_backup(model, dataset, backup, epochs=EPOCHS, verbose=0)
        expected = final_state(model)
        self.assertEqual(backup.global_step, STEPS * EPOCHS)

        # The same run, killed after step 8 (mid-epoch, one step after its newest backup).
        keras.backend.clear_session()
        root = self.get_temp_dir() + "/killed"
        model, dataset = make_run()
        backup = checkpointing.StepBackup(root, save_freq=SAVE_FREQ, steps_per_epoch=STEPS)
        with self.assertRaises(Killed):
            checkpointing.fit_from_backup(model, dataset, backup, epochs=EPOCHS, verbose=0,
                                          callbacks=[backup, Kill(backup, KILLED_AFTER)])
        self.assertEqual(backup.global_step, KILLED_AFTER)
        killed = final_state(model)

        # A new process: fresh model and pipeline, restore, train to the end.
        keras.backend.clear_session()
        model, dataset = make_run()
        backup = checkpointing.StepBackup(root, save_freq=SAVE_FREQ, steps_per_epoch=STEPS)
        metadata = backup.restore(model)
        self.assertEqual((metadata["epoch"], metadata["step"]), (1, 2))  # mid-epoch
        checkpointing.fit_from_backup(model, dataset, backup, epochs=EPOCHS, verbose=0)
        self.assertEqual(backup.global_step, STEPS * EPOCHS)
        resumed = final_state(model)

        # Control: the runs moved far from where the kill left them, so equality means
        # something (and float noise is far below the differences a wrong batch makes).
        moved = max(np.abs(a - b).max() for a, b in zip(killed["weights"], expected["weights"]))
        self.assertGreater(moved, 1e-3)
        for key in ("weights", "optimizer"):
            for index, (actual, wanted) in enumerate(zip(resumed[key], expected[key])):
                np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{key} {index}")
        np.testing.assert_allclose(resumed["buffer"], expected["buffer"], rtol=1e-5, atol=1e-6)
        self.assertEqual(resumed["seeds"], expected["seeds"])
