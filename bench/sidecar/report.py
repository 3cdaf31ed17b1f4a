#!/usr/bin/env python3
"""Renders the sidecar benchmark's results as markdown (used by `run`).

    report.py RESULTS_DIR     the whole report, on stdout
    report.py --line FILE     one run's summary, for the progress log

RESULTS_DIR holds `targets` (lines `name<TAB>label`, in run order),
`<name>-<rate>.json` (`tidemark loadgen --json`; rate 0 = saturation),
`<name>-<rate>.cost` (the target's CPU seconds, wall seconds and resident
memory over that run), `facts.md` and `billed.json` (the billing API's
answer for the benchmark's tenant).
"""

import json
import sys
from pathlib import Path

DIRECT = "direct"
SIDECAR = "sidecar"
MEASURED_RATE = 1000  # the rate of the headline numbers
DISTURBED = 0.2  # cores busy with other work that make a run suspect


def load(path):
    with open(path) as f:
        return json.load(f)


def fmt(x, digits=0):
    return f"{x:,.{digits}f}"


def signed(x):
    return f"{x:+,.0f}"


def line(path):
    s = load(path)
    return (
        f"achieved {s['achieved_rps']:.0f} req/s, p50 {s['p50_us']:.0f} µs, "
        f"p99 {s['p99_us']:.0f} µs, p99.9 {s['p999_us']:.0f} µs, "
        f"errors {s['errors']}, unfinished {s['unfinished']}"
    )


def rates_of(results, name):
    rates = []
    for p in results.glob(f"{name}-*.json"):
        rate = p.stem[len(name) + 1 :]
        if rate.isdigit():
            rates.append(int(rate))
    return sorted(rates)


