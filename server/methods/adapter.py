"""An adapter in memory, its files on disk, and its validation against a base model.

File layout (PEFT's convention, see docs/adapter-format.md):

    <folder>/adapter_config.json        {"peft_type": "LORA" | "HUT" | "ETHER" | "DCT" | "SURM", ...}
    <folder>/adapter_model.safetensors  base_model.model.<module path>.<tensor name>

Loading parses JSON and safetensors only: nothing is ever unpickled or imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import AdapterMethod, ConfigError, MethodConfig, ParamSpec, WeightsError
from .registry import method_for_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def parse_config(raw: object) -> tuple[AdapterMethod, MethodConfig]:
    if not isinstance(raw, dict):
        raise ConfigError("config", "adapter_config.json must be a JSON object")
    method = method_for_peft_type(raw.get("peft_type"), raw)
    return method, method.parse_config(raw)


@dataclass
class Adapter:
    """One adapter: its family, config and tensors per adapted module path."""

    method: AdapterMethod
    config: MethodConfig
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (out, in)
    # Adapter-wide tensors by their full file key (VeRA's projections); ``modules`` hold views of them.
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.method.name

    def trainable_count(self) -> int:
        return sum(
            math.prod(spec.shape)
            for p in self.modules
            for spec in self.method.module_specs(self.config_for(p), p, *self.shapes[p]).values()
            if spec.trainable
        )

    def config_for(self, path: str) -> MethodConfig:
        """The config of the linear at ``path`` (per-module ranks and scales, see ``for_module``)."""
        return self.config.for_module(path)

    def _own(self, path: str) -> dict[str, torch.Tensor]:
        """The module's tensors stored under its own name (not views of ``shared``)."""
        specs = self.method.module_specs(self.config_for(path), path, *self.shapes[path])
        return {n: t for n, t in self.modules[path].items() if not (n in specs and specs[n].shared)}

    def nbytes(self) -> int:
        tensors = [t for p in self.modules for t in self._own(p).values()] + list(self.shared.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- files ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        own = {
            f"{KEY_PREFIX}{path}.{self.method.tensor_suffix(name)}": t.detach().contiguous().cpu()
            for path in sorted(self.modules)
            for name, t in sorted(self._own(path).items())
        }
        return own | {k: t.detach().contiguous().cpu() for k, t in sorted(self.shared.items())}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.model_dump(mode="json")
        (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(self.state_dict(), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: str | Path, module_shapes: Mapping[str, tuple[int, int]]) -> Adapter:
        folder = Path(folder)
        try:
            raw = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError("config", f"adapter_config.json is not valid JSON ({e.msg})") from None
        method, cfg = parse_config(raw)
        tensors = load_file(str(folder / WEIGHTS_NAME))
        return cls.from_state_dict(method, cfg, tensors, module_shapes)

    @classmethod
    def from_state_dict(
        cls,
        method: AdapterMethod,
        cfg: MethodConfig,
        tensors: Mapping[str, torch.Tensor],
        module_shapes: Mapping[str, tuple[int, int]],
    ) -> Adapter:
        """Group tensors by module and check every name, shape and dtype against the base model."""
        targets = {p: s for p, s in module_shapes.items() if cfg.targets(p)}
        if not targets:
            raise ConfigError(
                "target_modules", f"{cfg.target_modules!r} matches no linear layer of the base model"
            )
        expected: dict[str, tuple[str, str]] = {}
        for path, (out_f, in_f) in targets.items():
            cfg.for_module(path).check_shape(path, out_f, in_f)
            for pname, spec in method.module_specs(cfg.for_module(path), path, out_f, in_f).items():
                if not spec.shared:
                    expected[f"{KEY_PREFIX}{path}.{method.tensor_suffix(pname)}"] = (path, pname)
        shared_specs = method.shared_specs(cfg, targets)
        modules: dict[str, dict[str, torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key in shared_specs:
                _check_tensor(key, t, shared_specs[key])
                shared[key] = t
                continue
            if key not in expected:
                raise WeightsError(
                    key, "unexpected tensor (not a parameter of this family on a targeted module)"
                )
            path, pname = expected[key]
            out_f, in_f = targets[path]
            _check_tensor(key, t, method.module_specs(cfg.for_module(path), path, out_f, in_f)[pname])
            modules.setdefault(path, {})[pname] = t
        missing = sorted((set(expected) | set(shared_specs)) - set(tensors))
        if missing:
            raise WeightsError(missing[0], f"missing tensor ({len(missing)} missing in all)")
        for path, params in modules.items():
            params |= method.shared_views(cfg, shared, path, *targets[path])
            method.check_params(cfg.for_module(path), path, params, *targets[path])
        return cls(method, cfg, modules, dict(targets), shared)


def _check_tensor(key: str, t: torch.Tensor, spec: ParamSpec) -> None:
    """Shape, dtype and finite values of one stored tensor against its spec."""
    if tuple(t.shape) != spec.shape:
        raise WeightsError(key, f"shape {list(t.shape)} != expected {list(spec.shape)}")
    if spec.kind == "int32":
        if t.dtype not in (torch.int32, torch.int64):
            raise WeightsError(key, f"dtype {t.dtype} must be int32")
    elif t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise WeightsError(key, f"dtype {t.dtype} not allowed (float32, float16, bfloat16)")
    elif not torch.isfinite(t).all():
        raise WeightsError(key, "contains NaN or Inf")


def check_finite_tables(
    path: str, sources: list[str], tables: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Raise WeightsError naming the module and table if a serving table is not finite in ``dtype``."""
    for name, t in sorted(tables.items()):
        if not t.is_floating_point():
            continue
        finite = torch.isfinite(t.to(dtype))
        if not finite.all():
            raise WeightsError(
                f"{KEY_PREFIX}{path}",
                f"serving table {name!r} made from {', '.join(sorted(sources))} and the config's scale has "
                f"{int((~finite).sum())} non-finite value(s) in {str(dtype).removeprefix('torch.')}; "
                "lower the scale or the tensor values",
            )


def check_tables(adapter: Adapter, dtype: torch.dtype = torch.float32) -> None:
    """Refuse an adapter whose prepared slot tables (what the engine installs) are not finite.

    ``prepare`` folds scales into the tables (LoRA s·Bᵀ, SURM α·spectra, DCT α·coef), so finite
    tensors and a finite scale can still make an infinite table, most easily in float16. Every
    family's ``prepare`` reads only the shape, dtype and device of the base weight (its values
    enter at apply time), so a zero-stride stand-in of the module's shape serves here; the engine
    checks the real tables again when it installs them (``Residency``).
    """
    if adapter.method.prepare_reads_weight:
        return  # its tables depend on the base weight's values: the engine checks them (Residency)
    for path in sorted(adapter.modules):
        params = {k: v.float() if v.is_floating_point() else v for k, v in adapter.modules[path].items()}
        stand_in = torch.zeros((), dtype=torch.float32).expand(adapter.shapes[path])
        with torch.no_grad():
            tables = adapter.method.prepare(adapter.config_for(path), params, stand_in)
        check_finite_tables(path, list(params), tables, dtype)
