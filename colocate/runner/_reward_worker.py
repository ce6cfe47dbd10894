"""The reward worker (a Ray actor) and what it shares with the driver: loading and checking.

Kept apart from :mod:`colocate.runner.rewards` so that a worker process imports only the
standard library and the user's reward modules: the driver's module pulls in the recipe schema
(and with it torch), which a worker has no use for. Items travel as plain tuples for the same
reason.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

#: A call's outcome: ``("ok", score, extras)`` or ``(reason, message)``.
Outcome = tuple

RAISED, TIMEOUT, NON_FINITE, BAD_TYPE = "raised", "timeout", "non_finite", "bad_type"


class LoadError(Exception):
    """A reward function spec that does not load: what is wrong and the fix."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; fix: {fix}")
        self.problem = problem
        self.fix = fix


def is_file_spec(module_part: str) -> bool:
    """Whether the part before ``:`` names a Python file (else a dotted module)."""
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def add_to_path(directory: str) -> None:
    """Appends ``directory`` to ``sys.path`` unless there (appended: installed packages win)."""
    if directory not in sys.path:
        sys.path.append(directory)


def load(spec: str) -> Callable:
    """The function a ``"pkg.module:fn"`` or ``"path/to/file.py:fn"`` spec names.

    Raises:
        LoadError: No such module or file, the import raised, no such attribute, or not
            callable.
    """
    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise LoadError(
            "is not MODULE:FUNCTION or FILE.py:FUNCTION", 'pass e.g. "my_rewards:score"'
        )
    if is_file_spec(module_part):
        module = _load_file(module_part)
    else:
        module = _import_module(module_part)
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise LoadError(
            f"{module_part} has no attribute {attr!r}",
            f"name one of its functions ({', '.join(public) or 'it defines none'})",
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise LoadError(
            f"{module_part}.{attr} is not callable (it is of type {type(fn).__name__})",
            "name a function",
        )
    return fn


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise LoadError(
                f"no module named {e.name!r} (searched sys.path, the current directory "
                f"{os.getcwd()} included)",
                "install the package, or run from the directory that holds the module, or "
                "give the file instead (path/to/file.py:fn)",
            ) from None
        raise _import_failed(name, e) from e
    except Exception as e:  # noqa: BLE001 - any error inside the user's module is reported
        raise _import_failed(name, e) from e


def _load_file(path_text: str):
    path = Path(path_text)
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise LoadError(
            f"no file {path} (relative paths are relative to the current directory {os.getcwd()})",
            "give the path of a Python file, relative to where the run is started, or absolute",
        )
    stem = re.sub(r"\W", "_", path.stem)
    # One module per file per process (two specs naming functions of one file share it); the
    # hash keeps two files of one name apart.
    name = f"_colocate_reward_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise LoadError(f"{path} cannot be loaded as a Python module", "give a .py file")
    module = importlib.util.module_from_spec(file_spec)
    # Registered before it runs, as an import would: dataclasses and pickling look it up.
    sys.modules[name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error inside the user's file is reported
        sys.modules.pop(name, None)
        raise _import_failed(str(path), e) from e
    return module


def _import_failed(what: str, e: BaseException) -> LoadError:
    return LoadError(
        f"importing {what} raised {type(e).__name__}: {e}",
        "fix the module (import it in Python to see the traceback)",
    )


def check_value(value: object) -> Outcome:
    """A function's return value as an outcome: a number, or a dict with a ``"score"``."""
    if isinstance(value, Mapping):
        if "score" not in value:
            keys = ", ".join(map(repr, value)) or "none"
            return BAD_TYPE, f"returned a dict without 'score' (keys: {keys})"
        named = dict(value)
    else:
        named = {"score": value}
    out = {}
    for key, v in named.items():
        if not isinstance(key, str):
            return BAD_TYPE, f"returned a dict with a non-string key {key!r}"
        # numbers.Real takes int, float, bool and numpy's scalars; a tensor or a string is not.
        if not isinstance(v, numbers.Real):
            if not isinstance(value, Mapping):
                return BAD_TYPE, (
                    f"returned {type(v).__name__}, not a number or a dict with a 'score'"
                )
            return BAD_TYPE, f"{key!r} is {type(v).__name__}, not a number"
        f = float(v)
        if not math.isfinite(f):
            return NON_FINITE, f"{key} = {f}"
        out[key] = f
    score = out.pop("score")
    return "ok", score, out


def call(fn: Callable, kwargs: dict, item: tuple) -> Outcome:
    """Calls ``fn`` on one item (a tuple: prompt, completion, completion_ids, row)."""
    prompt, completion, completion_ids, row = item
    try:
        value = fn(
            prompt=prompt,
            completion=completion,
            completion_ids=list(completion_ids),
            # A copy each: one function editing the row must not change what the next sees.
            row=dict(row),
            **kwargs,
        )
    except BaseException as e:  # noqa: BLE001 - SystemExit from a reward function is its error
        return RAISED, f"{type(e).__name__}: {e}"
    return check_value(value)


class RewardWorker:
    """Calls the reward functions on chunks of items, each call under a timeout.

    Each item's calls run at once in threads of a pool; a call not done ``timeout_s`` after
    the item started is abandoned (its thread cannot be stopped) and the worker is tainted:
    it goes on with a fresh pool, reports the taint, and the driver replaces it.

    Args:
        specs: The function specs (file paths absolute).
        kwargs: Keyword arguments of each function, in the order of ``specs``.
        cwd: The driver's working directory, added to ``sys.path``.
        timeout_s: Most seconds one call may take.
    """

    def __init__(self, specs: list[str], kwargs: list[dict], cwd: str, timeout_s: float):
        self._kwargs = kwargs
        self._timeout_s = timeout_s
        self._error: str | None = None
        self._fns: list[Callable] = []
        self._tainted = False
        add_to_path(cwd)
        for spec in specs:
            try:
                self._fns.append(load(spec))
            except LoadError as e:
                self._error = f"{spec}: {e}"
                break
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, len(self._fns)), thread_name_prefix="reward")

    def ready(self) -> str | None:
        """None once the functions are loaded; else why they did not load."""
        return self._error

    def score(self, items: list[tuple]) -> tuple[list[list[Outcome]], bool]:
        """The outcome of every function on every item, and whether a call was abandoned.

        Raises:
            RuntimeError: The functions did not load here.
        """
        if self._error is not None:
            raise RuntimeError(f"the reward functions did not load in this worker: {self._error}")
        results = []
        for item in items:
            started = time.monotonic()
            futures = [
                self._pool.submit(call, fn, kw, item)
                for fn, kw in zip(self._fns, self._kwargs, strict=True)
            ]
            row, hung = [], False
            for future in futures:
                left = max(0.0, started + self._timeout_s - time.monotonic())
                try:
                    row.append(future.result(timeout=left))
                except FutureTimeout:
                    row.append((TIMEOUT, f"no result within {self._timeout_s:g} s"))
                    hung = True
            if hung:
                # The hung thread stays busy (or asleep) in the old pool; later items get fresh
                # threads, and the driver replaces this process after the chunk.
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self._tainted = True
            results.append(row)
        return results, self._tainted
