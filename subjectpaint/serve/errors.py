"""HTTP status of every error raised on purpose: bad requests are 4xx with a clear message, never 500; a tenant over
its limits is 429; storage faults are 503 (retryable) or 507 (full), never a client error."""

from __future__ import annotations

from adapters_store.jobs import QueueFull

from ..errors import (AdapterCorrupt, AdapterNotFound, BaseMismatch, InvalidKey, QuotaExceeded, RegistryBusy,
                      StorageFull, StorageUnavailable, TenantNotFound, VersionExists)

STATUS = [  # first match wins (order: most specific first)
    (InvalidKey, 401),
    (AdapterNotFound, 404),
    (TenantNotFound, 401),  # a key whose tenant vanished: the same as a bad key
    (VersionExists, 409),
    (BaseMismatch, 409),
    (QuotaExceeded, 429),
    (StorageFull, 507),
    (StorageUnavailable, 503),
    (RegistryBusy, 503),
    (QueueFull, 429),
    (AdapterCorrupt, 503),
]


def status_of(exc: Exception) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 422  # InvalidImage, InvalidMask, InvalidArgument, InvalidName, InvalidAdapter, ...
