"""Timing statistics shared by the benches: alternate ours and the peer, warm both, and say how sure the ratio is.

    from bench._stats import alternate, ratio_stats, finish

    times = alternate({"ours": ours, "diffusers": theirs}, repeats=7)     # warmed, order rotated each repeat
    result.update(ratio_stats(times["ours"], times["diffusers"]))         # ratio, ratio_lo, ratio_hi, repeats
    finish(result, {"ratio": "<= 1.02"})                                  # goals + goal_met, prints the JSON line

The ratio is the median of the per-repeat paired ratios (ours_i / peer_i, the two timed back to back, so slow
drift of the machine cancels in each pair). Its interval is the distribution-free order-statistics interval for
a median: the k-th smallest and k-th largest paired ratio, with k the largest index whose binomial coverage
P(k <= #below median <= n - k) is at least 95 %. With fewer than 6 repeats no such k exists; the interval is then
[min, max] and `ratio_confidence` says the coverage it has (1 - 2 / 2^n: 94 % at 5, 88 % at 4). A goal is met
only when the interval's far bound meets it (`<= g`: ratio_hi <= g; `>= g`: ratio_lo >= g).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed calls each, then `repeats` rounds in which every
    function runs once, the order rotated round to round (A B, B A, A B, ... for two; A B C, B C A, ...). `sync` (e.g.
    torch.cuda.synchronize) runs before and after each timed call."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # each function in each position in turn
        for name in order:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(median, lo, hi, coverage): the order-statistics interval for the median of `values`."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    best_k, coverage = 1, 1 - 2 * 0.5**n  # [x_(1), x_(n)]
    for k in range(1, n // 2 + 1):
        # P(x_(k) <= median <= x_(n+1-k)) = P(k <= B <= n - k), B ~ Binomial(n, 1/2)
        cov = sum(math.comb(n, j) for j in range(k, n - k + 1)) / 2**n
        if cov >= confidence:
            best_k, coverage = k, cov
        else:
            break
    return statistics.median(xs), xs[best_k - 1], xs[n - best_k], coverage


def ratio_stats(num: list[float], den: list[float], prefix: str = "ratio", digits: int = 4) -> dict:
    """Paired ratios num_i / den_i (ours / peer for a cost; peer / ours for a speedup):
    {prefix, prefix_lo, prefix_hi, prefix_confidence, repeats}."""
    if len(num) != len(den) or not num:
        raise ValueError(f"unpaired timings: {len(num)} vs {len(den)}")
    med, lo, hi, cov = median_interval([a / b for a, b in zip(num, den)])
    return {prefix: round(med, digits), f"{prefix}_lo": round(lo, digits), f"{prefix}_hi": round(hi, digits),
            f"{prefix}_confidence": round(cov, 3), "repeats": len(num)}


def met(result: dict, key: str, goal: str) -> bool:
    """Whether result[key] meets goal ('<= 1.1', '>= 20', '== 0', '< 3', '> 0'), judged on the interval's far
    bound where the result has one (key_hi for an upper goal, key_lo for a lower one)."""
    op, _, value = goal.strip().partition(" ")
    target = float(value)
    if op in ("<=", "<"):
        x = result.get(f"{key}_hi", result[key])
        return x <= target if op == "<=" else x < target
    if op in (">=", ">"):
        x = result.get(f"{key}_lo", result[key])
        return x >= target if op == ">=" else x > target
    if op == "==":
        return result[key] == target
    raise ValueError(f"unknown goal {goal!r}")


def finish(result: dict, goals: dict[str, str]) -> dict:
    """Record the goals, each goal's verdict and `goal_met` (all met), and print the JSON line (last on stdout)."""
    result["goals"] = dict(goals)
    result["goals_met"] = {key: bool(met(result, key, goal)) for key, goal in goals.items()}
    result["goal_met"] = all(result["goals_met"].values())
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    """Calibrate the harness on a known ratio: a 4 ms and a 2 ms sleep, alternated and warmed like any bench's two
    sides. Sleeps do not depend on how busy the CPU is, so the measured ratio must come out near 2 with an interval
    that says so; a harness that pairs, orders or bounds the rounds wrongly fails its goals."""
    import argparse

    parser = argparse.ArgumentParser(description="calibrate bench/_stats.py on two sleeps of known ratio 2")
    parser.add_argument("--quick", action="store_true", help="9 rounds (under a second)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 31, 9 with --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (9 if args.quick else 31)
    times = alternate({"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.002)}, repeats)
    result = {"bench": "_stats", "quick": args.quick, "expected_ratio": 2.0,
              **ratio_stats(times["slow"], times["fast"])}
    return finish(result, {"ratio": ">= 1.5", "ratio_hi": "<= 2.5"})


if __name__ == "__main__":
    main()
