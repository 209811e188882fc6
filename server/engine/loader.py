"""Load the base model once: any HF causal LM folder or hub id, or the offline default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.settings import DEFAULT_MODEL, Settings

from .adapted_linear import AdaptedLinear, wrap_linears
from .model_cache import provision_default_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    name: str
    model: nn.Module
    tokenizer: object
    modules: dict[str, AdaptedLinear]  # wrapped target linears by path
    device: torch.device
    dtype: torch.dtype

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return {p: (m.out_features, m.in_features) for p, m in self.modules.items()}

    @property
    def vocab_size(self) -> int:
        """Width of the model's next-token scores (what bounds a request's ``top_k``)."""
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        return ids


def pick_device_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if settings.dtype:
        if settings.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {settings.dtype!r}")
        dtype = _DTYPES[settings.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_base_model(settings: Settings) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device_dtype(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    source = settings.model
    if source == DEFAULT_MODEL:
        source = str(provision_default_model(settings.model_cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    return wrap_model(
        settings.model if settings.model == DEFAULT_MODEL else Path(source).name or source,
        model,
        tokenizer,
        settings.target_modules,
    )


def wrap_model(name: str, model: nn.Module, tokenizer, target_modules: list[str]) -> BaseModel:
    """Wrap the target linears of an already-loaded model (also used by tests with tiny models)."""
    param = next(model.parameters())
    modules = wrap_linears(model, target_modules)
    return BaseModel(name, model, tokenizer, modules, param.device, param.dtype)
