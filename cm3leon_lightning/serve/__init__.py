"""Serving (``cm3leon serve``): a LitServe API over a CM3Leon checkpoint, with dynamic batching of requests.

Needs the ``serve`` extra (``pip install 'cm3leon_lightning[serve]'``: LitServe and FastAPI). The top-level package does
not import this one, and this one imports LitServe only when a name from ``api`` is first used, so ``cm3leon serve``
can say what to install instead of failing on the import.
"""

from cm3leon_lightning._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("CM3LeonAPI", "EditJob", "EditSettings", "ImageJob", "InfillJob", "TextJob", "TextSettings",
         "install_error_handlers"),
        "cm3leon_lightning.serve.api",
    ),
    **dict.fromkeys(
        ("EditRequest", "GenerationRequest", "ImageRequest", "InfillRequest", "Rejected", "TextRequest"),
        "cm3leon_lightning.serve.requests",
    ),
}  # fmt: skip

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
