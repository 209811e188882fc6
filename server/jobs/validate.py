"""A fine-tune job's checks before it is queued: everything that can fail without training.

``validate_spec`` checks the adapter id (a new, valid id that is not the base model's name), the
hyperparameters, the family config against the base model, every data line and its tokenization,
and the batch against the training memory budget. It raises ``JobInvalid(where, message)`` naming
the request field, so the API answers 422 and nothing is queued.
"""

from __future__ import annotations

import threading

from pydantic import ValidationError as PydanticValidationError

from adapters_store.errors import StoreError
from adapters_store.ids import check_new_id, is_valid_id
from server.engine.loader import BaseModel
from server.methods import AdapterError

from .data import DataError, parse_jsonl, tokenize_records
from .memory import TokenBudget
from .spec import JobInvalid, JobSpec
from .train import Hyperparameters, build_config


def validate_spec(
    spec: JobSpec,
    base: BaseModel,
    tokenizer,
    *,
    tokenizer_lock: threading.Lock,
    max_examples: int,
    token_budget: TokenBudget | None,
):
    """``(hyperparameters, training examples, validation examples or None)`` of a valid ``spec``."""
    if not is_valid_id(spec.adapter_id) or "@" in spec.adapter_id:
        raise JobInvalid(
            "adapter_id", "1-128 letters, digits, '.', '_', '-' (starting with a letter or digit)"
        )
    try:
        check_new_id(spec.adapter_id, base.name)  # not the base model's name, in any case
    except StoreError as e:
        raise JobInvalid("adapter_id", e.message) from None
    try:
        hp = Hyperparameters.model_validate(spec.hyperparameters or {})
    except PydanticValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise JobInvalid(f"hyperparameters.{loc}" if loc else "hyperparameters", err["msg"]) from None
    try:
        build_config(base, spec.method, dict(spec.config or {}), spec.target_modules)
    except AdapterError as e:
        where = "method" if e.where == "method" else f"config.{e.where}"
        raise JobInvalid(where, str(e).split(": ", 1)[-1]) from None
    parsed = {}
    for field, text in (("training_data", spec.training_data), ("validation_data", spec.validation_data)):
        if text is None:
            continue
        try:
            records = parse_jsonl(text, max_records=max_examples)
            parsed[field] = tokenize_records(tokenizer, records, hp.max_length, lock=tokenizer_lock)
        except DataError as e:
            raise JobInvalid(field, str(e)) from None
    train, val = parsed["training_data"], parsed.get("validation_data")
    problem = None if token_budget is None else token_budget.problem(hp.batch_size, train, val)
    if problem is not None:
        raise JobInvalid("hyperparameters.batch_size", problem)
    return hp, train, val
