"""Prompt scoring: the log-probabilities of a prompt's own tokens, from its prefill's logits.

Row ``i`` of a left-padded prefill holds its prompt in the last ``n`` positions; position ``j`` of
the prompt predicts token ``j + 1``. So token 0 has no score (nothing precedes it) and the last
position's scores are the first generated token's (checked and sampled as usual).
Log-probabilities are ``log_softmax`` in float32 of the raw scores, as for generated tokens
(``sampling``); -inf is reported as ``LOGPROB_FLOOR`` (JSON has no infinity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.requests import LOGPROB_FLOOR, PromptEvent
from server.engine.sampling import row_top_logprobs, usable_rows


class NonFinitePrompt(ValueError):
    """The scores at some prompt position are NaN / +inf (or all -inf): nothing to report."""

    def __init__(self, token: int):
        super().__init__(f"non-finite logits (NaN or inf) at prompt token {token}")
        self.token = token  # 1-based index of the prompt token whose score is unusable


def score_prompt(row_logits: torch.Tensor, token_ids: Sequence[int], k: int) -> PromptEvent:
    """The ``PromptEvent`` of one row from its prefill logits ``[T, V]`` (``T >= len(token_ids)``),
    with the ``k`` best alternatives per position for ``k > 0``. Raises ``NonFinitePrompt``."""
    n = len(token_ids)
    scored = row_logits[row_logits.shape[0] - n : row_logits.shape[0] - 1]  # [n - 1, V]
    usable = usable_rows(scored)  # [n - 1]
    if not bool(usable.all()):
        raise NonFinitePrompt(int((~usable).long().argmax()) + 2)
    ids = tuple(int(t) for t in token_ids)
    if n < 2:
        return PromptEvent(ids, (None,), (None,) if k else None)
    log_p = scored.float().log_softmax(dim=-1)  # [n - 1, V]
    targets = torch.tensor(ids[1:], dtype=torch.long, device=log_p.device)
    chosen = log_p.gather(-1, targets[:, None]).squeeze(-1).clamp(min=LOGPROB_FLOOR)  # [n - 1]
    top = None
    if k:
        best = log_p.topk(min(k, log_p.shape[-1]), dim=-1)  # ([n - 1, K], [n - 1, K])
        top = (None, *row_top_logprobs(tuple(best), [k] * (n - 1)))
    return PromptEvent(ids, (None, *chosen.tolist()), top)
