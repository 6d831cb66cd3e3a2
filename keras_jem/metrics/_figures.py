"""Matplotlib helpers that never touch the global pyplot backend."""

import os


def new_figure(figsize=(5.0, 4.0), dpi=100):
    """Return a `(figure, axes)` pair drawn with the Agg canvas.

    `matplotlib.figure.Figure` with an explicit Agg canvas works headless and leaves the
    user's `pyplot` backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    return figure, axes


def save_figure(figure, path):
    """Write `figure` as a PNG to `path` (parent folders are created) and return the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
