"""A sequence's KV state in blocks, and the packed inputs of one paged step.

Every sequence is a token list (prompt + generated) of which the first ``computed`` have their KV
in the sequence's blocks. A step gives each scheduled sequence ``n`` more tokens to compute:
``n = 1`` for a decode row (its last sampled token), more for a prefill chunk. A preempted
sequence drops its blocks and ``computed`` goes back to 0 (or to what the prefix cache still
holds): it is recomputed as a prefill of its prompt and what it generated, and then samples the
same next token it would have sampled before.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from .attention import Chunk, PagedKV, StepLayout
from .blocks import BlockPool


@dataclass(eq=False)
class SeqKV:
    blocks: list[int] = field(default_factory=list)  # block table
    computed: int = 0  # tokens whose KV is in ``blocks``
    registered: int = 0  # leading full blocks registered in the prefix cache
    chain_uid: int | None = None  # uid of the last registered one
    scored: bool = False  # prompt log-probabilities already sent (never again after a preemption)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # chunks' logits while scoring


def tokens_of(prompt: Sequence[int], generated: Sequence[int], start: int, stop: int) -> list[int]:
    """Tokens ``start:stop`` of ``prompt + generated`` without building the whole list."""
    p = len(prompt)
    if stop <= p:
        return list(prompt[start:stop])
    if start >= p:
        return list(generated[start - p : stop - p])
    return list(prompt[start:]) + list(generated[: stop - p])


@dataclass(eq=False)
class Work:
    """One sequence's share of a step: tokens ``state.computed : state.computed + n``."""

    seq: object  # the generator's sequence (prompt_token_ids, generated, adapter_key)
    state: SeqKV
    n: int
    logits_all: bool = False  # every position's logits (prompt scoring), not only the last

    @property
    def total(self) -> int:
        return len(self.seq.prompt_token_ids) + len(self.seq.generated)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's tokens (it then samples one)."""
        return self.state.computed + self.n == self.total


@dataclass
class PackedStep:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    token_keys: list[Hashable]  # [T] adapter key of each packed token
    logits_index: torch.Tensor  # [K] packed positions whose logits the step needs
    layout: StepLayout
    rows: list[tuple[int, int]]  # per work item: (first row in the logits, number of rows), (0, 0) = none


def slots_of(blocks: Sequence[int], block_size: int, start: int, stop: int) -> torch.Tensor:
    """Slots of positions ``start:stop`` through a block table."""
    pos = torch.arange(start, stop)
    table = torch.tensor(blocks, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def pack(work: list[Work], kv: PagedKV, device: torch.device) -> PackedStep:
    """The packed inputs of a step: decode rows first (one token each), then prefill chunks."""
    bs = kv.block_size
    decode = [w for w in work if w.n == 1 and w.state.computed > 0 and not w.logits_all]
    chunks = [w for w in work if not (w.n == 1 and w.state.computed > 0 and not w.logits_all)]
    ordered = decode + chunks
    decode_ids = {id(w) for w in decode}
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    keys: list[Hashable] = []
    write: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    rows: dict[int, tuple[int, int]] = {}
    read_decode: list[torch.Tensor] = []
    chunk_meta: list[Chunk] = []
    k = 0  # logits rows so far
    for w in ordered:
        start, c = len(ids), w.state.computed
        ids += tokens_of(w.seq.prompt_token_ids, w.seq.generated, c, c + w.n)
        positions.append(torch.arange(c, c + w.n))
        keys += [w.seq.adapter_key] * w.n
        read = slots_of(w.state.blocks, bs, 0, c + w.n)  # [c + n]: every key it attends to
        write.append(read[c:])
        if id(w) in decode_ids:
            read_decode.append(read)
        else:
            chunk_meta.append(Chunk(start, w.n, c, read.to(device)))
        if w.logits_all:
            index.append(torch.arange(start, start + w.n))
            rows[id(w)] = (k, w.n)
            k += w.n
        elif w.samples:
            index.append(torch.tensor([start + w.n - 1]))
            rows[id(w)] = (k, 1)
            k += 1
    layout = StepLayout(kv, torch.cat(write).to(device), chunks=chunk_meta)
    if decode:
        lengths = torch.tensor([len(r) for r in read_decode])
        # pad with each row's own first slot (written), so no unwritten slot is ever read
        padded = pad_sequence(read_decode, batch_first=True, padding_value=-1)  # [B, L]
        padded = torch.where(padded < 0, padded[:, :1], padded)
        layout.decodes = len(decode)
        layout.decode_slots = padded.to(device)
        if bool((lengths < padded.shape[1]).any()):  # rows of equal length need no mask
            mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
            layout.decode_mask = mask[:, None, None, :].to(device)
    return PackedStep(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device),
        position_ids=torch.cat(positions)[None].to(device),
        token_keys=keys,
        logits_index=(torch.cat(index) if index else torch.zeros(0, dtype=torch.long)).to(device),
        layout=layout,
        rows=[rows.get(id(w), (0, 0)) for w in work],
    )


def register_full_blocks(pool: BlockPool, seq, state: SeqKV, upto: int) -> list[int]:
    """Register the sequence's blocks that ``upto`` computed tokens fill; returns those registered."""
    bs = pool.block_size
    done = []
    while (state.registered + 1) * bs <= upto and state.registered < len(state.blocks):
        i = state.registered
        block = state.blocks[i]
        toks = tokens_of(seq.prompt_token_ids, seq.generated, i * bs, (i + 1) * bs)
        uid, new = pool.register(block, seq.adapter_key, state.chain_uid, toks)
        if new:
            done.append(block)
        state.chain_uid = uid
        state.registered += 1
    return done
