"""One loaded model version: its signatures, batchers, and how a request runs on it."""

import asyncio
import concurrent.futures
import logging
import os

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from serving.errors import ServingError
from serving.errors import deadline_exceeded
from serving.signatures import DEFAULT_SIGNATURE
from serving.signatures import Signature

logger = logging.getLogger("serving.servable")

_INIT_OP_KEY = "__saved_model_init_op"


class ServableVersion:
    """One loaded version of a model: its signatures and (optionally) their batchers.

    Args:
        name, version, path: the model name, integer version and SavedModel directory.
        loaded: the object `tf.saved_model.load` returned.
        signature_defs: the MetaGraph's SignatureDefs by key.
        batching: None, or a `BatchingOptions`: batch the batchable signatures.
        loop: the asyncio event loop the batchers run on (required with `batching`).
    """

    def __init__(self, name, version, path, loaded, signature_defs, batching=None, loop=None):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = loaded  # keeps the restored variables alive
        self.signature_defs = signature_defs
        self.signatures = {
            key: Signature(key, signature_defs[key], loaded.signatures[key])
            for key in signature_defs
        }
        self.batchers = {}
        if batching:
            if loop is None:
                raise ValueError("Batching needs the server's asyncio event loop (`loop=`).")
            for key, signature in self.signatures.items():
                if signature.batchable:
                    self.batchers[key] = batching.batcher(signature, loop)

    @classmethod
    def load(cls, name, version, path, batching=None, loop=None):
        pb_path = os.path.join(path, "saved_model.pb")
        if not os.path.isfile(pb_path):
            raise FileNotFoundError(f"no saved_model.pb in {path}")
        saved_model = saved_model_pb2.SavedModel()
        with open(pb_path, "rb") as f:
            saved_model.ParseFromString(f.read())
        meta_graphs = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
        if not meta_graphs:
            raise ValueError(f"{pb_path} has no MetaGraph tagged 'serve'")
        signature_defs = {
            key: sig
            for key, sig in meta_graphs[0].signature_def.items()
            if key != _INIT_OP_KEY
        }
        if not signature_defs:
            raise ValueError(f"{pb_path} has no serving signatures")
        loaded = tf.saved_model.load(path, tags=["serve"])
        return cls(name, version, path, loaded, signature_defs, batching, loop)

    def signature(self, key):
        key = key or DEFAULT_SIGNATURE
        if key not in self.signatures:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{key[:100]}" not found in model {self.name} version '
                f"{self.version}. Available signatures: {sorted(self.signatures)}.",
            )
        return self.signatures[key]

    def batched(self, signature, rows):
        """Whether a request of `rows` rows for `signature` goes through a batcher."""
        return self._batcher(signature, rows) is not None

    def _batcher(self, signature, rows):
        batcher = self.batchers.get(signature.key)
        if batcher is None or rows >= batcher.max_batch_size:
            # A request that fills a batch by itself gains nothing from waiting for one: it
            # runs at once, alone (TF Serving would refuse one larger than a batch).
            return None
        return batcher

    def run(self, signature, arrays, rows, timeout):
        """Runs one request from any thread but the event loop's (REST handlers, warmup)."""
        batcher = self._batcher(signature, rows)
        if batcher is None or not batcher.loop.is_running():
            return signature.run(arrays)
        try:
            return batcher.submit_threadsafe(arrays, rows).result(timeout)
        except concurrent.futures.TimeoutError:
            raise deadline_exceeded() from None

    async def run_async(self, signature, arrays, rows, timeout, executor=None):
        """Runs one request from the event loop: in a batch, or alone on `executor`."""
        batcher = self._batcher(signature, rows)
        if batcher is None:
            pending = asyncio.get_running_loop().run_in_executor(
                executor, signature.run, arrays
            )
        else:
            pending = batcher.submit(arrays, rows)
        try:
            return await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            raise deadline_exceeded() from None

    def unload(self, drain_seconds=30.0):
        for key, batcher in self.batchers.items():
            batcher.stop(drain_seconds)
            if batcher.num_batches:
                logger.info(
                    "Model %s version %d signature %s: %d rows in %d batches (%.1f rows per "
                    "batch).", self.name, self.version, key, batcher.num_rows,
                    batcher.num_batches, batcher.num_rows / batcher.num_batches,
                )
