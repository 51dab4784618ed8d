"""The tensors of a Hugging Face safetensors checkpoint folder (one file, or shards with an index),
read one at a time, whole or straight into a sharded ``jax.Array``."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads bf16 tensors)
import numpy as np
import safetensors

import jaxquant as jq


class Checkpoint:
    """The tensors of a checkpoint folder (one file or shards), read one at a time."""

    def __init__(self, path: pathlib.Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise jq.CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise jq.CheckpointError(f"{path}: holds neither model.safetensors nor "
                                     f"model.safetensors.index.json")
        self.where, self.info = {}, {}
        for name in files:
            file = path / name
            if not file.exists():
                raise jq.CheckpointError(f"{file}: missing (a shard listed in {index.name})")
            with self._open(file) as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    self.where[key], self.info[key] = file, (s.get_dtype(), tuple(s.get_shape()))
        for key, name in (weight_map or {}).items():
            if self.where.get(key) != path / name:
                raise jq.CheckpointError(f"{path / name}: lacks {key!r}, which {index.name} puts there")
        self._handles = {}

    @staticmethod
    def _open(file):
        try:
            return safetensors.safe_open(str(file), framework="numpy")
        except (safetensors.SafetensorError, OSError) as e:
            raise jq.CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

    def _require(self, key: str) -> None:
        if key not in self.where:
            raise jq.CheckpointError(f"{self.describe()}: tensor {key!r} is missing")

    def _read(self, key: str, read):
        self._require(key)
        file = self.where[key]
        try:
            if file not in self._handles:
                self._handles[file] = self._open(file).__enter__()
            return read(self._handles[file])
        except (safetensors.SafetensorError, OSError, TypeError, ValueError) as e:
            raise jq.CheckpointError(f"{file}: cannot read {key!r} ({e})") from None

    def get(self, key: str) -> np.ndarray:
        return self._read(key, lambda f: f.get_tensor(key))

    def get_sharded(self, key: str, sharding: jax.sharding.Sharding, dtype, transpose: bool = False) -> jax.Array:
        """The tensor (transposed: a torch ``(out, in)`` weight as a Flax ``(in, out)`` kernel) as
        a ``jax.Array`` placed by ``sharding``: each device's block is read from the file alone,
        so the host never holds more than one device's part."""
        self._require(key)
        shape = self.info[key][1]
        out_shape = shape[::-1] if transpose else shape

        def block(index: tuple) -> np.ndarray:
            rows = self._read(key, lambda f: f.get_slice(key)[index[::-1] if transpose else index])
            return np.ascontiguousarray(rows.T if transpose else rows).astype(dtype)

        return jax.make_array_from_callback(out_shape, sharding, block)

    def describe(self) -> str:
        files = sorted({str(f) for f in self.where.values()})
        return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"

    def close(self):
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()
