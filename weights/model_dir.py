"""Model directories for quantized checkpoints: what a GGUF file needs to be read like a checkpoint directory,
and which format a model directory's weights are in.

A GGUF file has no config.json; `gguf_model_dir` writes a small directory for it - the config from the GGUF
metadata, the tokenizer, and a note naming the file - that anything reading Hugging Face checkpoint
directories (vLLM, transformers' configs and tokenizers) can read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from runtime.config import cache_root
from weights.awq_gptq import METHODS, quantization_config
from weights.checkpoint import read_config
from weights.gguf import config_from_metadata, open_reader
from weights.mlx_format import is_mlx_quantized

SOURCE_NOTE = "vllm_metal_source.json"  # in a GGUF's model directory: which file holds the weights
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def gguf_model_dir(gguf_path: str | os.PathLike, tokenizer: str | os.PathLike | bool | None = None) -> Path:
    """A model directory vLLM can read for a GGUF file: its config (from the GGUF metadata), the tokenizer
    (the files of `tokenizer`, a directory; None: the one the GGUF file carries; False: none, for tools that
    only lower the model) and SOURCE_NOTE naming the file. Made once per file and tokenizer, under
    $VLLM_METAL_CACHE/gguf."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}:{tokenizer}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / SOURCE_NOTE).exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = config_from_metadata(open_reader(gguf_path), gguf_path)
    # as transformers writes it (rope_parameters, every default spelled out); activations in float32 unless the
    # user asks for another dtype, as llama.cpp computes
    config = AutoConfig.for_model(**metadata)
    config.dtype = "float32"
    config.save_pretrained(tmp)
    if tokenizer is False:
        pass
    elif tokenizer is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer) / name).exists():
                shutil.copy(Path(tokenizer) / name, tmp / name)
    else:  # the tokenizer inside the GGUF file, as transformers reads it
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)
    (tmp / SOURCE_NOTE).write_text(json.dumps({"gguf": str(gguf_path)}))
    try:
        os.rename(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def quantized_source(model: str) -> tuple[str, str] | None:
    """(format, path of the weights) when `model` (a model directory) holds a checkpoint whose weights go
    straight into MLX: "gguf" (a gguf_model_dir), "mlx", "awq" or "gptq"; None for anything else."""
    directory = Path(model)
    if not directory.is_dir():
        return None
    note = directory / SOURCE_NOTE
    if note.exists():
        return "gguf", json.loads(note.read_text())["gguf"]
    try:
        config = read_config(directory)
    except Exception:  # noqa: BLE001  no readable config: not ours to take
        return None
    if is_mlx_quantized(config):
        return "mlx", str(directory)
    qc = quantization_config(config, directory)
    method = str((qc or {}).get("quant_method", "")).lower()
    return (method, str(directory)) if method in METHODS else None
