"""A run folder's environment settings, as the programs read them back from ``config.json`` (or
``summary.json``'s ``settings``), in either layout that train_agent.py has written:

- version 2: ``"env"`` holds :meth:`~qenv.envs.config.EnvConfig.to_dict` (every setting, by group),
  beside the agent's settings;
- version 1 (earlier runs, still on disk): ``"env_kwargs"`` holds the keyword arguments that were
  given (others took the environment's defaults).

Both are read through :class:`~qenv.envs.config.EnvConfig`, so a run folder's settings (untrusted
input) are checked as any settings are, and a run from an earlier version resumes and evaluates
as it trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qenv.envs.config import EnvConfig, RemovedSettingError
from qenv.errors import QenvError

#: the layout of the ``config.json`` that train_agent.py writes (1: ``env_kwargs``; 2: ``env``)
RUN_CONFIG_VERSION = 2
#: environment arguments a version-1 run may hold that are not settings of :class:`EnvConfig`
#: (how an env draws itself: it changes no episode)
NON_CONFIG_KWARGS: tuple[str, ...] = ("render_mode",)


def env_config_of(settings: Mapping[str, Any], where: str) -> EnvConfig:
    """The :class:`EnvConfig` of a run's settings (``where`` names the file, for the error line)."""
    if not isinstance(settings, Mapping):
        raise QenvError(f"{where} is not a JSON object.", "start a new run instead.")
    try:
        if "env" in settings:
            if not isinstance(settings["env"], Mapping):
                raise QenvError("its 'env' settings are not a JSON object.", "")
            return EnvConfig.from_dict(settings["env"])
        kwargs = settings.get("env_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise QenvError("its env_kwargs are not a JSON object.", "")
        given = {k: v for k, v in kwargs.items() if k not in NON_CONFIG_KWARGS}
        if isinstance(given.get("model"), list):
            given["model"] = tuple(given["model"])
        return EnvConfig.from_kwargs(**given)
    except QenvError as exc:
        why = "" if isinstance(exc, RemovedSettingError) else " (edited by hand, or not written by train_agent.py)"
        raise QenvError(f"{where} holds environment settings this qenv cannot use: {exc.problem.rstrip('.')}{why}.",
                        exc.fix or "restore it from the run's summary.json ('settings'), or start a new run.") from None


def env_kwargs_of(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The environment arguments a run chose, as plain JSON values: a version-1 run's
    ``env_kwargs`` as stored (checked through :func:`env_config_of`), a version-2 run's settings
    that differ from :class:`EnvConfig`'s defaults. The programs merge their own flags into these
    (a flag given twice with two values is refused), so both layouts mean the same there."""
    config = env_config_of(settings, where)
    if "env" not in settings:
        kept = dict(settings.get("env_kwargs") or {})
        return {k: v for k, v in kept.items() if k in NON_CONFIG_KWARGS or k in config_field_names()}
    return changed_settings(config)


def config_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EnvConfig))


def changed_settings(config: EnvConfig) -> dict[str, Any]:
    """``config``'s settings that differ from the defaults, as :meth:`EnvConfig.to_dict` writes them."""
    mine, default = config.to_dict(), EnvConfig().to_dict()
    return {name: value for group in EnvConfig.GROUPS for name, value in mine[group].items()
            if value != default[group][name]}
