"""`subjectpaint` command line. Each command is a small function over the SDK; errors print one line."""

from __future__ import annotations

import argparse
import sys

from adapters_store.cli import add_commands, store_options

from .choices import DEFAULT_SCHEDULE, DEFAULT_SCHEDULER, SCHEDULERS, SCHEDULES
from .errors import ERRORS, InvalidArgument


def _check_outputs(*paths) -> None:
    """Refuse an output path that cannot be a file before any work is done (nothing is written then)."""
    import os

    for path in paths:
        if path is not None and os.path.isdir(os.path.expanduser(path)):
            raise InvalidArgument(f"output {path!r} is a directory; give a file name such as "
                                  f"{path.rstrip('/')}/out.png")


def _check_checkpoint(workdir) -> None:
    """A `--workdir` checkpoint that is not a readable checkpoint (truncated, overwritten) is refused before training:
    delete it to start afresh."""
    import os
    import zipfile

    last = os.path.join(os.path.expanduser(workdir), "last.ckpt") if workdir else None
    if last and os.path.lexists(last) and not (os.path.isfile(last) and zipfile.is_zipfile(last)):
        raise InvalidArgument(f"checkpoint {last} is unreadable (truncated or not a checkpoint); delete it to start "
                              "afresh, or point --workdir elsewhere")


def _load_studio(args):
    from .studio import Studio

    return Studio.load(args.base, device=args.device)  # None: the demo base; "tiny": a random tiny one


def _write(placement, args) -> int:
    """The placement to -o (and its grid to --grid)."""
    from .result import save_image

    path = placement.save(args.output)
    if args.grid:
        save_image(placement.grid(), args.grid)
    if not args.quiet:
        print(f"wrote {path}" + (f" and {args.grid}" if args.grid else ""))
    return 0


def cmd_inpaint(args) -> int:
    from .masks import PasteBack

    _check_outputs(args.output, args.grid)
    studio = _load_studio(args)
    placement = studio.inpaint(
        args.room,
        args.mask,
        args.exemplar,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        paste_back=PasteBack(enabled=not args.no_paste_back, dilate=args.dilate, feather=args.feather),
        progress=not args.quiet,
    )
    return _write(placement, args)


def cmd_demo(args) -> int:
    from pathlib import Path

    from .demo.scenes import EVAL_SEEDS, make_scene
    from .result import image_grid, save_image

    studio = _load_studio(args)
    scene = make_scene(EVAL_SEEDS[args.seed % len(EVAL_SEEDS)], studio.base.resolution)
    placed = studio.inpaint(scene.room, scene.mask, scene.exemplar, seed=args.seed, progress=not args.quiet)
    out = Path(args.output)
    grid = image_grid([[("room", scene.room), ("mask", placed.mask), ("exemplar", scene.exemplar),
                        ("placed", placed.image), ("truth", scene.composite)]])
    path = save_image(grid, out / "demo_grid.png")
    save_image(placed.image, out / "demo_placed.png")
    if not args.quiet:
        print(f"wrote {path} (room | mask | exemplar | placed | truth) and {out / 'demo_placed.png'}")
    return 0


def cmd_eval(args) -> int:
    from .demo.benchmark import run_fidelity, summarize
    from .evaluate import format_table

    if args.protocol is not None:
        return _eval_protocol(args)
    studio = _load_studio(args)
    rows, _, _ = run_fidelity(studio, n=args.scenes, steps=args.steps or studio.default_steps, seed=args.seed,
                              progress=not args.quiet)
    print(format_table(summarize(rows)))
    return 0


def _recipe_overrides(args) -> dict:
    """`--set field=value` (value as JSON when it parses: numbers, true/false, lists; else the string) and the
    shortcut options, as recipe overrides."""
    import json

    from .errors import InvalidArgument

    overrides = {k: v for k in ("rank", "steps", "lr", "lr_schedule", "strength", "storage", "seed")
                 if (v := getattr(args, k)) is not None}
    for item in args.set or ():
        field, eq, text = item.partition("=")
        if not eq or not field:
            raise InvalidArgument(f"--set takes field=value, got {item!r}")
        try:
            overrides[field.strip()] = json.loads(text)
        except ValueError:
            overrides[field.strip()] = text
    return overrides


