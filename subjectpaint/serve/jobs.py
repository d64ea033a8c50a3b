"""The training worker: claims registration jobs from the registry database (`adapters_store.jobs`) and runs
`Subject.train` for each, one at a time (training uses every core).

While a job runs, a heartbeat thread extends its lease and records its progress; every `checkpoint_every` steps
the Lightning checkpoint goes to the blob store, so when this process dies (its lease expires) another worker
resumes the job from there. Bad input (a photo without a product, a recipe value out of range) fails the job with
the typed error's message and the worker goes on; any other error is retried up to the job's attempts. `stop()`
(SIGTERM in `subjectpaint worker`) checkpoints the running job at its next step, gives it back and returns.

    worker = TrainingWorker(ServeConfig(base="tiny"))
    worker.run()                      # until worker.stop()

`subjectpaint serve` runs one in a thread by default; `subjectpaint worker` runs one as its own process.
"""

from __future__ import annotations

import atexit
import io
import os
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import lightning as L
import PIL.Image

from ..errors import ERRORS


class _Interrupted(Exception):
    """Raised from the training callback: the job is no longer ours (`lost`) or the worker is stopping."""


class _JobCallback(L.Callback):
    """Checkpoints to the blob store every `every` steps (and once more when the worker stops), and stops the
    fit when the lease is lost."""

    def __init__(self, run: "_Run"):
        self.run = run

    def on_train_start(self, trainer, *args, **kwargs):
        self.run.worker.started_at_step = int(trainer.global_step)  # > 0: resumed from a checkpoint

    def on_train_batch_end(self, trainer, *args, **kwargs):
        run, step = self.run, int(trainer.global_step)
        run.step = step
        if run.lost.is_set():
            raise _Interrupted("lease lost")
        stopping = run.worker.stopping.is_set()
        if stopping or (run.every and step % run.every == 0 and step < run.job.steps):
            path = run.workdir / "job.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # optimizer state too: a resumed run continues exactly
            if not run.worker.queue.save_checkpoint(run.job.id, run.worker.owner, path.read_bytes(), step):
                run.lost.set()
                raise _Interrupted("lease lost")
        if stopping:
            raise _Interrupted("stopping")


class _Run:
    """One claimed job on this worker: its workdir, progress and heartbeat thread."""

    def __init__(self, worker: "TrainingWorker", job):
        self.worker, self.job = worker, job
        self.step, self.every = job.step, worker.config.checkpoint_every
        self.lost, self.done = threading.Event(), threading.Event()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"subjectpaint-job-{job.id[:8]}-"))
        self.beat = threading.Thread(target=self._heartbeat, name="subjectpaint-heartbeat", daemon=True)

    def _heartbeat(self) -> None:
        interval = self.worker.config.lease_seconds / 3
        while not self.done.wait(interval):
            try:
                ok = self.worker.queue.heartbeat(self.job.id, self.worker.owner, self.worker.config.lease_seconds,
                                                 step=self.step)
            except Exception:  # noqa: BLE001 - a database hiccup: try again at the next beat
                continue
            if not ok:
                self.lost.set()
                return


