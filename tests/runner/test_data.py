"""Prompt data: loading through HF ``datasets``, chat templates, filtering, the eval split,
the sampler's epochs and checkpoints, and each refusal (key path and fix in the message)."""

from __future__ import annotations

import copy
import json

import pytest

from colocate.runner.data import PromptSampler, load_data
from colocate.runner.schema import DataSection, RecipeError

pytestmark = pytest.mark.fast

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ROWS = [{"prompt": f"question {i} ka to ri", "answer": str(i)} for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer (no chat template)."""
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model())
    assert tok.chat_template is None
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The same tokenizer with a chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(path, tok, budget=64, seed=0, **kwargs):
    return load_data(DataSection(train=str(path), **kwargs), tok, budget, seed)


def test_jsonl_text_prompts_keep_every_column(tmp_path, tokenizer):
    train, evaluation = load(write_jsonl(tmp_path / "p.jsonl", ROWS), tokenizer)
    assert evaluation is None
    assert len(train) == 10 and train.filtered == 0
    assert train.rows == ROWS
    assert train.prompt_ids[3] == tokenizer(ROWS[3]["prompt"])["input_ids"]
    assert train.prompt_text[3] == tokenizer.decode(train.prompt_ids[3])
    assert train.source.endswith("p.jsonl")


def test_json_array_file(tmp_path, tokenizer):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS[:3]))
    train, _ = load(path, tokenizer)
    assert [row["answer"] for row in train.rows] == ["0", "1", "2"]


def test_parquet_and_saved_dirs_give_the_same_rows(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for path in ("p.parquet", "saved", "saved_dict"):
        train, _ = load(tmp_path / path, tokenizer)
        assert train.rows == ROWS, path
        assert train.prompt_ids[0] == tokenizer(ROWS[0]["prompt"])["input_ids"]


def test_an_edited_file_is_read_again(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    assert load(path, tokenizer)[0].rows == ROWS[:2]
    write_jsonl(tmp_path / "p.jsonl", ROWS[5:8])
    assert load(path, tokenizer)[0].rows == ROWS[5:8]


def test_chat_template_applies_to_messages_and_text(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"prompt": [{"role": "user", "content": "ka to"}]},
    ]
    train, _ = load(write_jsonl(tmp_path / "chat.jsonl", rows), chat_tokenizer)
    assert train.prompt_text == ["<system>be brief<user>hi<assistant>", "<user>ka to<assistant>"]
    assert train.rows[0]["prompt"][0] == {"role": "system", "content": "be brief"}
    expected = chat_tokenizer.apply_chat_template(
        rows[1]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert train.prompt_ids[1] == list(expected)

    text, _ = load(write_jsonl(tmp_path / "text.jsonl", [{"prompt": "ka to"}]), chat_tokenizer)
    assert text.prompt_ids == train.prompt_ids[1:]
    plain, _ = load(tmp_path / "text.jsonl", chat_tokenizer, chat_template=False)
    assert plain.prompt_text == ["ka to"]


def test_messages_with_extra_keys_reach_the_template_without_arrow_padding(tmp_path):
    class Recorder:
        chat_template = "set"

        def __init__(self):
            self.seen = []

        def apply_chat_template(self, messages, **kwargs):
            self.seen.append(messages)
            return {"input_ids": [1, 2]}

        def decode(self, ids):
            return "x"

    rows = [
        {"prompt": [{"role": "user", "content": "a", "name": "ann"}]},
        {"prompt": [{"role": "user", "content": "b"}]},
    ]
    recorder = Recorder()
    load(write_jsonl(tmp_path / "p.jsonl", rows), recorder)
    assert recorder.seen == [rows[0]["prompt"], rows[1]["prompt"]]


def test_long_prompts_are_filtered_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "ka " * n} for n in (1, 40, 2, 50, 3)]
    lengths = [len(tokenizer(row["prompt"])["input_ids"]) for row in rows]
    budget = sorted(lengths)[2]
    train, _ = load(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, budget=budget)
    assert train.filtered == 2
    assert [row["prompt"] for row in train.rows] == [
        rows[0]["prompt"],
        rows[2]["prompt"],
        rows[4]["prompt"],
    ]
    assert all(len(ids) <= budget for ids in train.prompt_ids)


def test_held_out_eval_is_disjoint_and_fixed_by_the_seed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    train, evaluation = load(path, tokenizer, seed=3, eval_size=3)
    assert len(train) == 7 and len(evaluation) == 3
    train_answers = {row["answer"] for row in train.rows}
    eval_answers = {row["answer"] for row in evaluation.rows}
    assert train_answers.isdisjoint(eval_answers)
    assert train_answers | eval_answers == {row["answer"] for row in ROWS}
    # Both parts keep the file's order.
    assert [row["answer"] for row in train.rows] == sorted(train_answers, key=int)
    again = load(path, tokenizer, seed=3, eval_size=3)[1]
    assert again.rows == evaluation.rows
    others = [load(path, tokenizer, seed=s, eval_size=3)[1].rows for s in range(4, 8)]
    assert any(rows != evaluation.rows for rows in others)


def test_eval_file(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    train, evaluation = load(train_path, tokenizer, eval=eval_path)
    assert len(train) == 10 and evaluation.rows == ROWS[:2]
    assert evaluation.source == eval_path


def test_sampler_visits_every_row_once_per_epoch_in_a_new_order():
    sampler = PromptSampler(7, seed=1)
    epochs = [sampler.take(7) for _ in range(3)]
    assert sampler.epoch == 2
    assert all(sorted(order) == list(range(7)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert PromptSampler(7, seed=1).take(21) == sum(epochs, [])
    assert PromptSampler(7, seed=2).take(7) != epochs[0]
    assert PromptSampler(7, seed=1, shuffle=False).take(10) == list(range(7)) + [0, 1, 2]


def test_a_step_spans_epochs_and_the_epoch_counts_from_zero():
    sampler = PromptSampler(5, seed=0)
    assert sampler.epoch == 0 and sampler.take(0) == []
    first = sampler.take(3)
    assert sampler.epoch == 0
    spanning = sampler.take(4)
    assert sampler.epoch == 1
    assert sorted(first + spanning[:2]) == list(range(5))
    assert len(PromptSampler(2, seed=0).take(5)) == 5


def test_restore_continues_exactly_mid_epoch():
    sampler = PromptSampler(9, seed=4)
    sampler.take(13)
    state = json.loads(json.dumps(sampler.state()))
    expected = sampler.take(20)
    resumed = PromptSampler(9, seed=4)
    resumed.restore(state)
    assert resumed.epoch == 1
    assert resumed.take(20) == expected
    with pytest.raises(ValueError, match="size"):
        PromptSampler(8, seed=4).restore(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(9, seed=5).restore(state)


def refusal(match, key, *args, **kwargs):
    with pytest.raises(RecipeError, match=match) as info:
        load(*args, **kwargs)
    assert info.value.key == key
    assert "fix: " in str(info.value)
    return str(info.value)


def test_refusals_of_the_files(tmp_path, tokenizer):
    message = refusal("no such file", "data.train", tmp_path / "nope.jsonl", tokenizer)
    assert ".jsonl, .json or .parquet" in message
    (tmp_path / "p.csv").write_text("prompt\na\n")
    message = refusal("unknown format '.csv'", "data.train", tmp_path / "p.csv", tokenizer)
    assert "save_to_disk" in message
    (tmp_path / "empty.jsonl").write_text("")
    refusal("is empty", "data.train", tmp_path / "empty.jsonl", tokenizer)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    refusal(
        r"could not be read as JSON \(.jsonl\): \w+Error: ",
        "data.train",
        tmp_path / "bad.jsonl",
        tokenizer,
    )
    (tmp_path / "plain_dir").mkdir()
    refusal("could not be read as a directory", "data.train", tmp_path / "plain_dir", tokenizer)

    import datasets

    no_rows = datasets.Dataset.from_dict({"prompt": []})
    no_rows.to_parquet(str(tmp_path / "none.parquet"))
    refusal("has no rows", "data.train", tmp_path / "none.parquet", tokenizer)
    no_rows.save_to_disk(str(tmp_path / "none"), num_shards=1)
    refusal("has no rows", "data.train", tmp_path / "none", tokenizer)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    refusal("corresponds to no data", "data.train", tmp_path / "blank.jsonl", tokenizer)
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "dict"))
    refusal(r"without a 'train' split \(splits: a, b\)", "data.train", tmp_path / "dict", tokenizer)

    good = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(RecipeError, match="no such file") as info:
        load(good, tokenizer, eval=str(tmp_path / "nope.jsonl"))
    assert info.value.key == "data.eval"
    refusal("holds out every row", "data.eval_size", good, tokenizer, eval_size=10)


def test_refusals_of_the_prompts(tmp_path, tokenizer, chat_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    message = refusal("no such column", "data.prompt_key", path, tokenizer, prompt_key="question")
    assert "columns: prompt, answer" in message and "data.prompt_key=COLUMN" in message

    numbers = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 3}])
    message = refusal("neither text nor chat messages", "data.prompt_key", numbers, tokenizer)
    assert '"role": str, "content": str' in message
    odd = write_jsonl(tmp_path / "o.jsonl", [{"prompt": [{"speaker": "a", "text": "b"}]}])
    refusal("neither text nor chat messages", "data.prompt_key", odd, chat_tokenizer)
    blank = write_jsonl(tmp_path / "b.jsonl", [{"prompt": ""}])
    refusal("empty prompt", "data.prompt_key", blank, tokenizer)

    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    message = refusal("no chat template", "data.prompt_key", chat, tokenizer)
    assert "tokenizer has a chat template, or give text prompts" in message
    message = refusal(
        "chat messages", "data.chat_template", chat, chat_tokenizer, chat_template=False
    )
    assert "data.chat_template=true" in message

    message = refusal("every prompt", "data.max_prompt_tokens", path, tokenizer, budget=2)
    shortest = min(len(tokenizer(row["prompt"])["input_ids"]) for row in ROWS)
    assert f"shortest {shortest}" in message and "budget of 2 tokens" in message
    assert f"data.max_prompt_tokens={shortest} or more" in message


def test_no_cache_is_left_behind(tmp_path, tokenizer, monkeypatch):
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    load(write_jsonl(tmp_path / "p.jsonl", ROWS), tokenizer)
    assert not cache.exists() or not any(cache.iterdir())


def test_held_out_rows_are_filtered_apart(tmp_path, tokenizer):
    rows = [{"prompt": "ka " * (40 if i % 2 else 1), "i": i} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, evaluation = load(path, tokenizer, budget=8, eval_size=4)
    assert train.filtered + evaluation.filtered == 5
    assert len(train) + len(evaluation) == 5
    assert all(row["i"] % 2 == 0 for row in train.rows + evaluation.rows)
