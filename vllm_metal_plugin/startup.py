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
    """Every runtime variable (`RuntimeConfig.from_env`), the cache directory and (with debugging on) the
    debug directory. Raises ConfigError or StartupError; returns the validated runtime config."""

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


def resolve_model(model: str, option: str = "model") -> tuple[str, bool]:
    """A model argument as users give it -> (what vLLM gets, whether it was a bundled name).

    Bundled names (`smollm2`, `smollm2-q4`) become their prepared checkpoint directory; an existing path
    or a Hugging Face id pass unchanged; a path that does not exist is a StartupError.
    """
    from weights.bundled import bundled_names, resolve

    choices = (f"a checkpoint directory (config.json and weights), a Hugging Face model id or a bundled "
               f"name ({', '.join(bundled_names())})")
    if not model or not model.strip():
        raise StartupError(f"{option} is empty; give {choices}")
    if model in bundled_names():
        try:
            return resolve(model), True
        except (RuntimeError, OSError) as exc:
            raise StartupError(f"bundled model {model!r} cannot be prepared: {exc}") from None
    if os.path.exists(os.path.expanduser(model)):
        return os.path.expanduser(model), False
    if _looks_like_path(model):
        raise StartupError(f"{option} {model!r}: no such file or directory; give {choices}")
    return model, False


def _causes(exc: BaseException):
    """`exc` and everything that caused it, including errors kept inside a pydantic ValidationError
    (vLLM's config classes wrap what a platform hook raises in one)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        errors = getattr(e, "errors", None)
        if callable(errors) and type(e).__name__ == "ValidationError":
            try:
                stack.extend(item.get("ctx", {}).get("error") for item in errors())
            except Exception:  # noqa: BLE001  an unexpected shape: the chain below still counts
                pass
        stack.extend((e.__cause__, e.__context__))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line_error(exc: BaseException, model: str | None = None) -> str | None:
    """One line for an error that bad input caused, or None when `exc` is something else: a ConfigError
    or StartupError anywhere in its causes, or (for a `model` that is no local path) the Hugging Face
    Hub's failure to give that model."""
    causes = list(_causes(exc))
    for e in causes:
        if isinstance(e, (ConfigError, StartupError)):
            return _first_line(e)
    for e in causes:  # transformers (imported by vLLM) imports torchvision whenever it is installed
        if isinstance(e, RuntimeError) and "operator torchvision::" in str(e) and "does not exist" in str(e):
            return (f"torchvision cannot load with this torch ({_first_line(e)}: a build for CUDA torch beside the "
                    "CPU torch); text models do not need it: pip uninstall torchvision torchaudio torchcodec, or "
                    "install them with --extra-index-url https://download.pytorch.org/whl/cpu")
    if model is not None and not os.path.exists(model):
        for e in causes:
            if type(e).__module__.split(".")[0] == "huggingface_hub":
                return (f"model {model!r} is no local path and the Hugging Face Hub did not give it "
                        f"({_first_line(e)}); check the name and the network, or give a local checkpoint "
                        "directory")
    return None
