"""Subject fidelity on the demo base: does a per-subject LoRA (3 retailer photos) place the product more faithfully
than the base alone with the same exemplar?

    OMP_WAIT_POLICY=PASSIVE python bench/subject_fidelity.py            # 5 held-out products x 20 held-out scenes
    OMP_WAIT_POLICY=PASSIVE python bench/subject_fidelity.py --quick    # 2 products x 3 scenes, few steps
    OMP_WAIT_POLICY=PASSIVE python bench/subject_fidelity.py --validate # tuning set (never the eval scenes)

For each held-out product (HELDOUT_PRODUCT_SEEDS): `Subject.train(product_photos(product, 3))` on the demo base,
then masked PSNR against the true composite on 20 held-out scenes: its 10 `heldout_scene_seeds` plus 10 more
EVAL_SEEDS scenes (the rooms of the held-out product 50 places on, with this product placed instead), base alone
vs base + adapter, same exemplar (the scene's own) and same sampling seed. The adapter is scored as trained
(fp32) and in each storage form (fp16, int8, SVD-truncated) to measure the compression loss.

`--validate` runs the same protocol on products outside both product splits and on training-split scene seeds
(12 products x 10 scenes unless told): that is the set hyperparameters were chosen on. `--oracle N` is a diagnostic
upper bound: the same LoRA module, steps, learning rate and strength, but trained on N true demo scenes of the
product (training-split rooms, never the eval scenes) instead of composites of its photos. A control column: the
next product's adapter on this product's scenes (if the gain were not the product's own, it would show there too).

Beside PSNR, an appearance metric on the product: exemplar-I (`subjectpaint.evaluate.exemplar_i`), the cosine of
the base's own exemplar-encoder embeddings of the placed and the true product crop (CLIP-I with the encoder at
hand: no CLIP or DINO weights exist offline). How well that encoder tells the evaluated products apart on their
true scenes is reported too (`encoder_identity_top1`, against chance). Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stats import finish  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from subjectpaint import Studio  # noqa: E402
from subjectpaint.base import ExemplarInpainter  # noqa: E402
from subjectpaint.demo.scenes import (HELDOUT_PRODUCT_SEEDS, TRAIN_SEEDS, Product, heldout_scene_seeds,  # noqa: E402
                                      make_scene, product_photos)
from subjectpaint.evaluate import box_crop, exemplar_embed, exemplar_i, format_table, masked_psnr  # noqa: E402
from subjectpaint.subject import Subject  # noqa: E402
from trainers import export  # noqa: E402
from trainers.lora_module import LR_SCHEDULES  # noqa: E402
from trainers.recipe import TrainRecipe  # noqa: E402

VALIDATION_PRODUCTS = range(70_000_000, 70_000_100)  # in neither product split


def scenes_for(product_seed: int, n: int, validate: bool, size: int):
    product = Product.from_seed(product_seed)
    if validate:
        k = product_seed - VALIDATION_PRODUCTS.start
        seeds = [TRAIN_SEEDS[900_000 + 37 * k + j] for j in range(n)]
    else:
        k = product_seed - HELDOUT_PRODUCT_SEEDS.start
        seeds = heldout_scene_seeds(product_seed)
        seeds += heldout_scene_seeds(HELDOUT_PRODUCT_SEEDS[(k + 50) % len(HELDOUT_PRODUCT_SEEDS)])
        seeds = seeds[:n]
    return product, [make_scene(s, size, product=product) for s in seeds]


class Placed(NamedTuple):
    psnr: list  # masked PSNR against the truth, per scene
    appearance: list  # exemplar-I: the base's exemplar-encoder cosine, placed vs true product crop, per scene


def place(studio, scenes, steps, seed, subject=None, images=None, guidance=5.0) -> Placed:
    jobs = [(s.room, s.mask, s.exemplar) for s in scenes]
    if subject is None:
        placed = studio.inpaint_many(jobs, steps=steps, seed=seed, progress=False, guidance_scale=guidance)
    else:
        with subject.applied(studio):
            placed = studio.inpaint_many(jobs, steps=steps, seed=seed, progress=False, guidance_scale=guidance)
    if images is not None:
        images.extend(p.image for p in placed)
    appearance = exemplar_i([box_crop(p.image, s.box) for p, s in zip(placed, scenes)],
                            [box_crop(s.composite, s.box) for s in scenes], studio.base, reduction="none")
    return Placed([masked_psnr(p.image, s.composite, s.mask) for p, s in zip(placed, scenes)], appearance.tolist())


def encoder_identity(base, scene_sets) -> float:
    """How well the base's exemplar encoder tells the products apart on their true scenes: the share of true
    product crops whose nearest other crop (cosine) shows the same product (chance: 1 / products)."""
    crops, labels = [], []
    for k, scenes in enumerate(scene_sets):
        crops += [box_crop(s.composite, s.box) for s in scenes]
        labels += [k] * len(scenes)
    e = torch.nn.functional.normalize(exemplar_embed(crops, base).double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    labels = torch.tensor(labels)
    return float((labels[sim.argmax(1)] == labels).double().mean())


def fidelity_grid(path, photos, scenes, base_images, adapter_images, base_psnr, adapter_psnr, n=6):
    """The retailer's photos, then per scene: room + mask | exemplar | base alone | base + adapter | truth."""
    from subjectpaint.result import image_grid, save_image

    rows = [[(f"photo {i + 1}", ph) for i, ph in enumerate(photos)]]
    for k in range(min(n, len(scenes))):
        sc = scenes[k]
        rows.append([("room", sc.room), ("mask", sc.mask), ("exemplar", sc.exemplar),
                     (f"base {base_psnr[k]:.1f} dB", base_images[k]),
                     (f"adapter {adapter_psnr[k]:.1f} dB", adapter_images[k]), ("truth", sc.composite)])
    save_image(image_grid(rows, height=128), path)
    print(f"wrote {path}")


