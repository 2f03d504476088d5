"""The fleet benchmark's figures (bench_fleet.py) from what its reader, callers, Redis and
PostgreSQL recorded, and the table it prints. Not a benchmark itself."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

EVENT_P99_TARGET_MS = 250.0
LOST_TARGET_S = 10.0


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def spread(values_ms: list[float]) -> dict[str, Any]:
    return {"n": len(values_ms), "p50_ms": pct(values_ms, 50), "p99_ms": pct(values_ms, 99),
            "max_ms": round(max(values_ms), 1) if values_ms else None}


def event_latency(run: dict[str, Any], events: list[list[Any]]) -> dict[str, Any]:
    """(a) publisher's stamp -> arrival at the reader, overall, in the window, per engine."""
    names = {engine_id: name for name, engine_id in run["engine_ids"].items()}
    start, end = run["window"]
    every: list[float] = []
    window: list[float] = []
    by_engine: dict[str, list[float]] = {name: [] for name in run["engines"]}
    for engine_id, _type, ts, arrival, _sid, _reason in events:
        if not ts:
            continue
        ms = (arrival - ts) * 1000
        every.append(ms)
        if start <= ts <= end:
            window.append(ms)
        by_engine.setdefault(names.get(engine_id, engine_id), []).append(ms)
    overall = spread(every)
    return {"all": overall, "window": spread(window),
            "by_engine": {name: spread(v) for name, v in by_engine.items()},
            "engines_seen": sum(1 for name in run["engines"] if by_engine.get(name)),
            "within_target": overall["p99_ms"] is not None
            and overall["p99_ms"] <= EVENT_P99_TARGET_MS}


def lost_calls(run: dict[str, Any], events: list[list[Any]],
               calls: list[dict[str, Any]]) -> dict[str, Any]:
    """(b) the killed engine's calls marked lost: when, how many, by whom, and the record."""
    names = {engine_id: name for name, engine_id in run["engine_ids"].items()}
    victim_index = run["engines"].index(run["victim"])
    victim_calls = {c["call_sid"] for c in calls if c["engine"] == victim_index}
    lost = [e for e in events if e[1] == "call_ended" and e[5] == "lost"]
    per_sid = Counter(e[4] for e in lost)
    killed = run["killed_at"]
    arrivals = [e[3] - killed for e in lost]
    rows = run["lost_rows"]
    last = round(max(arrivals), 2) if arrivals else None
    return {
        "victim_live_at_kill": run["live_at_kill"].get(run["victim"]),
        "victim_calls": len(victim_calls),
        "lost_events": len(lost), "lost_calls": len(per_sid),
        "marked_twice": sum(1 for n in per_sid.values() if n > 1),
        "lost_not_victims": len(set(per_sid) - victim_calls),
        "victims_not_lost": len(victim_calls - set(per_sid)),
        "first_s": round(min(arrivals), 2) if arrivals else None, "last_s": last,
        "marked_by": dict(Counter(names.get(e[0], e[0]) for e in lost)),
        "within_target": last is not None and last <= LOST_TARGET_S
        and not victim_calls - set(per_sid),
        "postgres_lost": len(rows["lost"]),
        "postgres_lost_match": set(rows["lost"]) == victim_calls,
        "postgres_open_calls": len(rows["open"]), "postgres_calls": rows["total"],
    }


def control_plane(run: dict[str, Any], events: list[list[Any]]) -> dict[str, Any]:
    """(c) Redis (and PostgreSQL) work per call-minute over the steady window."""
    before, after = run["redis"]
    start, end = run["window"]
    seconds = end - start
    live = (sum(run["live_start"].values()) + sum(run["live_end"].values())) / 2
    call_min = live * seconds / 60
    commands = {name: after["commands"].get(name, 0) - before["commands"].get(name, 0)
                for name in after["commands"]}
    commands.pop("info", None)  # the bench's own readings
    commands = {k: v for k, v in sorted(commands.items(), key=lambda kv: -kv[1]) if v}
    events_in_window = sum(1 for e in events if e[2] and start <= e[2] <= end)

    def per_min(value: float) -> float:
        return round(value / call_min, 1) if call_min else 0.0

    pg_before, pg_after = before.get("postgres"), after.get("postgres")
    postgres = ({k: per_min(pg_after[k] - pg_before[k]) for k in pg_after}
                if pg_before and pg_after else None)
    net_in, net_out = after["net_in"] - before["net_in"], after["net_out"] - before["net_out"]
    return {
        "window_s": round(seconds, 1), "live_calls": live, "call_minutes": round(call_min, 2),
        "commands_per_call_min": per_min(sum(commands.values())),
        "by_command_per_call_min": {k: per_min(v) for k, v in commands.items()},
        "events_per_call_min": per_min(events_in_window),
        "net_in_bytes_per_call_min": per_min(net_in),
        "net_out_bytes_per_call_min": per_min(net_out),
        "net_in_bytes_per_event": round(net_in / events_in_window) if events_in_window else None,
        "redis_cpu_ms_per_call_min": per_min((after["cpu_s"] - before["cpu_s"]) * 1000),
        "redis_cpu_pct_of_core": round((after["cpu_s"] - before["cpu_s"]) / seconds * 100, 2),
        "redis_used_memory_mb": round(after["used_memory"] / 2**20, 1),
        "postgres_per_call_min": postgres,
    }


def command_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """(d) console -> engine -> (Redis -> owner ->) reply, for local and routed calls:
    state changes (take_over, hand_back) apart from say (which waits for its speech)."""

    def times(local: bool, say: bool) -> dict[str, Any]:
        return spread([r["ms"] for r in records if r["local"] == local and r["ok"]
                       and (r["command"] == "say") == say])

    return {"sent": len(records), "ok": sum(1 for r in records if r["ok"]),
            "local": times(True, False), "routed": times(False, False),
            "say_local": times(True, True), "say_routed": times(False, True),
            "ran_on_owner": sum(1 for r in records if r["ok"] and r["ran_on"] == r["owner"]),
            "by_owner": dict(Counter(r["owner"] for r in records)),
            "errors": sorted({str(r["error"]) for r in records if not r["ok"]})[:5]}


