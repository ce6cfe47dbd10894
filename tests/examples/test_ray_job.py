"""`ray job submit` against a real local head started with `ray start`.

The GRPO example is submitted from the repository (``--working-dir .``); the runner,
``colocate-rl train``, from a task directory the test writes (prompts, a reward module, a
recipe), as a user would submit theirs.
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from recipes import RECIPE, write_task

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray(*args, env, timeout=120, check=True):
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


@pytest.fixture
def ray_head(tmp_path):
    """A head node with 2 logical GPUs, on its own ports and temp dir; stopped even on failure.

    Every port is chosen free: the test session's own Ray runs beside it. The head is stopped
    by ending its process group (``ray stop`` would stop every Ray on the machine). Its jobs
    find the venv's console scripts (``colocate-rl``) on PATH, and this checkout's packages on
    PYTHONPATH (the venv's install may be another checkout's, editable).
    """
    (port, dash, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr, client) = (
        _free_ports(9)
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    # Short: Ray's socket paths under it must stay within 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--num-gpus=2",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = _ray("job", "list", "--address", address, env=env, check=False)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"head did not start: {head.stdout.read()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        _kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _ops_snapshot() -> dict:
    from colocate.actors.cpu.ds_ops import extensions_dir

    root = extensions_dir()
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.so")}


def _submit(address, env, command, working_dir=ROOT) -> str:
    """Submits ``command`` (an argv list) with ``working_dir`` uploaded; returns the job id."""
    submitted = _ray(
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(working_dir),
        "--no-wait",
        "--",
        *command,
        env=env,
    )
    return next(
        line.split("'")[1]
        for line in submitted.stdout.splitlines()
        if "submitted successfully" in line
    )


def _wait(address, env, job_id, until=("SUCCEEDED", "FAILED", "STOPPED"), timeout=600) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _ray("job", "status", "--address", address, job_id, env=env).stdout.upper()
        if any(s in status for s in until):
            break
        time.sleep(3)
    return status


def _logs(address, env, job_id) -> str:
    return _ray("job", "logs", "--address", address, job_id, env=env, check=False).stdout


def test_ray_job_submit_runs_grpo(ray_head, tmp_path):
    address, env = ray_head
    ops_before = _ops_snapshot()
    out = tmp_path / "job-out"
    example = ["python", "examples/grpo_colocated.py", "--quiet"]
    job_id = _submit(address, env, [*example, "--steps", "4", "--out", str(out)])
    status = _wait(address, env, job_id)
    logs = _logs(address, env, job_id)
    assert "SUCCEEDED" in status, f"{status}\n{logs[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["weight_version"] == 5
    assert summary["ordering_violations"] == []
    # The device kind comes from the bundles (the job's driver holds no GPU): each of the
    # head's two logical GPUs answered the placement probe itself, as a CPU bundle.
    accel = summary["accelerator"]
    assert accel["device"] == "cpu" and accel["source"] == "placement probe on each bundle"
    assert sorted(b["gpu_id"] for b in accel["bundles"]) == ["0", "1"]
    assert all(b["memory_kind"] == "host" for b in accel["bundles"])
    # The memory plan was checked before launch, against those bundles' host memory.
    assert set(summary["memory_plan"]) >= {"shared/rollout", "shared/train", "shared/sync"}
    assert "GRPO done" in logs
    # The job's trainers loaded the ops the set-up built: nothing was compiled at run time.
    assert ops_before and _ops_snapshot() == ops_before


def _runner_task(root: Path) -> Path:
    """A task directory as a user submits it: prompts, a reward module and a recipe."""
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    root.mkdir()
    write_task(root, len(AutoTokenizer.from_pretrained(str(build_tiny_model()))))
    (root / "recipe.yaml").write_text(RECIPE.format(steps=40))
    return root


def test_runner_job_stopped_mid_run_resumes_in_a_new_job(ray_head, tmp_path):
    """`ray job stop` mid-run of `colocate-rl train`, then a new job resuming: every step once.

    The job's working directory is the uploaded task directory: the recipe's relative data
    files and its reward module (``my_rewards.py:share``) resolve there.
    """
    address, env = ray_head
    assert shutil.which("colocate-rl", path=env["PATH"]) == str(BIN / "colocate-rl")
    task = _runner_task(tmp_path / "task")
    out = tmp_path / "job-out"  # outside the working dir: the second upload stays small
    # Enough steps that the stop lands mid-run (it takes a few seconds to reach the driver).
    train = [
        "colocate-rl",
        "train",
        "--config",
        "recipe.yaml",
        "checkpoint.save_every=3",
        f"out={out}",
        "log.progress=false",
        "eval.every=0",  # evaluations at the start and at the end only
    ]
    first = _submit(address, env, train, working_dir=task)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 4:
        status = _ray("job", "status", "--address", address, first, env=env).stdout.upper()
        assert "FAILED" not in status and "SUCCEEDED" not in status, _logs(address, env, first)
        assert time.monotonic() < deadline, "the first job made no progress"
        time.sleep(1)
    _ray("job", "stop", "--address", address, first, env=env, timeout=180)
    assert "STOPPED" in _wait(address, env, first, timeout=120)
    second = _submit(address, env, [*train, f"checkpoint.resume={out}"], working_dir=task)
    status = _wait(address, env, second)
    logs = _logs(address, env, second)
    assert "SUCCEEDED" in status, f"{shlex.join(train)}\n{logs[-4000:]}"
    assert "colocate-rl done" in logs
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(40)), [r["step"] for r in rows]
    # the reward module the job loaded from its working directory scored every step
    assert all("reward/share/mean" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    resumed = summary["resumed_from"]
    assert 3 <= resumed < 40 and resumed % 3 == 0 and summary["ordering_violations"] == []
    saved = json.loads((out / "checkpoints" / f"step{resumed}" / "run.json").read_text())
    # the resume's verified sync is a version of its own, then one per step
    assert summary["weight_version"] == saved["weight_version"] + 1 + (40 - resumed)
    # the first job's evaluation before step 0, the second's after the last: each once
    assert [e["eval/step"] for e in summary["eval"]] == [0, 40]
    lines = (out / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["eval/step"] for line in lines] == [0, 40]
    assert [Path(e).name for e in summary["exports"]] == ["step-40"]
