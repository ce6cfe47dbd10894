"""Bad command-line flags of the examples: each is refused before anything starts, with exit
status 2 and a message naming the flag, the value and the fix. Parsing runs in this process
with ``ray.init`` made to fail, so a check that started Ray would show."""

import importlib.util
import time
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRPO = [
    ("--steps 0", ["--steps", "0"], ["--steps 0", "must be >= 1", "fix:"]),
    ("--prompts 0", ["--prompts", "0"], ["--prompts 0", "fix:"]),
    ("--group-size 1", ["--group-size", "1"], ["--group-size 1", "advantage is zero", "fix:"]),
    ("--bucket-mb 0", ["--bucket-mb", "0"], ["--bucket-mb 0.0", "fix:"]),
    (
        "--max-tokens 100000",
        ["--max-tokens", "100000"],
        ["--max-tokens 100000", "max-model-len", "fix:"],
    ),
    ("--max-tokens 0", ["--max-tokens", "0"], ["--max-tokens 0", "fix:"]),
    ("--gpus 0", ["--gpus", "0"], ["--gpus 0", "fix:"]),
    ("--engines 0", ["--engines", "0"], ["--engines 0", "fix:"]),
    ("--tp 0", ["--tp", "0"], ["--tp 0", "fix:"]),
    ("--gpus 3 --tp 2", ["--gpus", "3", "--tp", "2"], ["--tp", "engine_tp=2", "fix:"]),
    ("--lr -1", ["--lr", "-1"], ["--lr -1.0", "fix:"]),
    ("--temperature -1", ["--temperature", "-1"], ["--temperature -1.0", "fix:"]),
    ("--top-p 0", ["--top-p", "0"], ["--top-p 0.0", "(0, 1]", "fix:"]),
    ("--top-p 1.5", ["--top-p", "1.5"], ["--top-p 1.5", "fix:"]),
    ("--seed -1", ["--seed", "-1"], ["--seed -1", "fix:"]),
    ("--save-every 0", ["--save-every", "0"], ["--save-every 0", "fix:"]),
    ("--max-model-len 8", ["--max-model-len", "8"], ["--max-model-len 8", "fix:"]),
    (
        "--in-flight-groups without --pipeline partial",
        ["--in-flight-groups", "8"],
        ["--in-flight-groups", "--pipeline partial", "fix:"],
    ),
    ("--max-staleness 0", ["--max-staleness", "0"], ["--max-staleness 0", "fix:"]),
    (
        "--max-tokens-per-micro-batch below --max-model-len",
        ["--max-tokens-per-micro-batch", "100"],
        ["--max-tokens-per-micro-batch 100", "--max-model-len 512", "fix:"],
    ),
    (
        "--max-tokens-per-micro-batch with --micro-batch-size",
        ["--max-tokens-per-micro-batch", "512", "--micro-batch-size", "4"],
        ["--micro-batch-size", "max_tokens_per_micro_batch", "pass one of the two"],
    ),
    (
        "--out unwritable",
        ["--out", "/proc/colocate-out"],
        ["--out '/proc/colocate-out'", "cannot be written", "fix:"],
    ),
    (
        "--address nobody",
        ["--address", "127.0.0.1:1"],
        ["--address '127.0.0.1:1'", "does not answer", "fix:"],
    ),
    (
        "--address not host:port",
        ["--address", "nowhere"],
        ["--address 'nowhere'", "host:port", "fix:"],
    ),
    (
        "--model missing",
        ["--model", "/nonexistent"],
        ["--model '/nonexistent'", "not a directory", "fix:"],
    ),
    ("--resume missing", ["--resume", "/nonexistent"], ["--resume '/nonexistent'", "fix:"]),
    (
        "--trainer-gpus alone",
        ["--trainer-gpus", "1"],
        ["--trainer-gpus and --engine-gpus", "fix:"],
    ),
    ("--pipeline async colocated", ["--pipeline", "async"], ["--pipeline async", "fix:"]),
    ("--no-sync --sleep-level 2", ["--no-sync", "--sleep-level", "2"], ["--no-sync", "fix:"]),
]


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a flag check started Ray")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("case", GRPO, ids=[c[0] for c in GRPO])
def test_grpo_example_refuses_bad_flags_before_anything_starts(
    case, no_ray, capsys, tmp_path, report
):
    name, argv, words = case
    grpo = _example("grpo_colocated")
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        grpo.parse_args([*argv, *out])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert time.monotonic() - t0 < 30
    message = err.strip().splitlines()[-1]
    report.setdefault("bad_flags", []).append(
        {"input": f"grpo_colocated.py {name}", "message": message}
    )


def test_model_dir_without_config_is_refused(no_ray, capsys, tmp_path):
    grpo = _example("grpo_colocated")
    with pytest.raises(SystemExit) as exit_:
        grpo.parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "holds no config.json" in capsys.readouterr().err


def test_custom_topology_refuses_bad_flags(no_ray, capsys):
    topology = _example("custom_topology")
    with pytest.raises(SystemExit) as exit_:
        topology.main(["--steps", "0"])
    assert exit_.value.code == 2 and "--steps 0" in capsys.readouterr().err
