"""adapters_store: an SQL-indexed registry of adapters over content-addressed safetensors blobs.

Knows nothing about diffusion: names, versions, bytes, hashes and metadata.
"""
from .blobs import BlobStore
from .cache import AdapterCache, CacheStats
from .errors import (AdapterCorrupt, AdapterNotFound, InvalidAdapter, InvalidKey, InvalidName,
                     RegistryBusy, StorageFull, StorageUnavailable, StoreError, TenantNotFound,
                     VersionExists)
from .naming import parse_ref, validate_name
from .registry import AdapterRecord, GcReport, Registry
from .tenants import DEFAULT_TENANT

__all__ = [
    "AdapterCache", "AdapterCorrupt", "AdapterNotFound", "AdapterRecord", "BlobStore", "CacheStats",
    "DEFAULT_TENANT", "GcReport", "InvalidAdapter", "InvalidKey", "InvalidName", "Registry",
    "RegistryBusy", "StorageFull", "StorageUnavailable", "StoreError", "TenantNotFound", "VersionExists", "parse_ref", "validate_name",
]
