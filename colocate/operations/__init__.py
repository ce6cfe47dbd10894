"""Operating a run: command-line checks, the Ray cluster, run logs and checkpoints, the memory
plan and its pre-launch check, the timeline and its plot."""
