"""Tests of keras_jem.sampling.FIFOReplayBuffer, the official IGEBM code's replay buffer.

Every expected value is computed here in numpy from the formulas of `openai/ebm_code_release`
(`train.py`: `compress_x_mod`, `decompress_x_mod`, the FIFO `ReplayBuffer` and its draws), mapped
from [0, 1] to the buffer's `value_range`.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_jem.models.igebm import IGEBM
from keras_jem.sampling import FIFOReplayBuffer
from keras_jem.sampling import ReplayBuffer
from tests import testing

_seed = testing.stateless_seed


def _buffer(image_shape=(1, 1, 1), **kwargs):
    return testing.built_buffer(FIFOReplayBuffer, image_shape, **kwargs)


def numpy_codes(x, low=-1.0, high=1.0):
    """The official `uint8(256 * clip(p, 0, 1))` on p = (x - low) / (high - low), with the top
    value clipped to 255 instead of wrapping to 0."""
    p = (np.asarray(x, np.float64) - low) / (high - low)
    return np.minimum(np.floor(256 * np.clip(p, 0, 1)), 255).astype(np.uint8)


def centre(code, low=-1.0, high=1.0):
    """The value in the middle of a code's bin."""
    return low + (high - low) * (np.asarray(code, np.float64) + 0.5) / 256


def constant_images(codes, image_shape=(1, 1, 1)):
    """One image per code, every pixel at the centre of that code's bin."""
    codes = np.asarray(codes)
    return np.broadcast_to(centre(codes).reshape((-1, 1, 1, 1)),
                           (len(codes),) + image_shape).astype(np.float32)


class CodesTest(testing.TestCase):
    def test_codes_and_decoding_follow_the_official_formulas(self):
        rng = np.random.default_rng(0)
        x = np.concatenate([
            rng.uniform(-1, 1, 2000),
            [-1.0, 1.0, 0.0, -1.5, 1.5, np.nextafter(1.0, 0.0)],
            -1.0 + 2.0 * np.arange(256) / 256,  # the bin edges
        ]).astype(np.float32)
        buffer = _buffer()
        codes = testing.to_numpy(buffer.encode(x))
        self.assertEqual(codes.dtype, np.uint8)
        np.testing.assert_array_equal(codes, numpy_codes(x))
        # The top of the range is code 255: the official uint8(256) would wrap it to 0.
        np.testing.assert_array_equal(codes[2000:2005], [0, 255, 128, 0, 255])
        np.testing.assert_array_equal(codes[2006:], np.arange(256))  # every code is used
        # Bin centres, and the dequantised draw U(0, 1) inside each bin.
        all_codes = np.arange(256, dtype=np.uint8)
        self.assertAllClose(buffer.decode(all_codes), centre(all_codes), atol=1e-6, rtol=0)
        offsets = rng.uniform(0, 1, 256).astype(np.float32)
        self.assertAllClose(buffer.decode(all_codes, offsets),
                            -1.0 + 2.0 * (all_codes + offsets) / 256, atol=1e-6, rtol=0)
        # Decoding then encoding a centre gives the same code back.
        np.testing.assert_array_equal(buffer.encode(buffer.decode(all_codes)), all_codes)
        # Another value range maps onto the same 256 codes.
        shifted = _buffer(value_range=(0.0, 1.0))
        p = rng.uniform(0, 1, 500).astype(np.float32)
        np.testing.assert_array_equal(shifted.encode(p), numpy_codes(p, 0.0, 1.0))
        self.assertEqual(int(testing.to_numpy(shifted.encode([1.0]))[0]), 255)


