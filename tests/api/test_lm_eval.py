"""lm-evaluation-harness against a live server: ``local-completions`` (token-id prompts, and text
prompts with ``tokenized_requests=False``) agrees with lm-eval's own ``hf`` backend on the same
model folder, for a multiple-choice task scored by loglikelihood and a ``generate_until`` task,
without and with an adapter (PEFT's ``peft=`` on the hf side). Local JSONL data, a tiny
random-weight model saved to a folder; nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_llama, make_tokenizer

from .processes import server_process
from .tiny_server import TARGETS

TASKS = Path(__file__).parent / "lm_eval_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _task_yamls(folder: Path) -> None:
    """The two tasks, pointing at the repository's JSONL files."""
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{context}}'\n"
    (folder / "facet_mc.yaml").write_text(
        "task: facet_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {TASKS / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "facet_gen.yaml").write_text(
        "task: facet_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {TASKS / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['t0']\n  max_gen_toks: 4\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model folder, PEFT LoRA folder, task folder)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lm_eval")
    model_dir, lora_dir, tasks = root / "tiny-eval", root / "lora", root / "tasks"
    model = make_tiny_llama()
    model.save_pretrained(model_dir)
    tokenizer = make_tokenizer()
    tokenizer.eos_token = "t0"  # lm-eval needs a prefix token; t0 is also the tasks' stop string
    tokenizer.save_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(make_tiny_llama(), config).save_pretrained(lora_dir)
    tasks.mkdir()
    _task_yamls(tasks)
    return model_dir, lora_dir, tasks


@pytest.fixture(scope="module")
def live(folders, tmp_path_factory):
    model_dir, lora_dir, _ = folders
    data = tmp_path_factory.mktemp("lm_eval_server")
    args = ["--model", str(model_dir), "--data-dir", str(data), "--dtype", "float32", "--threads", "1"]
    with server_process("server", args, data / "server.log", env=OFFLINE) as url:
        files = {
            "config": ("adapter_config.json", (lora_dir / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (lora_dir / "adapter_model.safetensors").read_bytes()),
        }
        response = httpx.post(url + "/adapters", data={"adapter_id": "eval-lora"}, files=files, timeout=60)
        assert response.status_code == 201, response.text
        yield url


def _evaluate(model: str, model_args: str, tasks: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["facet_mc", "facet_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=1,
        device="cpu",
    )


def _per_item(out: dict, task: str) -> list:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"] for s in samples]


@pytest.fixture(scope="module")
def hf_reference(folders):
    """lm-eval's hf backend on the folder (with ``peft=`` for the adapter), once per adapter."""
    model_dir, lora_dir, tasks = folders
    cache: dict = {}

    def get(adapter: str | None) -> dict:
        if adapter not in cache:
            args = f"pretrained={model_dir},dtype=float32" + (f",peft={lora_dir}" if adapter else "")
            cache[adapter] = _evaluate("hf", args, tasks)
        return cache[adapter]

    return get


# About a minute in all (lm-eval builds its tasks and model per run): not part of `make test`.
@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, "eval-lora"], ids=["base", "lora"])
@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_local_completions_agrees_with_hf(folders, live, hf_reference, adapter, tokenized):
    model_dir, _, tasks = folders
    served = adapter or model_dir.name
    api_args = (
        f"model={served},base_url={live}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
        f"tokenized_requests={tokenized},num_concurrent=1,max_retries=1,max_length=256"
    )
    ref, got = hf_reference(adapter), _evaluate("local-completions", api_args, tasks)
    for task, metric in (("facet_mc", "acc,none"), ("facet_gen", "exact_match,none")):
        assert got["results"][task][metric] == ref["results"][task][metric], (
            task,
            got["results"],
            ref["results"],
        )
    worst = 0.0
    for mine, theirs in zip(_per_item(got, "facet_mc"), _per_item(ref, "facet_mc"), strict=True):
        for (ll, _), (ll_ref, _) in zip(mine, theirs, strict=True):
            worst = max(worst, abs(ll - ll_ref))
    assert worst <= 1e-3, worst
    # Greedy token equality. The completion's text carries the separator that joins it to the prompt
    # (this word-level tokenizer decodes with spaces between tokens); lm-eval's hf decodes it alone.
    texts = [[t.strip() for t in item] for item in _per_item(got, "facet_gen")]
    assert texts == _per_item(ref, "facet_gen")
    print(
        json.dumps(
            {
                "adapter": adapter,
                "tokenized": tokenized,
                "acc": got["results"]["facet_mc"]["acc,none"],
                "max_ll_diff": worst,
            }
        )
    )
