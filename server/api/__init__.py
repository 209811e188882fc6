"""HTTP API: one router per resource, shared schemas and dependencies."""

from . import adapters, files, finetune, generate, health, metrics, openai

ROUTERS = [
    health.router,
    generate.router,
    openai.router,
    adapters.router,
    metrics.router,
    finetune.router,
    files.router,
]