def _eval_protocol(args) -> int:
    """`eval PROTOCOL DATA_DIR`: a paper's protocol on the user's dataset (subjectpaint/protocols.py)."""
    import contextlib
    import json

    from .evaluate import format_table
    from .protocols import Encoders, run_protocol

    if args.data_dir is None:
        raise InvalidArgument("eval PROTOCOL needs a DATA_DIR")
    if args.make_demo:
        from .demo.datasets import write_demo_dataset

        write_demo_dataset(args.protocol, args.data_dir, n=args.make_demo)
    studio = _load_studio(args)
    encoders = Encoders.load(args.clip, args.dino, args.dino_arch, lpips=args.protocol == "pie")
    with contextlib.ExitStack() as stack:
        subjects = {}
        if args.subject:
            from adapters_store import Registry

            from .subject import Subject

            registry = stack.enter_context(Registry(args.registry, args.blobs))
            studio.registry = registry
            for item in args.subject:  # SAMPLE_OR_OBJECT=NAME[@VERSION] or NAME (the object folder's name)
                key, _, ref = item.partition("=")
                subjects[key] = Subject.load(ref or key, studio=studio, registry=registry)
        rows, summary = run_protocol(args.protocol, args.data_dir, studio, encoders, session=args.session,
                                     subjects=subjects, seed=args.seed, steps=args.steps, limit=args.limit,
                                     progress=not args.quiet)
    if not args.quiet:
        print(format_table(rows))
        for note in summary["notes"]:
            print(f"note: {note}")
    print(json.dumps(summary))
    return 0


def cmd_train(args) -> int:
    from adapters_store import Registry

    from .subject import Subject

    _check_checkpoint(args.workdir)
    studio = _load_studio(args)
    with Registry(args.registry, args.blobs) as registry:
        subject = Subject.train(args.photos, args.name, studio, args.recipe, new_version=args.new_version,
                                registry=registry, workdir=args.workdir, progress=not args.quiet,
                                detector=None if args.no_detr else args.detector, **_recipe_overrides(args))
    if not args.quiet:
        r = subject.record
        print(f"registered {subject.ref}: rank {subject.rank}, {r.byte_size} bytes, "
              f"boxes by {subject.metadata.get('annotation_method')}")
    return 0


def cmd_place(args) -> int:
    from adapters_store import Registry

    from .subject import Subject

    _check_outputs(args.output, args.grid)
    studio = _load_studio(args)
    with Registry(args.registry, args.blobs) as registry:
        studio.registry = registry  # the subject's adapter bytes come from the same registry
        subject = Subject.load(args.name, studio=studio, registry=registry)
        options = dict(steps=args.steps, seed=args.seed, progress=not args.quiet)
        if args.session == "dual":
            placement = studio.dual_branch(**options).place(subject, args.room, args.mask)
        else:
            placement = studio.progressive(schedule=args.schedule, **options).place(subject, args.room, args.mask)
    return _write(placement, args)


def cmd_serve(args) -> int:
    from .serve import ServeConfig, build_server, run
    from .serve.lifecycle import bind

    config = ServeConfig(base=args.base, registry_url=args.registry, blobs=args.blobs, max_batch_size=args.max_batch_size,
                         batch_timeout=args.batch_timeout, train_steps=args.train_steps, place_steps=args.steps,
                         max_jobs_per_tenant=args.max_jobs_per_tenant, place_rate=args.place_rate,
                         drain_timeout=args.drain_timeout, worker=not args.no_worker)
    sock = bind(args.host, args.port)  # a busy port: AddressInUse, one line, before anything starts
    server, state = build_server(config)
    if args.command == "ui":
        from adapters_store import Registry

        with Registry(args.registry, args.blobs) as registry:
            key = registry.issue_key(args.tenant, label="subjectpaint ui")
        print(f"studio page: http://{args.host}:{args.port}/ui#key={key}  (an API key for tenant {args.tenant!r})")
    elif not args.quiet:
        print(f"serving on http://{args.host}:{args.port} (API: /v1/..., page: /ui, /health); Ctrl-C or SIGTERM "
              "stops it", flush=True)
    run(server, state, host=args.host, port=args.port, sock=sock)  # returns after a clean stop (SIGTERM / SIGINT)
    return 0


