"""Nested plugin sections: a config option that names another plugin, `{name: ..., **its options}`.

Some plugins hold others: best-of-n its base policy and the reward source that picks, `combined`
its reward sources, the `critique` reward its judge policy. Such an option is written as a run
config's top-level sections are, a registered name or a mapping with a `name` and that plugin's
options,

    base: {name: hf, init: sft}        # or `base: hf`

and declared with one pydantic type, `PluginSection.of(kind)`:

    class BestOfNConfig(PluginConfig):
        base: PolicySection = Field(default_factory=lambda: {"name": "hf", "init": "sft"}, validate_default=True, ...)

Validating it looks the name up in the registry (an unknown name is an error with the registry's
did-you-mean) and validates the options against that plugin's `Config`; every problem is a pydantic
error at its own path, so a run config reports it as `policy.base.n_layer`. The value is a
`PluginSection`: `create(**kwargs)` builds the plugin, `required_stages()` names the stages it
reads. It dumps to the mapping as written (no defaults filled in, an alias left an alias), which is
what config.yaml holds and what cache keys hash.

`find_plugin` and `explain` are shared with `rlhfzoo.config`, which resolves the top-level sections
the same way.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, get_args

from pydantic import BaseModel, PlainSerializer, PlainValidator, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from rlhfzoo.interfaces import PluginConfig
from rlhfzoo.registry import Entry, RegistryError, UnknownNameError, registry

# The pydantic error type of a problem found inside a nested section: its message is final.
SECTION_ERROR = "plugin_section"


class SectionError(ValueError):
    """A section that names no registered plugin. `where`: the key at fault within the section
    (`"name"`), or `""` for the section as a whole."""

    def __init__(self, where: str, message: str):
        self.where, self.message = where, message
        super().__init__(message)


def find_plugin(kind: str, value: Any) -> tuple[Entry, dict[str, Any]]:
    """The registry entry of the plugin of `kind` a section names, and the section as a mapping
    (`{"name": ..., **options}`, as written). `value`: the name, or a mapping with a `name`.
    Raises `SectionError`."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SectionError("", f"must be a mapping with a `name`, got {type(value).__name__}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise SectionError("name", f"required: the registered name of the {kind.replace('_', ' ')} to use")
    try:
        return registry.get(kind, name), dict(value)
    except UnknownNameError as e:  # its did-you-mean and the registered names, on one line
        raise SectionError("name", str(e).replace("\n", " ")) from None
    except RegistryError as e:
        raise SectionError("name", str(e)) from None


def explain(error: ErrorDetails, model: type[BaseModel]) -> str:
    """One pydantic error of validating `model`, as a message for people: an unknown key gets a
    did-you-mean and the valid keys, a plugin's own check (a ValueError) reads as its message, a
    problem inside a nested section as it was explained there, anything else as pydantic's message
    with the value given."""
    if error["type"] == SECTION_ERROR:
        return error["msg"]
    if error["type"] == "extra_forbidden":
        field_name = str(error["loc"][-1])
        for key in error["loc"][:-1]:  # an unknown key of a nested model (policy.lora.rank): that model's keys
            inner = model.model_fields.get(str(key))
            nested = [a for a in (inner.annotation, *get_args(inner.annotation)) if isinstance(a, type) and issubclass(a, BaseModel)] if inner else []
            if not nested:
                break
            model = nested[0]
        close = difflib.get_close_matches(field_name, list(model.model_fields), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown key {field_name!r}.{hint} Valid keys: {', '.join(model.model_fields)}."
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "value_error":  # a plugin's own check: its message names the values
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"{error['msg']} (got {error.get('input')!r})"


@dataclass(frozen=True)
class PluginSection:
    """A validated nested section: the registered plugin it names (`entry`), that plugin's validated
    `config`, and the mapping as written (`written`), which is what it dumps to. `own`: the holding
    plugin's own settings of this entry, validated, where it declares some (combined's `weight`)."""

    entry: Entry
    config: PluginConfig
    written: dict[str, Any]
    own: PluginConfig | None = None

    @classmethod
    def of(cls, kind: str, own: type[PluginConfig] | None = None) -> Any:
        """The pydantic field type of a section naming a plugin of `kind` ("policy", "reward_source",
        ...). `own`: a config of settings the holder keeps beside the plugin's options in the same
        mapping (combined's `weight`), taken out before the rest is validated as the plugin's."""
        return Annotated[
            cls,
            PlainValidator(partial(cls.parse, kind, own=own), json_schema_input_type=str | dict[str, Any]),
            PlainSerializer(cls.to_dict),
        ]

    @classmethod
    def parse(cls, kind: str, value: Any, own: type[PluginConfig] | None = None) -> "PluginSection":
        """Validate a section of plugin `kind` (see `of`); raises pydantic's ValidationError with
        every problem at its path within the section."""
        if isinstance(value, PluginSection):
            value = value.written
        try:
            entry, written = find_plugin(kind, value)
        except SectionError as e:
            raise _section_errors([((e.where,) if e.where else (), e.message, value)]) from None
        options = {k: v for k, v in written.items() if k != "name"}
        own_options = {k: options.pop(k) for k in list(options) if own is not None and k in own.model_fields}
        problems: list[tuple[tuple, str, Any]] = []
        own_config = _validate(own, own_options, problems) if own is not None else None
        config = _validate(entry.cls.Config, options, problems)
        if problems:
            raise _section_errors(problems)
        return cls(entry, config, written, own_config)

    @property
    def name(self) -> str:
        """The name as written (an alias stays an alias)."""
        return self.written["name"]

    @property
    def options(self) -> dict[str, Any]:
        """The plugin's options as written (without `name` and the holder's own settings)."""
        own = type(self.own).model_fields if self.own is not None else {}
        return {k: v for k, v in self.written.items() if k != "name" and k not in own}

    def create(self, *args: Any, **kwargs: Any) -> Any:
        """The plugin, built with its validated config (e.g. `create(task=task)`)."""
        return self.entry.cls(self.config, *args, **kwargs)

    def required_stages(self) -> list[str]:
        """The cached stages the plugin reads (`Plugin.required_stages`)."""
        return self.entry.cls.required_stages(self.config)

    def with_options(self, **options: Any) -> "PluginSection":
        """This section with some options replaced, validated again (e.g. a path filled in)."""
        return PluginSection.parse(self.entry.kind, {**self.written, **options}, own=type(self.own) if self.own is not None else None)

    def to_dict(self) -> dict[str, Any]:
        """The mapping as written: what config.yaml holds and cache keys hash."""
        return dict(self.written)


def _validate(model: type[PluginConfig], values: dict[str, Any], problems: list) -> PluginConfig | None:
    """`model` validated from `values`, or None with every error added to `problems` (explained)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        problems += [(tuple(err["loc"]), explain(err, model), err.get("input")) for err in e.errors()]
        return None


def _section_errors(problems: list[tuple[tuple, str, Any]]) -> ValidationError:
    """A pydantic ValidationError of (location within the section, message, value given) problems,
    each of type SECTION_ERROR, so that whoever reports it keeps the message and prefixes the path."""
    return ValidationError.from_exception_data(
        "plugin section",
        [{"type": PydanticCustomError(SECTION_ERROR, "{message}", {"message": message}), "loc": loc, "input": value}
         for loc, message, value in problems],
    )


PolicySection = PluginSection.of("policy")
RewardSourceSection = PluginSection.of("reward_source")
