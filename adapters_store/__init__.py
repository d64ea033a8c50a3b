"""adapters_store: an SQL-indexed registry of adapters over content-addressed safetensors blobs.

Knows nothing about diffusion: names, versions, bytes, hashes and metadata.
"""
from .blobs import BlobStore
from .cache import AdapterCache, CacheStats
from .errors import (AdapterCorrupt, AdapterNotFound, InvalidAdapter, InvalidName, RegistryBusy,
                     StoreError, VersionExists)
from .naming import parse_ref, validate_name
from .registry import AdapterRecord, GcReport, Registry

__all__ = [
    "AdapterCache", "AdapterCorrupt", "AdapterNotFound", "AdapterRecord", "BlobStore", "CacheStats",
    "GcReport", "InvalidAdapter", "InvalidName", "Registry", "RegistryBusy", "StoreError",
    "VersionExists", "parse_ref", "validate_name",
]
