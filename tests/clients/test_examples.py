"""clients/examples/*.py run as subprocesses against a real uvicorn tiny-model server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.api.processes import REPO, free_port

from .conftest import ADMIN

EXAMPLES = REPO / "clients" / "examples"
RECORDS = [{"prompt": f"t{1 + i} t{10 + i}", "completion": f"t{40 + i} t{50 + i}"} for i in range(4)]


def example(name: str, *args: str, key: str | None = ADMIN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FACET_URL", "FACET_API_KEY")}
    if key is not None:
        env["FACET_API_KEY"] = key
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tuned(server_url, tmp_path_factory) -> str:
    """fine_tune.py trains ``ex-lora`` (the other examples then use it)."""
    data = tmp_path_factory.mktemp("examples") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    run = example(
        "fine_tune.py", "--base-url", server_url, "--adapter-id", "ex-lora", "--data", str(data),
        "--config", '{"r": 2}', "--max-steps", "3", "--prompt", "t1 t10", "--max-new-tokens", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stderr and run.stdout.strip()
    return "ex-lora"


def test_fine_tune_example(tuned):
    assert tuned == "ex-lora"


def test_generate_example(server_url, tuned):
    run = example("generate.py", "--base-url", server_url, "--prompt", "t1 t10", "--max-new-tokens", "3")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and "completion_tokens" in run.stderr
    run = example(
        "generate.py", "--base-url", server_url, "--prompt", "t1 t10", "--adapter", tuned, "--stream",
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_openai_example(server_url, tuned):
    run = example("openai_chat.py", "--base-url", server_url, "--model", tuned, "--message", "t1 t10",
                  "--max-tokens", "3")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    run = example("openai_chat.py", "--base-url", server_url, "--model", "tiny-llama", "--message", "t1",
                  "--max-tokens", "3", "--stream")  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_examples_exit_non_zero_on_failure(server_url):
    assert example("generate.py", "--base-url", server_url, "--adapter", "no-such").returncode == 1
    assert example("openai_chat.py", "--base-url", server_url, "--model", "no-such").returncode == 1
    bad = example("fine_tune.py", "--base-url", server_url, "--method", "nope", key="wrong-key")
    assert bad.returncode == 1 and "error" in bad.stderr
    dead = f"http://127.0.0.1:{free_port()}"
    assert example("generate.py", "--base-url", dead).returncode == 1
