"""One training loop for every adapter family, on the resident (shared, frozen) base model.

    adapter, history = train_adapter(base, "lora", {"r": 8}, None, train_records, val_records,
                                     Hyperparameters(max_steps=200, learning_rate=1e-3))

The family only enters through its ``AdapterMethod``: ``init_params(mode="train")`` for every
targeted wrapped linear, and the differentiable serving math (``prepare``/``pre``/``post``/
``delta``) run by ``TrainBinding`` inside ``bind(...)``. The base weights are never copied or
touched: they stay frozen and shared with the serving thread, which never sees this thread's
binding (a per-thread context variable). The model is not switched to train mode (it is shared);
the supported base models have no dropout in eval mode.

Loss: token-level cross-entropy on completion tokens only (``server.jobs.data``), averaged over
every completion token of an optimizer step (all ``grad_accum`` micro-batches), AdamW on the
trainable adapter tensors only (DCT positions are fixed), optional gradient clipping and linear
warm-up. Deterministic for a given seed on a given device (initialisation and data order come
from one seeded CPU generator).

Offline:

    python -m server.jobs.train --data train.jsonl --method lora --config '{"r": 8}' --out folder
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel as PydanticModel
from pydantic import ConfigDict, Field, FiniteFloat

from server.engine.adapted_linear import TrainBinding, bind
from server.engine.loader import BaseModel
from server.methods import Adapter, AdapterMethod, ConfigError, MethodConfig, available_methods, get_method

from .data import IGNORE_INDEX, Example, Record, read_jsonl, tokenize_records
from .state import StateError, TrainState


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradients)."""


