"""Compatibility module: ``Client`` and ``AsyncClient`` now live in ``sync`` and ``_async``, the
objects they return in ``models``. ``from facet_client.client import Client`` keeps working."""

from ._async import AsyncAdapters, AsyncClient, AsyncFiles, AsyncFineTunes
from ._ops import CONFIG_NAME, DEFAULT_URL, WEIGHTS_NAME
from ._sse import AsyncGenerationStream, GenerationStream
from .models import (
    TERMINAL,
    Adapter,
    AdapterPage,
    DeletedFile,
    FineTune,
    FineTuneEvent,
    FineTunePage,
    Generation,
    Token,
    TrainingFile,
)
from .sync import Adapters, Client, Files, FineTunes

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_URL",
    "TERMINAL",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterPage",
    "Adapters",
    "AsyncAdapters",
    "AsyncClient",
    "AsyncFiles",
    "AsyncFineTunes",
    "AsyncGenerationStream",
    "Client",
    "DeletedFile",
    "Files",
    "FineTune",
    "FineTuneEvent",
    "FineTunePage",
    "FineTunes",
    "Generation",
    "GenerationStream",
    "Token",
    "TrainingFile",
]
