"""Model versions: loading, polling the base paths, retries, retirement and lookup."""

import logging
import os
import threading
import time

import grpc
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.config import model_server_config_pb2

from keras_jem.export import list_versions
from serving.errors import ServingError
from serving.errors import invalid
from serving.servable import ServableVersion

logger = logging.getLogger("serving.model_manager")

def version_fingerprint(path):
    """(relative path, size, mtime) of every file under `path`: changes when files do."""
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


class _Failure:
    __slots__ = ("attempts", "fingerprint", "message", "retry_at")

    def __init__(self, fingerprint, message, attempts, retry_at):
        self.fingerprint, self.message = fingerprint, message
        self.attempts, self.retry_at = attempts, retry_at


class _ModelState:
    def __init__(self, config):
        self.config = config
        self.served = {}  # version -> ServableVersion
        self.failed = {}  # version -> _Failure
        self.ended = set()  # versions unloaded after having been served
        self.misses = 0  # consecutive polls that could not list the base path


class ModelManager:
    """Loads, serves and retires model versions found under the configured base paths.

    Like TF Serving, a poll that cannot list a base path (unmounted volume, permissions) is a
    failed poll: the loaded versions stay served, and are unloaded only after
    `unload_after_missed_polls` consecutive failures. A version that fails to load is retried
    `max_num_load_retries` times with exponential backoff starting at `load_retry_interval`
    seconds, and again whenever its files change.

    Args:
        model_configs: list of `tensorflow.serving.ModelConfig` protos (name, base_path,
            model_version_policy, version_labels), or None to discover the models as the
            subdirectories of `model_base_path` at every poll.
        model_base_path: the directory of models when `model_configs` is None.
        batching: None, or a `serving.batching.BatchingOptions`.
        warmup: a callable(servable) replaying the version's warmup requests, or None.
        loop: the asyncio event loop the batchers run on (required with `batching`).
        max_num_load_retries: retries of a version that failed to load (TF Serving: 5).
        load_retry_interval: seconds before the first retry; doubled at each further one.
        unload_after_missed_polls: consecutive failed listings before a model is unloaded.
        on_change: optional callable(model name, serving: bool) called after each poll.

    Example:

    ```python
    manager = ModelManager(model_base_path="models")
    manager.poll()
    servable = manager.resolve(request.model_spec)
    ```
    """

    def __init__(self, model_configs=None, model_base_path=None, batching=None, warmup=None,
                 loop=None, max_num_load_retries=5, load_retry_interval=2.0,
                 unload_after_missed_polls=3, on_change=None):
        if model_configs is None and model_base_path is None:
            raise ValueError("Pass `model_configs` or `model_base_path`.")
        self._static_configs = model_configs
        self._model_base_path = model_base_path
        self._batching = batching
        self.warmup = warmup
        self.loop = loop
        self.max_num_load_retries = int(max_num_load_retries)
        self.load_retry_interval = float(load_retry_interval)
        self.unload_after_missed_polls = max(1, int(unload_after_missed_polls))
        self.on_change = on_change
        self.drain_seconds = 30.0
        self._models = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()

    def _configs(self):
        """The model configs, or None when the base path could not be listed."""
        if self._static_configs is not None:
            return list(self._static_configs)
        try:
            names = sorted(os.listdir(self._model_base_path))
        except OSError as e:
            logger.warning(
                "Failed poll: cannot list --model_base_path %s (%s); still serving the loaded "
                "versions.", self._model_base_path, e.strerror or e,
            )
            return None
        configs = []
        for name in names:
            path = os.path.join(self._model_base_path, name)
            if not name.startswith(".") and os.path.isdir(path):
                configs.append(
                    model_server_config_pb2.ModelConfig(
                        name=name, base_path=path, model_platform="tensorflow"
                    )
                )
        return configs

    def poll(self):
        """Scan the base paths once; load new versions and retire replaced ones."""
        with self._poll_lock:
            configs = self._configs()
            names = set() if configs is None else {c.name for c in configs}
            with self._lock:
                gone = [s for n, s in self._models.items() if n not in names]
            for state in gone:  # a failed listing counts as a miss for every model
                state.misses += 1
                if state.misses >= self.unload_after_missed_polls:
                    logger.warning(
                        "Model %s has been missing for %d polls; unloading it.",
                        state.config.name, state.misses,
                    )
                    with self._lock:
                        self._models.pop(state.config.name, None)
                    for servable in state.served.values():
                        servable.unload(self.drain_seconds)
                    if self.on_change is not None:
                        self.on_change(state.config.name, False)
            for config in configs or ():
                with self._lock:
                    state = self._models.get(config.name)
                    if state is None:
                        state = self._models[config.name] = _ModelState(config)
                    state.config = config
                try:
                    self._sync(state)
                except Exception:
                    logger.exception("Error while polling model %s", config.name)
            if self.on_change is not None:
                for name, versions in self.served_summary().items():
                    self.on_change(name, bool(versions))

    def _sync(self, state):
        config = state.config
        base = config.base_path
        try:
            on_disk = list_versions(base, missing_ok=False)
        except OSError as e:
            state.misses += 1
            logger.warning(
                "Failed poll %d of model %s: cannot list %s (%s).", state.misses, config.name,
                base, e.strerror or e,
            )
            if state.misses < self.unload_after_missed_polls:
                return
            logger.warning("Unloading model %s after %d failed polls.", config.name, state.misses)
            on_disk = []
        else:
            state.misses = 0
        on_disk.sort(reverse=True)
        policy = config.model_version_policy.WhichOneof("policy_choice")
        if policy == "all":
            wanted, limit = on_disk, None
        elif policy == "specific":
            pinned = set(config.model_version_policy.specific.versions)
            wanted, limit = [v for v in on_disk if v in pinned], None
        else:
            limit = config.model_version_policy.latest.num_versions or 1
            wanted = on_disk

        keep = []
        for version in wanted:
            if limit is not None and len(keep) >= limit:
                break
            if version in state.served:
                keep.append(version)
                continue
            path = os.path.join(base, str(version))
            fingerprint = version_fingerprint(path)
            failed = state.failed.get(version)
            if failed is not None and failed.fingerprint == fingerprint and (
                failed.attempts > self.max_num_load_retries
                or time.monotonic() < failed.retry_at
            ):
                continue
            servable = self._load(config.name, version, path, fingerprint, state)
            if servable is not None:
                with self._lock:
                    state.served[version] = servable
                    state.failed.pop(version, None)
                    state.ended.discard(version)
                keep.append(version)
        retired = [v for v in state.served if v not in keep]
        with self._lock:
            retired_servables = [state.served.pop(v) for v in retired]
            state.ended.update(retired)
        for servable in retired_servables:
            logger.info("Unloading model %s version %d.", servable.name, servable.version)
            servable.unload(self.drain_seconds)
        for version in list(state.failed):
            if version not in on_disk:
                del state.failed[version]

    def _load(self, name, version, path, fingerprint, state):
        start = time.monotonic()
        servable = None
        try:
            servable = ServableVersion.load(name, version, path, self._batching, self.loop)
            if self.warmup is not None:
                self.warmup(servable)
        except Exception as e:  # noqa: BLE001 (a failed load skips the version)
            if servable is not None:
                servable.unload(self.drain_seconds)
            previous = state.failed.get(version)
            attempts = 1
            if previous is not None and previous.fingerprint == fingerprint:
                attempts = previous.attempts + 1
            retries_left = self.max_num_load_retries - attempts + 1
            delay = self.load_retry_interval * 2 ** (attempts - 1)
            logger.error(
                "Model %s version %d at %s does not load (attempt %d): %s: %s. The versions "
                "already served stay up; %s",
                name, version, path, attempts, type(e).__name__, str(e)[:500],
                f"retrying in {delay:.1f} s ({retries_left} retries left)." if retries_left > 0
                else "no retries left; it is retried when its files change.",
            )
            state.failed[version] = _Failure(
                fingerprint,
                f"Version {version} failed to load ({type(e).__name__}); see the server log.",
                attempts,
                time.monotonic() + delay,
            )
            return None
        logger.info(
            "Serving model %s version %d from %s (signatures: %s) after %.1f s.",
            name, version, path, ", ".join(sorted(servable.signatures)),
            time.monotonic() - start,
        )
        return servable

    def model_names(self):
        with self._lock:
            return sorted(self._models)

    def resolve(self, model_spec):
        """The ServableVersion a request's ModelSpec asks for, or a ServingError."""
        name = model_spec.name
        if not name:
            raise invalid("model_spec.name is empty; set it to the name of a served model.")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            state = self._models.get(name)
            if state is not None and choice is None and state.served:
                return state.served[max(state.served)]  # the common case, kept cheap
            served = dict(state.served) if state is not None else {}
            labels = dict(state.config.version_labels) if state is not None else {}
        if state is None or (not served and choice is None):
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({name[:100]}). Check the model name.",
            )
        if choice == "version":
            version = model_spec.version.value
            request = f"Specific({name}, {version})"
        else:
            label = model_spec.version_label
            if label not in labels:
                raise invalid(
                    f"Unrecognized servable version label: {label[:100]}. Labels of model "
                    f"{name}: {sorted(labels) or 'none (set version_labels in --model_config_file)'}."
                )
            version = labels[label]
            request = f"Specific({name}, {version}) (label '{label}')"
        if version not in served:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {request}. Served versions of {name}: "
                f"{sorted(served)}.",
            )
        return served[version]

    def served_summary(self):
        with self._lock:
            return {name: sorted(s.served) for name, s in self._models.items()}

    def version_states(self, name, version=None):
        """[(version, state name, error code, message)] for GetModelStatus."""
        with self._lock:
            state = self._models.get(name)
            if state is None:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find any versions of model {name[:100]}.",
                )
            rows = {v: ("AVAILABLE", error_codes_pb2.OK, "") for v in state.served}
            for v in state.ended:
                rows.setdefault(v, ("END", error_codes_pb2.OK, ""))
            for v, failure in state.failed.items():
                rows.setdefault(v, ("END", error_codes_pb2.UNKNOWN, failure.message))
        if version is not None:
            if version not in rows:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {name}. Known versions: "
                    f"{sorted(rows)}.",
                )
            rows = {version: rows[version]}
        if not rows:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}."
            )
        return [(v,) + rows[v] for v in sorted(rows, reverse=True)]

    def labels(self, name):
        with self._lock:
            state = self._models.get(name)
            return dict(state.config.version_labels) if state is not None else {}

    def batchers(self):
        """{"name/version/signature": Batcher} of every served version."""
        with self._lock:
            return {
                f"{name}/{version}/{key}": batcher
                for name, state in self._models.items()
                for version, servable in state.served.items()
                for key, batcher in servable.batchers.items()
            }

    def stop(self):
        with self._poll_lock, self._lock:
            for state in self._models.values():
                for servable in state.served.values():
                    servable.unload(self.drain_seconds)
