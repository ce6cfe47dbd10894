"""ObservationEncoder on the tiny model's tokenizer: plain text (the prompt with special
tokens, an observation without), token ids passed through, refusals of other values, and the
chat template (an observation's tokens are the template's delta, role header included)."""

from __future__ import annotations

import copy

import pytest

from colocate.agents import ObservationFormat
from colocate.agents.encoding import ObservationEncoder
from colocate.core.errors import InputError

pytestmark = pytest.mark.fast

# The synthetic template of tests/runner/test_data.py: every message is <role>content.
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEXT = "the answer is ka to ri"


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer, adding a BOS token (so special tokens can be seen)."""
    from transformers import AutoTokenizer

    from colocate.testing.tiny_model import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model(), add_bos_token=True)
    assert tok.chat_template is None
    assert tok.encode(TEXT)[0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The same tokenizer with the synthetic chat template."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def template(tok, messages, generation):
    out = tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----- TEXT -------------------------------------------------------------------------------------


def test_text_prompt_has_the_special_tokens(tokenizer):
    enc = ObservationEncoder(tokenizer, ObservationFormat.TEXT)
    ids = enc.prompt(TEXT)
    assert ids == tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_token_id


def test_text_observation_has_none(tokenizer):
    enc = ObservationEncoder(tokenizer, "text")
    ids = enc.observation(TEXT)
    assert ids == tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == TEXT


@pytest.mark.parametrize("fmt", list(ObservationFormat))
@pytest.mark.parametrize("ids", [[5, 6, 7], (9, 10), [0], range(3, 6)])
def test_token_ids_pass_through_unchanged(tokenizer, chat_tokenizer, fmt, ids):
    enc = ObservationEncoder(chat_tokenizer if fmt is ObservationFormat.CHAT else tokenizer, fmt)
    assert enc.observation(ids) == list(ids)
    assert enc.prompt(ids) == list(ids)
    assert all(type(t) is int for t in enc.observation(ids))


@pytest.mark.parametrize("fmt", list(ObservationFormat))
@pytest.mark.parametrize("empty", ["", [], ()])
def test_an_empty_observation_is_no_tokens(tokenizer, chat_tokenizer, fmt, empty):
    enc = ObservationEncoder(chat_tokenizer if fmt is ObservationFormat.CHAT else tokenizer, fmt)
    assert enc.observation(empty) == []


@pytest.mark.parametrize("value", [None, 3, 2.5, {"text": "x"}, [1, "a"], [True, False], [1.0]])
def test_neither_text_nor_ids_is_refused(tokenizer, value):
    enc = ObservationEncoder(tokenizer, "text")
    with pytest.raises(InputError, match="returns text or a list of token ids"):
        enc.observation(value)
    with pytest.raises(InputError, match="returns text or a list of token ids"):
        enc.prompt(value)


# ----- CHAT -------------------------------------------------------------------------------------


def test_chat_observation_is_the_template_delta(chat_tokenizer):
    enc = ObservationEncoder(chat_tokenizer, ObservationFormat.CHAT)
    ids = enc.observation(TEXT)
    before = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
    head = template(chat_tokenizer, before, generation=False)
    full = template(chat_tokenizer, [*before, {"role": "tool", "content": TEXT}], generation=True)
    assert full[: len(head)] == head
    assert ids == full[len(head) :]
    assert chat_tokenizer.decode(ids) == f"<tool>{TEXT}<assistant>"
    header = chat_tokenizer.encode("<tool>", add_special_tokens=False)
    assert ids[: len(header)] == header


def test_chat_observation_role(chat_tokenizer):
    enc = ObservationEncoder(chat_tokenizer, ObservationFormat.CHAT, role="observation")
    assert chat_tokenizer.decode(enc.observation("42")) == "<observation>42<assistant>"


def test_chat_prompt_is_a_user_message_with_the_generation_prompt(chat_tokenizer):
    enc = ObservationEncoder(chat_tokenizer, "chat")
    ids = enc.prompt(TEXT)
    assert ids == template(chat_tokenizer, [{"role": "user", "content": TEXT}], generation=True)
    assert chat_tokenizer.decode(ids).endswith(f"<user>{TEXT}<assistant>")


def test_chat_prompt_from_messages(chat_tokenizer):
    enc = ObservationEncoder(chat_tokenizer, "chat")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXT}]
    ids = enc.prompt(messages)
    assert ids == template(chat_tokenizer, messages, generation=True)
    assert "<system>be brief<user>" in chat_tokenizer.decode(ids)


def test_chat_without_a_template_is_refused(tokenizer):
    with pytest.raises(InputError) as info:
        ObservationEncoder(tokenizer, ObservationFormat.CHAT)
    message = str(info.value)
    assert "has no chat template" in message and "fix: use observation='text'" in message
    ObservationEncoder(tokenizer, ObservationFormat.TEXT)  # text needs none


def test_chat_template_that_rewrites_earlier_messages_is_refused(tokenizer):
    # The last message is marked: an earlier conversation renders differently once one follows.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}*{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    enc = ObservationEncoder(tok, "chat")
    with pytest.raises(InputError, match="renders an earlier conversation differently"):
        enc.observation(TEXT)
    assert enc.observation([4, 5]) == [4, 5]  # token ids need no template
