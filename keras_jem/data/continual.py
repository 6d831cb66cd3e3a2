"""Class-incremental task splits for continual learning (Split MNIST style)."""

import numpy as np


def class_incremental_tasks(labels, num_tasks=5, class_order=None):
    """Splits a labelled set into tasks of disjoint classes, returned as index arrays.

    The classes (in `class_order`, default ascending) are cut into `num_tasks` equal groups:
    Split MNIST's 5 tasks are {0, 1}, {2, 3}, ..., {8, 9}. Task `t` holds exactly the examples
    whose label is in its group, so no example of an earlier task can reach a later one.

    Args:
        labels: integer labels `(N,)`.
        num_tasks: number of tasks; must divide the number of classes (5).
        class_order: the classes in the order they arrive (default: sorted unique labels).

    Returns:
        A list of `(classes, indices)` pairs, one per task: the task's classes (a tuple) and the
        indices of its examples in `labels` (ascending).

    Example:

    >>> tasks = class_incremental_tasks(train_labels, num_tasks=5)
    >>> for classes, index in tasks:
    ...     model.fit(train_images[index], train_labels[index], epochs=1)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`labels` must be a vector of class ids. Received shape {labels.shape}.")
    present = np.unique(labels)
    if class_order is None:
        class_order = present
    class_order = [int(c) for c in class_order]
    if sorted(class_order) != [int(c) for c in present]:
        raise ValueError(
            f"`class_order` must list each class present in `labels` once. Received "
            f"{class_order}; the labels hold {present.tolist()}."
        )
    if int(num_tasks) != num_tasks or num_tasks < 1 or len(class_order) % num_tasks:
        raise ValueError(
            f"`num_tasks` must divide the {len(class_order)} classes into equal groups. "
            f"Received num_tasks={num_tasks}."
        )
    per_task = len(class_order) // int(num_tasks)
    tasks = []
    for start in range(0, len(class_order), per_task):
        classes = tuple(class_order[start:start + per_task])
        tasks.append((classes, np.flatnonzero(np.isin(labels, classes))))
    return tasks


def seen_so_far(tasks, task_index):
    """The classes of tasks `0..task_index` (what a class-incremental test covers after it)."""
    return tuple(c for classes, _ in tasks[: task_index + 1] for c in classes)
