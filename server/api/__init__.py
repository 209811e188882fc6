"""HTTP API: one router per resource, shared schemas and dependencies."""

from . import adapters, generate, health, openai

ROUTERS = [health.router, generate.router, openai.router, adapters.router]
