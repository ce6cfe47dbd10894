"""Checks of an example's command line, all before any actor starts.

Every check names the flag, the value and the fix, and reports through ``argparse``'s
``error`` (exit status 2, the usage status). :meth:`Checker.check_recipe` turns a refusal of
the runner's recipe an example builds from its flags (``RecipeError``, the library's own
``ConfigError`` and ``TopologyError`` among its causes) into such errors too, naming the flag
the recipe key came from.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Checker",
    "address_answers",
]

T = TypeVar("T")


def address_answers(address: str, timeout_s: float = 10.0) -> str | None:
    """None if something accepts TCP connections at ``address`` within ``timeout_s``; else why.

    ``address`` is what ``ray.init`` takes: ``host:port``, ``ray://host:port`` or
    ``http(s)://host:port``; ``auto`` and ``local`` are Ray's own and not probed.
    """
    if address in ("auto", "local"):
        return None
    parsed = urllib.parse.urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:  # a port that is not a number
        port = None
    if not parsed.hostname or not port:
        return "is not host:port (or ray://host:port)"
    # The connect timeout does not bound the name lookup: try in a thread, wait bounded.
    answer: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                answer.append(None)
        except OSError as exc:
            answer.append(f"does not answer within {timeout_s:g} s ({exc.strerror or exc})")

    thread = threading.Thread(target=attempt, name="address-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return answer[0] if answer else f"does not answer within {timeout_s:g} s (name lookup)"


class Checker:
    """Validates parsed arguments against one parser; each failure exits with status 2.

    Args:
        parser: The example's parser (its ``error`` prints usage and exits 2).
        args: The parsed arguments.
    """

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace):
        self.parser = parser
        self.args = args

    def fail(self, flag: str, value: Any, problem: str, fix: str) -> None:
        """Exits with ``--flag value: problem; fix: fix`` (status 2)."""
        self.parser.error(f"{flag} {value!r}: {problem}; fix: {fix}")

    def _value(self, flag: str) -> Any:
        return getattr(self.args, flag.lstrip("-").replace("-", "_"))

    def at_least(self, flag: str, minimum: int, why: str = "") -> None:
        """An int flag must be >= ``minimum`` (None is allowed: the default applies)."""
        value = self._value(flag)
        if value is not None and value < minimum:
            problem = f"must be >= {minimum}" + (f" ({why})" if why else "")
            self.fail(flag, value, problem, f"pass {flag} {minimum} or more")

    def not_below(self, flag: str, other: str, why: str) -> None:
        """An int flag, when given, must be >= the value of flag ``other``."""
        value, floor = self._value(flag), self._value(other)
        if value is not None and value < floor:
            self.fail(
                flag,
                value,
                f"{why} (below {other} {floor})",
                f"pass {floor} or more, or a smaller {other}",
            )

    def in_range(self, flag: str, lo: float, hi: float, lo_open: bool = True) -> None:
        """A number flag must lie in (lo, hi] (or [lo, hi] when not ``lo_open``)."""
        value = self._value(flag)
        if value is None:
            return
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            bracket = "(" if lo_open else "["
            self.fail(flag, value, f"must be in {bracket}{lo:g}, {hi:g}]", "pass a value in it")

    def writable_dir(self, flag: str) -> Path:
        """The directory of ``flag`` exists (created) and takes a file."""
        value = self._value(flag)
        path = Path(value)
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
                pass
        except OSError as exc:
            self.fail(
                flag,
                value,
                f"cannot be written ({exc.strerror or exc})",
                "pass a directory you can write",
            )
        return path

    def existing_dir(self, flag: str, must_hold: str | None = None) -> Path | None:
        """The directory of ``flag`` exists (and holds ``must_hold``, if given)."""
        value = self._value(flag)
        if value is None:
            return None
        path = Path(value)
        if not path.is_dir():
            self.fail(flag, value, "is not a directory", "pass an existing local directory")
        if must_hold and not (path / must_hold).exists():
            self.fail(flag, value, f"holds no {must_hold}", f"pass a directory with {must_hold}")
        return path

    def address(self, flag: str, timeout_s: float = 10.0) -> None:
        """The Ray address of ``flag`` (or ``RAY_ADDRESS``) answers within ``timeout_s``."""
        value = self._value(flag)
        source = flag
        if value is None and os.environ.get("RAY_ADDRESS"):
            value, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        if value is None:
            return
        why = address_answers(value, timeout_s)
        if why:
            self.fail(
                source, value, why, "start the cluster (`ray start --head`) or fix the address"
            )

    def check_recipe(self, build: Callable[[], T], flags: dict[str, str]) -> T:
        """Runs ``build`` (which loads or prepares the runner's recipe); a refusal names its flag.

        A refusal of the library's own checks keeps the library's words (``--tp:
        TopologySpec.engine_tp=2: ...``); any other is ``--flag value: problem; fix: ...``.

        Args:
            build: Makes the recipe the flags ask for (``load_recipe``, ``prepare``).
            flags: Recipe key -> the flag it came from (``"trainer.lr": "--lr"``); a key that
                no flag sets is named as it is.
        """
        from colocate.core.config import ConfigError
        from colocate.runner.schema import RecipeError
        from placement import TopologyError

        try:
            return build()
        except RecipeError as exc:
            flag = flags.get(exc.key, exc.key)
            if isinstance(exc.__cause__, (ConfigError, TopologyError)):
                self.parser.error(f"{flag}: {exc.__cause__}")
            problem = str(exc).removeprefix(f"{exc.key}={exc.value!r}: ")
            self.parser.error(f"{flag} {exc.value!r}: {problem}")
