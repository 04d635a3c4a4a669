"""vLLM platform plugin: run vLLM's own models as lowered, compiled MLX.

`register()` is the `vllm.platform_plugins` entry point. vLLM calls it (more than once) to ask
whether this platform is available; it answers with the platform's class path when MLX can be
imported, so installing this package is all it takes. `VLLM_PLUGINS` (vLLM's allow-list of
plugin names; ours is "metal") turns it off, and `VLLM_METAL_USE_MLX=0` keeps the plugin but runs
the torch model eagerly (the baseline). Cheap and side-effect free: no mlx or torch import here.
"""

import importlib.util


def register() -> str | None:
    if importlib.util.find_spec("mlx") is None:
        return None
    return "vllm_metal_plugin.platform.MetalPlatform"