def report(results):
    targets = [
        tuple(l.split("\t", 1))
        for l in (results / "targets").read_text().splitlines()
        if l.strip()
    ]
    runs = {}
    costs = {}
    for name, _ in targets:
        for rate in rates_of(results, name):
            runs[(name, rate)] = load(results / f"{name}-{rate}.json")
            cost = results / f"{name}-{rate}.cost"
            if cost.exists():
                costs[(name, rate)] = load(cost)
    constant_rates = sorted({r for (_, r) in runs if r > 0})
    out = []
    w = out.append

    w("# Sidecar benchmark: last run")
    w("")
    w("Written by `bench/sidecar/run`; `bench/sidecar/README.md` says how to read it.")
    w("")
    w((results / "facts.md").read_text().rstrip())
    w("")

    disturbed = [
        f"{label} at {rate_name(rate)}"
        for name, label in targets
        for rate in rates_of(results, name)
        if costs.get((name, rate), {}).get("other_cores", 0) >= DISTURBED
    ]
    if disturbed:
        w(
            f"**Disturbed:** other work kept {DISTURBED} cores or more busy during "
            f"{len(disturbed)} of {len(runs)} runs ({'; '.join(disturbed)}; see `other CPU`). "
            "Their numbers, tails first, include that interference; run again on a quiet "
            "machine to compare closely."
        )
        w("")

    headline = sidecar_headline(runs, costs)
    if headline:
        w("## In short")
        w("")
        w(headline)
        w("")

    w("## Latency at a constant rate")
    w("")
    w(
        "Open loop: request *i* is sent at *t0 + i/rate* whatever the target does, and "
        "its latency runs from that scheduled time to the end of the response body "
        "(coordinated-omission corrected). Microseconds. `+p50`, `+p99`, `+p99.9`: "
        "what the proxy adds over the direct run at the same rate. `lag p99`: how "
        "late the generator itself started requests (included in every latency). "
        "`other CPU`: cores kept busy by work other than the benchmark during the run."
    )
    w("")
    w(
        "| target | rate | achieved | p50 | p99 | p99.9 | max | +p50 | +p99 | +p99.9 "
        "| errors | unfinished | lag p99 | other CPU |"
    )
    w("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for rate in constant_rates:
        base = runs.get((DIRECT, rate))
        for name, label in targets:
            s = runs.get((name, rate))
            if s is None:
                continue
            if name == DIRECT or base is None:
                added = ["—", "—", "—"]
            else:
                added = [
                    signed(s[k] - base[k]) for k in ("p50_us", "p99_us", "p999_us")
                ]
            w(
                f"| {label} | {fmt(rate)} | {fmt(s['achieved_rps'])} "
                f"| {fmt(s['p50_us'])} | {fmt(s['p99_us'])} | {fmt(s['p999_us'])} "
                f"| {fmt(s['max_us'])} | {' | '.join(added)} | {s['errors']} "
                f"| {s['unfinished']} | {fmt(s['lag_p99_us'])} | {other(costs, name, rate)} |"
            )
    w("")

    w("## Saturation")
    w("")
    w(
        "Closed loop: each of the connections sends its next request as soon as the "
        "last one ends. The load generator, the app and the proxy share the same "
        "cores, so this is the most the whole setup moves, not the proxy alone. "
        "Latency from the send, in microseconds."
    )
    w("")
    w("| target | req/s | of direct | p50 | p99 | p99.9 | errors | other CPU |")
    w("|---|--:|--:|--:|--:|--:|--:|--:|")
    base = runs.get((DIRECT, 0))
    for name, label in targets:
        s = runs.get((name, 0))
        if s is None:
            continue
        share = (
            f"{100 * s['achieved_rps'] / base['achieved_rps']:.0f} %"
            if base and base["achieved_rps"]
            else "—"
        )
        w(
            f"| {label} | {fmt(s['achieved_rps'])} | {share} | {fmt(s['p50_us'])} "
            f"| {fmt(s['p99_us'])} | {fmt(s['p999_us'])} | {s['errors']} | {other(costs, name, 0)} |"
        )
    w("")

    w("## CPU and memory")
    w("")
    w(
        "CPU (user + system, from `/proc/PID/stat`) of the target's processes over "
        "the whole run, warmup included; for a proxy that is the proxy alone, for "
        "`direct` the app. `cores per 1k req/s`: CPU seconds per second, scaled to "
        "1000 req/s. `µs CPU per request`: CPU time over the responses served. "
        "Resident memory (`VmRSS`) before and after the run and its peak (`VmHWM`), "
        "summed over the target's processes (nginx: master and workers)."
    )
    w("")
    w(
        "| target | rate | cores per 1k req/s | µs CPU per request "
        "| RSS MiB before | RSS MiB after | peak RSS MiB |"
    )
    w("|---|--:|--:|--:|--:|--:|--:|")
    for rate in constant_rates:
        for name, label in targets:
            c = costs.get((name, rate))
            s = runs.get((name, rate))
            if c is None or s is None:
                continue
            w(
                f"| {label} | {fmt(rate)} | {cores_per_1k(c, rate):.3f} "
                f"| {cpu_per_request_us(c, s):.1f} | {c['rss_before_kib'] / 1024:.1f} "
                f"| {c['rss_kib'] / 1024:.1f} "
                f"| {c['hwm_kib'] / 1024:.1f} |"
            )
    w("")

    check = metering_check(results, runs)
    if check:
        w("## Metering check")
        w("")
        w(check)
        w("")

    w("## Which rows to compare")
    w("")
    if any(name == SIDECAR + "-cores" for name, _ in targets):
        w(
            "Like with like: the sidecar by default runs on one worker thread, as nginx "
            "with `worker_processes 1` and HAProxy with `nbthread 1`; with "
            "`--worker-threads 0` it runs one per core, as nginx with "
            "`worker_processes auto` and HAProxy without `nbthread`. Compare "
            "single-thread rows with single-thread rows and per-core rows with per-core "
            "rows. On a machine this small, where the load generator and the app share "
            "the cores, one thread usually wins on both latency and throughput: it saves "
            "the cross-core hand-offs."
        )
    else:
        w(
            "The sidecar runs a multi-threaded tokio runtime with one worker thread per "
            "core and no setting to limit it, so the like-for-like rows are nginx with "
            "`worker_processes auto` and HAProxy without `nbthread` (both one per core): "
            "each proxy may use every core. The single-worker rows show what one core of "
            "each gives; on a machine this small, where the load generator and the app "
            "share the same cores, one worker often has the lower latency at moderate "
            "rates (no cross-core hand-offs), so both are shown."
        )
    return "\n".join(out) + "\n"


def rate_name(rate):
    return "saturation" if rate == 0 else f"{rate:,} req/s"


def other(costs, name, rate):
    c = costs.get((name, rate))
    if c is None or "other_cores" not in c:
        return "—"
    return f"{c['other_cores']:.2f}"


def cores_per_1k(cost, rate):
    if cost["wall_s"] <= 0:
        return 0.0
    return cost["cpu_s"] / cost["wall_s"] * 1000 / rate


def cpu_per_request_us(cost, summary):
    if summary["responses"] == 0:
        return 0.0
    return cost["cpu_s"] / summary["responses"] * 1e6


def sidecar_headline(runs, costs):
    s = runs.get((SIDECAR, MEASURED_RATE))
    d = runs.get((DIRECT, MEASURED_RATE))
    c = costs.get((SIDECAR, MEASURED_RATE))
    if not (s and d and c):
        return ""
    parts = [
        f"At {MEASURED_RATE:,} req/s the sidecar adds {signed(s['p50_us'] - d['p50_us'])} µs "
        f"at p50, {signed(s['p99_us'] - d['p99_us'])} µs at p99 and "
        f"{signed(s['p999_us'] - d['p999_us'])} µs at p99.9",
        f"uses {cores_per_1k(c, MEASURED_RATE):.3f} cores per 1k req/s "
        f"({cpu_per_request_us(c, s):.1f} µs CPU per request)",
        f"and holds {c['rss_kib'] / 1024:.1f} MiB resident after the run "
        f"({c['rss_before_kib'] / 1024:.1f} MiB before, peak {c['hwm_kib'] / 1024:.1f} MiB).",
    ]
    sat, sat_direct = runs.get((SIDECAR, 0)), runs.get((DIRECT, 0))
    text = ", ".join(parts)
    busy = max(c.get("other_cores", 0), costs.get((DIRECT, MEASURED_RATE), {}).get("other_cores", 0))
    if busy >= DISTURBED:
        text += (
            f" (Other work kept {busy:.2f} cores busy during these runs: the tail "
            "numbers here are suspect.)"
        )
    if sat and sat_direct and sat_direct["achieved_rps"]:
        text += (
            f" At saturation the setup moves {fmt(sat['achieved_rps'])} req/s through "
            f"it, {100 * sat['achieved_rps'] / sat_direct['achieved_rps']:.0f} % of direct."
        )
    return text


def metering_check(results, runs):
    billed_path = results / "billed.json"
    if not billed_path.exists():
        return ""
    billed = load(billed_path).get("totals", {}).get("requests")
    answered = sum(s["responses"] for (name, _), s in runs.items() if name.startswith(SIDECAR))
    probes_path = results / "probes"
    # One readiness request through each sidecar started.
    probe = len(probes_path.read_text().split()) if probes_path.exists() else 0
    expected = answered + probe
    if billed is None:
        return "The billing API has no `requests` total for the tenant: nothing was metered."
    verdict = "exact" if billed == expected else f"off by {billed - expected:+,}"
    return (
        f"Billing (`tidemark dev`, fed by the sidecar during the run) counts "
        f"{billed:,} requests for the tenant; the sidecar answered {expected:,} "
        f"({answered:,} to the load generator, warmups included, and {probe} readiness "
        f"request{'s' if probe != 1 else ''}): {verdict}."
    )


def main(argv):
    if len(argv) == 3 and argv[1] == "--line":
        print(line(argv[2]))
        return 0
    if len(argv) == 2:
        sys.stdout.write(report(Path(argv[1])))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
