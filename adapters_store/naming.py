"""Subject names and ``name@version`` references."""
from __future__ import annotations

import unicodedata

from .errors import InvalidName

MAX_NAME_LENGTH = 128


def validate_name(name: object) -> str:
    """Return ``name`` if it is an acceptable subject name, else raise :class:`InvalidName`.

    Names are free text for people (``blue-mug``, ``Tasse bleue``) but never paths: no ``/`` or
    ``\\``, no ``..``, no control characters, no ``@`` (it separates the version), no
    leading/trailing whitespace, 1..128 characters.
    """
    if not isinstance(name, str):
        raise InvalidName(f"subject name must be a str, got {type(name).__name__}")
    if not name:
        raise InvalidName("subject name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"subject name is {len(name)} characters long (max {MAX_NAME_LENGTH})")
    for ch in name:
        if ch in "/\\":
            raise InvalidName(f"subject name {name!r} contains a path separator {ch!r}")
        if ch == "@":
            raise InvalidName(f"subject name {name!r} contains '@' (reserved for name@version)")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise InvalidName(f"subject name {name!r} contains a control character {ch!r}")
    if ".." in name:
        raise InvalidName(f"subject name {name!r} contains '..'")
    if name != name.strip():
        raise InvalidName(f"subject name {name!r} has leading or trailing whitespace")
    return name


MAX_VERSION = 2**63 - 1  # versions are signed 64-bit integers in every database


def parse_ref(ref: object) -> tuple[str, int | None]:
    """Split ``"name"`` / ``"name@3"`` / ``"name@latest"`` into ``(name, version or None)``."""
    if not isinstance(ref, str):
        raise InvalidName(f"adapter reference must be a str, got {type(ref).__name__}")
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep or version == "latest":
        return name, None
    if not version.isascii() or not version.isdigit() or len(version) > 19 or not 1 <= int(version) <= MAX_VERSION:
        raise InvalidName(f"bad version in {ref!r}: expected name@N with 1 <= N <= {MAX_VERSION}, or name@latest")
    return name, int(version)
