"""The AMX tile request (colocate.actors.cpu.amx): flag parsing, and a bf16 engine that
generates on one OpenMP thread, where vLLM's AMX attention trapped (SIGILL) before the request
was made."""

import os
import subprocess
import sys
import textwrap

import pytest

from colocate.actors.cpu.amx import cpu_has_amx

pytestmark = pytest.mark.timeout(300)


@pytest.mark.fast
def test_cpu_has_amx_reads_the_flags_line():
    assert cpu_has_amx("processor : 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert not cpu_has_amx("processor : 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    # A flag that merely contains the name is not the flag.
    assert not cpu_has_amx("flags : fpu amx_tile_x\n")
    assert not cpu_has_amx("model name : amx_tile\n")


@pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX: nothing to trap")
def test_bf16_engine_generates_on_one_thread(tiny_model_dir):
    script = textwrap.dedent(
        """
        import sys
        from vllm import LLM, SamplingParams
        from colocate.core.config import EngineConfig
        from colocate.actors.engine import llm_kwargs
        from colocate.actors.engine_extension import EXTENSION_QUALNAME

        kwargs = llm_kwargs(EngineConfig(model=sys.argv[1]), cuda=False)
        llm = LLM(**kwargs, worker_extension_cls=EXTENSION_QUALNAME)
        out = llm.generate(["kato rimu"], SamplingParams(max_tokens=4, logprobs=0))
        print("TOKENS", len(out[0].outputs[0].token_ids))
        """
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # what a Ray actor with a fractional CPU gets
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TORCHDYNAMO_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, tiny_model_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS 4" in proc.stdout
