"""Names -> plugin classes.

The registry is filled lazily, on first access, by calling every plugin's `register_*` hooks
(`rlhfzoo.hookspecs`). Built-in plugins are the modules listed in `BUILTIN_PLUGINS`;
third-party plugins are modules named by entry points in the group `rlhfzoo`. Both go through
`_load_plugin`, so a built-in is registered exactly the way a third party's plugin is.

- A plugin that fails to import or to register is reported (`registry.load_errors`, a warning)
  and skipped; every other plugin still works. Registering a class whose `Config` is not a
  `PluginConfig` is such a failure. Using a name the failed plugin tried to register raises
  `PluginRegistrationError` with the report.
- Two plugins registering the same name (or alias) in the same kind is a `DuplicateNameError`
  naming both.
- An unknown name is an `UnknownNameError` with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator

import pluggy

from rlhfzoo import hookspecs
from rlhfzoo.errors import UserError
from rlhfzoo.interfaces import Objective, Plugin, PluginConfig, Policy, RewardSource, Stage, Task

ENTRY_POINT_GROUP = "rlhfzoo"
DISABLE_ENV = "RLHFZOO_DISABLE_PLUGIN_AUTOLOAD"

# Every built-in plugin, listed once. Each is an ordinary plugin module with `@hookimpl`s.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "rlhfzoo.policy",
    "rlhfzoo.plugins.sft",
    "rlhfzoo.plugins.sft_samples",
    "rlhfzoo.plugins.sentiment",
    "rlhfzoo.plugins.arithmetic",
    "rlhfzoo.plugins.hh_rlhf",
    "rlhfzoo.plugins.dataset",
    "rlhfzoo.plugins.gold",
    "rlhfzoo.plugins.dpo",
    "rlhfzoo.plugins.ipo",
    "rlhfzoo.plugins.kto",
    "rlhfzoo.plugins.simpo",
    "rlhfzoo.plugins.orpo",
    "rlhfzoo.plugins.online_dpo",
    "rlhfzoo.plugins.reward_model",
    "rlhfzoo.plugins.critique",
    "rlhfzoo.plugins.combined",
    "rlhfzoo.plugins.ppo",
    "rlhfzoo.plugins.ppo_penalty",
    "rlhfzoo.plugins.a2c",
    "rlhfzoo.plugins.grpo",
    "rlhfzoo.plugins.rloo",
    "rlhfzoo.plugins.rejection_sampling",
    "rlhfzoo.plugins.best_of_n",
    "rlhfzoo.plugins.ilql",
)

# The only built-in names the rest of the core uses, by kind: the policy of a config without a
# `policy` section (and the bench's baseline row), the task `--task` defaults to, and the reward
# source `rlhfzoo.testing`'s contract checks score online objectives with (the task's own gold), and
# the task that reads the rows passed to `rlhfzoo.train(train_dataset=...)` (`from_rows`).
DEFAULTS: dict[str, str] = {"policy": "hf", "task": "sentiment", "reward_source": "gold", "rows_task": "dataset"}


@dataclass(frozen=True)
class Kind:
    name: str  # "objective"
    plural: str  # "objectives"
    hook: str  # "register_objectives"
    base: type
    title: str  # "Objective", for messages


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("objective", "objectives", "register_objectives", Objective, "Objective"),
        Kind("reward_source", "reward sources", "register_reward_sources", RewardSource, "Reward source"),
        Kind("policy", "policies", "register_policies", Policy, "Policy"),
        Kind("task", "tasks", "register_tasks", Task, "Task"),
        Kind("stage", "stages", "register_stages", Stage, "Stage"),
    )
}


class RegistryError(UserError):
    """Base class of registry errors; their messages are meant for users."""


class UnknownNameError(RegistryError, KeyError):
    def __init__(self, kind: str, name: str, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, choices
        title = KINDS[kind].title if kind in KINDS else kind
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
        msg = f"{title} {name!r} is not registered."
        if close:
            msg += f" Did you mean {close[0]!r}?"
        listed = ", ".join(choices) if choices else "(none)"
        msg += (
            f"\nRegistered {KINDS[kind].plural if kind in KINDS else kind}: {listed}."
            "\nIf it comes from a plugin package, check that the package is installed in this "
            "environment (`rlhfzoo plugins` lists what was loaded)."
        )
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class DuplicateNameError(RegistryError):
    pass


class PluginRegistrationError(RegistryError):
    """A plugin registered something unusable; `names` holds the (kind, name)s concerned."""

    def __init__(self, message: str, names: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.names = names or []


@dataclass(frozen=True)
class Entry:
    """One registered name and its metadata."""

    kind: str
    name: str
    cls: type
    aliases: tuple[str, ...]
    summary: str
    paper: str
    status: str
    package: str  # distribution that provided it ("rlhfzoo" for built-ins)
    plugin: str  # plugin module name

    @property
    def data_kind(self) -> str | None:
        return getattr(self.cls, "data_kind", None) if self.kind == "objective" else None

    @property
    def config_class(self):
        return self.cls.Config

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "summary": self.summary,
            "paper": self.paper,
            "status": self.status,
            "package": self.package,
        }
        if self.aliases:
            meta["aliases"] = list(self.aliases)
        if self.kind == "objective":
            meta["data_kind"] = self.data_kind
            meta["online"] = bool(getattr(self.cls, "online", False))
        if self.kind == "stage":
            meta["requires"] = list(self.cls.requires)
        meta["config"] = config_defaults(self.cls.Config)
        return meta


def config_defaults(config_cls) -> dict[str, Any]:
    """Field name -> default (JSON-friendly; required fields show as '<required>')."""
    out: dict[str, Any] = {}
    for fname, f in config_cls.model_fields.items():
        if f.is_required():
            out[fname] = "<required>"
        else:
            default = f.get_default(call_default_factory=True)
            out[fname] = default.model_dump() if hasattr(default, "model_dump") else default
    return out


@dataclass
class PluginInfo:
    """What one loaded plugin contributed."""

    name: str  # module name
    package: str
    version: str
    builtin: bool
    registered: list[tuple[str, str]] = field(default_factory=list)  # (kind, name)


class Registry:
    def __init__(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool | None = None):
        self._builtins = builtins
        self._entry_points = entry_points
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._conflicts: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._failed: dict[str, dict[str, str]] = {k: {} for k in KINDS}  # name -> why its plugin was skipped
        self.plugins: dict[str, PluginInfo] = {}
        self.load_errors: list[str] = []
        self._loaded = False
        self._lock = threading.RLock()
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)

    # ---------------------------------------------------------------------------- loading
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True  # set first: plugins may query the registry while registering
            from rlhfzoo import __version__

            for modname in self._builtins:
                self._load_plugin(modname, lambda m=modname: importlib.import_module(m), "rlhfzoo", __version__, True)
            use_eps = self._entry_points
            if use_eps is None:
                use_eps = os.environ.get(DISABLE_ENV, "").strip().lower() not in ("1", "true", "yes")
            if use_eps:
                for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                    dist = getattr(ep, "dist", None)
                    package = dist.name if dist is not None else ep.value.split(":")[0]
                    version = dist.version if dist is not None else "?"
                    self._load_plugin(ep.value, ep.load, package, version, False)

    def _load_plugin(self, name: str, load: Callable[[], Any], package: str, version: str, builtin: bool) -> None:
        """Import a plugin and run its hooks; on failure report it and leave the registry as it was."""
        try:
            module = load()
        except Exception as e:  # noqa: BLE001 - any import error of a plugin must not take others down
            self._report(f"plugin {name!r} from package {package!r} failed to import: {type(e).__name__}: {e}")
            return
        self.register_plugin(module, name=name, package=package, version=version, builtin=builtin)

    def _report(self, message: str) -> None:
        self.load_errors.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def register_plugin(
        self, plugin: Any, name: str | None = None, package: str = "?", version: str = "?", builtin: bool = False
    ) -> PluginInfo | None:
        """Register a plugin object (module or instance with `@hookimpl`s) and run its hooks.

        Everything the plugin registers is committed only if all its hooks succeed; otherwise the
        failure is reported and the plugin skipped. A name another plugin already holds is
        reported, and using it raises `DuplicateNameError` naming both plugins.
        """
        with self._lock:
            name = name or getattr(plugin, "__name__", repr(plugin))
            if name in self.plugins:
                return self.plugins[name]
            info = PluginInfo(name=name, package=package, version=version, builtin=builtin)
            pending: list[Entry] = []
            try:
                self.pm.register(plugin, name=name)
                for kind in KINDS.values():
                    hook = getattr(self.pm.hook, kind.hook)
                    impls = [i for i in hook.get_hookimpls() if i.plugin_name == name]
                    for impl in impls:
                        impl.function(register=self._collector(kind, info, pending))
            except Exception as e:  # noqa: BLE001
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                message = f"plugin {name!r} from package {package!r} failed to register: {type(e).__name__}: {e}"
                rejected = e.names if isinstance(e, PluginRegistrationError) else []
                for kind_name, n in [(p.kind, p.name) for p in pending] + rejected:
                    self._failed[kind_name].setdefault(n, message)
                self._report(message)
                return None
            for entry in pending:  # validated: commit (duplicates checked against committed entries)
                self._add(entry)
            self.plugins[name] = info
            return info

    def _collector(self, kind: Kind, info: PluginInfo, pending: list[Entry]):
        def register(cls: type, name: str | None = None, aliases: tuple[str, ...] | list[str] | None = None, **meta: Any):
            if not (isinstance(cls, type) and issubclass(cls, kind.base)):
                raise PluginRegistrationError(
                    f"{kind.hook} was given {cls!r}, which is not a subclass of {kind.base.__name__}"
                )
            reg_name = name or getattr(cls, "name", "")
            if not reg_name:
                raise PluginRegistrationError(f"{cls.__name__} has no `name`; set the class attribute or pass name=")
            config = getattr(cls, "Config", None)
            if not (isinstance(config, type) and issubclass(config, PluginConfig)):
                raise PluginRegistrationError(
                    f"{kind.title.lower()} {reg_name!r} ({cls.__name__}) has `Config = {config!r}`, which is not a "
                    "subclass of rlhfzoo.interfaces.PluginConfig; derive its Config from PluginConfig",
                    names=[(kind.name, reg_name)],
                )
            entry = Entry(
                kind=kind.name,
                name=reg_name,
                cls=cls,
                aliases=tuple(aliases if aliases is not None else getattr(cls, "aliases", ())),
                summary=meta.get("summary", getattr(cls, "summary", "")),
                paper=meta.get("paper", getattr(cls, "paper", "")),
                status=meta.get("status", getattr(cls, "status", "stable")),
                package=info.package,
                plugin=info.name,
            )
            taken = {n for e in pending if e.kind == kind.name for n in (e.name, *e.aliases)}
            for n in (entry.name, *entry.aliases):
                if n in taken:
                    raise DuplicateNameError(f"{kind.title} {n!r} is registered twice by plugin {info.name!r}")
                owner = self._owner(kind.name, n)
                if owner is not None:
                    # Both plugins keep their other names; this one becomes an error to use.
                    message = (
                        f"{kind.title} {n!r} is registered by two plugins: {owner.plugin!r} (package "
                        f"{owner.package!r}) and {info.name!r} (package {info.package!r}). Uninstall one of "
                        f"the packages, or rename the {kind.title.lower()} in one of them."
                    )
                    self._conflicts[kind.name][n] = message
                    self._report(message)
                    return
            pending.append(entry)
            info.registered.append((kind.name, entry.name))

        return register

    def _owner(self, kind: str, n: str) -> Entry | None:
        return self._entries[kind].get(n) or self._entries[kind].get(self._aliases[kind].get(n, ""))

    def _add(self, entry: Entry) -> None:
        self._entries[entry.kind][entry.name] = entry
        for a in entry.aliases:
            self._aliases[entry.kind][a] = entry.name

    # ---------------------------------------------------------------------------- lookup
    def get(self, kind: str, name: str) -> Entry:
        self._ensure_loaded()
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
        if name in self._conflicts[kind]:
            raise DuplicateNameError(self._conflicts[kind][name])
        entries = self._entries[kind]
        canonical = self._aliases[kind].get(name, name)
        if canonical not in entries:
            raise self.missing(name, kind)
        return entries[canonical]

    def missing(self, name: str, kind: str | None = None) -> RegistryError:
        """The error for a name that is not registered (in `kind`, or in any kind): why its plugin
        was skipped, if one tried to register it; else not registered, with a did-you-mean."""
        self._ensure_loaded()
        for k in [kind] if kind else list(KINDS):
            if name in self._failed[k]:
                return PluginRegistrationError(f"{KINDS[k].title} {name!r} cannot be used: {self._failed[k][name]}")
        if kind:
            return UnknownNameError(kind, name, sorted(self._entries[kind]) + sorted(self._aliases[kind]))
        return UnknownNameError("objective", name, self.all_names())

    def names(self, kind: str) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        self._ensure_loaded()
        for k in [kind] if kind else list(KINDS):
            for n in sorted(self._entries[k]):
                yield self._entries[k][n]

    def find(self, name: str) -> list[Entry]:
        """Every entry of any kind with this name or alias."""
        self._ensure_loaded()
        found = []
        for k in KINDS:
            canonical = self._aliases[k].get(name, name)
            if canonical in self._entries[k]:
                found.append(self._entries[k][canonical])
        return found

    def all_names(self) -> list[str]:
        self._ensure_loaded()
        return sorted({n for k in KINDS for n in [*self._entries[k], *self._aliases[k]]})

    def create(self, kind: str, name: str, config: Any = None, **kwargs: Any) -> Any:
        """Instantiate a registered class with its validated config."""
        entry = self.get(kind, name)
        if config is None or isinstance(config, dict):
            config = entry.cls.Config(**(config or {}))
        return entry.cls(config, **kwargs)


registry = Registry()


def get(kind: str, name: str) -> Entry:
    return registry.get(kind, name)
