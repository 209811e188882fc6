"""JSONL parsing and tokenization: line-numbered errors, completion-only labels, chat templates."""

from __future__ import annotations

import json

import pytest

from server.jobs.data import IGNORE_INDEX, DataError, Record, parse_jsonl, tokenize_records
from tests.conftest import make_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def lines(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


GOOD = {"prompt": "t1 t2", "completion": "t3"}


def test_parses_both_record_kinds_and_skips_blank_lines():
    chat = {"messages": [{"role": "user", "content": "t1"}, {"role": "assistant", "content": "t2"}]}
    recs = parse_jsonl(lines(GOOD, "", "   ", chat))
    assert [r.line for r in recs] == [1, 4]
    assert recs[0].prompt == "t1 t2" and recs[0].completion == "t3"
    assert recs[1].messages[-1] == {"role": "assistant", "content": "t2"}


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"prompt": "t1"}, 'expected {"prompt", "completion"}'),
        ({"prompt": "t1", "completion": "t2", "extra": 1}, "unknown keys: ['extra']"),
        ({"prompt": 3, "completion": "t2"}, '"prompt" must be a string'),
        ({"prompt": "t1", "completion": ""}, "completion"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "t1"}]}, "must be the assistant's"),
        ({"messages": [{"role": "robot", "content": "t1"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
        ({"prompt": "t1 \ud800", "completion": "t2"}, '"prompt" is not valid Unicode'),  # a lone surrogate
        ({"prompt": "t1", "completion": "\udfff"}, '"completion" is not valid Unicode'),
        (
            {"messages": [{"role": "user", "content": "\ud83d"}, {"role": "assistant", "content": "t2"}]},
            "messages[0].content is not valid Unicode",
        ),
    ],
)
def test_malformed_lines_name_the_line(bad, needle):
    with pytest.raises(DataError) as exc:
        parse_jsonl(lines(GOOD, GOOD, "", GOOD, bad, GOOD))
    assert exc.value.line == 5
    assert str(exc.value).startswith("line 5: ")
    assert needle in str(exc.value)


def test_empty_data_is_an_error():
    with pytest.raises(DataError, match="no examples"):
        parse_jsonl("\n\n")


def test_labels_mask_the_prompt():
    tok = make_tokenizer()
    [ex] = tokenize_records(tok, [Record(1, prompt="t5 t6 t7", completion="t8 t9")], max_length=64)
    assert ex.input_ids == [5, 6, 7, 8, 9]
    assert ex.labels == [IGNORE_INDEX] * 3 + [8, 9]
    assert ex.n_target == 2


def test_eos_is_appended_to_completions_when_the_tokenizer_has_one():
    tok = make_tokenizer()
    tok.eos_token = "t1"
    [ex] = tokenize_records(tok, [Record(1, prompt="t5", completion="t8")], max_length=64)
    assert ex.input_ids == [5, 8, 1] and ex.labels == [IGNORE_INDEX, 8, 1]


def test_truncation_cuts_the_end_and_errors_without_a_completion_token():
    tok = make_tokenizer()
    [ex] = tokenize_records(tok, [Record(1, prompt="t5 t6", completion="t7 t8 t9")], max_length=3)
    assert ex.input_ids == [5, 6, 7] and ex.labels == [IGNORE_INDEX, IGNORE_INDEX, 7]
    with pytest.raises(DataError, match="line 7: the prompt has 2 tokens"):
        tokenize_records(tok, [Record(7, prompt="t5 t6", completion="t7")], max_length=2)


def test_messages_use_the_chat_template_and_train_on_the_last_reply():
    tok = make_tokenizer()
    msgs = [
        {"role": "user", "content": "t1 t2"},
        {"role": "assistant", "content": "t3"},
        {"role": "user", "content": "t4"},
        {"role": "assistant", "content": "t5 t6"},
    ]
    [rec] = parse_jsonl(lines({"messages": msgs}))
    with pytest.raises(DataError, match="line 1: .*no chat template"):
        tokenize_records(tok, [rec], max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    [ex] = tokenize_records(tok, [rec], max_length=64)
    assert ex.input_ids == [1, 2, 3, 4, 5, 6]
    assert ex.labels == [IGNORE_INDEX] * 4 + [5, 6]


def test_the_zorblish_task_files_are_what_the_generator_writes():
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "data" / "zorblish"
    spec = importlib.util.spec_from_file_location("make_zorblish", folder / "make_zorblish.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, val = mod.build()
    assert len(train) == 320 and len(val) == 80
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in val}
    assert mod.zorblish("bantemo") == "zobontimak"
    for name, recs in (("train.jsonl", train), ("val.jsonl", val)):
        text = (folder / name).read_text()
        assert text == "".join(json.dumps(r) + "\n" for r in recs)
        assert len(parse_jsonl(text)) == len(recs)