class RingTest(testing.TestCase):
    def test_first_in_first_out(self):
        buffer = _buffer(size=5)
        self.assertEqual((buffer.images.dtype, buffer.num_written.dtype), ("uint8", "int64"))
        self.assertEqual(buffer.trainable_weights, [])
        self.assertEqual(testing.to_numpy(buffer.stored_images()).shape, (0, 1, 1, 1))
        # Three batches of two into five slots: the sixth image overwrites the first.
        for batch in ([0, 1], [2, 3], [4, 5]):
            buffer.write(None, constant_images(batch))
        expected_ring = [5, 1, 2, 3, 4]
        np.testing.assert_array_equal(testing.to_numpy(buffer.images).ravel(), expected_ring)
        self.assertEqual(int(buffer.num_written.numpy()), 6)
        self.assertAllClose(testing.to_numpy(buffer.stored_images()).ravel(),
                            centre(expected_ring), atol=1e-6, rtol=0)
        # A batch larger than the ring: its last five images, each at its ring position
        # (images 6..12 of the stream, codes 10..16, go to positions 1, 2, 3, 4, 0, 1, 2:
        # 10 and 11 are overwritten by 15 and 16).
        buffer.write(np.arange(7), constant_images(np.arange(10, 17)))  # indices are ignored
        np.testing.assert_array_equal(testing.to_numpy(buffer.images).ravel(),
                                      [14, 15, 16, 12, 13])
        self.assertEqual(int(buffer.num_written.numpy()), 13)
        # In a tf.function, as in train_step: images 13 and 14 go to positions 3 and 4.
        tf.function(lambda x: buffer.write(None, x))(constant_images([20, 21]))
        np.testing.assert_array_equal(testing.to_numpy(buffer.images).ravel(),
                                      [14, 15, 16, 20, 21])
        buffer.reset()
        self.assertEqual(int(buffer.num_written.numpy()), 0)
        self.assertEqual(len(testing.to_numpy(buffer.stored_images())), 0)

    def test_draws_only_from_the_filled_part_with_replacement(self):
        buffer = _buffer(size=100, reinit_probability=0.0)
        stored = np.arange(30) * 8 + 3  # 30 distinct codes, far apart
        buffer.write(None, constant_images(stored))
        seen = set()
        duplicates = 0
        for seed in range(40):
            indices, images, reinitialized = buffer.draw(20, seed=_seed(seed))
            indices, images = testing.to_numpy(indices), testing.to_numpy(images).ravel()
            self.assertFalse(testing.to_numpy(reinitialized).any())
            self.assertAllInRange(indices, 0, 29)
            # Each start is its stored image dequantised inside the code's bin.
            low = -1.0 + 2.0 * stored[indices] / 256
            self.assertTrue(np.all(images >= low - 1e-6) and np.all(images < low + 2 / 256),
                            (images, low))
            seen.update(indices.tolist())
            duplicates += 20 - len(set(indices.tolist()))
        self.assertEqual(seen, set(range(30)))
        self.assertGreater(duplicates, 0)  # with replacement (20 of 30: repeats are certain)
        # The same seed draws the same starts.
        self.assertAllEqual(buffer.draw(8, seed=_seed(3))[1], buffer.draw(8, seed=_seed(3))[1])

    def test_all_starts_are_noise_until_more_than_a_batch_is_stored(self):
        # Official train.py: buffer samples only `if len(replay_buffer) > batch_size`.
        buffer = _buffer(image_shape=(4, 4, 1), size=100, reinit_probability=0.0)
        for stored in (0, 5, 8, 9):
            buffer.reset()
            if stored:
                buffer.write(None, np.full((stored, 4, 4, 1), 0.5, np.float32))
            _, images, reinitialized = buffer.draw(8, seed=_seed(stored))
            images = testing.to_numpy(images).reshape(8, -1)
            reinitialized = testing.to_numpy(reinitialized)
            if stored <= 8:
                self.assertTrue(reinitialized.all(), stored)
                self.assertGreater(images.std(axis=1).min(), 0.3)  # U(-1, 1) per image
            else:
                self.assertFalse(reinitialized.any())
                self.assertAllClose(images, np.full_like(images, 0.5), atol=2 / 256)

    def test_reinit_fraction(self):
        buffer = _buffer(image_shape=(2, 2, 1), size=5000)
        buffer.write(None, np.full((5000, 2, 2, 1), 0.5, np.float32))
        flags, fresh_rows, kept_rows = [], [], []
        for seed in range(5):
            _, images, reinitialized = buffer.draw(4000, seed=_seed(seed))
            images = testing.to_numpy(images).reshape(4000, -1)
            reinitialized = testing.to_numpy(reinitialized)
            flags.append(reinitialized)
            fresh_rows.append(images[reinitialized])
            kept_rows.append(images[~reinitialized])
        # Binomial(20000, 0.05): standard deviation 0.0015, so 0.006 is four of them.
        self.assertAllClose(np.concatenate(flags).mean(), 0.05, atol=0.006)
        kept = np.concatenate(kept_rows)
        self.assertAllClose(kept, np.full_like(kept, 0.5), atol=2 / 256)
        fresh = np.concatenate(fresh_rows)
        self.assertAllClose(fresh.mean(), 0.0, atol=0.05)  # U(-1, 1), not the stored 0.5
        self.assertAllClose(fresh.var(), 1 / 3, atol=0.03)

    def test_arguments_and_config(self):
        with self.assertRaisesRegex(ValueError, "uniform noise only.*gaussian_mixture.*"
                                                "buffer_type='persistent'"):
            FIFOReplayBuffer(initialization="gaussian_mixture", num_classes=3)
        buffer = _buffer(size=10, num_classes=3)
        with self.assertRaisesRegex(ValueError, "class-agnostic.*labels=None"):
            buffer.draw(4, labels=tf.constant([0, 1, 2, 0]))
        with self.assertRaisesRegex(ValueError, "holds 10 chains, fewer than the batch of 11"):
            buffer.draw(11)
        config = buffer.get_config()
        json.dumps(config)
        restored = keras.saving.deserialize_keras_object(
            json.loads(json.dumps(keras.saving.serialize_keras_object(buffer))))
        self.assertIsInstance(restored, FIFOReplayBuffer)
        self.assertEqual(restored.get_config(), config)
        self.assertTrue(buffer.is_adapted)

    def test_stored_images_of_the_persistent_buffer_are_its_chains(self):
        persistent = ReplayBuffer(size=7, seed=1)
        persistent.build((2, 2, 1))
        stored = testing.to_numpy(persistent.stored_images())
        self.assertEqual(stored.dtype, np.float32)
        np.testing.assert_array_equal(stored, testing.to_numpy(persistent.images))


