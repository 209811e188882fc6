"""Fine-tuning data: JSONL records -> token ids with a completion-only loss mask.

One JSON object per line (blank lines are skipped), either

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}

A ``prompt`` is tokenized exactly as ``POST /generate`` tokenizes a prompt (the tokenizer's
special tokens added); the ``completion`` follows it, without special tokens, then the EOS token
(so the adapter learns to stop). ``messages`` go through the tokenizer's chat template exactly as
``/v1/chat/completions`` renders them: the prompt is every message before the last one with the
generation prompt added, the completion is what the template renders for the last message, which
must be the assistant's (its end-of-turn marker included).

Labels are ``-100`` on prompt tokens: the loss covers completion tokens only. Examples longer
than ``max_length`` are cut at the end; an example left with no completion token is an error.
Every error names the 1-based line of the file (``line 5: ...``).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
MAX_LINE_CHARS = 1 << 20
# A JSON escape such as "\ud800" decodes to a str no tokenizer (nor UTF-8) can take.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """A problem with one line of the training data (``line`` is 1-based; 0 = the whole file)."""

    def __init__(self, line: int, message: str):
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass(frozen=True)
class Record:
    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class Example:
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _check_text(line: int, name: str, value: str) -> None:
    if _SURROGATE.search(value):
        raise DataError(line, f"{name} is not valid Unicode: a lone surrogate (\\ud800-\\udfff)")


def _record(line: int, obj: object) -> Record:
    if not isinstance(obj, dict):
        raise DataError(line, f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys == {"prompt", "completion"}:
        prompt, completion = obj["prompt"], obj["completion"]
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DataError(line, f'"{name}" must be a string, got {type(value).__name__}')
        if not completion:
            raise DataError(line, '"completion" is empty (nothing to learn)')
        _check_text(line, '"prompt"', prompt)
        _check_text(line, '"completion"', completion)
        return Record(line, prompt=prompt, completion=completion)
    if keys == {"messages"}:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(line, '"messages" must be a non-empty list')
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise DataError(line, f'messages[{i}] must be an object with exactly "role" and "content"')
            if m["role"] not in ROLES:
                raise DataError(line, f"messages[{i}].role {m['role']!r} is not one of {list(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(line, f"messages[{i}].content must be a string")
            _check_text(line, f"messages[{i}].content", m["content"])
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DataError(line, "the last message must be the assistant's (it is the completion)")
        if not out[-1]["content"]:
            raise DataError(line, "the last (assistant) message is empty (nothing to learn)")
        return Record(line, messages=tuple(out))
    extra = sorted(keys - {"prompt", "completion", "messages"})
    hint = f" (unknown keys: {extra})" if extra else ""
    raise DataError(line, f'expected {{"prompt", "completion"}} or {{"messages"}}{hint}')


def parse_jsonl(text: str, *, max_records: int | None = None) -> list[Record]:
    """Parse and check every line; raises ``DataError`` naming the first bad line."""
    records: list[Record] = []
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_CHARS:
            raise DataError(i, f"line is longer than {MAX_LINE_CHARS} characters")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(i, f"invalid JSON ({e.msg} at column {e.colno})") from None
        records.append(_record(i, obj))
        if max_records is not None and len(records) > max_records:
            raise DataError(i, f"more than {max_records} examples")
    if not records:
        raise DataError(0, "no examples (the data is empty)")
    return records


def read_jsonl(path: str | Path, **kw) -> list[Record]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(0, f"{path}: not UTF-8 ({e.reason})") from None
    return parse_jsonl(text, **kw)


def _split_chat(tokenizer, record: Record) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(record.line, "the base model's tokenizer has no chat template; use prompt/completion")
    messages = list(record.messages)
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError as exc:  # raise_exception(...), e.g. roles that do not alternate
        first = str(exc).splitlines()[0][:200] if str(exc) else "invalid messages"
        raise DataError(record.line, f"the chat template rejected the messages: {first}") from None
    except Exception:  # anything else: no internal (tokenizer) type names in the message
        raise DataError(record.line, "the chat template could not render these messages") from None
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise DataError(
            record.line,
            "the chat template does not render the conversation as prompt + assistant reply",
        )
    return prompt, full[len(prompt) :]


def tokenize_record(tokenizer, record: Record, max_length: int, *, append_eos: bool = True) -> Example:
    if record.messages is not None:
        prompt, completion = _split_chat(tokenizer, record)
        p_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        c_ids = list(tokenizer.encode(completion, add_special_tokens=False))
    else:
        p_ids = list(tokenizer.encode(record.prompt, add_special_tokens=True))
        c_ids = list(tokenizer.encode(record.completion, add_special_tokens=False))
        eos = getattr(tokenizer, "eos_token_id", None)
        if append_eos and eos is not None:
            c_ids.append(int(eos))
    if not c_ids:
        raise DataError(record.line, "the completion has no tokens")
    if len(p_ids) >= max_length:
        raise DataError(
            record.line,
            f"the prompt has {len(p_ids)} tokens; max_length={max_length} leaves no completion token",
        )
    c_ids = c_ids[: max_length - len(p_ids)]
    return Example(record.line, p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids)


def tokenize_records(
    tokenizer, records: list[Record], max_length: int, *, append_eos: bool = True, lock=None
) -> list[Example]:
    """Tokenize every record (``lock`` serialises use of a tokenizer shared with serving)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    with lock if lock is not None else contextlib.nullcontext():
        return [tokenize_record(tokenizer, r, max_length, append_eos=append_eos) for r in records]
