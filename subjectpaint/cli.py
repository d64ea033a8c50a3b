"""`subjectpaint` command line. Each command is a small function over the SDK; errors print one line."""

from __future__ import annotations

import argparse
import sys

from adapters_store.cli import add_commands, store_options

from .errors import ERRORS


def _check_outputs(*paths) -> None:
    """Refuse an output path that cannot be a file before any work is done (nothing is written then)."""
    import os

    from .errors import InvalidArgument

    for path in paths:
        if path is not None and os.path.isdir(os.path.expanduser(path)):
            raise InvalidArgument(f"output {path!r} is a directory; give a file name such as "
                                  f"{path.rstrip('/')}/out.png")


def _check_checkpoint(workdir) -> None:
    """A `--workdir` checkpoint that is not a readable checkpoint (truncated, overwritten) is refused before training:
    delete it to start afresh."""
    import os
    import zipfile

    from .errors import InvalidArgument

    last = os.path.join(os.path.expanduser(workdir), "last.ckpt") if workdir else None
    if last and os.path.lexists(last) and not (os.path.isfile(last) and zipfile.is_zipfile(last)):
        raise InvalidArgument(f"checkpoint {last} is unreadable (truncated or not a checkpoint); delete it to start "
                              "afresh, or point --workdir elsewhere")


def _load_studio(args):
    from .studio import Studio

    return Studio.load(args.base, device=args.device)  # None: the demo base; "tiny": a random tiny one


def cmd_inpaint(args) -> int:
    from .masks import PasteBack
    from .result import save_image

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
    path = placement.save(args.output)
    if args.grid:
        save_image(placement.grid(), args.grid)
    if not args.quiet:
        print(f"wrote {path}" + (f" and {args.grid}" if args.grid else ""))
    return 0


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

    studio = _load_studio(args)
    rows, _, _ = run_fidelity(studio, n=args.scenes, steps=args.steps or studio.default_steps, seed=args.seed,
                              progress=not args.quiet)
    print(format_table(summarize(rows)))
    return 0


def cmd_train(args) -> int:
    from adapters_store import Registry

    from .subject import DEFAULT_STEPS, Subject

    _check_checkpoint(args.workdir)
    studio = _load_studio(args)
    with Registry(args.registry, args.blobs) as registry:
        subject = Subject.train(args.photos, args.name, studio, rank=args.rank, steps=args.steps or DEFAULT_STEPS,
                                new_version=args.new_version, storage=args.storage, seed=args.seed,
                                registry=registry, workdir=args.workdir, progress=not args.quiet,
                                detector=None if args.no_detr else args.detector,
                                lr_schedule=args.lr_schedule,
                                **({"lr": args.lr} if args.lr is not None else {}),
                                **({"strength": args.strength} if args.strength is not None else {}))
    if not args.quiet:
        r = subject.record
        print(f"registered {subject.ref}: rank {subject.rank}, {r.byte_size} bytes, "
              f"boxes by {subject.metadata.get('annotation_method')}")
    return 0


def cmd_place(args) -> int:
    from adapters_store import Registry

    from .result import save_image
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
    path = placement.save(args.output)
    if args.grid:
        save_image(placement.grid(), args.grid)
    if not args.quiet:
        print(f"wrote {path}" + (f" and {args.grid}" if args.grid else ""))
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeConfig, build_server, run
    from .serve.lifecycle import bind

    config = ServeConfig(base=args.base, registry_url=args.registry, blobs=args.blobs, max_batch_size=args.max_batch_size,
                         batch_timeout=args.batch_timeout, train_steps=args.train_steps, place_steps=args.steps,
                         max_jobs_per_tenant=args.max_jobs_per_tenant, place_rate=args.place_rate,
                         drain_timeout=args.drain_timeout)
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
    p.add_argument("--scheduler", default=None, help="pndm (default), ddim, dpm++, euler, euler_a, lms, unipc")
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

    p = sub.add_parser("eval", help="the demo fidelity benchmark: masked PSNR/SSIM against the true composites")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    _base_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train a subject adapter from 2-4 product photos and register it")
    p.add_argument("name", help="subject name in the registry")
    p.add_argument("photos", nargs="+", help="product photos on a plain backdrop, or cut-outs (transparent PNGs)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 4e-3, for the demo base on a CPU; the paper's 3e-5 for a full-size base)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant (default) or cosine decay to 0 at the last step")
    p.add_argument("--strength", type=float, default=None,
                   help="fraction of the trained weight delta to export (default 0.6, chosen on the demo base)")
    p.add_argument("--new-version", action="store_true", help="add a version to an existing name")
    p.add_argument("--storage", choices=("int8", "fp16", "fp32"), default="int8")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--schedule", choices=("linear", "log", "cubic", "sigmoid"), default="linear",
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
        store_options(p)
        _base_options(p)
        p.set_defaults(func=cmd_serve)

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
