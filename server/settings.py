"""All server settings, read in one place: environment variables ``FACET_*`` and CLI flags.

Build one ``Settings`` at start-up and pass it down; nothing else reads the environment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACET_", extra="forbid")

    # ---- base model ----
    model: str = Field(
        DEFAULT_MODEL, description="'smollm2-135m-instruct' (offline default), a local folder or a hub id"
    )
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available")
    dtype: str | None = Field(
        "auto",
        description="auto / float32 / bfloat16 / float16; auto: bf16 on CUDA and on CPUs with AMX or"
        " AVX-512-BF16, float32 elsewhere",
    )
    data_dir: Path = Field(Path("var"), description="model cache, adapter store, job data")
    models_dir: Path | None = Field(None, description="base model cache; default: <data_dir>/models")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="linear layers wrapped for adapters (name suffixes)",
    )

    # ---- engine ----
    max_batch_size: int = Field(64, ge=1, description="running sequences per step")
    max_tokens_per_step: int = Field(4096, ge=16, description="prefill + decode tokens in one step")
    device_adapter_bytes: int = Field(256 << 20, ge=0, description="byte budget of device slot tables")
    host_adapter_bytes: int = Field(1 << 30, ge=0, description="byte budget of the host adapter LRU")
    pinned_adapters: list[str] = Field(
        [], description="adapter ids never evicted once loaded (also PUT /adapters/{id}/pin)"
    )
    merged_cache_bytes: int = Field(0, ge=0, description="byte budget of merged-weight copies (0 = off)")
    merge_after_steps: int = Field(
        4, ge=1, description="whole steps on one adapter before it is served merged"
    )
    kv_cache: str = Field(
        "paged",
        pattern="^(paged|padded)$",
        description="paged: KV blocks, packed tokens, chunked prefill, prefix cache; padded: the"
        " left-padded DynamicCache batch (kept for comparison)",
    )
    kv_cache_bytes: int = Field(512 << 20, ge=1, description="byte budget of the paged KV cache")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    prefill_itl_factor: float = Field(
        2.0,
        ge=0,
        description="paged: while sequences decode, a step's prefill chunk is sized so the step takes at"
        " most this many decode-only steps (measured); 0 = chunks of max_tokens_per_step",
    )
    prefill_max_share: int = Field(
        4,
        ge=1,
        description="paged: with k prompts waiting or part prefilled, a step's prefill allowance is"
        " min(k, this) times prefill_itl_factor's (1 = one prompt's share whatever the queue)",
    )
    prefill_itl_floor_ms: float = Field(
        0.0,
        ge=0,
        description="paged: while sequences decode, a step with prefill may always take this long"
        " (ms), whatever the decode step; the larger of this and prefill_itl_factor's allowance"
        " applies (0 = relative pacing only)",
    )
    static_decode: str = Field(
        "off",
        pattern="^(off|eager|compiled)$",
        description="paged: decode-only steps of base-model rows run over bucketed batch sizes and"
        " static buffers (eager), also through torch.compile (compiled; every bucket compiles at"
        " start-up); off: packed shapes (measured faster here, docs/engine.md)",
    )
    prefix_caching: bool = Field(
        True, description="share full KV blocks of equal prefixes (same adapter version)"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    cpu_kernels: bool = Field(
        True, description="fused C++ kernels for mixed-adapter batches on CPU (built once; torch code if off)"
    )
    kernels_dir: Path | None = Field(
        None, description="build cache of the CPU kernels; default: $XDG_CACHE_HOME/facet (~/.cache/facet)"
    )

    # ---- http ----
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = Field(1 << 20, ge=1024, description="cap on a JSON request body (413 above)")
    max_upload_bytes: int = Field(
        256 << 20, ge=1024, description="cap on an uploaded adapter_model.safetensors (413 above)"
    )
    max_file_bytes: int = Field(
        32 << 20, ge=1024, description="cap on an uploaded training file (POST /files; 413 above)"
    )
    upload_idle_timeout_s: float = Field(
        30.0, gt=0, description="a request body (upload or JSON) that sends nothing for this long gets 408"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that sends no complete request head for this long (after connecting or"
        " after its last response) is closed (408 if it sent part of one)",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this")
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open connections; a request on one beyond it gets 503 + Retry-After at once and the"
        " connection closes. Default: half the open-file limit (RLIMIT_NOFILE), so refusals come before"
        " accept() runs out of descriptors",
    )
    max_prompt_tokens: int = Field(4096, ge=1, description="cap on prompt tokens (422 above)")
    max_new_tokens: int = Field(2048, ge=1, description="cap on a request's max_new_tokens (422 above)")
    max_queue: int = Field(256, ge=1, description="waiting requests; beyond it new ones get 429")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429 / 503")
    api_keys: list[str] = Field(
        [], description="'SCOPE:TOKEN' bearer keys, SCOPE = infer | admin; none = no auth"
    )
    api_keys_file: Path | None = Field(None, description="file of 'SCOPE:TOKEN' lines (# comments)")
    key_max_concurrent: int | None = Field(
        None,
        ge=1,
        description="generations one API key may have in flight (waiting or running; streams while open);"
        " beyond it 429 + Retry-After. Default: 3/4 of max_batch_size, so other keys find batch room."
        " Only with api_keys (without keys there is one caller)",
    )
    key_max_queued: int | None = Field(
        None,
        ge=1,
        description="of those, how many may wait for a batch slot; beyond it 429 + Retry-After."
        " Default: a quarter of max_queue",
    )
    engine_stall_s: float = Field(
        120.0,
        gt=0,
        description="/ready and new requests answer 503 when a step takes longer (a wedged engine)",
    )
    shutdown_grace_s: int = Field(30, ge=0, description="seconds in-flight requests get on shutdown")

    # ---- fine-tunes ----
    finetune_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="activation memory one training micro-batch may use; a job whose batch_size x longest"
        " example exceeds it is 422. Default: a quarter of the training device's memory",
    )
    finetune_bytes_per_token: int | None = Field(
        None,
        ge=1,
        description="activation bytes per micro-batch token; default: estimated from the base model's"
        " shape (~1.6 MB for SmolLM2-135M in float32, as measured)",
    )

    jobs_lease_s: float = Field(
        30.0,
        ge=1,
        description="a running fine-tune's lease, renewed every third of it; another replica resumes the"
        " job only once it expired (or its runner's process is known dead)",
    )
    jobs_runner_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="this process's name in the jobs table; default <host>:<pid namespace>:<pid>",
    )

    # ---- metrics ----
    metrics_top_adapters: int = Field(
        20, ge=0, description="adapters (top N by requests) with their own /metrics series; the rest: 'other'"
    )

    # ---- adapter store backends (docs/scale-out.md, "Shared store") ----
    store_blob_url: str = Field(
        "file",
        pattern=r"^(file|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?)$",
        description="adapter files: 'file' (under <data_dir>/adapters) or s3://<bucket>[/<prefix>]",
    )
    store_s3_endpoint: str | None = Field(
        None, pattern=r"^https?://", description="S3 endpoint URL (MinIO, SeaweedFS, ...); default: AWS"
    )
    store_s3_region: str | None = Field(None, description="S3 region; default us-east-1")
    store_index_url: str = Field(
        "sqlite",
        pattern=r"^(sqlite|postgres(ql)?://.+)$",
        description="adapter index: 'sqlite' (<data_dir>/adapters/index.sqlite3) or a postgresql:// DSN "
        "(keep the password in PGPASSWORD or ~/.pgpass)",
    )
    store_cache_bytes: int = Field(
        1 << 30, ge=0, description="byte bound of the local read-through cache of S3 blobs"
    )
    store_orphan_grace_s: float | None = Field(
        None, ge=0, description="age before the GC removes a blob no row points to; default 0 local, 900 S3"
    )

    @property
    def model_cache_dir(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def kernels_build_dir(self) -> Path:
        if self.kernels_dir is not None:
            return self.kernels_dir
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "facet"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if kind == list[str]:
            parser.add_argument(flag, nargs="+", default=None, help=field.description)
        else:
            parser.add_argument(flag, default=None, help=field.description)


def settings_from_cli(argv: list[str] | None = None) -> Settings:
    """Environment first, then CLI flags on top."""
    parser = argparse.ArgumentParser(prog="facet")
    add_cli_args(parser)
    ns = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(ns).items() if v is not None}
    return Settings(**overrides)
