"""Load the base model once: any HF causal LM folder or hub id, or the offline default."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.settings import DEFAULT_MODEL, Settings

from . import threads
from .adapted_linear import AdaptedLinear, wrap_linears
from .model_cache import provision_default_model

log = logging.getLogger("facet.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags (as /proc/cpuinfo names them) of native bf16 matrix math: AMX tiles, AVX-512 bf16 dots.
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


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


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...); empty where the file is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def auto_dtype(device_type: str, flags: frozenset[str] | set[str]) -> torch.dtype:
    """What ``--dtype auto`` serves in: bf16 on CUDA and on CPUs with native bf16 matrix math,
    float32 elsewhere (where bf16 would be emulated and slower).

    On a CPU this needs AMX or AVX-512-BF16 (docs/benchmarks.md, "dtype", has the figures).
    """
    if device_type == "cuda":
        return torch.bfloat16
    if device_type == "cpu" and flags & _BF16_CPU_FLAGS:
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of ``--dtype``)."""
    return str(dtype).removeprefix("torch.")


def pick_device_dtype(
    settings: Settings, flags: frozenset[str] | None = None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to serve in; ``flags``: the CPU flags (default: this machine's)."""
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = settings.dtype or "auto"
    if name == "auto":
        return device, auto_dtype(device.type, cpu_flags() if flags is None else flags)
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
    return device, _DTYPES[name]


def load_base_model(settings: Settings) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device_dtype(settings)
    # The engine thread's intra-op threads (``threads``). Not this thread's: a loading thread that
    # went parallel would keep an OpenMP pool beside the engine thread's and throttle both.
    threads.configure(settings.threads)
    source = settings.model
    if source == DEFAULT_MODEL:
        source = str(provision_default_model(settings.model_cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    model.requires_grad_(False)
    log.info("model %s: dtype %s (--dtype %s) on %s", source, dtype_name(dtype), settings.dtype, device)
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
