"""Where a placement's subject and its adapter come from: the one resolver behind every entry point
(`Studio.inpaint` / `inpaint_many`, the sessions' `place` / `place_many`, the serve worker).

A *subject* (what a placement places) is one of

- a `Subject`: from the registry (`Subject.load`), from a file (`Subject.from_file`), just trained
  (`Subject.train`) or built in memory from tensors; its exemplar crop conditions the placement and its adapter
  is applied there;
- a registry `AdapterRecord`, or a ``"name@version"`` / ``"name@latest"`` string: that registered subject
  (a string without ``@``, or naming an existing file, is an image path);
- an exemplar image (path, PIL image, array) or None: no adapter.

An *adapter source* (what `Studio.activate`, `Studio.laid_out` and `Studio.subjects` take) is any of those that
carries an adapter, an `Adapter`, or in-memory LoRA tensors (a dict of tensors, interchange keys).

A Subject's tensors, when it holds them, are its record's: an adapter with a record is cached by the record's
sha256 and laid out from the tensors in hand, or else from the registry blob, verified as it is read.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from adapters_store.errors import InvalidName
from adapters_store.naming import parse_ref

from .errors import InvalidAdapter, InvalidArgument
from .slots import Adapter


@dataclass(frozen=True)
class Resolved:
    """A placement's subject, resolved: the `exemplar` to condition on (an image input, or None for an
    unconditional fill), the `subject` that carries its adapter (None: the base alone) and its `name`."""

    exemplar: Any
    subject: Any
    name: str | None


def resolve(x, registry=None) -> Resolved:
    """Resolve a subject (see the module's docstring). `registry`: a Registry, or a callable returning one
    (asked only for a ``"name@version"`` string). Raises InvalidArgument / InvalidAdapter / AdapterNotFound."""
    if is_ref(x):
        x = _registry(registry).get(x)
    if is_record(x):
        x = subject_from_record(x)
    if isinstance(x, Adapter) or is_tensors(x):
        raise InvalidArgument("an adapter alone has no exemplar to place: give a Subject (or an exemplar image)")
    if not hasattr(x, "exemplar"):  # an exemplar image, or None
        return Resolved(x, None, None)
    name = getattr(x, "name", None)
    if x.exemplar is None:
        raise InvalidAdapter(f"subject {name!r} has no exemplar crop in its metadata")
    return Resolved(x.exemplar, adapter_source(x), name)


def adapter_source(x):
    """`x` if it carries an adapter, else None: the one test of "does this have an adapter"."""
    if x is None:
        return None
    if isinstance(x, (str, Adapter)) or is_record(x) or is_tensors(x):
        return x
    if any(getattr(x, a, None) is not None for a in ("record", "adapter", "tensors")):
        return x
    return None


def looked_up(source, registry=None):
    """An adapter source with a string (``"name"`` or ``"name@version"``) looked up: its registry record."""
    return _registry(registry).get(source) if isinstance(source, str) else source


def cache_key(source) -> str | None:
    """What identifies the adapter's content across calls (its record's sha256), or None (not cacheable)."""
    record = source if is_record(source) else getattr(source, "record", None)
    return None if record is None else record.sha256


@contextlib.contextmanager
def opened(source, registry=None) -> Iterator[Adapter]:
    """The `Adapter` of an adapter source, for the block. A registry blob is verified on leaving the block
    (`Registry.verifying`): use what it yields inside, so that a blob that fails the check is never kept."""
    source = looked_up(source, registry)
    if isinstance(source, Adapter):
        yield source
        return
    adapter = getattr(source, "adapter", None)
    if adapter is not None:
        yield adapter
        return
    tensors = source if is_tensors(source) else getattr(source, "tensors", None)
    name = str(getattr(source, "name", None) or "adapter")
    if tensors is not None:
        yield Adapter.from_state_dict(tensors, getattr(source, "metadata", None), name)
        return
    record = source if is_record(source) else getattr(source, "record", None)
    if record is None:
        raise InvalidArgument(f"cannot find an adapter in {type(source).__name__}")
    with _registry(registry).verifying(record) as stored:
        yield Adapter.from_state_dict(stored, record_metadata(record), record.ref)


def subject_from_record(record):
    """A Subject for a registry record: its metadata (the exemplar crop among it), the adapter left in the blob
    store until it is laid out (through the RAM tier)."""
    from .subject import Subject

    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in record.metadata.items()}
    return Subject(record.name, record.version, metadata, None, record)


def record_metadata(record) -> dict:
    """The adapter metadata of a record: its file metadata, plus the row's alpha and base fingerprint."""
    meta = dict(record.metadata or {})
    if record.alpha is not None:
        meta.setdefault("lora_alpha", record.alpha)
    meta.setdefault("base_fingerprint", record.base_fingerprint)
    return meta


def is_ref(x) -> bool:
    """A ``"name@version"`` string that names no file."""
    if not isinstance(x, str) or "@" not in x or os.path.exists(x):
        return False
    try:
        parse_ref(x)
    except InvalidName:
        return False
    return True


def is_record(x) -> bool:
    return hasattr(x, "sha256") and hasattr(x, "ref")


def is_tensors(x) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def _registry(registry):
    if registry is None:
        from adapters_store.registry import Registry

        return Registry()
    return registry() if callable(registry) else registry
