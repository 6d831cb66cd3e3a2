"""The keras-jem test suite (a regular package, so `from tests import testing` finds this one).

tf-keras-vis 0.8.7 installs a top-level `tests` package into site-packages; a regular package
anywhere on `sys.path` wins over a namespace package, so without this file that one shadowed ours.
"""
