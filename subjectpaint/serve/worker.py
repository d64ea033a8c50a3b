"""The inference worker: a LitServe `LitAPI` whose `predict` gets a batch of placement requests (LitServe's dynamic
batching) and runs every plain placement of the batch as ONE mixed-subject pass through the slots
(`Studio.inpaint_many`, per-row adapters and per-row seeds), sessions (progressive, dual-branch) one by one.

Requests reach it already authenticated and validated by the HTTP app (`app.py`); a row that still fails here
(e.g. its subject was deleted meanwhile) fails alone, as a 4xx, never the whole batch."""

from __future__ import annotations

import io
import time

import litserve as ls

from ..errors import ERRORS
from .config import ServeConfig
from .errors import status_of

SESSIONS = ("batch", "progressive", "dual")


class TenantRouter:
    """What `Studio` calls `registry`: reads each record's blob through its own tenant's registry view
    (`Studio.laid_out` needs only `verifying`)."""

    def __init__(self, registry):
        self.registry = registry

    def verifying(self, record):
        return self.registry.for_tenant(record.tenant).verifying(record)


class PlaceAPI(ls.LitAPI):
    def __init__(self, config: ServeConfig):
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout,
                         api_path="/internal/place")  # not public: `app.Gate` answers 404 there
        self.config = config

    def setup(self, device):
        import torch
        from adapters_store import Registry

        from ..studio import Studio
        from ..quiet import quiet_third_party
        from .lifecycle import die_with_parent

        die_with_parent()  # a killed server leaves no worker behind
        quiet_third_party()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.router = TenantRouter(Registry(self.config.registry_url, self.config.blobs))
        self.studio = Studio.load(self.config.base, registry=self.router)
        self.studio.default_steps = self.config.place_steps or self.studio.default_steps
        self.fingerprint = self.studio.base.fingerprint()

    def decode_request(self, request):
        return request  # validated by the app; never raises (one bad row must not fail a batch)

    def encode_response(self, output):
        return output

    # ------------------------------------------------------------------ predict

    def predict(self, rows):
        if isinstance(rows, dict):  # max_batch_size=1: LitServe's unbatched loop hands over one request
            return self.predict([rows])[0]
        started = time.perf_counter()
        out: list = [None] * len(rows)
        ready = []
        for i, row in enumerate(rows):
            try:
                ready.append((i, row, self._subject(row)))
            except ERRORS as exc:
                out[i] = _error(exc)
        plain = [(i, row, s) for i, row, s in ready if row["session"] == "batch"]
        groups: dict = {}
        for item in plain:
            groups.setdefault((item[1]["steps"], item[1]["guidance_scale"]), []).append(item)
        for (steps, guidance), items in groups.items():
            self._run_plain(items, steps, guidance, out)
        for i, row, subject in ready:
            if row["session"] != "batch":
                out[i] = self._run_session(row, subject)
        stats = self.studio.adapter_cache.stats()
        info = {"batch_rows": len(rows), "subjects": len({r["ref"] for r in rows}), "swap_hits": stats.hits,
                "swap_misses": stats.misses, "predict_s": time.perf_counter() - started}
        return [{**o, "stats": info} for o in out]

    def _subject(self, row):
        """The row's subject from its tenant's registry, resolved as every entry point resolves one (its blob is
        read, through the RAM tier, only when it is laid out)."""
        from .. import sources
        from ..errors import BaseMismatch

        record = self.router.registry.for_tenant(row["tenant"]).get(row["ref"])
        if record.base_fingerprint and record.base_fingerprint != self.fingerprint:
            raise BaseMismatch(f"subject {record.ref} was trained for another base")
        return sources.resolve(record).subject

    def _run_plain(self, items, steps, guidance, out):
        """One mixed-subject pass for all rows; if it fails, each row alone (so only the bad row fails)."""
        jobs = [(row["room"], row["mask"], subject) for _, row, subject in items]
        try:
            placed = self.studio.inpaint_many(jobs, steps=steps, guidance_scale=guidance, progress=False,
                                              seeds=[row["seed"] for _, row, _ in items])
        except ERRORS as exc:
            if len(items) == 1:
                out[items[0][0]] = _error(exc)
                return
            for item in items:
                self._run_plain([item], steps, guidance, out)
            return
        for (i, _, _), placement in zip(items, placed):
            out[i] = {"png": _png(placement.image)}

    def _run_session(self, row, subject):
        options = dict(steps=row["steps"], seed=row["seed"], guidance_scale=row["guidance_scale"], progress=False)
        try:
            if row["session"] == "dual":
                placement = self.studio.dual_branch(**options).place(subject, row["room"], row["mask"])
            else:
                placement = self.studio.progressive(schedule=row["schedule"], **options).place(
                    subject, row["room"], row["mask"])
        except ERRORS as exc:
            return _error(exc)
        return {"png": _png(placement.image)}


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _error(exc) -> dict:
    return {"error": status_of(exc), "detail": f"{type(exc).__name__}: {exc}"}
