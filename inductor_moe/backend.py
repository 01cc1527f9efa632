"""The ``inductor_moe`` torch.compile backend: Inductor's ``compile_fx`` plus our graph pass.

``torch.compile(model, backend="inductor_moe", options={...})`` finds this through the
``torch_dynamo_backends`` entry point.  Option keys that name ``inductor_moe.config`` entries
configure us; every other key is an Inductor config patch, exactly as for ``backend="inductor"``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch._dynamo.backends.registry import register_backend

from . import config
from .passes import InductorMoEPass


def _enable_dynamo_capture() -> None:
    """Let Dynamo keep data-dependent MoE loops (``torch.where(ids == e)``, ``nonzero``) in one
    graph, so the pattern library can see the whole block.  ``INDUCTOR_MOE_DYNAMO_CAPTURE=0``
    keeps Dynamo's defaults (such loops then graph-break and are left to Inductor)."""
    if os.environ.get("INDUCTOR_MOE_DYNAMO_CAPTURE", "1") != "0":
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.capture_scalar_outputs = True


def split_options(options: Optional[dict]) -> tuple[dict, dict]:
    """(our config keys, Inductor config patches)."""
    ours = set(config.get_config_copy())
    options = dict(options or {})
    mine = {k: options.pop(k) for k in list(options) if k in ours}
    return mine, options


def inductor_moe_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                         mode: Optional[str] = None) -> Any:
    """Compile ``gm`` with Inductor, with our pass installed as the post-grad pre-pass."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    import torch._inductor.config as inductor_config

    from .lowering import register

    register()
    mine, patches = split_options(options)
    if mode is not None:
        patches = {**list_mode_options(mode), **patches}
    with config.patch(mine):
        config.validate()
        settings = config.get_config_copy()
    existing = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    patches["post_grad_custom_pre_pass"] = InductorMoEPass(settings, chained=existing)
    return compile_fx(gm, example_inputs, config_patches=patches)


def _register_on_import() -> None:
    """Register by name on ``import inductor_moe`` too.  When Dynamo is loading our entry point
    it registers the function itself (and refuses a duplicate), so step aside then."""
    from torch._dynamo.backends import registry

    if "inductor_moe" not in registry._COMPILER_FNS and registry._BACKENDS.get("inductor_moe") is None:
        register_backend(inductor_moe_backend, name="inductor_moe")


_enable_dynamo_capture()
_register_on_import()
