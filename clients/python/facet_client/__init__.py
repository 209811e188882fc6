"""Python client for the Facet adapter inference server (``Client``, ``AsyncClient``, ``FacetError``)."""

from ._async import AsyncClient
from ._sse import AsyncGenerationStream, GenerationStream
from .errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FacetConnectionError,
    FacetError,
    FineTuneError,
    FineTuneTimeout,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PermissionDeniedError,
    ServerError,
    ValidationError,
)
from .models import (
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
from .sync import Client

__all__ = [
    "Adapter",
    "AdapterPage",
    "AsyncClient",
    "AsyncGenerationStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "DeletedFile",
    "FacetConnectionError",
    "FacetError",
    "FineTune",
    "FineTuneError",
    "FineTuneEvent",
    "FineTunePage",
    "FineTuneTimeout",
    "Generation",
    "GenerationStream",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PermissionDeniedError",
    "ServerError",
    "Token",
    "TrainingFile",
    "ValidationError",
]
