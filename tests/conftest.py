import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# The fixtures holding the results of a two-device checks script (`tests/NAME_checks.py`, run by
# `tests/two_device_checks.py`), in the order the tests reading them run.
TWO_DEVICE_FIXTURES = {"two_replicas": "distribute", "fifo_two_replicas": "fifo",
                       "mirrored": "modes"}


def pytest_addoption(parser):
    parser.addoption(
        "--run_large", action="store_true", default=False, help="run tests marked large"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run_large"):
        return
    skip_large = pytest.mark.skip(reason="large test: pass --run_large to run it")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip_large)


def pytest_collection_finish(session):
    """Starts the two-device checks that the selected tests read, in one background process.

    They run in a fresh interpreter anyway (the CPU must be split before TensorFlow starts) and
    use about one core for a minute and a half while the tests before theirs keep the other.
    """
    if session.config.option.collectonly:
        return
    needed = {TWO_DEVICE_FIXTURES[name] for item in session.items
              if "large" not in item.keywords or session.config.getoption("--run_large")
              for name in getattr(item, "fixturenames", ()) if name in TWO_DEVICE_FIXTURES}
    if needed:
        from tests import testing

        testing.start_two_device_checks(
            [name for name in TWO_DEVICE_FIXTURES.values() if name in needed])


def pytest_sessionfinish(session):
    testing = sys.modules.get("tests.testing")
    if testing is not None:
        testing.stop_two_device_checks()


@pytest.fixture(scope="session")
def two_replicas():
    """`tests/distribute_checks.py`'s results (`tests/test_distribute.py`)."""
    from tests import testing

    return testing.two_device_results("distribute")


@pytest.fixture(scope="session")
def fifo_two_replicas():
    """`tests/fifo_checks.py`'s results (`tests/test_fifo_buffer.py`)."""
    from tests import testing

    return testing.two_device_results("fifo")


@pytest.fixture(scope="session")
def mirrored():
    """`tests/modes_checks.py`'s results (`tests/test_modes.py`)."""
    from tests import testing

    return testing.two_device_results("modes")
