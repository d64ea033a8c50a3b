"""Registration jobs: `Subject.train` in a background thread, one at a time (training uses every core), with
progress from a Lightning callback. Admission is `ServeConfig.check_job_quota` (per tenant, then the server's capacity:
429). `close` stops the running job at its next step."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import lightning as L

from ..errors import ERRORS, TrainingInterrupted


@dataclass
class Job:
    id: str
    tenant: str
    name: str
    steps: int
    state: str = "queued"  # queued -> running -> done | failed
    step: int = 0
    ref: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def public(self) -> dict:
        out = asdict(self)
        out.pop("tenant")
        out["progress"] = round(self.step / self.steps, 4) if self.steps else 0.0
        return out


class _Progress(L.Callback):
    def __init__(self, job: Job, stop: threading.Event):
        self.job, self.stop = job, stop

    def on_train_batch_end(self, trainer, *args, **kwargs):
        self.job.step = int(trainer.global_step)
        if self.stop.is_set():
            raise TrainingInterrupted(f"the server shut down at step {self.job.step}/{self.job.steps}; submit again")


class TrainingJobs:
    def __init__(self, config, base_loader):
        self.config = config
        self._base_loader = base_loader
        self._base = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="subjectpaint-train")
        self._stop = threading.Event()
        self._futures: set = set()

    def counts(self) -> dict:
        with self._lock:
            out = {s: 0 for s in ("queued", "running", "done", "failed")}
            for job in self._jobs.values():
                out[job.state] += 1
            return out

    def get(self, tenant: str, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.tenant == tenant else None  # another tenant's job: not found

    def pending_names(self, tenant: str) -> set[str]:
        with self._lock:
            return {j.name for j in self._jobs.values() if j.tenant == tenant and j.state in ("queued", "running")}

    def submit(self, registry, tenant: str, name: str, photos: list, steps: int) -> Job:
        with self._lock:
            active = [j for j in self._jobs.values() if j.state in ("queued", "running")]
            mine = {s: sum(j.tenant == tenant and j.state == s for j in active) for s in ("queued", "running")}
            self.config.check_job_quota(tenant, mine, len(active))  # QuotaExceeded -> 429
            job = Job(uuid.uuid4().hex, tenant, name, steps)
            self._jobs[job.id] = job
            future = self._pool.submit(self._run, job, registry, photos)
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return job

    def _run(self, job: Job, registry, photos: list) -> None:
        from ..studio import Studio
        from ..subject import Subject

        job.state = "running"
        try:
            if self._base is None:
                self._base = self._base_loader()
            studio = Studio(self._base, registry=registry)
            subject = Subject.train(photos, job.name, studio, steps=job.steps, batch_size=self.config.train_batch_size,
                                    detector=self.config.detector, registry=registry, progress=False,
                                    trainer_kwargs={"callbacks": [_Progress(job, self._stop)]})
            job.ref, job.step, job.state = subject.ref, job.steps, "done"
        except ERRORS as exc:
            job.error, job.state = f"{type(exc).__name__}: {exc}", "failed"
        except Exception as exc:  # noqa: BLE001 - a job thread must record every failure, not die silently
            job.error, job.state = f"internal error: {type(exc).__name__}: {exc}", "failed"

    def close(self, timeout: float = 30.0) -> None:
        """Cancel queued jobs, stop the running one at its next step, and wait up to `timeout` s for it."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        wait(list(self._futures), timeout)
