"""``python -m colocate``: the ``colocate-rl`` command (:mod:`colocate.runner.cli`)."""

from colocate.runner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
