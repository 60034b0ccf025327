"""Building a plugin manager: never global, a fresh one per configuration (start and each reload).

Loading order: entry points in the ``milterd.plugins`` group (the built-ins are registered there
exactly like third-party plugins), minus ``[plugins] disable``, then ``[plugins] modules`` by
dotted name.  An import failure names the plugin and refuses the configuration.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Iterable

import pluggy

from milterd import hookspecs
from milterd.core.config import Config

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "milterd.plugins"


class PluginLoadError(Exception):
    pass


def make_plugin_manager(config: Config, *, load_entrypoints: bool = True,
                        extra_plugins: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins.disable)
    if load_entrypoints:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in disabled:
                log.info("plugin %s disabled by [plugins] disable", ep.name)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(f"plugin {ep.name} ({ep.value}): cannot load: {exc}") from exc
            _register(pm, ep.name, plugin)
    for dotted in config.plugins.modules:
        try:
            plugin = importlib.import_module(dotted)
        except Exception as exc:
            raise PluginLoadError(f"plugin module {dotted}: cannot import: {exc}") from exc
        _register(pm, dotted, plugin)
    for name, plugin in extra_plugins:
        _register(pm, name, plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(str(exc)) from exc
    return pm


def _register(pm: pluggy.PluginManager, name: str, plugin: object) -> None:
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginLoadError(f"plugin {name}: {exc}") from exc
