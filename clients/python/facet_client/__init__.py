"""Python client for the Facet adapter inference server (``Client``, ``AsyncClient``, ``FacetError``)."""

from .client import (
    Adapter,
    AdapterPage,
    AsyncClient,
    AsyncGenerationStream,
    Client,
    Generation,
    GenerationStream,
    Token,
)
from .errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FacetConnectionError,
    FacetError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PermissionDeniedError,
    ServerError,
    ValidationError,
)

__all__ = [
    "Adapter",
    "AdapterPage",
    "AsyncClient",
    "AsyncGenerationStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "FacetConnectionError",
    "FacetError",
    "Generation",
    "GenerationStream",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PermissionDeniedError",
    "ServerError",
    "Token",
    "ValidationError",
]
