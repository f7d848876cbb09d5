"""bench/serve.py's report: a result JSON as markdown, one section per function."""
from __future__ import annotations

import json


def header(result: dict) -> list[str]:
    m, v = result["machine"], result["versions"]
    lines = [f"# Serving benchmark ({result['started']})", "",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['memory']}; load average at start "
             f"{m['loadavg_start']}, at end {m.get('loadavg_end')} (shared machine: other jobs may have run)",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- git: {result['git']['commit'][:12]}" + (" (uncommitted changes in service/ or bench/)" if result["git"]["dirty_files"] else ""),
             f"- settings: {json.dumps(result['settings'])}", ""]
    for name, info in result["models"].items():
        lines.append(f"- model `{name}`: {info['note']}")
    for wait in result.get("quiet_waits", []):
        lines.append(f"- before {wait['model']} round {wait['round'] + 1}: waited {wait['waited_s']} s for other jobs' CPU "
                     f"< {wait['threshold_pct']}% (last samples {wait['background_cpu_pct_samples'][-3:]}; quiet: {wait['quiet']})")
    return lines


def raw_ort_table(result: dict) -> list[str]:
    lines = ["", "## Raw ONNX Runtime in-process (the ceiling)", "",
             "| model | intra-op threads | batch | images/s (median round) | all rounds | ms/call p50 | ms/call p99 |",
             "|---|---:|---:|---:|---|---:|---:|"]
    return lines + [f"| {r['model']} | {r['threads']} | {r['batch']} | {r['images_per_s']:.0f} | "
                    f"{', '.join(f'{x:.0f}' for x in r['images_per_s_rounds'])} | {r['ms_per_call_p50']:.3f} | "
                    f"{r['ms_per_call_p99']:.3f} |" for r in result["summary"]["raw_ort"]]


def http_table(result: dict) -> list[str]:
    lines = ["", "## HTTP serving", "",
             "| model | server | load | conc | req/s | images/s | img/s all rounds | p50 ms | p99 ms | errors "
             "| req/call | img/call | CPU % by process | server CPU ms/req | wrk CPU % | other jobs CPU % |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in result["summary"]["cells"]:
        b = c.get("batching") or {}
        cpu = ", ".join(f"{k} {val:.0f}" for k, val in c["cpu_pct"].items() if val >= 1)
        lines.append(f"| {c['model']} | {c['server']} | {c['load']} | {c['concurrency']} | {c['req_per_s']:.1f} | "
                     f"{c['images_per_s']:.1f} | {', '.join(f'{x:.0f}' for x in c['images_per_s_rounds'])} | "
                     f"{c['latency_ms']['p50']:.1f} | {c['latency_ms']['p99']:.1f} | {sum(c['errors_rounds'])} | {b.get('requests_per_call', '-')} | {b.get('images_per_call', '-')} | {cpu} | "
                     f"{c['server_cpu_ms_per_request']} | {c['wrk_cpu_pct']:.0f} | {c['other_processes_cpu_pct']:.0f} |")
    return lines


def startup_table(result: dict) -> list[str]:
    lines = ["", "## Start-up and memory", "", "| model | server | ready after start (s) | peak RSS total (MiB) | peak RSS by process (MiB) |",
             "|---|---|---:|---:|---|"]
    for name, info in result["servers"].items():
        for kind, s in info.items():
            mem = s.get("memory", {})
            lines.append(f"| {name} | {kind} | {s['ready_s']:.2f} (all: {s.get('ready_s_all')}) | {mem.get('peak_rss_total_mib')} | "
                         f"{json.dumps(mem.get('peak_rss_by_role_mib'))} |")
    return lines


def targets_table(result: dict) -> list[str]:
    lines = ["", "## Targets", "", "| target | measured | limit | met | detail |", "|---|---:|---:|---|---|"]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**NO**")
        lines.append(f"| {t['target']} | {t['measured']} | {t['limit'] if t['limit'] is not None else '-'} | {met} | {t['detail']} |")
    return lines


def profiles(result: dict) -> list[str]:
    if not result["profiles"]:
        return []
    lines = ["", "## Where the time goes (py-spy, separate run of the same load)", ""]
    for p in result["profiles"]:
        lines.append(f"### {p['model']} {p['server']} {p['load']} c={p['concurrency']} ({p['seconds']} s at {p['rate_hz']} Hz)")
        lines.append("")
        for role, s in p["processes"].items():
            cats = ", ".join(f"{k} {val}%" for k, val in s["categories_pct"].items())
            tops = "; ".join(f"`{k}` {val}%" for k, val in list(s["top_self_pct"].items())[:8])
            lines.append(f"- **{role}** (busy {s['cpu_pct_of_one_core']}% of one core): {cats}")
            lines.append(f"  - top self frames: {tops}")
        lines.append("")
    return lines


SECTIONS = (header, raw_ort_table, http_table, startup_table, targets_table, profiles)


def markdown(result: dict) -> str:
    return "\n".join(line for section in SECTIONS for line in section(result)) + "\n"
