"""ServeConfig: everything a serve process needs, picklable (it travels to LitServe's inference workers)."""

from __future__ import annotations

from dataclasses import dataclass

import math

from ..errors import InvalidArgument, QuotaExceeded


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
    max_jobs: int = 16  # training jobs queued or running at once, all tenants together (more: 429)
    max_jobs_per_tenant: int = 2  # training jobs one tenant may have queued or running (more: 429 for it alone)
    place_rate: float = 10.0  # placements per second per tenant, sustained (token bucket; more: 429 + Retry-After)
    place_burst: int = 20  # placements a tenant may send at once above the rate
    admin_tenant: str = "admin"  # keys of this tenant may read /metrics and /info (operators' tenant)
    drain_timeout: float = 10.0  # on SIGTERM/SIGINT: seconds in-flight placements get before they are answered 503
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
        for name in ("max_batch_size", "max_upload_bytes", "max_side", "max_photos", "max_jobs", "max_jobs_per_tenant",
                     "place_burst", "train_steps", "train_batch_size", "max_place_steps", "checkpoint_every",
                     "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        for name in ("batch_timeout", "drain_timeout", "place_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}")
        if self.place_rate == 0:
            raise InvalidArgument("place_rate must be > 0")
        for name in ("lease_seconds", "poll_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidArgument(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_jobs_per_tenant > self.max_jobs:
            raise InvalidArgument("max_jobs_per_tenant must be <= max_jobs")

    def check_job_quota(self, tenant: str, tenant_counts: dict, total_active: int) -> None:
        """The registration-job admission policy, for any job store: `tenant_counts` = {"queued": n, "running": n}
        of this tenant's jobs, `total_active` = queued + running of all tenants. Raises `QuotaExceeded` (429)
        when the tenant is at its own limit or the server at its capacity; one tenant's jobs never count against
        another's limit."""
        mine = tenant_counts.get("queued", 0) + tenant_counts.get("running", 0)
        if mine >= self.max_jobs_per_tenant:
            raise QuotaExceeded(f"tenant {tenant!r} has {mine} training jobs queued or running (limit "
                                f"{self.max_jobs_per_tenant}); retry when one has finished", retry_after=30)
        if total_active >= self.max_jobs:
            raise QuotaExceeded(f"the server has {total_active} training jobs queued or running (capacity "
                                f"{self.max_jobs}); retry later", retry_after=30)

