"""The objects the client returns: parsed from the server's JSON, which stays in ``raw``."""

from __future__ import annotations

from dataclasses import dataclass, field

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None
    adapter_version: int | None = None
    logprobs: list[dict] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_json(cls, body: dict) -> Generation:
        usage = body.get("usage") or {}
        return cls(
            text=body["text"],
            finish_reason=body["finish_reason"],
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            adapter=body.get("adapter"),
            adapter_version=body.get("adapter_version"),
            logprobs=body.get("logprobs"),
            raw=body,
        )


@dataclass
class Token:
    """One streamed token (``text`` may be empty while a character is incomplete)."""

    token_id: int
    text: str
    logprob: float | None = None


@dataclass
class Adapter:
    adapter_id: str
    version: int
    family: str
    status: str
    nbytes: int
    residency: list[str]
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict) -> Adapter:
        return cls(
            adapter_id=body["adapter_id"],
            version=body["version"],
            family=body["family"],
            status=body["status"],
            nbytes=body["nbytes"],
            residency=list(body.get("residency", [])),
            raw=body,
        )


@dataclass
class AdapterPage:
    adapters: list[Adapter]
    total: int
    offset: int
    limit: int


@dataclass
class FineTune:
    """A fine-tune job (``/fine-tunes``): ``status`` is queued, running, succeeded, failed or cancelled.

    Progress (``None`` until the first step is reported): ``step`` / ``total_steps``, ``epoch``
    (0-based pass over the training data), ``loss`` (last train loss), ``val_loss`` (last
    validation loss), ``tokens_per_s`` and ``eta_s`` (seconds left, estimated; ``None`` once not
    running). ``interruptions`` counts server crashes it survived; ``resumed_from`` is the step it
    last resumed at after a restart. ``raw`` has every field of the server's job object."""

    id: str
    adapter_id: str
    method: str
    status: str
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    error: str | None = None
    result: dict | None = None
    epoch: int | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    interruptions: int = 0
    resumed_from: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, body: dict) -> FineTune:
        return cls(
            id=body["id"],
            adapter_id=body["adapter_id"],
            method=body["method"],
            status=body["status"],
            step=body.get("step") or 0,
            total_steps=body.get("total_steps"),
            loss=body.get("loss"),
            error=body.get("error"),
            result=body.get("result"),
            epoch=body.get("epoch"),
            val_loss=body.get("val_loss"),
            tokens_per_s=body.get("tokens_per_s"),
            eta_s=body.get("eta_s"),
            interruptions=body.get("interruptions") or 0,
            resumed_from=body.get("resumed_from"),
            raw=body,
        )


@dataclass
class FineTuneEvent:
    """One job event: ``type`` is created, started, step, eval, checkpoint, cancel_requested,
    paused (the server shut down: the job is queued again), requeued (found interrupted at start),
    resumed (training went on from a saved state) or a terminal status; ``data`` its payload (a
    step's has step, total_steps, epoch, loss, tokens_per_s, ...)."""

    seq: int
    time: float
    type: str
    data: dict

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @classmethod
    def from_json(cls, body: dict) -> FineTuneEvent:
        return cls(body["seq"], body["time"], body["type"], body.get("data") or {})


@dataclass
class FineTunePage:
    jobs: list[FineTune]
    total: int
    offset: int
    limit: int


@dataclass
class TrainingFile:
    """An uploaded JSONL file (``/files``, OpenAI's file object plus ``records``): use its ``id``
    as a fine-tune's ``training_file`` / ``validation_file``."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    records: int
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict) -> TrainingFile:
        return cls(
            id=body["id"],
            bytes=body["bytes"],
            created_at=body["created_at"],
            filename=body["filename"],
            purpose=body["purpose"],
            records=body.get("records", 0),
            raw=body,
        )


@dataclass
class DeletedFile:
    """The answer to ``files.delete``: the id and name of the file now gone."""

    id: str
    filename: str
    deleted: bool = True
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict) -> DeletedFile:
        return cls(body["id"], body.get("filename", ""), bool(body.get("deleted", True)), body)
