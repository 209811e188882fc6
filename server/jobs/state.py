"""Resumable training state: what a fine-tune job needs to go on after a restart.

One safetensors file per save (an object ``jobs/<job id>/state-<step>-<hex>.safetensors`` in the
store's blob store, ``server.jobs.jobfiles``; ``<jobs>/<job id>/resume.safetensors`` for jobs of
the earlier layout), written by the server itself (never a user upload) and read back without
pickle:

    param.<module path>.<tensor name>   every adapter tensor (trainable or not), as trained so far
    optim.<index>.<key>                 AdamW's per-tensor state (step, exp_avg, exp_avg_sq)
    rng.epoch                           the data-order generator as it was when the epoch began
    __metadata__["state"]               JSON: step, epoch, micro-batch offset in the epoch,
                                        optimizer param groups, token counters, validation history

Resuming replays the epoch's shuffle from ``rng.epoch`` and skips the optimizer steps already
done in it, so a resumed job ends with exactly the weights an uninterrupted one would have
(on the same device). ``save_state`` replaces a file atomically (temp file, fsync, rename, fsync
dir); ``state_bytes``/``load_state_bytes`` are the same format in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store.fsutil import replace_durable


class StateError(ValueError):
    """The resume file is missing, damaged or does not fit the job."""


@dataclass
class TrainState:
    step: int  # optimizer steps done
    epoch: int  # the epoch in progress
    batch_offset: int  # micro-batches of this epoch already consumed
    epoch_rng: torch.Tensor  # generator state at the start of the epoch (uint8)
    params: dict[str, dict[str, torch.Tensor]]
    optimizer: dict  # torch optimizer state_dict (tensor state, param groups)
    tokens_seen: int = 0
    train_tokens: int = 0
    val: list[dict] = field(default_factory=list)


def _flatten(state: TrainState) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {"rng.epoch": state.epoch_rng.contiguous()}
    for path, mod in state.params.items():
        for name, t in mod.items():
            tensors[f"param.{path}.{name}"] = t.detach().to("cpu").contiguous()
    scalars: dict[str, dict] = {}
    for index, entry in state.optimizer["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {
        "step": state.step,
        "epoch": state.epoch,
        "batch_offset": state.batch_offset,
        "tokens_seen": state.tokens_seen,
        "train_tokens": state.train_tokens,
        "val": state.val,
        "param_groups": state.optimizer["param_groups"],
        "optim_scalars": scalars,
        "modules": {path: sorted(mod) for path, mod in state.params.items()},
    }
    return tensors, meta


def state_bytes(state: TrainState) -> bytes:
    """``state`` as the bytes of one safetensors file."""
    tensors, meta = _flatten(state)
    return st_save(tensors, metadata={"state": json.dumps(meta)})


def save_state(path: Path, state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically."""
    replace_durable(path, state_bytes(state))


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict) -> TrainState:
    params = {p: {n: tensors[f"param.{p}.{n}"] for n in names} for p, names in meta["modules"].items()}
    opt_state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = t
    for index, values in meta["optim_scalars"].items():
        opt_state.setdefault(int(index), {}).update(values)
    return TrainState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_offset=int(meta["batch_offset"]),
        epoch_rng=tensors["rng.epoch"],
        params=params,
        optimizer={"state": opt_state, "param_groups": meta["param_groups"]},
        tokens_seen=int(meta["tokens_seen"]),
        train_tokens=int(meta["train_tokens"]),
        val=list(meta["val"]),
    )


_DAMAGE = (SafetensorError, KeyError, ValueError, TypeError, IndexError, json.JSONDecodeError)


def load_state(path: Path) -> TrainState:
    """Read a file written by ``save_state``; raises ``StateError`` if it is missing or damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            meta = json.loads((f.metadata() or {})["state"])
        return _from_parts(tensors, meta)
    except FileNotFoundError:
        raise StateError(f"no resume state at {Path(path).name}") from None
    except _DAMAGE as e:
        raise StateError(f"the resume state is damaged ({type(e).__name__})") from None


def load_state_bytes(data: bytes) -> TrainState:
    """``load_state`` of bytes held in memory (a state read from the blob store)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        meta = json.loads(header["__metadata__"]["state"])
        return _from_parts(st_load(data), meta)
    except _DAMAGE + (struct.error,) as e:
        raise StateError(f"the resume state is damaged ({type(e).__name__})") from None
