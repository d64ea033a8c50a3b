"""Typed errors. Every error the SDK raises on bad input is a `SubjectPaintError`.

Registry errors live in `adapters_store.errors` (that package knows nothing of diffusion) and are
re-exported here when available, so users catch everything from one module.
"""

from __future__ import annotations


class SubjectPaintError(Exception):
    """Base class of every error subjectpaint raises on purpose."""


class InvalidImage(SubjectPaintError, ValueError):
    """An image (room, exemplar, product photo) that cannot be used: unreadable, empty, blank."""


class InvalidMask(SubjectPaintError, ValueError):
    """A mask or edit map that cannot be used: empty, wrong aspect ratio, wrong values."""


class InvalidArgument(SubjectPaintError, ValueError):
    """A parameter outside its allowed range or of the wrong kind."""


class WeightsNotFound(SubjectPaintError, FileNotFoundError):
    """Model weights missing, not safetensors, or not reachable (no hub access)."""


class BaseMismatch(SubjectPaintError):
    """An adapter trained for another base model."""


class QuotaExceeded(SubjectPaintError):
    """A tenant is over one of its limits (training jobs queued or running, placements per second): retry later.
    `retry_after`: seconds a client should wait (None: unknown)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class AddressInUse(SubjectPaintError, OSError):
    """`subjectpaint serve` cannot listen on the host and port it was given."""


# The registry's errors (adapters_store knows nothing of diffusion, so they derive from its own StoreError),
# one import away for users. Catch `(SubjectPaintError, StoreError)` to catch everything raised on purpose.
from adapters_store.errors import (  # noqa: E402,F401
    AdapterCorrupt,
    AdapterFileError,
    AdapterNotFound,
    InvalidAdapter,
    InvalidKey,
    InvalidName,
    RegistryBusy,
    StorageFull,
    StorageUnavailable,
    StoreError,
    TenantNotFound,
    VersionExists,
)

ERRORS = (SubjectPaintError, StoreError)