class TrainingWorker:
    def __init__(self, config, registry=None, base=None, owner: str | None = None,
                 stopping: threading.Event | None = None):
        from adapters_store import Registry
        from adapters_store.jobs import JobQueue

        self.config = config
        self.registry = registry if registry is not None else Registry(config.registry_url, config.blobs)
        self.queue = JobQueue(self.registry, max_attempts=config.max_attempts)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._base = base
        self.stopping = stopping if stopping is not None else threading.Event()
        self.jobs_run = 0
        self.started_at_step: int | None = None  # the step the last fit started from (a figure for tests)

    @property
    def base(self):
        if self._base is None:
            from ..studio import Studio

            self._base = Studio.load(self.config.base).base
        return self._base

    def stop(self) -> None:
        """Stop after checkpointing and giving back the running job (if any)."""
        self.stopping.set()

    def run(self) -> None:
        """Claim and run jobs until `stop()`."""
        while not self.stopping.is_set():
            try:
                ran = self.run_one()
            except Exception:  # noqa: BLE001 - the database is away for a moment: keep polling
                ran = None
            if ran is None:
                self.stopping.wait(self.config.poll_seconds)

    def run_one(self):
        """Claim one job and run it to its end (or until this worker stops); returns it, or None if none."""
        job = self.queue.claim(self.owner, self.config.lease_seconds)
        if job is None:
            return None
        run = _Run(self, job)
        run.beat.start()
        try:
            self._train(run)
        finally:
            run.done.set()
            run.beat.join()
            import shutil

            shutil.rmtree(run.workdir, ignore_errors=True)
        self.jobs_run += 1
        return self.queue.get(job.tenant, job.id)

    # ------------------------------------------------------------------------------------------------ one job
    def _train(self, run: _Run) -> None:
        from ..studio import Studio
        from ..subject import Subject, SubjectExists

        job, queue, owner = run.job, self.queue, self.owner
        view = self.registry.for_tenant(job.tenant)
        try:
            if self._adopt(run, view):
                return
            photos = [PIL.Image.open(io.BytesIO(queue.read_blob(sha))) for sha in job.photos]
            if job.checkpoint:  # resume where the last worker left off
                (run.workdir / "last.ckpt").write_bytes(queue.read_blob(job.checkpoint))
            studio = Studio(self.base, registry=view)
            options = {"batch_size": self.config.train_batch_size, "detector": self.config.detector,
                       **dict(job.recipe)}
            subject = Subject.train(photos, job.name, studio, steps=job.steps, registry=view, progress=False,
                                    workdir=run.workdir, trainer_kwargs={"callbacks": [_JobCallback(run)]},
                                    **options)
        except _Interrupted:
            self._interrupted(run)
            return
        except SubjectExists as exc:
            if not self._adopt(run, view):
                queue.fail(job.id, owner, f"{type(exc).__name__}: {exc}")
            return
        except ERRORS as exc:  # bad input: the same on every attempt, so no retry
            queue.fail(job.id, owner, f"{type(exc).__name__}: {exc}")
            return
        except TypeError as exc:  # a recipe field Subject.train does not take
            queue.fail(job.id, owner, f"InvalidArgument: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a worker records every failure and goes on
            queue.fail(job.id, owner, f"internal error: {type(exc).__name__}: {exc}", retry=True)
            return
        if not queue.complete(job.id, owner, subject.ref, steps=job.steps):
            if queue.state(job.id) == "cancelled":  # cancelled while it registered: take the version back
                view.delete(subject.ref)
                queue.discard(job.id)

    def _adopt(self, run: _Run, view) -> bool:
        """An earlier attempt of this job may have registered the adapter and died before marking the job done
        (the name was free when the job was accepted, so a version created since is this job's): finish it."""
        job = run.job
        if job.attempts <= 1 or not view.exists(job.name):
            return False
        record = view.get(job.name)
        if record.created < job.created:
            return False
        self.queue.complete(job.id, self.owner, record.ref, steps=job.steps)
        return True

    def _interrupted(self, run: _Run) -> None:
        job = run.job
        if run.lost.is_set():  # cancelled, or expired and claimed by another worker
            if self.queue.state(job.id) == "cancelled":
                self.queue.discard(job.id)
            return
        self.queue.release(job.id, self.owner)  # stopping: checkpoint saved, give it back


class EmbeddedWorker:
    """A `TrainingWorker` in a daemon thread of the serve process (`subjectpaint serve` without --no-worker)."""

    def __init__(self, config):
        self.config, self.stopping = config, threading.Event()
        self.thread = threading.Thread(target=self._main, name="subjectpaint-train", daemon=True)

    def _main(self) -> None:
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        TrainingWorker(self.config, stopping=self.stopping).run()

    def start(self) -> "EmbeddedWorker":
        self.thread.start()
        atexit.register(self.close)  # stop polling before the interpreter tears down (a daemon thread otherwise)
        return self

    def close(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
