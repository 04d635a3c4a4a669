"""Start-up checks that answer bad input with one line: what was wrong and how to fix it.

The platform runs `check_environment` before vLLM builds its config (so a bad `VLLM_METAL_*` value is a
plain `ConfigError`, not an entry of vLLM's config validation error); the command-line entry points run
it too, resolve the model argument with `resolve_model`, and print any of these errors as one line
(`one_line_error`) instead of a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtime.config import ConfigError, RuntimeConfig, cache_root


class StartupError(ValueError):
    """Bad input found before serving; the message is one line naming the input and the fix."""


def writable_dir(variable: str, path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it takes files; StartupError naming `variable` otherwise."""
    path = Path(path)
    fix = f"point {variable} at a writable directory"
    if path.exists() and not path.is_dir():
        raise StartupError(f"{variable}={path} is not a directory; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)  # also catches read-only mounts
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(f"{variable}={path} is not writable ({exc.strerror or exc}); {fix}") from None
    return path


def check_environment() -> RuntimeConfig:
    """Every `VLLM_METAL_*` / `VLLM_MLX_*` value, the cache directory and (with debugging on) the debug
    directory. Raises ConfigError or StartupError; returns the validated runtime config."""

    config = RuntimeConfig.from_env()
    writable_dir("VLLM_METAL_CACHE", cache_root())
    if config.debug:
        writable_dir("VLLM_METAL_DEBUG_DIR", config.debug_dir)
    return config


def _looks_like_path(model: str) -> bool:
    """A Hugging Face model id is `name` or `org/name`; anything else names a local path."""
    if model.startswith(("/", "./", "../", "~")) or model in (".", "..") or model.endswith("/"):
        return True
    parts = model.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def resolve_model(model: str, option: str = "--model") -> tuple[str, bool]:
    """A model argument as users give it -> (what vLLM gets, whether it was a bundled name).

    Bundled names (`smollm2`) become their prepared checkpoint directory; an existing path or a
    Hugging Face id pass unchanged; a path that does not exist is a StartupError.
    """
    from weights.bundled import bundled_names, prepare

    choices = (f"a checkpoint directory (config.json and weights), a Hugging Face model id or a bundled "
               f"name ({', '.join(bundled_names())})")
    if not model or not model.strip():
        raise StartupError(f"{option} is empty; give {choices}")
    if model in bundled_names():
        try:
            return str(prepare(model)), True
        except (RuntimeError, OSError) as exc:
            raise StartupError(f"bundled model {model!r} cannot be prepared: {exc}") from None
    if os.path.exists(os.path.expanduser(model)):
        return os.path.expanduser(model), False
    if _looks_like_path(model):
        raise StartupError(f"{option} {model}: no such file or directory; give {choices}")
    return model, False


def one_line_error(exc: BaseException) -> str | None:
    """The message of a ConfigError / StartupError that caused `exc` (also one wrapped in vLLM's
    pydantic config validation error), or None when `exc` is something else."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (ConfigError, StartupError)):
            return str(e).strip().splitlines()[0]
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":  # pydantic keeps the raised error
            try:
                stack.extend(item.get("ctx", {}).get("error") for item in errors())
            except Exception:  # noqa: BLE001  an unexpected shape: fall back to the chain
                pass
        stack.extend((e.__cause__, e.__context__))
    return None
