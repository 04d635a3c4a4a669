"""Hugging Face-style checkpoint directories: config.json and safetensors shards, opened lazily.

`mx.load` reads only the safetensors headers; a tensor's bytes are read when it is evaluated, so a
loader that evaluates one tensor at a time never holds more than that one in memory besides what it keeps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from weights.errors import DamagedFileError, WeightsError

INDEX = "model.safetensors.index.json"


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{directory}: no config.json; a checkpoint directory needs one")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc})") from None


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The shards named by model.safetensors.index.json, else every *.safetensors file (sorted)."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise DamagedFileError(f"{index}: unreadable ({exc})") from None
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors files")
    return files


def open_tensors(directory: str | os.PathLike) -> dict[str, mx.array]:
    """Every tensor of the checkpoint by name, lazy (no tensor data read yet)."""
    tensors: dict[str, mx.array] = {}
    for f in safetensors_files(directory):
        try:
            shard = mx.load(str(f))
        except (RuntimeError, ValueError) as exc:
            raise DamagedFileError(f"{f}: not a readable safetensors file, truncated or damaged ({exc})") from None
        if not isinstance(shard, dict):
            raise DamagedFileError(f"{f}: not a safetensors file")
        tensors.update(shard)
    return tensors