def oracle_subject(base, product, k: int, n: int, args, steps: int, lr: float) -> Subject:
    """An adapter trained on n true scenes of `product` (target = the true composite, mask = the scene's, reference
    = an augmented exemplar of one of them): what the training could reach with scene-like data."""
    from torchvision.transforms import v2

    from trainers.annotate import foreground_box
    from trainers.data import SubjectData, SubjectDataModule, to_unit
    from trainers.lora_module import SubjectLoRAModule, fit

    size = base.resolution
    scenes = [make_scene(TRAIN_SEEDS[800_000 + 101 * k + j], size, product=product) for j in range(n)]
    fe = base.feature_extractor
    # the data module's loader and step sampler, over the scenes instead of its photo (one exemplar, for the sizes)
    photo = scenes[0].exemplar
    data = SubjectDataModule.for_base(base, [photo], [foreground_box(photo)], batch_size=args.batch, seed=args.seed)
    side = data.dataset.reference_size

    class Scenes(torch.utils.data.Dataset):
        def __len__(self):
            return 1 << 30

        def __getitem__(self, i):
            rng = np.random.default_rng([args.seed, int(i)])
            scene, ref = scenes[int(rng.integers(n))], scenes[int(rng.integers(n))]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(rng.integers(2**31)))
                r = SubjectData.reference_augment(to_unit(ref.exemplar.resize((side, side)))).clamp(0, 1)
            mask = torch.from_numpy(np.asarray(scene.mask, dtype=np.float32) / 255)[None]
            return {"target": to_unit(scene.composite) * 2 - 1, "mask": (mask > 0.5).float(),
                    "reference": v2.functional.normalize(r, fe.image_mean, fe.image_std), "index": torch.tensor(i)}

    data.dataset = Scenes()
    module = SubjectLoRAModule(base, rank=args.rank, dropout=args.dropout, targets=tuple(args.targets), lr=lr,
                               seed=args.seed, lr_schedule=args.lr_schedule)
    fit(module, data, steps, progress=False)
    meta = export.build_metadata(rank=args.rank, alpha=float(args.rank), targets=tuple(args.targets),
                                 base_fingerprint=base.fingerprint(), subject=f"oracle{product.seed}")
    tensors = export.fold_scale(module.lora_state_dict(), args.rank, args.rank * args.strength)
    return Subject(f"oracle{product.seed}", None, meta, tensors)


