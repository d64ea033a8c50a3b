"""ServeConfig: everything a serve process needs, picklable (it travels to LitServe's inference workers)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument


@dataclass
class ServeConfig:
    """`base`: None (the demo base shipped in the package), "tiny" / "tiny:SEED" (a random tiny base, for tests
    and benchmarks), or a hub id / local diffusers directory. Registry and blobs: as `adapters_store.Registry`
    (None: `$SUBJECTPAINT_REGISTRY_URL` / `$SUBJECTPAINT_BLOBS` / ~/.subjectpaint)."""

    base: str | None = None
    registry_url: str | None = None
    blobs: str | None = None
    max_batch_size: int = 8  # LitServe dynamic batching: rows per predict call (1 = no batching)
    batch_timeout: float = 0.05  # seconds a batch waits to fill
    max_upload_bytes: int = 8 << 20  # per request body
    max_side: int = 2048  # longest side of any uploaded image, px
    max_photos: int = 8  # product photos per registration
    max_jobs: int = 4  # training jobs queued or running at once (more: 429)
    train_steps: int = 300  # default and maximum training steps a registration may ask for
    train_batch_size: int = 8
    place_steps: int | None = None  # default denoising steps (None: the base's default)
    max_place_steps: int = 100
    detector: str | None = None  # DETR hub id or local dir for product boxes; None: backdrop boxes only
    torch_threads: int | None = None
    request_timeout: float = 120.0
    worker: bool = True  # run a training worker thread in the serve process (`serve --no-worker`: jobs only queue)
    lease_seconds: float = 30.0  # a training worker holds its job this long past its last heartbeat (lease / 3)
    poll_seconds: float = 1.0  # an idle training worker looks for a queued job this often
    checkpoint_every: int = 50  # training steps between checkpoints in the blob store (a killed job resumes there)
    max_attempts: int = 3  # claims of one job (its worker died or hit an internal error) before it fails

    def __post_init__(self):
        for name in ("max_batch_size", "max_upload_bytes", "max_side", "max_photos", "max_jobs", "train_steps",
                     "train_batch_size", "max_place_steps", "checkpoint_every", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if self.batch_timeout < 0:
            raise InvalidArgument("batch_timeout must be >= 0")
        if not self.lease_seconds > 0 or not self.poll_seconds > 0:
            raise InvalidArgument("lease_seconds and poll_seconds must be > 0")

