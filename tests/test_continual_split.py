"""Class-incremental task splits."""

import numpy as np
import pytest

from keras_jem.data import continual


def test_split_mnist_tasks_are_disjoint_and_complete():
    labels = np.array([3, 0, 1, 9, 8, 2, 2, 5, 4, 6, 7, 1, 0])
    tasks = continual.class_incremental_tasks(labels, num_tasks=5)
    assert [classes for classes, _ in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    # By hand: task {0, 1} holds positions 1, 2, 11, 12; task {8, 9} positions 3 and 4.
    np.testing.assert_array_equal(tasks[0][1], [1, 2, 11, 12])
    np.testing.assert_array_equal(tasks[4][1], [3, 4])
    every = np.concatenate([index for _, index in tasks])
    assert sorted(every.tolist()) == list(range(len(labels)))
    for t, (classes, index) in enumerate(tasks):
        later = {c for cs, _ in tasks[t + 1:] for c in cs}
        assert not later & set(labels[index].tolist())
    assert continual.seen_so_far(tasks, 2) == (0, 1, 2, 3, 4, 5)


def test_custom_order_and_errors():
    labels = np.repeat(np.arange(4), 3)
    tasks = continual.class_incremental_tasks(labels, num_tasks=2, class_order=[3, 1, 0, 2])
    assert [c for c, _ in tasks] == [(3, 1), (0, 2)]
    with pytest.raises(ValueError, match="divide the 4 classes"):
        continual.class_incremental_tasks(labels, num_tasks=3)
    with pytest.raises(ValueError, match="each class present"):
        continual.class_incremental_tasks(labels, num_tasks=2, class_order=[0, 1, 2])