def cutout(photo):
    """A photo as a matting tool would cut it out: RGBA, the product's alpha, its colours with the backdrop
    unmixed from the edges (the backdrop plane fitted as the annotator does)."""
    import PIL.Image

    from trainers.annotate import _plane_residual, decontaminate

    img = np.asarray(photo.image, dtype=np.float32)
    alpha = np.asarray(photo.alpha, dtype=np.float32) / 255
    _, _, plane = _plane_residual(img, max(1, round(0.02 * min(img.shape[:2]))))
    rgba = np.concatenate([decontaminate(img, plane, alpha), alpha[..., None] * 255], -1)
    return PIL.Image.fromarray(rgba.round().astype(np.uint8), "RGBA")


def variants(subject: Subject, energy: float):
    """The adapter as trained, and in its storage forms (same metadata, re-encoded tensors)."""
    out = {"fp32": subject}
    for name, kw in (("fp16", {}), ("int8", {"int8": True}), (f"svd{energy}", {"energy": energy}),
                     (f"svd{energy}+int8", {"energy": energy, "int8": True})):
        stored, meta = export.compress(subject.tensors, subject.metadata, **kw)
        out[name] = Subject(subject.name, subject.version, meta, export.dequantize(stored))
        out[name].stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    out["fp32"].stored_bytes = sum(t.numel() * t.element_size() for t in subject.tensors.values())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 products x 3 scenes, 20 training steps, 8 sampling steps (plumbing)")
    ap.add_argument("--validate", action="store_true", help="tuning set: other products, training-split scenes")
    ap.add_argument("--products", type=int, default=None, help="default 5 held-out, or 12 with --validate")
    ap.add_argument("--scenes", type=int, default=None, help="per product: default 20 held-out, or 10 with --validate")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: Subject.train's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"])
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--energy", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default=None,
                    help="default the demo base; 'tiny' for a smoke run; or a local Paint-by-Example directory")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--composite-p", type=float, default=1.0, help="share of targets composited onto rooms")
    ap.add_argument("--oracle", type=int, default=0, help="diagnostic: train on N true scenes instead of photos")
    ap.add_argument("--photos", type=int, default=3, help="retailer photos per product (the issue's setting: 3)")
    ap.add_argument("--shadow-p", type=float, default=0.7, help="share of composites with a contact shadow")
    ap.add_argument("--placement-p", type=float, default=None,
                    help="share of training masks that are the placement box (default: Subject.train's)")
    ap.add_argument("--no-upright", action="store_true", help="composite the product as photographed (tilted)")
    ap.add_argument("--grid", default="docs/subject_fidelity.png",
                    help="before/after grid of the first product ('' to skip; not written with --quick)")
    ap.add_argument("--exposure", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="brightness factor range on the composited product (default: Subject.train's)")
    ap.add_argument("--strength", type=float, default=None, help="exported fraction of the delta (default: Subject.train's)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0],
                    help="guidance scales; the first gives the headline (the studio's default, 5), the others a "
                         "sensitivity check: base alone and base + adapter (int8) at each")
    ap.add_argument("--cutouts", action="store_true",
                    help="the retailer uploads cut-outs (RGBA PNGs with the product's alpha) instead of photos")
    args = ap.parse_args(argv)
    # validation: 12 products, so that a 0.15 dB difference between two settings is outside the noise of training
    # (seed to seed a product moves 0.2 dB on average, the 12-product mean 0.06 dB)
    if args.products is None:
        args.products = 12 if args.validate else 5
    if args.scenes is None:
        args.scenes = 10 if args.validate else 20
    if args.quick:
        args.products, args.scenes, args.steps, args.sample_steps = 2, 3, args.steps or 20, 8
        args.grid = ""
    demo = TrainRecipe.from_preset("demo")  # the preset Subject.train picks for the demo base
    steps, lr = args.steps or demo.steps, args.lr or demo.lr
    args.strength = demo.strength if args.strength is None else args.strength
    args.exposure = tuple(args.exposure) if args.exposure else demo.exposure
    args.placement_p = demo.placement_p if args.placement_p is None else args.placement_p
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base == "tiny":
        base = ExemplarInpainter.tiny(0, 32)
    elif args.base:
        base = ExemplarInpainter.from_pretrained(args.base)
    else:
        base = ExemplarInpainter.demo()
    size = base.resolution
    products = (VALIDATION_PRODUCTS if args.validate else HELDOUT_PRODUCT_SEEDS)[: args.products]
    rows, started, kept = [], time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        from adapters_store import Registry

        studio = Studio(base, registry=Registry(f"sqlite:///{tmp}/registry.db", os.path.join(tmp, "blobs")))
        for index, ps in enumerate(products):
            product, scenes = scenes_for(ps, args.scenes, args.validate, size)
            shots = product_photos(product, args.photos, size=64)
            photos = [cutout(p) if args.cutouts else p.image for p in shots]
            photos = [p.resize((size, size)) if p.width != size else p for p in photos]
            t0 = time.time()
            if args.oracle:
                subject = oracle_subject(base, product, index, args.oracle, args, steps, lr)
            else:
                subject = Subject.train(photos, f"p{ps}", studio, "demo", rank=args.rank, steps=steps, batch_size=args.batch,
                                        lr=lr, lr_schedule=args.lr_schedule, strength=args.strength,
                                        dropout=args.dropout, seed=args.seed, targets=tuple(args.targets),
                                        storage="fp32", detector=None, composite_p=args.composite_p,
                                        placement_p=args.placement_p,
                                        shadow_p=args.shadow_p, upright=not args.no_upright, exposure=args.exposure,
                                        progress=False)
            train_s = time.time() - t0
            pictures = ([], []) if index == 0 and args.grid else (None, None)
            g0 = args.guidance[0]
            placed = {"base": place(studio, scenes, args.sample_steps, args.seed, images=pictures[0], guidance=g0)}
            base_psnr = placed["base"].psnr
            row = {"product": ps, "shape": product.shape, "scenes": len(scenes), "train_s": round(train_s, 1),
                   "base": statistics.fmean(base_psnr)}
            forms = variants(subject, args.energy)
            for name, variant in forms.items():
                placed[name] = place(studio, scenes, args.sample_steps, args.seed, variant,
                                     images=pictures[1] if name == "int8" else None, guidance=g0)
                row[name] = statistics.fmean(placed[name].psnr)
                row[f"{name}_bytes"] = variant.stored_bytes
            if pictures[1] is not None:
                fidelity_grid(args.grid, photos, scenes, *pictures, base_psnr, placed["int8"].psnr)
            row["gain"] = row["int8"] - row["base"]
            row["app_base"] = statistics.fmean(placed["base"].appearance)
            row["app_int8"] = statistics.fmean(placed["int8"].appearance)
            for g in args.guidance[1:]:  # the same adapter, both sides at another guidance scale
                b = place(studio, scenes, args.sample_steps, args.seed, guidance=g)
                a = place(studio, scenes, args.sample_steps, args.seed, forms["int8"], guidance=g)
                row[f"base_g{g:g}"] = statistics.fmean(b.psnr)
                row[f"gain_g{g:g}"] = statistics.fmean(a.psnr) - row[f"base_g{g:g}"]
                row[f"app_base_g{g:g}"] = statistics.fmean(b.appearance)
                row[f"app_int8_g{g:g}"] = statistics.fmean(a.appearance)
            rows.append(row)
            kept.append((scenes, forms["int8"]))
            print(format_table([{k: v for k, v in row.items() if not k.endswith("_bytes")}]), flush=True)
        # control: is the gain the product's own? The next product's adapter on these scenes (same exemplar)
        for k, row in enumerate(rows):
            other = kept[(k + 1) % len(kept)][1] if len(kept) > 1 else None
            row["other_adapter_gain"] = (statistics.fmean(place(studio, kept[k][0], args.sample_steps, args.seed, other,
                                                                guidance=args.guidance[0]).psnr)
                                         - row["base"]) if other is not None else float("nan")
        identity = encoder_identity(base, [scenes for scenes, _ in kept])
    extra = [k for k in rows[0] if k.startswith(("base_g", "gain_g", "app_"))]
    names = [k for k in rows[0] if k not in ("product", "shape", "scenes", "train_s", "base", "gain",
                                             "other_adapter_gain", *extra) and not k.endswith("_bytes")]
    table = [{k: v for k, v in r.items() if not k.endswith("_bytes")} for r in rows]
    mean = {"product": "mean", "shape": "", "scenes": sum(r["scenes"] for r in rows),
            "train_s": round(statistics.fmean(r["train_s"] for r in rows), 1),
            "base": statistics.fmean(r["base"] for r in rows),
            **{n: statistics.fmean(r[n] for r in rows) for n in names}}
    mean["gain"] = mean["int8"] - mean["base"]
    mean["other_adapter_gain"] = statistics.fmean(r["other_adapter_gain"] for r in rows)
    mean.update({k: statistics.fmean(r[k] for r in rows) for k in extra})
    print(format_table(table + [mean]))
    summary = {
        "bench": "subject_fidelity", "quick": args.quick, "validate": args.validate, "base": base.name,
        "products": len(rows), "scenes_per_product": args.scenes, "photos": args.photos, "cutouts": args.cutouts,
        "exposure": list(args.exposure),
        "oracle_scenes": args.oracle,
        "train_steps": steps, "lr": lr, "lr_schedule": args.lr_schedule, "strength": args.strength,
        "rank": args.rank, "targets": args.targets, "dropout": args.dropout, "composite_p": args.composite_p,
        "placement_p": args.placement_p,
        "shadow_p": args.shadow_p, "upright": not args.no_upright, "batch": args.batch, "sample_steps": args.sample_steps,
        "psnr_base": round(mean["base"], 3),
        **{f"psnr_{n}": round(mean[n], 3) for n in names},
        "gain_db_default_storage": round(mean["int8"] - mean["base"], 3),
        "gain_db_fp32": round(mean["fp32"] - mean["base"], 3),
        "other_product_adapter_gain_db": round(mean["other_adapter_gain"], 3),
        "guidance": args.guidance[0],
        "by_guidance": {f"{g:g}": {"psnr_base": round(mean[f"base_g{g:g}"], 3),
                                   "gain_db": round(mean[f"gain_g{g:g}"], 3),
                                   "exemplar_i_base": round(mean[f"app_base_g{g:g}"], 4),
                                   "exemplar_i_adapter": round(mean[f"app_int8_g{g:g}"], 4)}
                        for g in args.guidance[1:]},
        "exemplar_i_base": round(mean["app_base"], 4), "exemplar_i_adapter": round(mean["app_int8"], 4),
        "encoder_identity_top1": round(identity, 3), "encoder_identity_chance": round(1 / len(rows), 3),
        "compression_loss_db": {n: round(mean["fp32"] - mean[n], 3) for n in names if n != "fp32"},
        "minutes": round((time.time() - started) / 60, 1),
    }
    finish(summary, {"gain_db_default_storage": ">= 2"})


if __name__ == "__main__":
    main()