class Hyperparameters(PydanticModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=1000, description="passes over the data (ignored with max_steps)")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="optimizer steps; overrides epochs")
    learning_rate: FiniteFloat | None = Field(
        None, gt=0, le=10, description="AdamW learning rate; default: the family's (learning_rate_for)"
    )
    batch_size: int = Field(8, ge=1, le=1024, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    seed: int = Field(0, ge=0, lt=2**63)
    weight_decay: FiniteFloat = Field(0.0, ge=0, le=1)
    max_grad_norm: FiniteFloat | None = Field(1.0, gt=0, description="gradient clipping (None = off)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    max_length: int = Field(512, ge=2, le=32768, description="tokens per example (cut at the end)")
    eval_every: int = Field(0, ge=0, description="validation every N steps (0 = before and after only)")
    checkpoint_every: int = Field(0, ge=0, description="on_checkpoint every N steps (0 = never)")

    def lr_for(self, method: AdapterMethod, cfg: MethodConfig) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return method.learning_rate_for(cfg)


@dataclass
class History:
    method: str
    trainable_params: int
    total_steps: int
    learning_rate: float
    steps: list[dict] = field(default_factory=list)  # one per optimizer step
    val: list[dict] = field(default_factory=list)  # {"step", "loss"}; step 0 = before training
    train_tokens: int = 0  # completion (loss) tokens seen
    tokens_seen: int = 0  # every token forwarded (prompt + completion, no padding)
    wall_s: float = 0.0
    stopped: bool = False  # should_stop ended training early
    last_step: int = 0  # optimizer steps done (counting those before a resume)
    resumed_from: int | None = None  # the step training resumed at

    @property
    def final_loss(self) -> float | None:
        return self.steps[-1]["loss"] if self.steps else None

    def to_dict(self) -> dict:
        return asdict(self)


def target_suffixes(base: BaseModel) -> list[str]:
    """The wrapped linears' names (last path part): the default ``target_modules``."""
    return sorted({p.rsplit(".", 1)[-1] for p in base.modules})


def build_config(
    base: BaseModel, method_name: str, method_config: dict, target_modules: list[str] | str | None
) -> tuple[AdapterMethod, MethodConfig, dict[str, tuple[int, int]]]:
    """Parse the family config (raises ConfigError) and pick the wrapped linears it targets."""
    method = get_method(method_name)
    if not isinstance(method_config, dict):
        raise ConfigError("config", "the method config must be a JSON object")
    raw = dict(method_config)
    peft_type = raw.pop("peft_type", method.peft_type)
    if not isinstance(peft_type, str) or peft_type.upper() != method.peft_type:
        raise ConfigError("peft_type", f"{peft_type!r} does not match method {method.name!r}")
    if target_modules is None:
        target_modules = raw.pop("target_modules", None) or target_suffixes(base)
    elif "target_modules" in raw and raw.pop("target_modules") != target_modules:
        raise ConfigError("target_modules", "given both in the config and as an argument, differently")
    raw.setdefault("base_model_name_or_path", base.name)
    cfg = method.parse_config({"peft_type": method.peft_type, "target_modules": target_modules, **raw})
    targets = {p: s for p, s in sorted(base.module_shapes.items()) if cfg.targets(p)}
    if any(cfg.for_module(p) != cfg for p in targets):  # one config per training binding
        raise ConfigError(
            "method_config", "per-module settings (rank_pattern, alpha_pattern) are not trained here"
        )
    if not targets:
        raise ConfigError(
            "target_modules",
            f"{cfg.target_modules!r} matches no adaptable linear of the base model "
            f"(adaptable: {target_suffixes(base)})",
        )
    for path, (out_f, in_f) in targets.items():
        cfg.check_shape(path, out_f, in_f)
    return method, cfg, targets


def init_trainable(
    base: BaseModel,
    method: AdapterMethod,
    cfg: MethodConfig,
    targets: dict[str, tuple[int, int]],
    generator: torch.Generator,
) -> dict[str, dict[str, torch.Tensor]]:
    """``init_params(mode="train")`` per targeted linear, on a float32 CPU copy of its weight (the
    same draws on every device), moved to the model's device; trainable tensors require grad."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    for path, (out_f, in_f) in targets.items():
        weight = base.modules[path].weight.detach().to("cpu", torch.float32)
        specs = method.module_specs(cfg, path, out_f, in_f)
        fresh = method.init_module_params(cfg, path, weight, "train", generator)
        mod = {}
        for name, t in fresh.items():
            t = t.detach().to(base.device).clone()
            if specs[name].trainable and t.is_floating_point():
                t = t.float().requires_grad_(True)
            mod[name] = t
        params[path] = mod
    return params


def _batch_tensors(batch: Sequence[Example], pad_id: int, device: torch.device):
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def loss_sum(base: BaseModel, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Summed cross-entropy over the completion tokens of ``batch`` (call inside ``bind``).

    The output head runs on the positions that predict a completion token only (a big vocabulary
    times every prompt position would dominate memory)."""
    ids, labels, mask = _batch_tensors(batch, pad_id, base.device)
    model = base.model
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def evaluate(
    base: BaseModel,
    binding: TrainBinding | None,
    examples: Sequence[Example],
    batch_size: int = 8,
    pad_id: int = 0,
) -> float:
    """Mean completion-token loss of ``examples`` with ``binding`` (None = the base model)."""
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        with bind(binding):
            total += float(loss_sum(base, batch, pad_id))
        n += sum(e.n_target for e in batch)
    return total / max(n, 1)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def _as_examples(base: BaseModel, records, max_length: int, lock) -> list[Example]:
    records = list(records or [])
    if all(isinstance(r, Example) for r in records):
        return records
    if not all(isinstance(r, Record) for r in records):
        raise TypeError("records must be all server.jobs.data.Record or all Example")
    return tokenize_records(base.tokenizer, records, max_length, lock=lock)


def snapshot(method: AdapterMethod, cfg: MethodConfig, params, targets) -> Adapter:
    """The current parameters as an ``Adapter`` (detached float32/int CPU copies)."""
    modules = {p: {n: t.detach().to("cpu").clone() for n, t in mod.items()} for p, mod in params.items()}
    return Adapter(method, cfg, modules, dict(targets))


def _restore(params: dict[str, dict[str, torch.Tensor]], state: TrainState) -> None:
    """Copy a resume state's tensors into freshly initialised ``params`` (same keys and shapes)."""
    if {p: sorted(m) for p, m in params.items()} != {p: sorted(m) for p, m in state.params.items()}:
        raise StateError("the resume state does not match the job's modules")
    with torch.no_grad():
        for path, mod in params.items():
            for name, t in mod.items():
                saved = state.params[path][name]
                if saved.shape != t.shape or saved.dtype != t.dtype:
                    raise StateError(f"the resume state's {path}.{name} has another shape or dtype")
                t.copy_(saved)


def train_adapter(
    base: BaseModel,
    method_name: str,
    method_config: dict,
    target_modules: list[str] | str | None,
    train_records: Sequence[Record] | Sequence[Example],
    val_records: Sequence[Record] | Sequence[Example] | None = None,
    hyperparameters: Hyperparameters | dict | None = None,
    *,
    on_step: Callable[[dict], None] | None = None,
    on_eval: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[int, Adapter], None] | None = None,
    tokenizer_lock=None,
    resume: TrainState | None = None,
    on_state: Callable[[TrainState], None] | None = None,
    state_every_s: float | None = None,
    eval_when_stopped: bool = False,
) -> tuple[Adapter, History]:
    """Train one adapter of ``method_name`` on ``base``; returns it with its history.

    ``on_step(info)`` runs after every optimizer step (it may block, e.g. to yield to serving),
    ``should_stop()`` before every step (True: stop early, return what was trained so far),
    ``on_checkpoint(step, adapter)`` every ``checkpoint_every`` steps before the last.
    ``on_state(state)`` receives the resumable state (``server.jobs.state``; its tensors are only
    valid during the call) after every checkpoint, every ``state_every_s`` seconds and when
    ``should_stop`` ends training; ``resume`` continues from such a state. The final validation
    is skipped when ``should_stop`` ended training, unless ``eval_when_stopped`` (a time budget).
    Raises ConfigError (bad config or targets), DataError (bad data), TrainingError (NaN/Inf),
    StateError (``resume`` does not fit this job).
    """
    hp = (
        hyperparameters
        if isinstance(hyperparameters, Hyperparameters)
        else Hyperparameters.model_validate(hyperparameters or {})
    )
    method, cfg, targets = build_config(base, method_name, method_config, target_modules)
    train = _as_examples(base, train_records, hp.max_length, tokenizer_lock)
    val = _as_examples(base, val_records, hp.max_length, tokenizer_lock)
    if not train:
        raise ValueError("no training examples")
    pad_id = _pad_id(base.tokenizer)
    lr = hp.lr_for(method, cfg)

    generator = torch.Generator().manual_seed(hp.seed)
    params = init_trainable(base, method, cfg, targets, generator)
    if resume is not None:
        _restore(params, resume)
    trainable = [t for p in sorted(params) for _, t in sorted(params[p].items()) if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=hp.weight_decay, foreach=False)
    if resume is not None:
        try:
            optimizer.load_state_dict(resume.optimizer)
        except (ValueError, KeyError) as e:
            raise StateError(f"the resume state's optimizer does not fit ({e})") from None
    binding = TrainBinding(method, cfg, params)

    micro_per_epoch = math.ceil(len(train) / hp.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / hp.grad_accum)
    total = hp.max_steps if hp.max_steps is not None else steps_per_epoch * hp.epochs
    history = History(
        method=method.name,
        trainable_params=sum(t.numel() for t in trainable),
        total_steps=total,
        learning_rate=lr,
    )

    def run_eval(step: int) -> None:
        if not val:
            return
        entry = {"step": step, "loss": evaluate(base, binding, val, hp.batch_size, pad_id)}
        history.val.append(entry)
        if on_eval is not None:
            on_eval(entry)

    step, epoch, skip = 0, 0, 0
    epoch_rng = generator.get_state()
    if resume is not None:
        step, epoch, skip = resume.step, resume.epoch, resume.batch_offset
        generator.set_state(resume.epoch_rng)
        history.val = list(resume.val)
        history.tokens_seen, history.train_tokens = resume.tokens_seen, resume.train_tokens
        history.last_step = history.resumed_from = step

    def emit_state(offset: int) -> None:
        on_state(
            TrainState(
                step=step,
                epoch=epoch,
                batch_offset=offset,
                epoch_rng=epoch_rng,
                params=params,
                optimizer=optimizer.state_dict(),
                tokens_seen=history.tokens_seen,
                train_tokens=history.train_tokens,
                val=list(history.val),
            )
        )

    start = last_state = time.perf_counter()
    tokens_before = history.tokens_seen  # tokens/s counts this run only
    if resume is None:
        run_eval(0)
    with torch.enable_grad():
        while step < total and not history.stopped:
            epoch_rng = generator.get_state()
            order = torch.randperm(len(train), generator=generator).tolist()
            batches = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
            for k in range(skip, len(batches), hp.grad_accum):
                if should_stop is not None and should_stop():
                    history.stopped = True
                    if on_state is not None:
                        emit_state(k)
                    break
                group = [[train[i] for i in b] for b in batches[k : k + hp.grad_accum]]
                n_target = sum(e.n_target for b in group for e in b)
                optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                for batch in group:
                    with bind(binding):
                        s = loss_sum(base, batch, pad_id)
                    (s / n_target).backward()
                    total_loss += float(s.detach())
                loss = total_loss / n_target
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"the training loss is {loss} at step {step + 1} "
                        f"(learning rate {lr:g} too high for {method.name}?); stopped"
                    )
                grad_norm = None
                if hp.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm))
                    if not math.isfinite(grad_norm):
                        raise TrainingError(f"the gradient norm is {grad_norm} at step {step + 1}; stopped")
                step_lr = lr * min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps else lr
                for g in optimizer.param_groups:
                    g["lr"] = step_lr
                optimizer.step()
                step += 1
                history.last_step = step
                history.train_tokens += n_target
                history.tokens_seen += sum(len(e.input_ids) for b in group for e in b)
                elapsed = time.perf_counter() - start
                info = {
                    "step": step,
                    "total_steps": total,
                    "epoch": epoch,
                    "loss": loss,
                    "learning_rate": step_lr,
                    "grad_norm": grad_norm,
                    "tokens": history.tokens_seen,
                    "elapsed_s": elapsed,
                    "tokens_per_s": (history.tokens_seen - tokens_before) / elapsed if elapsed > 0 else None,
                }
                history.steps.append(info)
                if on_step is not None:
                    on_step(info)
                if hp.eval_every and step % hp.eval_every == 0 and step < total:
                    run_eval(step)
                checkpoint = hp.checkpoint_every and step % hp.checkpoint_every == 0 and step < total
                if checkpoint and on_checkpoint is not None:
                    on_checkpoint(step, snapshot(method, cfg, params, targets))
                now = time.perf_counter()
                timed = state_every_s is not None and now - last_state >= state_every_s
                if on_state is not None and step < total and (checkpoint or timed):
                    emit_state(k + hp.grad_accum)
                    last_state = now
                if step >= total:
                    break
            skip = 0
            epoch += 1
    if (eval_when_stopped or not history.stopped) and (not history.val or history.val[-1]["step"] != step):
        run_eval(step)
    history.wall_s = time.perf_counter() - start
    return snapshot(method, cfg, params, targets), history


