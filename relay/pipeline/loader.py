"""Loads filters by name: built-in and third-party alike, through the `relay.filters`
entry-point group (our own filters are registered there by pyproject.toml).

Takes the `filters:` config list; hands back a Chain. An unknown name, or options the
filter refuses, is a ConfigError naming `filters[i]` — raised at start, before any
listener opens.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

from relay.config import ConfigError, FilterConfig
from relay.pipeline.chain import Chain, Loaded
from relay.pipeline.protocol import Filter, FilterEnv


def find(name: str) -> type[Filter]:
    for ep in entry_points(group="relay.filters"):
        if ep.name == name:
            return ep.load()
    # Running from a source tree without the package metadata: built-ins by module.
    try:
        mod = importlib.import_module(f"filters.{name}")
    except ModuleNotFoundError:
        raise LookupError(name) from None
    for obj in vars(mod).values():
        if inspect.isclass(obj) and issubclass(obj, Filter) and obj is not Filter \
                and obj.__module__ == mod.__name__:
            return obj
    raise LookupError(name)


def load(configs: tuple[FilterConfig, ...], env: FilterEnv) -> Chain:
    loaded = []
    for i, fc in enumerate(configs):
        try:
            cls = find(fc.name)
        except LookupError:
            raise ConfigError(f"filters[{i}].name: no filter called {fc.name!r} (neither "
                              "built in nor installed in the 'relay.filters' entry-point group)") from None
        except Exception as e:  # noqa: BLE001 - a plugin's import error is a config error
            raise ConfigError(f"filters[{i}].name: cannot load filter {fc.name!r}: "
                              f"{type(e).__name__}: {e}") from None
        if not (inspect.isclass(cls) and issubclass(cls, Filter)):
            raise ConfigError(f"filters[{i}].name: {fc.name!r} is not a relay Filter class")
        try:
            f = cls(fc.options, env)
        except ConfigError as e:
            msg = str(e)
            if not msg.startswith(f"filters[{i}]"):
                msg = f"filters[{i}].options: {msg.removeprefix(f'filters.{fc.name}.')}"
            raise ConfigError(msg) from None
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"filters[{i}].options: {type(e).__name__}: {e}") from None
        if not f.name:
            f.name = fc.name
        loaded.append(Loaded(f, fc))
    return Chain(loaded)
