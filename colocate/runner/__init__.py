"""The runner: a whole RL run from a recipe, without writing a driver.

``colocate-rl train --config recipe.yaml key=value ...`` (or ``python -m colocate``): a YAML
recipe (:mod:`colocate.runner.schema`) with dotted overrides, prompt data through HF
``datasets`` (:mod:`~colocate.runner.data`), reward functions run off the driver
(:mod:`~colocate.runner.rewards`), an advantage estimator
(:mod:`colocate.algorithms.advantages`), evaluation and HF export during training, metrics
under verl's names (:mod:`~colocate.runner.loop`). ``docs/runner.md`` is the guide.
"""
