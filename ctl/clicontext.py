"""The registry a command works on, opened once per command from its flags."""

from __future__ import annotations

import typer

from ctl.registry import Registry, open_registry, registry_url


def open_from_context(ctx: typer.Context) -> Registry:
    """Open the registry named by --registry / RAMPOOL_REGISTRY (once)."""
    root = ctx.find_root()
    root.ensure_object(dict)
    cached = root.obj.get("registry")
    if isinstance(cached, Registry):
        return cached
    registry = open_registry(registry_url(root.obj.get("registry_url")))
    root.obj["registry"] = registry
    root.call_on_close(registry.close)
    return registry
