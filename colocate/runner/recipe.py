"""Loading a recipe: the YAML file and the command line's overrides, checked, as a RunnerConfig.

:func:`load_recipe` turns every way a recipe can be wrong into a :class:`RecipeError` naming
the key path, the value and the fix: a file that is missing, not YAML or not a mapping (key
``--config``); an override without ``=``; a key the schema does not have (its section's keys
listed, the closest suggested); a value of the wrong type or not among an enum's values; a
required value not given; and whatever the sections' own checks refuse. :func:`to_yaml` prints a
resolved recipe that loads back to an equal one.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from colocate.runner.schema import RecipeError, RunnerConfig

__all__ = ["MissingValueError", "load_recipe", "to_yaml"]

#: How OmegaConf marks a value that must be given.
_MISSING = "???"

# The fix for each required value, by key.
_REQUIRED_FIX = {
    "model.path": "pass model.path=DIR (a local HF model directory, or tiny)",
    "data.train": "pass data.train=FILE (JSONL, Parquet, or a saved dataset directory)",
    "reward": 'pass reward.functions=["pkg.module:fn"] or reward.model=DIR',
}


class MissingValueError(RecipeError):
    """A required value was not given: ``key is required; fix: ...``.

    Attributes:
        key: The dotted key path.
        value: ``"???"`` (OmegaConf's mark of a missing value).
    """

    def __init__(self, key: str, also: Sequence[str] = ()):
        fix = _REQUIRED_FIX.get(key, f"pass {key}=VALUE")
        more = f" (also missing: {', '.join(also)})" if also else ""
        ValueError.__init__(self, f"{key} is required{more}; fix: {fix}")
        self.key = key
        self.value = _MISSING


def load_recipe(path: str | None, overrides: Sequence[str] = ()) -> RunnerConfig:
    """The run's configuration from a YAML recipe and dotted overrides.

    Steps, in order: (1) the structured base (every section's defaults); (2) the YAML file, if
    given, merged over it; (3) each override (``key=value``, the value parsed as YAML) merged
    in turn; (4) required values that are still missing refused; (5) ``OmegaConf.to_object``,
    which runs every section's ``__post_init__`` and then :class:`RunnerConfig`'s (their
    :class:`RecipeError` passes through unchanged). Before each merge the source's keys are
    checked against the schema, enum values (``grpo``, ``token-mean``; their names too) and
    booleans checked, so that a refusal names the full key path.

    Args:
        path: The YAML recipe, or None (overrides only).
        overrides: ``key=value`` items (``trainer.lr=1e-5``, ``reward.functions=[m:f]``).

    Returns:
        The frozen, checked configuration.

    Raises:
        RecipeError: Anything that cannot work; the message names key, value and fix.
    """
    config = OmegaConf.structured(RunnerConfig)
    if path is not None:
        config = _merge(config, _read_yaml(path), None)
    for item in overrides:
        config = _merge(config, _parse_override(item), item)
    try:
        missing = sorted(OmegaConf.missing_keys(config), key=_schema_order)
        if missing:
            raise MissingValueError(missing[0], missing[1:])
        return OmegaConf.to_object(config)
    except MissingMandatoryValue as exc:  # what missing_keys did not see
        raise MissingValueError(exc.full_key or "?") from None
    except ValidationError as exc:
        raise _type_error(exc.full_key or "", _unspecified) from None
    except OmegaConfBaseException as exc:  # an interpolation (``${...}``) that does not resolve
        raise RecipeError(
            exc.full_key or "recipe",
            _lookup(OmegaConf.to_container(config, resolve=False), exc.full_key or ""),
            f"cannot be resolved ({str(exc).splitlines()[0]})",
            "refer to a key the recipe has, e.g. ${algorithm.clip_low}",
        ) from None


def to_yaml(config: RunnerConfig) -> str:
    """The resolved recipe as YAML (enums by value: ``estimator: grpo``); loads back equal.

    Args:
        config: A configuration (from :func:`load_recipe`).
    """
    return OmegaConf.to_yaml(OmegaConf.create(_plain(config)))


def _plain(value: Any) -> Any:
    """A dataclass tree as plain dicts and lists, each enum by its value."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----- the sources ----------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    """The recipe file as a plain mapping; refusals name ``--config``."""
    file = Path(path)
    if not file.exists():
        raise RecipeError("--config", path, "no such file", "pass the path of a YAML recipe")
    if not file.is_file():
        raise RecipeError("--config", path, "is not a file", "pass the path of a YAML recipe")
    try:
        loaded = OmegaConf.load(file)
    except yaml.YAMLError as exc:
        raise RecipeError(
            "--config", path, f"is not valid YAML ({_yaml_problem(exc)})", "fix the YAML there"
        ) from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as exc:
        # OmegaConf refuses a top-level scalar with an OSError ("Invalid loaded object type")
        raise RecipeError(
            "--config",
            path,
            f"cannot be read as a recipe ({exc})",
            "write a mapping of sections (model:, data:, reward:, ...)",
        ) from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(
            "--config",
            path,
            f"holds a {type(loaded).__name__}, not a mapping of sections",
            "write a mapping of sections (model:, data:, reward:, ...)",
        )
    return OmegaConf.to_container(loaded, resolve=False)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def _parse_override(item: str) -> dict:
    """One ``key=value`` as a nested mapping (the value parsed as YAML)."""
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(
            "override",
            item,
            "is not KEY=VALUE",
            f"pass {key.strip() or 'KEY'}=VALUE, e.g. trainer.lr=1e-5",
        )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(
            "override", item, f"does not parse ({first})", "pass KEY=VALUE, e.g. trainer.lr=1e-5"
        ) from None


def _merge(config: DictConfig, source: dict, override: str | None) -> DictConfig:
    """``source`` (checked against the schema first) merged over ``config``."""
    _check_keys(source, RunnerConfig, "")
    try:
        return OmegaConf.merge(config, source)
    except ConfigKeyError as exc:  # the walk above sees these first; kept as a backstop
        key = exc.full_key or ""
        raise RecipeError(
            key or (override or "--config"),
            _lookup(source, key),
            f"is not a recipe key ({exc.msg.splitlines()[0]})",
            "use a key of the schema (colocate.runner.schema)",
        ) from None
    except ValidationError as exc:
        raise _type_error(exc.full_key or "", _lookup(source, exc.full_key or "")) from None


# ----- the schema -----------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, Any]:
    """A section's field types, resolved, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(kind: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``; else ``(kind, False)``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _schema_keys(cls: type = RunnerConfig, prefix: str = "") -> list[str]:
    """Every key of the schema, sections before their keys, in declaration order."""
    out = []
    for name, kind in _fields(cls).items():
        out.append(prefix + name)
        kind, _ = _unwrap(kind)
        if _is_section(kind):
            out += _schema_keys(kind, f"{prefix}{name}.")
    return out


def _schema_order(key: str) -> int:
    keys = _schema_keys()
    return keys.index(key) if key in keys else len(keys)


def _kind_at(path: str) -> Any:
    """The schema's type at a dotted path (``reward.weights[0]`` gives the item type)."""
    kind: Any = RunnerConfig
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        kind, _ = _unwrap(kind)
        if part.startswith("["):
            args = typing.get_args(kind)
            kind = args[0] if args else Any
        elif _is_section(kind):
            kind = _fields(kind).get(part, Any)
        else:
            return Any
    return kind


def _describe(kind: Any) -> str:
    """What a value of ``kind`` is, in words (``an int``, ``a list of numbers``)."""
    kind, optional = _unwrap(kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        text = "true or false"
    elif kind is int:
        text = "an int"
    elif kind is float:
        text = "a number"
    elif kind is str:
        text = "a string"
    elif _is_enum(kind):
        text = "one of " + ", ".join(str(m.value) for m in kind)
    elif _is_section(kind):
        text = "a mapping of its keys (" + ", ".join(_fields(kind)) + ")"
    elif origin is list:
        item = _describe(typing.get_args(kind)[0])
        text = f"a list of {item.removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict:
        text = "a mapping"
    else:
        text = "a value"
    return text + (" (or null)" if optional else "")


def _default_at(path: str) -> Any:
    """The schema's default at a dotted path of scalars, or None."""
    *sections, name = path.split(".")
    cls: Any = RunnerConfig
    for part in sections:
        cls, _ = _unwrap(_fields(cls).get(part, Any))
        if not _is_section(cls):
            return None
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None or field.default is dataclasses.MISSING or field.default in (None, _MISSING):
        return None
    default = field.default
    return default.value if isinstance(default, enum.Enum) else default


def _type_error(path: str, value: Any) -> RecipeError:
    """A value OmegaConf could not convert to the schema's type at ``path``."""
    kind = _kind_at(path)
    expected = _describe(kind)
    default = _default_at(path)
    example = f", e.g. {path}={str(default).lower() if isinstance(default, bool) else default}"
    fix = f"pass {expected}" + (example if default is not None else "")
    shown = value if value is not _unspecified else "?"
    return RecipeError(path or "recipe", shown, f"must be {expected}", fix)


_unspecified = object()


def _lookup(source: Any, path: str) -> Any:
    """The value at a dotted path of a plain mapping (``_unspecified`` if not there)."""
    node = source
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("[") and isinstance(node, list):
            i = int(part[1:-1])
            node = node[i] if i < len(node) else _unspecified
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _unspecified
    return node


def _first_leaf(path: str, value: Any) -> tuple[str, Any]:
    """The first scalar under a nested mapping, with its full path."""
    while isinstance(value, dict) and value:
        key, value = next(iter(value.items()))
        path = f"{path}.{key}"
    return path, value


def _check_keys(node: dict, cls: type, prefix: str) -> None:
    """Checks a source mapping against section ``cls``; enum values become member names.

    Refuses a key the section does not have, a section given a scalar, an enum value not among
    the enum's, and a boolean given anything but true or false (OmegaConf would take ``3`` as
    true). Interpolations (``${...}``) and missing marks (``???``) are left to OmegaConf.
    """
    fields = _fields(cls)
    for key, value in list(node.items()):
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(str(key), value, list(fields), prefix)
        kind, optional = _unwrap(fields[key])
        if value is None and optional:
            continue
        if isinstance(value, str) and (value == _MISSING or value.startswith("${")):
            continue
        if _is_section(kind):
            if value is None:  # an empty section (``trainer:`` with every key commented out)
                del node[key]
                continue
            if not isinstance(value, dict):
                first = dataclasses.fields(kind)[0].name
                raise RecipeError(
                    path,
                    value,
                    f"is a section, not a value (its keys: {', '.join(_fields(kind))})",
                    f"give its keys, e.g. {path}.{first}=...",
                )
            _check_keys(value, kind, f"{path}.")
        elif isinstance(value, dict) and typing.get_origin(kind) is not dict and kind is not Any:
            leaf, leaf_value = _first_leaf(path, value)
            raise RecipeError(
                leaf,
                leaf_value,
                f"{path} is a value ({_describe(fields[key])}), not a section",
                f"pass {path}=VALUE",
            )
        elif _is_enum(kind):
            node[key] = _enum_name(path, value, kind)
        elif kind is bool and not isinstance(value, bool):
            raise RecipeError(path, value, "must be true or false", "pass true or false")


def _enum_name(path: str, value: Any, kind: type[enum.Enum]) -> str:
    """The member name OmegaConf takes for ``value`` (a member's value or name)."""
    for member in kind:
        if value in (member, member.value, member.name):
            return member.name
    choices = ", ".join(str(m.value) for m in kind)
    raise RecipeError(path, value, f"is not one of {choices}", "pass one of them")


def _unknown_key(key: str, value: Any, valid: list[str], prefix: str) -> RecipeError:
    """``prefix + key`` is not in the schema: the section's keys, and the closest one."""
    section = prefix.rstrip(".") or "the recipe"
    leaf, leaf_value = _first_leaf(prefix + key, value)
    rest = leaf[len(prefix + key) :]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    fix = f"did you mean {prefix}{close[0]}{rest}?" if close else "use one of its keys, or drop it"
    return RecipeError(
        leaf,
        leaf_value,
        f"{section} has no key {key!r} (its keys: {', '.join(valid)})",
        fix,
    )