def test_both_replicas_samples_are_kept(fifo_two_replicas):
    # `tests/fifo_checks.py`'s results (fixture in `tests/conftest.py`, computed in the
    # background from the start of the session).
    results = fifo_two_replicas
    assert results["num_replicas"] == 2
    ring = results.get("ring")
    assert ring is not None
    assert "error" not in ring, ring.get("traceback")
    # Replica r writes the codes 10 * step + 3 * r + (0, 1, 2); the all-gathered batch is
    # replica 0's then replica 1's, appended to a ring of 8: step 0 writes 0-5 at positions
    # 0-5, step 1 writes 10-15 at positions 6, 7, 0, 1, 2, 3.
    expected = [12, 13, 14, 15, 4, 5, 10, 11]
    assert ring["copies"] == [expected, expected]
    assert ring["num_written"] == [12, 12]
    # The two replicas draw different starts from the same ring.
    first, second = ring["draws"]
    assert first != second
    model = results.get("model")
    assert "error" not in model, model.get("traceback")
    assert model["num_written"] == [16, 16]  # 2 steps of a global batch of 8
    assert model["copies_identical"]


class IGEBMBufferTest(testing.TestCase):
    def _model(self, **kwargs):
        from tests.test_igebm import make_igebm

        return make_igebm(num_steps=1, buffer_size=24, **kwargs)

    def test_igebm_default_buffer_is_fifo_and_round_trips(self):
        model = self._model()
        self.assertEqual(model.buffer_type, "fifo")
        self.assertIsInstance(model.buffer, FIFOReplayBuffer)
        self.assertEqual(model.get_config()["buffer_type"], "fifo")
        model.compile(optimizer=keras.optimizers.Adam(1e-3, beta_1=0.0))
        images, labels = testing.load_digits("train", 32)
        model.fit(images, labels, batch_size=8, epochs=1, steps_per_epoch=4, verbose=0)
        self.assertEqual(int(model.buffer.num_written.numpy()), 32)  # 4 steps of 8 appended
        path = os.path.join(self.get_temp_dir(), "fifo.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertIsInstance(loaded.buffer, FIFOReplayBuffer)
        np.testing.assert_array_equal(testing.to_numpy(loaded.buffer.images),
                                      testing.to_numpy(model.buffer.images))
        self.assertEqual(int(loaded.buffer.num_written.numpy()), 32)
        # Other models keep persistent chains; configs saved before `buffer_type` existed
        # describe the persistent buffer.
        config = model.get_config()
        del config["buffer_type"]
        self.assertEqual(IGEBM.from_config(config).buffer_type, "persistent")
        import keras_jem

        jem = testing.make_model(keras_jem.JEM, build=False)
        self.assertEqual(jem.buffer_type, "persistent")
        self.assertIsInstance(jem.buffer, ReplayBuffer)
        self.assertNotIsInstance(jem.buffer, FIFOReplayBuffer)

    def test_bad_buffer_settings(self):
        with self.assertRaisesRegex(ValueError, "buffer_type.*Received: buffer_type='ring'"):
            self._model(buffer_type="ring")
        from tests.test_igebm import make_igebm

        # A size that class blocks accept: only the FIFO's class-agnosticism is in the way.
        with self.assertRaisesRegex(ValueError, "class-agnostic.*buffer_type='persistent'"):
            make_igebm(buffer_size=30, class_blocks=True)
        self.assertTrue(make_igebm(buffer_size=30, class_blocks=True,
                                   buffer_type="persistent").class_blocks)

    def test_sample_grid_and_sampling_from_the_fifo(self):
        from keras_jem import callbacks

        model = self._model(conditional=False)
        directory = self.get_temp_dir()
        grid = callbacks.SampleGrid(os.path.join(directory, "empty"), num_per_class=2)
        grid.set_model(model)
        grid.on_epoch_end(0)  # nothing stored yet: fresh chains instead
        self.assertTrue(os.path.exists(grid.last_path))
        model.buffer.write(None, constant_images(np.arange(40), (8, 8, 1)))
        grid = callbacks.SampleGrid(os.path.join(directory, "stored"), num_per_class=2)
        grid.set_model(model)
        grid.on_epoch_end(0)
        self.assertTrue(os.path.exists(grid.last_path))
        # `sample(from_buffer=True)` starts from the ring and appends its samples.
        samples = model.sample(num_samples=4, from_buffer=True, num_steps=0, seed=1)
        self.assertEqual(int(model.buffer.num_written.numpy()), 44)
        stored = set(range(16, 40))  # the last 24 codes written
        codes = numpy_codes(testing.to_numpy(samples)[:, 0, 0, 0])
        restarted = ~np.isin(codes, sorted(stored))
        self.assertLessEqual(int(restarted.sum()), 1)  # 5% restarts: rarely one of four

    def test_presets_and_flag(self):
        from trainers import factory
        from trainers import fit
        from trainers import presets

        config = presets.resolve("igebm", "digits")
        self.assertEqual((config["buffer_type"], config["noise_first"]), ("fifo", True))
        self.assertIsInstance(factory.build_model(config, num_classes=10).buffer,
                              FIFOReplayBuffer)
        self.assertTrue(factory.build_sampler(config).noise_first)
        for model in ("jem", "jempp", "sadajem", "gmmc"):
            self.assertEqual(presets.resolve(model, "digits")["buffer_type"], "persistent")
        config, _ = fit.resolve_config(["--model", "igebm", "--buffer_type", "persistent",
                                        "--no-noise_first"])
        self.assertEqual(presets.sections(config)["model"]["buffer_type"], "persistent")
        self.assertFalse(factory.build_sampler(config).noise_first)
        with self.assertRaisesRegex(fit.ConfigError, "buffer_type.*'ring'"):
            factory.build_model(dict(config, buffer_type="ring"), num_classes=10)


@pytest.mark.parametrize("buffer_class", [ReplayBuffer, FIFOReplayBuffer])
def test_build_takes_the_shape_of_one_image(buffer_class):
    buffer = buffer_class(size=4)
    with pytest.raises(ValueError, match=rf"^{buffer_class.__name__}\.build expects the shape of "
                       r"one image \(height, width, channels\)\. Received: \(2, 8, 8, 1\)"):
        buffer.build((2, 8, 8, 1))
    buffer.build([8, 8, 1])
    assert buffer.image_shape == (8, 8, 1) and tuple(buffer.images.shape) == (4, 8, 8, 1)
