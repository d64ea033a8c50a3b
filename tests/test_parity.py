"""Our sampler vs diffusers' PaintByExamplePipeline: same tiny weights, seed, scheduler and steps."""

import numpy as np
import pytest
import torch

from subjectpaint.images import load_mask, pil_to_tensor
from subjectpaint.sampler import Sampler, make_scheduler
from subjectpaint.studio import Studio


def pipeline_output(base, scene, scheduler, guidance, steps=4, seed=3, output_type="np"):
    room, mask, exemplar = scene
    pipe = base.to_pipeline()
    pipe.scheduler = make_scheduler(scheduler, base.scheduler.config)
    return pipe(
        example_image=exemplar,
        image=room,
        mask_image=mask,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler", "pndm"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sampler_equals_diffusers_pipeline(tiny_base, scene, scheduler, guidance):
    room, mask, exemplar = scene
    reference = pipeline_output(tiny_base, scene, scheduler, guidance)
    embeddings, uncond = tiny_base.encode_exemplar([exemplar])
    ours = Sampler(tiny_base, progress=False)(
        pil_to_tensor(room),
        load_mask(mask, room.size)[None, None],
        embeddings,
        uncond=uncond,
        num_inference_steps=4,
        guidance_scale=guidance,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(3),
    )
    ours = ours.images.permute(0, 2, 3, 1).numpy()
    assert reference.shape == ours.shape == (1, 32, 48, 3)  # non-square
    assert np.abs(reference - ours).max() <= 1e-5


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_studio_without_paste_back_equals_pipeline_pixels(tiny_base, scene, scheduler):
    room, mask, exemplar = scene
    reference = pipeline_output(tiny_base, scene, scheduler, 5.0, output_type="pil")[0]
    studio = Studio(tiny_base)
    placed = studio.inpaint(
        room, mask, exemplar, steps=4, scheduler=scheduler, seed=3, paste_back=False, progress=False, resolution=48
    )
    assert np.array_equal(np.asarray(placed.image), np.asarray(reference))


def test_guidance_changes_the_output(tiny_base, scene):
    # guards the parity test against a sampler that ignores guidance on both sides
    off = pipeline_output(tiny_base, scene, "ddim", 1.0)
    on = pipeline_output(tiny_base, scene, "ddim", 5.0)
    assert np.abs(off - on).max() > 1e-3


def test_batched_call_equals_single_calls(tiny_base):
    from tests.conftest import box_mask_image, random_image

    jobs = [
        (random_image(48, 32, s), box_mask_image(48, 32, (4 + s, 4, 30, 28)), random_image(36, 36, 10 + s))
        for s in range(3)
    ]
    studio = Studio(tiny_base)
    batched = studio.inpaint_many(jobs, steps=3, scheduler="ddim", seed=7, paste_back=False, progress=False, resolution=48)
    for i, job in enumerate(jobs):
        single = studio.inpaint(*job, steps=3, scheduler="ddim", seed=7 + i, paste_back=False, progress=False, resolution=48)
        diff = np.abs(np.asarray(single.image, dtype=int) - np.asarray(batched[i].image, dtype=int)).max()
        assert diff <= 1  # batched convolutions may round differently by one uint8 level at most
    assert not np.array_equal(np.asarray(batched[0].image), np.asarray(batched[1].image))