def caller_figures(run: dict[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    victim_index = run["engines"].index(run["victim"])
    survivors = [c for c in calls if c["engine"] != victim_index]
    replies = [r * 1000 for c in calls for r in c["replies"] if r is not None]
    failed = [c for c in survivors if c["error"] or c["ended_by"] != "caller"]
    return {"calls": len(calls), "by_engine": dict(Counter(run["engines"][c["engine"]]
                                                           for c in calls)),
            "survivor_calls_failed": len(failed),
            "failures": sorted({f"{c['ended_by']}: {c['error']}" for c in failed})[:5],
            "answers": len(replies), "reply_latency": spread(replies)}


def summarize(run: dict[str, Any], stream: dict[str, Any], calls: list[dict[str, Any]],
              commands: list[dict[str, Any]]) -> dict[str, Any]:
    events = stream["events"]
    return {"engines": run["engines"], "calls": run["calls"],
            "loadavg_window": list(run["loadavg"]),
            "cpu_pct_of_core": run["cpu_pct_of_core"],
            "event_latency": event_latency(run, events),
            "bus_gaps": stream["gaps"],
            "lost": lost_calls(run, events, calls),
            "control_plane": control_plane(run, events),
            "callers": caller_figures(run, calls),
            "commands": command_figures(commands)}


def print_table(r: dict[str, Any]) -> None:
    ev, lost, cp, cl = r["event_latency"], r["lost"], r["control_plane"], r["callers"]
    cm = r["commands"]
    rows = [
        ("engines / calls (per engine)", f"{len(r['engines'])} / {cl['calls']} "
                                         f"{cl['by_engine']}"),
        ("loadavg window start -> end", " -> ".join(r["loadavg_window"])),
        ("CPU in window, % of a core", ", ".join(f"{k} {v}" for k, v in
                                                 r["cpu_pct_of_core"].items())),
        ("(a) events ts->reader p50/p99/max ms", f"{ev['all']['p50_ms']} / "
         f"{ev['all']['p99_ms']} / {ev['all']['max_ms']} ({ev['all']['n']} events, "
         f"{ev['engines_seen']} engines) target p99 <= {EVENT_P99_TARGET_MS:.0f}: "
         f"{'met' if ev['within_target'] else 'MISSED'}"),
    ]
    for name, s in ev["by_engine"].items():
        rows.append((f"    {name}: n / p50 / p99 / max ms",
                     f"{s['n']} / {s['p50_ms']} / {s['p99_ms']} / {s['max_ms']}"))
    rows += [
        ("    bus gaps seen by the reader", str(len(r["bus_gaps"]))),
        ("(b) kill -> lost first / last (s)", f"{lost['first_s']} / {lost['last_s']} "
         f"target <= {LOST_TARGET_S:.0f}: {'met' if lost['within_target'] else 'MISSED'}"),
        ("    victim live at kill / lost calls", f"{lost['victim_live_at_kill']} / "
                                                  f"{lost['lost_calls']} (marked by "
                                                  f"{lost['marked_by']})"),
        ("    marked twice / wrong / missed", f"{lost['marked_twice']} / "
                                              f"{lost['lost_not_victims']} / "
                                              f"{lost['victims_not_lost']}"),
        ("    PostgreSQL: lost rows (match) / open", f"{lost['postgres_lost']} "
         f"({lost['postgres_lost_match']}) / {lost['postgres_open_calls']} of "
         f"{lost['postgres_calls']}"),
        ("(c) call-minutes in window", f"{cp['call_minutes']} ({cp['live_calls']} live x "
                                       f"{cp['window_s']} s)"),
        ("    Redis commands / call-minute", str(cp["commands_per_call_min"])),
        ("    by command", ", ".join(f"{k} {v}" for k, v in
                                     list(cp["by_command_per_call_min"].items())[:8])),
        ("    events / call-minute", str(cp["events_per_call_min"])),
        ("    bytes in / out per call-minute", f"{cp['net_in_bytes_per_call_min']} / "
                                               f"{cp['net_out_bytes_per_call_min']}"),
        ("    Redis CPU ms / call-minute (% core)", f"{cp['redis_cpu_ms_per_call_min']} "
                                                    f"({cp['redis_cpu_pct_of_core']})"),
        ("    PostgreSQL per call-minute", str(cp["postgres_per_call_min"])),
        ("(d) commands sent / ok / ran on owner", f"{cm['sent']} / {cm['ok']} / "
                                                   f"{cm['ran_on_owner']} {cm['by_owner']}"),
    ] + [
        (f"    {label}: n / p50 / p99 / max ms", f"{cm[key]['n']} / {cm[key]['p50_ms']} / "
                                                 f"{cm[key]['p99_ms']} / {cm[key]['max_ms']}")
        for label, key in (("take_over/hand_back, local", "local"),
                           ("take_over/hand_back, routed", "routed"),
                           ("say, local", "say_local"), ("say, routed", "say_routed"))
    ] + [
        ("callers: answers / reply p50 / p99 ms", f"{cl['answers']} / "
         f"{cl['reply_latency']['p50_ms']} / {cl['reply_latency']['p99_ms']}"),
        ("callers on survivors failed", str(cl["survivor_calls_failed"])),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if cm["errors"]:
        print("command errors:", "; ".join(cm["errors"]))
    if cl["failures"]:
        print("failures:", "; ".join(cl["failures"]))
