"""Registry subcommands for the ``subjectpaint`` CLI: ``list``, ``rm``, ``gc``, ``export``, ``import``, ``tenants``.

``subjectpaint.cli`` calls :func:`add_commands` on its subparsers; each command sets
``func(args) -> int`` (the exit code). ``--registry`` / ``--blobs`` fall back to
``$SUBJECTPAINT_REGISTRY_URL`` / ``$SUBJECTPAINT_BLOBS`` / ``$SUBJECTPAINT_HOME`` defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import os

from .errors import InvalidAdapter, InvalidKey, StoreError
from .registry import Registry
from .tenants import PREFIX_LENGTH


def store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", metavar="URL", default=None,
                        help="SQLAlchemy URL of the registry (default: env or ~/.subjectpaint)")
    parser.add_argument("--blobs", metavar="DIR", default=None,
                        help="blob directory or fsspec URL (default: env or ~/.subjectpaint/blobs)")


def tenant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", dest="tenant_view", default=None, metavar="NAME",
                        help="the tenant whose subjects these are (default: the 'default' tenant)")


def _handler(run: Callable[[Registry, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        try:
            with Registry(args.registry, args.blobs) as registry:
                tenant = getattr(args, "tenant_view", None)
                return run(registry.for_tenant(tenant) if tenant else registry, args)
        except StoreError as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return func


def _list(registry: Registry, args: argparse.Namespace) -> int:
    records = registry.list(prefix=args.prefix, base_fingerprint=args.base, limit=args.limit,
                            offset=args.offset, after=args.after, latest_only=args.latest)
    if args.json:
        for r in records:
            print(json.dumps({"name": r.name, "version": r.version, "sha256": r.sha256,
                              "bytes": r.byte_size, "rank": r.rank, "alpha": r.alpha,
                              "dtype": r.dtype, "base_fingerprint": r.base_fingerprint,
                              "created": r.created.isoformat()}))
        return 0
    if not records:
        print("no adapters")
        return 0
    width = max(len(r.ref) for r in records)
    for r in records:
        print(f"{r.ref:<{width}}  rank={r.rank!s:<3} {r.dtype:<8} {r.byte_size:>10} B  "
              f"{r.sha256[:12]}  {r.created:%Y-%m-%d %H:%M}")
    return 0


def _rm(registry: Registry, args: argparse.Namespace) -> int:
    n = registry.delete(args.ref)
    print(f"removed {n} version{'s' * (n != 1)} of {args.ref} (run `gc` to free blobs)")
    return 0


def _gc(registry: Registry, args: argparse.Namespace) -> int:
    report = registry.gc(grace_seconds=args.grace)
    print(f"removed {report.removed_blobs} blobs ({report.bytes_freed} bytes) and "
          f"{report.removed_temp} temp files; kept {report.kept_blobs} blobs")
    return 0


def _export(registry: Registry, args: argparse.Namespace) -> int:
    if os.path.isdir(args.path):
        raise InvalidAdapter(f"output {args.path!r} is a directory; give a file name such as "
                             f"{os.path.join(args.path, args.ref.replace('@', '-') + '.safetensors')}")
    record = registry.export(args.ref, args.path)
    print(f"exported {record.ref} to {args.path}")
    return 0


def _import(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.import_(args.path, name=args.name)
    print(f"imported {args.path} as {record.ref}")
    return 0


def _tenants(registry: Registry, args: argparse.Namespace) -> int:
    if args.action == "add":
        registry.create_tenant(args.name)
        print(f"tenant {args.name!r} ready")
    elif args.action == "key":
        key = registry.issue_key(args.name, label=args.label)
        info = next(k for k in registry.keys(args.name) if k.prefix == key[:PREFIX_LENGTH])
        print(key)  # shown once, stored hashed; stdout holds only the key, for scripts
        print(f"key id {info.id} (prefix {info.prefix}) for tenant {args.name!r}: keep it now, it is not shown "
              "again", file=sys.stderr)
    elif args.action == "keys":
        for k in registry.keys(args.name):
            used = f"{k.last_used:%Y-%m-%d %H:%M}" if k.last_used else "never"
            print(f"{k.id:>6}  {k.prefix or '(no prefix)':<12}  created {k.created:%Y-%m-%d %H:%M}  last used {used}"
                  + (f"  {k.label}" if k.label else ""))
    elif args.action == "revoke":
        if not args.name.isdigit() or not registry.revoke_key_id(int(args.name)):
            raise InvalidKey(f"no API key with id {args.name!r} (see `tenants keys NAME`)")
        print(f"revoked key {args.name}")
    else:
        print("\n".join(registry.tenants()))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the registry subcommands to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser("list", help="list registered adapters")
    p.add_argument("prefix", nargs="?", default=None, help="only names starting with this")
    p.add_argument("--base", default=None, help="only adapters for this base fingerprint")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--after", default=None, metavar="NAME@V", help="page after this entry")
    p.add_argument("--latest", action="store_true", help="only the latest version of each name")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    tenant_option(p)
    store_options(p)
    p.set_defaults(func=_handler(_list))

    p = subparsers.add_parser("rm", help="remove an adapter (NAME: all versions, NAME@V: one)")
    p.add_argument("ref", metavar="NAME[@V]")
    tenant_option(p)
    store_options(p)
    p.set_defaults(func=_handler(_rm))

    p = subparsers.add_parser("gc", help="delete blobs no adapter references")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="keep unreferenced blobs younger than this (writes in flight)")
    store_options(p)
    p.set_defaults(func=_handler(_gc))

    p = subparsers.add_parser("export", help="write an adapter as one safetensors file")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("path")
    tenant_option(p)
    store_options(p)
    p.set_defaults(func=_handler(_export))

    p = subparsers.add_parser("import", help="register a safetensors adapter file")
    p.add_argument("path")
    p.add_argument("--name", default=None, help="subject name (default: the file's metadata)")
    tenant_option(p)
    store_options(p)
    p.set_defaults(func=_handler(_import))

    p = subparsers.add_parser("tenants", help="tenants and API keys: list | add NAME | key NAME (prints a new key "
                              "once) | keys NAME (ids, prefixes, created, last used) | revoke KEY_ID")
    p.add_argument("action", choices=("list", "add", "key", "keys", "revoke"))
    p.add_argument("name", nargs="?", default="default", help="tenant name (revoke: the key id)")
    p.add_argument("--label", default=None)
    store_options(p)
    p.set_defaults(func=_handler(_tenants))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m adapters_store.cli``)."""
    parser = argparse.ArgumentParser(prog="adapters_store")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