# ---- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from server.engine.loader import load_base_model
    from server.settings import Settings

    from .data import DataError

    ap = argparse.ArgumentParser(prog="python -m server.jobs.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="training JSONL")
    ap.add_argument("--val", type=Path, help="validation JSONL (held-out loss before/after)")
    ap.add_argument("--method", required=True, help="adapter family: " + ", ".join(available_methods()))
    ap.add_argument("--config", default="{}", help="family config as JSON, e.g. '{\"r\": 8}'")
    ap.add_argument("--target-modules", nargs="+", help="default: every adaptable linear")
    ap.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    ap.add_argument("--model", help="base model (default: the offline SmolLM2)")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--hp", default="{}", help="more hyperparameters as JSON (see Hyperparameters)")
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "seed", "max_length", "warmup_steps"):
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float)
    args = ap.parse_args(argv)

    try:
        config = json.loads(args.config)
        hp_raw = json.loads(args.hp)
    except json.JSONDecodeError as e:
        ap.error(f"--config/--hp must be JSON: {e}")
    for name in Hyperparameters.model_fields:
        if getattr(args, name, None) is not None:
            hp_raw[name] = getattr(args, name)
    settings_kw = {k: getattr(args, k) for k in ("model", "device", "dtype", "threads") if getattr(args, k)}
    try:
        hp = Hyperparameters.model_validate(hp_raw)
        train_records = read_jsonl(args.data)
        val_records = read_jsonl(args.val) if args.val else None
        base = load_base_model(Settings(**settings_kw))

        def progress(info: dict) -> None:
            if info["step"] == 1 or info["step"] % 10 == 0 or info["step"] == info["total_steps"]:
                print(f"step {info['step']}/{info['total_steps']} loss {info['loss']:.4f}", file=sys.stderr)

        adapter, history = train_adapter(
            base, args.method, config, args.target_modules, train_records, val_records, hp, on_step=progress
        )
    except (DataError, ConfigError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adapter.save(args.out)
    summary = {k: v for k, v in history.to_dict().items() if k != "steps"}
    summary["final_loss"] = history.final_loss
    summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
