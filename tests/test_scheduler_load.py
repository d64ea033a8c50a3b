"""Studio.load(dir) samples with the scheduler the directory names, as diffusers' own pipeline does."""

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PaintByExamplePipeline,
                       PNDMScheduler, UniPCMultistepScheduler)
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
from transformers import CLIPVisionConfig

from subjectpaint.base import ExemplarInpainter
from subjectpaint.images import load_mask, pil_to_tensor
from subjectpaint.sampler import Sampler, make_scheduler
from subjectpaint.studio import Studio

SCHEDULERS = [PNDMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
              UniPCMultistepScheduler]


@pytest.fixture(scope="module", params=SCHEDULERS, ids=lambda c: c.__name__)
def saved(request, tmp_path_factory):
    """A tiny Paint-by-Example directory written by diffusers' own pipeline, with that scheduler."""
    base = ExemplarInpainter.tiny(0)
    pipe = base.to_pipeline()
    pipe.scheduler = request.param.from_config(base.scheduler.config)
    directory = tmp_path_factory.mktemp(request.param.__name__)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory, request.param


def load_pipeline(directory) -> PaintByExamplePipeline:
    """diffusers' pipeline from the directory (its scheduler by diffusers' own loading). diffusers 0.42 no longer
    resolves the deprecated pipeline's encoder class from model_index.json, so the encoder is loaded and registered
    by hand."""
    pipe = PaintByExamplePipeline.from_pretrained(directory, image_encoder=None, safety_checker=None,
                                                  requires_safety_checker=False)
    clip = CLIPVisionConfig.from_pretrained(directory, subfolder="image_encoder")
    pipe.register_modules(image_encoder=PaintByExampleImageEncoder.from_pretrained(
        directory, subfolder="image_encoder", config=clip))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_uses_the_directorys_scheduler_and_equals_the_pipeline(saved, scene):
    directory, cls = saved
    room, mask, exemplar = scene
    pipe = load_pipeline(directory)
    assert type(pipe.scheduler) is cls
    call = dict(example_image=exemplar, image=room, mask_image=mask, num_inference_steps=4, guidance_scale=5.0)
    latents = pipe(**call, generator=torch.Generator().manual_seed(3), output_type="latent").images
    reference = pipe(**call, generator=torch.Generator().manual_seed(3), output_type="pil").images[0]

    studio = Studio.load(directory)
    assert type(studio.base.scheduler) is cls
    assert dict(studio.base.scheduler.config) == dict(pipe.scheduler.config)  # every key kept
    embeddings, uncond = studio.base.encode_exemplar([exemplar])
    ours = Sampler(studio.base, progress=False)(
        pil_to_tensor(room), load_mask(mask, room.size)[None, None], embeddings, uncond=uncond,
        num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(3))
    assert ours.latents.shape == latents.shape == (1, 4, 16, 24)  # non-square (48 x 32 px)
    assert (ours.latents - latents).abs().max() <= 1e-5
    placed = studio.inpaint(room, mask, exemplar, steps=4, seed=3, paste_back=False, progress=False, resolution=48)
    diff = np.abs(np.asarray(placed.image, dtype=int) - np.asarray(reference, dtype=int)).max()
    assert diff <= 1


def test_scheduler_by_name_still_overrides(saved, scene):
    directory, cls = saved
    room, mask, exemplar = scene
    studio = Studio.load(directory)
    named = studio.inpaint(room, mask, exemplar, steps=4, seed=3, scheduler="ddim", paste_back=False,
                           progress=False, resolution=48)
    pipe = load_pipeline(directory)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # the name's scheduler on the directory's config
    reference = pipe(example_image=exemplar, image=room, mask_image=mask, num_inference_steps=4, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(np.asarray(named.image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1


def test_save_round_trips_the_scheduler(saved, tmp_path):
    directory, cls = saved
    studio = Studio.load(directory)
    studio.save(tmp_path / "copy")
    again = Studio.load(tmp_path / "copy")
    assert type(again.base.scheduler) is cls
    assert dict(again.base.scheduler.config) == dict(studio.base.scheduler.config)


def test_load_does_not_warn_about_the_clip_config_type(saved, caplog):
    directory, _ = saved
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        Studio.load(directory)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert messages is not None and not [m for m in messages if "to instantiate a model of type" in m]


def test_a_directory_naming_no_scheduler_class_is_refused(tmp_path):
    import json

    from subjectpaint.errors import SubjectPaintError

    base = ExemplarInpainter.tiny(0)
    base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "AutoencoderKL"
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(SubjectPaintError):
        Studio.load(tmp_path)
