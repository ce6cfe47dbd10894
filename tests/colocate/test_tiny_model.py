"""The tiny model kit: deterministic, cached by content key, accepted by the CPU backend."""

import hashlib
import json

import pytest

from colocate import TinyModelSpec, build_tiny_model
from colocate.core.config import CPU_HEAD_SIZES, EngineConfig, check_engine_model

pytestmark = pytest.mark.fast


def _digest(path):
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
        if f.suffix in (".json", ".safetensors")
    }


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny_model(cache_root=tmp_path / "a")
    b = build_tiny_model(cache_root=tmp_path / "b")
    assert a.name == b.name and _digest(a) == _digest(b)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cache_root=tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    other = build_tiny_model(TinyModelSpec(seed=1), cache_root=tmp_path / "a")
    assert other != a and _digest(other)["model.safetensors"] != _digest(a)["model.safetensors"]


def test_model_and_tokenizer_are_usable(tiny_model_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((__import__("pathlib").Path(tiny_model_dir) / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in CPU_HEAD_SIZES
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("kato rimu sena").input_ids
    assert tok.decode(ids) == "kato rimu sena"
    assert len(tok) == cfg["vocab_size"]
    assert check_engine_model(EngineConfig(model=tiny_model_dir), "cpu")["model_type"] == "llama"


def test_spec_refuses_head_dim_the_cpu_backend_refuses():
    with pytest.raises(ValueError, match="head_dim=16"):
        TinyModelSpec(hidden_size=64, num_attention_heads=4)
