"""DeepSpeed's JIT-built C++ ops: built once per environment, never at run time, never a hang.

Two things made runs rebuild ops that the set-up had built, and one made a later run hang:

- Two ``ninja`` binaries: the system's (1.11) and the virtual environment's (the ``ninja``
  wheel, 1.13). torch's extension builder runs whichever ``ninja`` is first on ``PATH``; a
  process started from ``.venv/bin`` (a Ray worker of ``ray start``) and one started with a
  plain ``PATH`` use different ones, each reads the other's ``.ninja_log`` as a changed
  command and rebuilds (minutes per op: ``docs/design.md``, section 8a).
- One cache for every checkout of a user (``~/.cache/torch_extensions``), while the compile
  command embeds the virtual environment's path: two clones rebuild each other's ops.
- torch's build lock (``<op>/lock``) is a plain file waited on without a bound: a build killed
  half-way leaves it, and every later process that loads the op waits forever.

So every process that loads the ops (the set-up's warm-up, every trainer actor) runs with the
same :func:`op_environment`: this environment's own ``bin`` first on ``PATH`` and its own
extension directory; and :func:`prepare_ops` loads them under an ``flock`` (released by the
kernel when its holder dies, unlike torch's lock file): holding it, the torch lock file of
each op it loads is stale (every builder of those ops holds the flock) and is removed;
waiting for it is bounded, and a live holder that keeps it past the bound is named with the fix.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from pathlib import Path

__all__ = ["op_environment", "extensions_dir", "prepare_ops", "OpsLockError", "OPS"]

#: The ops a trainer rank loads on a CPU accelerator (shared-memory comm, fused Adam).
OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
_LOCK = ".colocate-build.lock"


class OpsLockError(RuntimeError):
    """Another live process holds the op-build lock for longer than the bound."""


def extensions_dir() -> Path:
    """This environment's extension cache (``TORCH_EXTENSIONS_DIR`` if set, else in it)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def op_environment() -> dict[str, str]:
    """What every op-loading process of this environment runs with (see the module doc)."""
    bin_dir = str(Path(sys.prefix) / "bin")
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        path = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return {"TORCH_EXTENSIONS_DIR": str(extensions_dir()), "PATH": path}


def _acquire(lock_path: Path, timeout_s: float):
    f = open(lock_path, "a+")  # noqa: SIM115 - held until release
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
        if time.monotonic() > deadline:
            f.close()
            raise OpsLockError(
                f"{lock_path} is held by another live process (building DeepSpeed ops) for "
                f"more than {timeout_s:g} s; fix: wait for it to finish, or stop it (e.g. "
                f"`fuser -k {lock_path}`) and start again"
            )
        time.sleep(0.2)


def prepare_ops(timeout_s: float = 600.0, names: tuple[str, ...] = OPS) -> dict[str, float]:
    """Loads (building once if needed) DeepSpeed's ``names`` ops for this process.

    Order: (1) the op environment is applied to this process; (2) the directory's flock is
    taken (bounded by ``timeout_s``); (3) holding it, the torch lock file of each op to load
    is stale (its builder died: a live one would hold the flock) and is removed;
    (4) each op is loaded (built only if the cache lacks it); (5) the flock is released.

    Returns:
        Seconds each op took to load (or build).

    Raises:
        OpsLockError: A live process kept the flock for more than ``timeout_s``.
    """
    os.environ.update(op_environment())
    directory = extensions_dir()
    directory.mkdir(parents=True, exist_ok=True)
    held = _acquire(directory / _LOCK, timeout_s)
    try:
        from deepspeed.accelerator import get_accelerator

        seconds = {}
        for name in names:
            builder = get_accelerator().create_op_builder(name)
            if builder is None:  # not an op of this accelerator
                continue
            # Only this op's lock: an op DeepSpeed builds itself later (say CPU Adam) is built
            # without the flock, so its lock may be live.
            (directory / builder.name / "lock").unlink(missing_ok=True)
            start = time.monotonic()
            builder.load(verbose=False)
            seconds[name] = time.monotonic() - start
        return seconds
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        held.close()
