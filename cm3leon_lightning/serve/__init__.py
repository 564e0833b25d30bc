"""Serving (``cm3leon serve``): a LitServe API over a CM3Leon checkpoint, with dynamic batching of requests.

Needs the ``serve`` extra (``pip install 'cm3leon_lightning[serve]'``: LitServe and FastAPI). The top-level package does
not import this one.
"""

from cm3leon_lightning.serve.api import (
    CM3LeonAPI,
    EditJob,
    EditSettings,
    ImageJob,
    InfillJob,
    TextJob,
    TextSettings,
    install_error_handlers,
)
from cm3leon_lightning.serve.requests import (
    EditRequest,
    GenerationRequest,
    ImageRequest,
    InfillRequest,
    Rejected,
    TextRequest,
)

__all__ = [
    "CM3LeonAPI",
    "EditJob",
    "EditRequest",
    "EditSettings",
    "GenerationRequest",
    "ImageJob",
    "ImageRequest",
    "InfillJob",
    "InfillRequest",
    "Rejected",
    "TextJob",
    "TextRequest",
    "TextSettings",
    "install_error_handlers",
]