def cmd_worker(args) -> int:
    import signal

    from .serve import ServeConfig
    from .serve.jobs import TrainingWorker

    config = ServeConfig(base=args.base, registry_url=args.registry, blobs=args.blobs, detector=args.detector,
                         lease_seconds=args.lease, poll_seconds=args.poll, checkpoint_every=args.checkpoint_every,
                         max_attempts=args.attempts, train_batch_size=args.batch_size)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    worker = TrainingWorker(config)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())  # checkpoint the running job, give it back, exit
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    if not args.quiet:
        print(f"training worker {worker.owner} on {worker.registry!r}", flush=True)
    worker.run()
    return 0


def _base_options(p):
    p.add_argument(
        "--base",
        default=None,
        help="hub id or local Paint-by-Example directory (default: the demo base shipped in the package; "
        "'tiny' = a random tiny model for smoke tests)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectpaint",
        description="Personalized product placement with exemplar-inpainting diffusion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inpaint", help="paint an exemplar image into a room photo under a mask")
    p.add_argument("room", help="room photo (any format PIL reads)")
    p.add_argument("mask", help="mask image: white = place here, black = keep")
    p.add_argument("exemplar", help="reference image of the product")
    p.add_argument("-o", "--output", required=True, help="where to write the result (PNG/JPEG by extension)")
    p.add_argument("--grid", help="also write a before|mask|exemplar|after grid here")
    _base_options(p)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the base's default)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--scheduler", default=None, choices=tuple(SCHEDULERS), help=f"default {DEFAULT_SCHEDULER}")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-paste-back", action="store_true", help="return the raw generated image everywhere")
    p.add_argument("--dilate", type=int, default=None, help="paste-back: px around the mask fully regenerated "
                   "(default: long side / 256)")
    p.add_argument("--feather", type=int, default=None, help="paste-back: px of blended seam beyond that "
                   "(default: long side / 128)")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("demo", help="place a held-out demo product into a demo room; writes a before/after grid")
    p.add_argument("-o", "--output", default="subjectpaint-demo", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="which held-out scene (and the sampling seed)")
    p.add_argument("--steps", type=int, default=None)
    _base_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="the demo fidelity benchmark (no PROTOCOL): masked PSNR/SSIM against the true "
                       "composites; or a paper's protocol on DATA_DIR: cocoee, pixels, lora, pie")
    p.add_argument("protocol", nargs="?", choices=("cocoee", "pixels", "lora", "pie"), default=None)
    p.add_argument("data_dir", nargs="?", default=None, help="the dataset folder (layouts: subjectpaint/protocols.py)")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", default=None, help="local CLIPVisionModelWithProjection directory (e.g. ViT-B/32)")
    p.add_argument("--dino", default=None, help="local DINO ViT weights (.safetensors)")
    p.add_argument("--dino-arch", default="vit_small_patch16_224.dino", help="timm architecture of --dino")
    p.add_argument("--session", choices=("plain", "progressive", "dual"), default=None,
                   help="default: the protocol's paper (cocoee/lora plain, pixels progressive, pie dual)")
    p.add_argument("--subject", action="append", default=[], metavar="KEY[=NAME]",
                   help="place sample/object KEY with the registered subject NAME (default NAME = KEY)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    p.add_argument("--make-demo", type=int, default=0, metavar="N",
                   help="first write N demo scenes into DATA_DIR in the protocol's layout")
    store_options(p)
    _base_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train a subject adapter from 2-4 product photos and register it")
    p.add_argument("name", help="subject name in the registry")
    p.add_argument("photos", nargs="+", help="product photos on a plain backdrop, or cut-outs (transparent PNGs)")
    p.add_argument("--recipe", default=None, help="training preset: paint-by-example (the paper's; the default for "
                   "any base but the demo) or demo (the default for the demo base)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set precision=bf16-mixed --set batch_size=4 (repeatable)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the recipe's, 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="constant or cosine decay to 0 at the last step (default: the recipe's)")
    p.add_argument("--strength", type=float, default=None,
                   help="fraction of the trained weight delta to export (default: the recipe's)")
    p.add_argument("--new-version", action="store_true", help="add a version to an existing name")
    p.add_argument("--storage", choices=("int8", "fp16", "fp32"), default=None, help="(default: the recipe's, int8)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep checkpoints here; rerun to resume")
    p.add_argument("--detector", default="facebook/detr-resnet-50", help="DETR hub id or local dir")
    p.add_argument("--no-detr", action="store_true", help="boxes from the photo backdrop only")
    store_options(p)
    _base_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("place", help="place a registered subject into a room (binary mask or soft edit map)")
    p.add_argument("name", help="subject name (or name@version) in the registry")
    p.add_argument("room", help="room photo")
    p.add_argument("mask", help="mask or soft edit map: white = regenerate, black = keep, grey = partial")
    p.add_argument("-o", "--output", required=True, help="where to write the result")
    p.add_argument("--grid", help="also write the session's step grid here")
    p.add_argument("--session", choices=("progressive", "dual"), default="progressive",
                   help="progressive (PIXELS, soft maps) or dual (ViMAEdit dual branch)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=DEFAULT_SCHEDULE,
                   help="progressive: threshold schedule of the edit map")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    store_options(p)
    _base_options(p)
    p.set_defaults(func=cmd_place)

    for name, text in (("serve", "the HTTP API (LitServe): register, place, list, delete; API keys per tenant"),
                       ("ui", "the HTTP API plus the studio web page; prints the page's URL with a fresh key")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--max-batch-size", type=int, default=8, help="dynamic batching: rows per pass (1 = off)")
        p.add_argument("--batch-timeout", type=float, default=0.05, help="seconds a batch waits to fill")
        p.add_argument("--train-steps", type=int, default=300, help="default and maximum training steps per job")
        p.add_argument("--steps", type=int, default=None, help="default denoising steps of a placement")
        p.add_argument("--max-jobs-per-tenant", type=int, default=2, help="registration jobs a tenant may have "
                       "queued or running (more: 429 for that tenant only)")
        p.add_argument("--place-rate", type=float, default=10.0, help="placements per second per tenant (bursts "
                       "of 20; more: 429 with Retry-After)")
        p.add_argument("--drain-timeout", type=float, default=10.0, help="on SIGTERM / Ctrl-C: seconds in-flight "
                       "placements get before they are answered 503")
        p.add_argument("--tenant", default="default", help="ui: the tenant whose key the page gets")
        p.add_argument("--no-worker", action="store_true",
                       help="do not train in this process: registration jobs wait for `subjectpaint worker` processes")
        store_options(p)
        _base_options(p)
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="train queued registration jobs (any number of workers, on any machine "
                       "with the same --registry and --blobs); SIGTERM checkpoints the running job and gives it back")
    p.add_argument("--lease", type=float, default=30.0, help="seconds a job stays ours past the last heartbeat")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between looks for a queued job when idle")
    p.add_argument("--checkpoint-every", type=int, default=50, help="training steps between checkpoints")
    p.add_argument("--attempts", type=int, default=3, help="claims of a job before it fails (new jobs only)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (a job's recipe may set its own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--detector", default=None, help="DETR hub id or local dir for product boxes (default: none, "
                   "boxes from the photo backdrop)")
    store_options(p)
    _base_options(p)
    p.set_defaults(func=cmd_worker)

    add_commands(sub)  # the registry's own: list, rm, gc, export, import, tenants
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        from .quiet import quiet_third_party

        quiet_third_party()
    try:
        return args.func(args)
    except ERRORS as exc:
        print(f"subjectpaint: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine's, not the input's: a full disk, a permission, a vanished file
        print(f"subjectpaint: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
