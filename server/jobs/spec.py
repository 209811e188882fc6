"""What a fine-tune job is before it runs, and the refusals of the runner's API.

``JobSpec`` is a submitted job (``server.jobs.runner.JobRunner.submit``); ``JobInvalid`` (422,
naming the field), ``JobConflict`` (409) and ``JobQueueFull`` (429) are what the API maps.
"""

from __future__ import annotations

from dataclasses import dataclass


class JobInvalid(ValueError):
    """The job cannot start; ``where`` names the request field (API: 422)."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


class JobConflict(RuntimeError):
    """The job is in a state that does not allow the operation (API: 409)."""


class JobQueueFull(RuntimeError):
    """Too many jobs are waiting (API: 429)."""


@dataclass(frozen=True)
class JobSpec:
    adapter_id: str
    method: str
    training_data: str  # JSONL text
    config: dict | None = None
    target_modules: list[str] | str | None = None
    hyperparameters: dict | None = None
    validation_data: str | None = None
