"""The benches: every `bench/*.py --quick` runs and ends with its JSON line; the shared statistics; serve_load's
outcome counting.

The smoke test discovers the benches by glob, so a new bench is checked without being listed here. Each one runs
in its own subprocess with `--quick` (under a minute on 2 cores) and must exit 0, write nothing inside the
repository, and print one JSON object last with `goal_met` (a bool) and the goals it was judged by; a bench that
times against a peer (any `*ratio*` / `*speedup*` figure with an interval) carries the interval and `repeats`.
SUBJECTPAINT_BENCH_LOG=DIR keeps every bench's stdout and stderr there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted((ROOT / "bench").glob("*.py"))  # _stats.py too: its --quick calibrates the timing harness


def tracked_changes() -> str:
    """Tracked files that differ from HEAD plus untracked files git does not ignore: what a bench must not add."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                         text=True)
    return out.stdout if out.returncode == 0 else ""


def test_every_bench_is_found():
    assert {"swap.py", "registry_scale.py", "sampler_overhead.py", "serve_load.py"} <= {p.name for p in BENCHES}


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_quick(bench, tmp_path):
    before = tracked_changes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(bench), "--quick"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    if os.environ.get("SUBJECTPAINT_BENCH_LOG"):  # keep every bench's output (for the README's table)
        log = Path(os.environ["SUBJECTPAINT_BENCH_LOG"])
        log.mkdir(parents=True, exist_ok=True)
        (log / f"{bench.stem}.out").write_text(proc.stdout)
        (log / f"{bench.stem}.err").write_text(proc.stderr)
    tail = (proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, f"{bench.name} --quick exited {proc.returncode}\n{tail}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{bench.name} --quick printed nothing\n{tail}"
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(f"{bench.name} --quick: the last stdout line is not JSON: {lines[-1][:300]!r}")
    assert isinstance(result, dict)
    assert isinstance(result.get("goal_met"), bool), f"{bench.name}: no boolean goal_met in {sorted(result)}"
    goals = result.get("goals")
    assert isinstance(goals, dict) and goals, f"{bench.name}: no goals"
    check_intervals(bench.name, result)
    assert tracked_changes() == before, f"{bench.name} --quick wrote inside the repository"


def check_intervals(name: str, result: dict) -> None:
    """Every figure with an interval is inside it; a timed comparison says how many repeats it had."""
    for key, lo in result.items():
        if not key.endswith("_lo") or not isinstance(lo, (int, float)):
            continue
        figure = key[: -len("_lo")]
        hi = result.get(f"{figure}_hi")
        assert isinstance(hi, (int, float)), f"{name}: {key} without {figure}_hi"
        assert lo <= result[figure] <= hi, f"{name}: {figure}={result[figure]} outside [{lo}, {hi}]"
        assert result.get("repeats", 0) >= 1, f"{name}: {figure} has an interval but no repeats"
    if "ratio" in result:
        assert {"ratio_lo", "ratio_hi", "repeats"} <= set(result), f"{name}: ratio without its interval"


# ---------------------------------------------------------------------------------------- bench/_stats.py


def test_median_interval_order_statistics():
    from bench._stats import median_interval

    med, lo, hi, cov = median_interval([float(x) for x in range(1, 21)])
    assert med == 10.5
    # n = 20: the 6th smallest and the 6th largest cover the median with 95.9 %
    assert (lo, hi) == (6.0, 15.0) and cov == pytest.approx(0.9586, abs=1e-4)
    med, lo, hi, cov = median_interval([3.0, 1.0, 2.0])  # too few for 95 %: [min, max] and its true coverage
    assert (med, lo, hi) == (2.0, 1.0, 3.0) and cov == pytest.approx(0.75)


def test_goal_met_on_the_interval_bound():
    from bench._stats import finish, ratio_stats

    ours, peer = [1.00, 1.05, 0.98, 1.20, 1.01, 0.99, 1.02], [1.0] * 7
    result = ratio_stats(ours, peer)
    assert result["ratio"] == 1.01 and result["repeats"] == 7
    assert result["ratio_lo"] <= 1.01 <= result["ratio_hi"] == 1.2  # n = 7: the interval is [min, max]
    out = finish(dict(result), {"ratio": "<= 1.1"})  # median meets it, the upper bound does not
    assert out["goal_met"] is False and out["goals_met"] == {"ratio": False}
    assert finish(dict(result), {"ratio": "<= 1.3"})["goal_met"] is True
    assert finish({"speedup": 30, "speedup_lo": 19, "speedup_hi": 40}, {"speedup": ">= 20"})["goal_met"] is False
    assert finish({"lost": 0}, {"lost": "== 0"})["goal_met"] is True


def test_alternate_rotates_and_warms():
    from bench._stats import alternate

    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up untimed, then the order alternates
    assert len(times["a"]) == len(times["b"]) == 3


# ---------------------------------------------------------------------------------------- sampler overhead


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "euler_a", "dpm++", "unipc"])
def test_sampler_loop_never_syncs_and_idle_hooks_cost_nothing(tiny_base, scene, scheduler):
    """Per denoising step: no host-device synchronisation, no more ops than diffusers' pipeline (same weights,
    scheduler, seed), and the same ops with hooks that do nothing or a per-pixel start that is over. (Euler's step
    reads its sigma twice, `s_tmin <= sigma <= s_tmax`; diffusers keeps that table on the CPU on purpose, so on a
    GPU it is no synchronisation, but a CPU run cannot tell it from one: both sides count 2 there.)"""
    from bench.sampler_overhead import count_per_step

    from subjectpaint.images import load_mask, pil_to_tensor
    from subjectpaint.sampler import LatentStart, Sampler, SamplerHook, make_scheduler

    room, mask, exemplar = scene
    emb, unc = tiny_base.encode_exemplar([exemplar])
    image, mask_t = pil_to_tensor(room), load_mask(mask, room.size)[None, None]

    def ours(hooks=()):
        return lambda: Sampler(tiny_base, progress=False)(
            image, mask_t, emb, uncond=unc, num_inference_steps=4, scheduler=scheduler,
            generator=torch.Generator().manual_seed(0), hooks=list(hooks))

    pipe = tiny_base.to_pipeline()
    pipe.scheduler = make_scheduler(scheduler, tiny_base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def theirs():
        pipe(example_image=exemplar, image=room, mask_image=mask, num_inference_steps=4,
             generator=torch.Generator().manual_seed(0), output_type="latent")

    with torch.no_grad():
        plain, peer = count_per_step(tiny_base.unet, ours()), count_per_step(tiny_base.unet, theirs)
        idle = count_per_step(tiny_base.unet, ours([SamplerHook(), SamplerHook()]))
        h, w = (n // tiny_base.vae_scale_factor for n in image.shape[-2:])
        start = torch.zeros(1, 1, h, w, dtype=torch.long)
        start[..., 0, 0] = 2  # one pixel held for two steps: from step 2 on the hook has nothing to do
        held = count_per_step(tiny_base.unet, ours([LatentStart(start, torch.zeros(1, 4, h, w))]))
    host_reads = 2 if scheduler == "euler" else 0
    assert plain["syncs_per_step"] == idle["syncs_per_step"] == held["syncs_per_step"] == host_reads
    assert peer["syncs_per_step"] >= host_reads
    assert plain["ops_per_step"] <= peer["ops_per_step"]
    assert idle["ops_in_steps"] == plain["ops_in_steps"]
    assert held["ops_in_steps"] > plain["ops_in_steps"]  # step 1 does the hook's work ...
    held_late = count_per_step(tiny_base.unet, ours([LatentStart(torch.zeros(1, 1, h, w, dtype=torch.long),
                                                                 torch.zeros(1, 4, h, w))]))
    assert held_late["ops_in_steps"] == plain["ops_in_steps"]  # ... and a start that is over costs nothing


# ---------------------------------------------------------------------------------------- serve_load counting


def test_serve_load_counts_every_failure():
    """Injected failures against a fake server: a 500, a 404, a timeout after the request went out, a dropped
    connection and an unexpected exception are all failed; the timeout and the drop are also lost; the run goes
    on and every request has exactly one outcome."""
    pytest.importorskip("litserve")
    from bench.serve_load import drive

    bodies = [{"subject": f"s{i}"} for i in range(10)]

    def handler(request: httpx.Request) -> httpx.Response:
        subject = json.loads(request.content)["subject"]
        if subject == "s1":
            return httpx.Response(500, json={"detail": "boom"})
        if subject == "s2":
            return httpx.Response(404, json={"detail": "unknown"})
        if subject == "s3":
            raise httpx.ReadTimeout("no answer", request=request)
        if subject == "s4":
            raise httpx.RemoteProtocolError("server disconnected", request=request)
        if subject == "s5":
            raise ValueError("something else")
        return httpx.Response(200, content=b"png", headers={"X-Batch-Rows": "2"})

    out = asyncio.run(drive("http://bench", "key", bodies, clients=3, transport=httpx.MockTransport(handler)))
    assert out["requests"] == 10 and out["ok"] == 5 and out["failed"] == 5 and out["lost"] == 2
    assert out["failures"]["http 500"] == 1 and out["failures"]["http 404"] == 1
    assert out["failures"]["lost: ReadTimeout"] == 1 and out["failures"]["lost: RemoteProtocolError"] == 1
    assert out["mean_batch_rows"] == 2.0 and len(out["latencies_s"]) == 5


def test_serve_load_counts_unanswered_at_the_deadline():
    """A request the server holds past the run's deadline is lost (and failed); one never sent is failed."""
    pytest.importorskip("litserve")
    from bench.serve_load import drive

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["subject"] == "slow":
            await asyncio.sleep(30)
        return httpx.Response(200, content=b"png")

    bodies = [{"subject": "fast"}, {"subject": "slow"}, {"subject": "fast"}]
    out = asyncio.run(drive("http://bench", "key", bodies, clients=1, deadline=0.5,
                            transport=httpx.MockTransport(handler)))
    assert out["ok"] == 1 and out["failed"] == 2 and out["lost"] == 1
    assert out["failures"] == {"lost: unanswered at the deadline": 1, "error: never sent": 1}


def test_real_shape_memory_measure_counts_what_is_allocated_and_fails_when_blind():
    """real_shape's CPU measure: the peak of torch's own allocations in a window (a freed tensor does not add to a
    later one), and an error, not a zero, when the profiler saw no allocation at all."""
    from torch.profiler import ProfilerActivity, profile

    from bench.real_shape import Window, cpu_allocation_peak

    window = Window("cpu").open()
    a = torch.ones(4 << 20, dtype=torch.uint8)  # 4 MiB
    del a
    b = torch.ones(2 << 20, dtype=torch.uint8)  # 2 MiB, after the 4 MiB one is freed
    allocated, rss = window.close()
    assert 4 << 20 <= allocated < (4 << 20) + (1 << 16) and rss is not None and b.numel()
    with profile(activities=[ProfilerActivity.CPU]) as blind:  # memory events off: the measure cannot see
        torch.ones(1 << 20)
    with pytest.raises(RuntimeError, match="no CPU allocations"):
        cpu_allocation_peak(blind)
