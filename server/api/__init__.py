"""HTTP API: one router per resource, shared schemas and dependencies."""

from . import adapters, files, finetune, generate, health, metrics, openai, tokenize

ROUTERS = [
    health.router,
    generate.router,
    openai.router,
    tokenize.router,
    adapters.router,
    metrics.router,
    finetune.router,
    files.router,
]
