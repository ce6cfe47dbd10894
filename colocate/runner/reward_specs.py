"""The reward functions a recipe names: their names, loading, and the preflight check.

The specs and the call signature are described in :mod:`colocate.runner.rewards`;
:func:`check_functions` runs in the driver before Ray starts (``colocate.runner.loop.prepare``),
and the reward workers load the same specs with the same code
(``colocate.runner._reward_worker``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from colocate.runner import _reward_worker as worker_module
from colocate.runner.schema import RecipeError, RewardSection

__all__ = ["function_names", "load_function", "check_functions", "kwargs_by_name", "STANDARD_ARGS"]

#: The keyword arguments every reward function receives; ``reward.kwargs`` may not set them.
STANDARD_ARGS = ("prompt", "completion", "completion_ids", "row")


def function_names(specs: Sequence[str]) -> list[str]:
    """The functions' names: the part after ``:``; a repeated name gets ``#2``, ``#3``, ..."""
    names, seen = [], {}
    for spec in specs:
        base = spec.rpartition(":")[2]
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def load_function(spec: str, key: str) -> Callable:
    """Loads the function a spec names.

    ``"pkg.module:fn"`` is imported (the current directory is appended to ``sys.path``, as a
    console script does not have it); ``"path/to/file.py:fn"`` is loaded from the file (a path
    relative to the current directory) under a module name unique to that file.

    Args:
        spec: ``"pkg.module:fn"`` or ``"path/to/file.py:fn"``.
        key: The recipe key the spec came from (``reward.functions[1]``), for the error.

    Returns:
        The function.

    Raises:
        RecipeError: No such module or file, the import raised (the exception is named), no
            such attribute, or not callable.
    """
    worker_module.add_to_path(os.getcwd())
    try:
        return worker_module.load(spec)
    except worker_module.LoadError as e:
        raise RecipeError(key, spec, e.problem, e.fix) from None


def check_functions(section: RewardSection) -> list[str]:
    """Loads every function in the driver and checks the section's keyword arguments.

    Args:
        section: The recipe's ``reward`` section.

    Returns:
        The functions' names (see :func:`function_names`), in the order of the specs.

    Raises:
        RecipeError: A spec does not load (:func:`load_function`); a ``reward.kwargs`` key
            names no function, is not a mapping, or sets one of the standard arguments; a
            function cannot be called with the standard arguments and its ``reward.kwargs``.
    """
    names = function_names(section.functions)
    fns = [
        load_function(spec, f"reward.functions[{i}]") for i, spec in enumerate(section.functions)
    ]
    kwargs = kwargs_by_name(section, names)
    for i, (spec, name, fn) in enumerate(zip(section.functions, names, fns, strict=True)):
        _check_signature(fn, kwargs[name], f"reward.functions[{i}]", spec, name)
    return names


def kwargs_by_name(section: RewardSection, names: list[str]) -> dict[str, dict]:
    """Each function's keyword arguments (``reward.kwargs``, by name; {} where none).

    Raises:
        RecipeError: A key names no function, is not a mapping, or sets a standard argument.
    """
    given = dict(section.kwargs or {})
    for key, value in given.items():
        if key not in names:
            raise RecipeError(
                f"reward.kwargs.{key}",
                value,
                f"names no reward function (the functions: {', '.join(names) or 'none'})",
                "key the arguments by a function's name (the part of its spec after ':')",
            )
        if not isinstance(value, Mapping):
            raise RecipeError(
                f"reward.kwargs.{key}",
                value,
                "must be a mapping of keyword arguments",
                f"pass e.g. reward.kwargs.{key}.NAME=VALUE",
            )
        for arg in value:
            if arg in STANDARD_ARGS:
                raise RecipeError(
                    f"reward.kwargs.{key}.{arg}",
                    value[arg],
                    "is one of the arguments the scorer passes itself",
                    f"drop it (the scorer passes {', '.join(STANDARD_ARGS)})",
                )
    return {name: dict(given.get(name) or {}) for name in names}


def _check_signature(fn: Callable, kwargs: dict, key: str, spec: str, name: str) -> None:
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none; the call will tell
        return
    try:
        signature.bind(prompt="", completion="", completion_ids=[], row={}, **kwargs)
    except TypeError as e:
        given = ", ".join([*STANDARD_ARGS, *kwargs])
        raise RecipeError(
            key,
            spec,
            f"cannot be called with the keyword arguments {given}: {e}",
            f"define it as {name.split('#')[0]}(prompt, completion, completion_ids, row, "
            f"**kwargs), and give its own arguments in reward.kwargs.{name}",
        ) from None
