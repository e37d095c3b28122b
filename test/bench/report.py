"""report.py - the figures of test/bench/run.sh.

  report.py pgbench NAME CLIENTS SECS B0 T0 B1 T1 OUTFILE LOGDIR
      one pgbench run as JSON on stdout (tps from pgbench's summary,
      latency percentiles from its per-transaction logs, machine CPU busy
      from the /proc/stat jiffies sampled around it)
  report.py table OUTDIR SECS ACCOUNTS POOL MAXC ELAPSED S4LAT "CONCS"
      reads OUTDIR/run-*.json, prints the table and the targets, writes
      OUTDIR/bench-results.json
"""
import glob
import json
import os
import platform
import re
import subprocess
import sys


def pct(sorted_vals, p):
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(len(sorted_vals) * p / 100.0 + 0.999999) - 1))
    return sorted_vals[i]


def pgbench(args):
    name, clients, secs = args[0], int(args[1]), float(args[2])
    b0, t0, b1, t1 = map(int, args[3:7])
    text = open(args[7]).read()
    lat = []
    for path in glob.glob(os.path.join(args[8], "tx*")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]) / 1000.0)
    lat.sort()
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    aborted = "Run was aborted" in text
    print(json.dumps({
        "label": name, "kind": "pgbench", "connections": clients, "window_s": secs,
        "answers": len(lat), "payments_per_s": float(m.group(1)) if m and not aborted else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                       "p999": pct(lat, 99.9), "max": lat[-1] if lat else 0.0},
        "failed": int(failed.group(1)) if failed else None, "aborted": aborted,
        "machine_cpu_busy_pct": round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else 0.0}))


def machine():
    info = {"nproc": os.cpu_count(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_total_mib"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        info["postgres"] = subprocess.run(["/usr/lib/postgresql/15/bin/postgres", "--version"],
                                          capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "coordinator", "proto", "sql"],
                               capture_output=True, text=True).stdout.strip()
        info["commit"] = head + ("+uncommitted daemon changes" if dirty else "")
    except OSError:
        pass
    return info


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(args):
    out, secs, naccts, pool, maxc = args[0], float(args[1]), int(args[2]), int(args[3]), int(args[4])
    elapsed, s4lat, concs = int(args[5]), int(args[6]), [int(c) for c in args[7].split()]
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "run-*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        runs[os.path.basename(path)[4:-5]] = r
    inv = runs.pop("invariants", None)

    def tput(name):
        r = runs.get(name)
        return r["payments_per_s"] if r else None

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    rows = []
    for name, r in runs.items():
        if "hold" in r:
            continue
        d = r.get("daemon", {})
        lat = r.get("latency_ms", {})
        errs = r.get("errors_by_code") or {}
        st = r.get("ok_by_status") or {}
        notes = []
        if errs:
            notes.append("errors " + " ".join(f"{k}={v}" for k, v in sorted(errs.items())))
        others = {k: v for k, v in st.items() if k != "succeeded"}
        if others:
            notes.append("status " + " ".join(f"{k}={v}" for k, v in sorted(others.items())))
        if r.get("aborted"):
            notes.append("pgbench aborted")
        vs2 = vs1 = None
        if name.startswith("s1-c"):
            c = int(re.match(r"s1-c(\d+)", name).group(1))
            vs2 = ratio(r["payments_per_s"], tput(f"pgbench-2pc-c{c}"))
            vs1 = ratio(r["payments_per_s"], tput(f"pgbench-1pc-c{c}"))
        r["vs_pgbench_2pc"] = vs2
        r["vs_pgbench_1pc"] = vs1
        rows.append([name, r.get("connections", 0) * r.get("depth", 1) if r.get("depth") else r.get("connections"),
                     fmt(r["payments_per_s"]), fmt(lat.get("p50"), 2), fmt(lat.get("p99"), 2), fmt(lat.get("p999"), 2),
                     fmt(d.get("cpu_s_per_1000"), 3) if d else "-",
                     fmt(round(d["vmhwm_kb"] / 1024.0, 1)) if d else "-",
                     fmt(r.get("machine_cpu_busy_pct"), 0), fmt(vs2, 2), fmt(vs1, 2), "; ".join(notes)])

    hdr = ["run", "in flight", "payments/s", "p50 ms", "p99 ms", "p99.9 ms", "daemon cpu s/1000", "VmHWM MiB",
           "machine cpu %", "x pgb-2PC", "x pgb-1PC", "notes"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")

    summary = {}
    # targets
    for c in concs:
        summary[f"s1_c{c}_vs_pgbench_2pc"] = ratio(tput(f"s1-c{c}-pool{pool}"), tput(f"pgbench-2pc-c{c}"))
        summary[f"s1_c{c}_vs_pgbench_1pc"] = ratio(tput(f"s1-c{c}-pool{pool}"), tput(f"pgbench-1pc-c{c}"))
        summary[f"s1_c{c}_vs_pgbench_daemonsql"] = ratio(tput(f"s1-c{c}-pool{pool}"),
                                                          tput(f"pgbench-daemonsql-c{c}"))
    ceiling = tput(f"s1-c{maxc}-pool{pool}")
    s2 = tput("s2-pc1100")
    if s2 is not None:
        bound_latency = 1000 / 0.200
        bound = min(bound_latency, ceiling) if ceiling else bound_latency
        summary["s2_bound_in_flight_over_latency"] = bound_latency
        summary["s2_ceiling_daemon_s1"] = ceiling
        summary["s2_bound"] = bound
        summary["s2_payments_per_s"] = s2
        summary["s2_vs_bound"] = ratio(s2, bound)
        summary["s2_default_proc_conns_payments_per_s"] = tput("s2-pc64")
        summary["s2_default_proc_conns_vs_bound"] = ratio(tput("s2-pc64"), bound)
    for name in ("s3-hot10", "s3-hot10-lat200"):
        if name in runs:
            summary[name] = {"payments_per_s": runs[name]["payments_per_s"],
                             "ok_by_status": runs[name].get("ok_by_status"),
                             "errors_by_code": runs[name].get("errors_by_code"),
                             "latency_ms": runs[name].get("latency_ms")}
    mem_lines = []
    for name in ("s4-hold", "s4-pending"):
        r = runs.get(name)
        if not r:
            continue
        h = r.get("hold", [])
        summary[name] = {"steps": h, "bytes_per_in_flight": r.get("bytes_per_in_flight"),
                         "vmrss_idle_kb": r.get("daemon", {}).get("vmrss_idle_kb"),
                         "vmhwm_kb": r.get("daemon", {}).get("vmhwm_kb"),
                         "ok_by_status": r.get("ok_by_status"), "errors_by_code": r.get("errors_by_code")}
        steps = ", ".join(f"{s['prepared']} prepared: VmRSS {s['vmrss_kb'] / 1024:.1f} MiB" for s in h)
        mem_lines.append(f"  {name}: {steps}; bytes per in-flight payment = {r.get('bytes_per_in_flight')} "
                         f"(target <= 4096); answers {r.get('ok_by_status')} errors {r.get('errors_by_code')}")

    print()
    print(f"paycoord benchmark: {secs:.0f}s per run, {naccts} accounts, daemon pool_size {pool} "
          f"(unless the run name says otherwise), total {elapsed}s")
    print("\n".join(lines))
    print()
    print("targets:")
    for c in concs:
        print(f"  S1 c{c}: daemon / pgbench-2PC = {summary.get(f's1_c{c}_vs_pgbench_2pc')} (target >= 1.0); "
              f"/ pgbench-1PC = {summary.get(f's1_c{c}_vs_pgbench_1pc')}; "
              f"/ pgbench running the daemon's own SQL = {summary.get(f's1_c{c}_vs_pgbench_daemonsql')}")
    if s2 is not None:
        print(f"  S2: {s2:.1f}/s vs bound min(1000/0.2s = 5000, ceiling {ceiling}) = {summary['s2_bound']:.1f}: "
              f"{summary['s2_vs_bound']} (target >= 0.9); with processor_max_connections=64: "
              f"{summary['s2_default_proc_conns_payments_per_s']}/s = {summary['s2_default_proc_conns_vs_bound']}")
    for name in ("s3-hot10", "s3-hot10-lat200"):
        if name in summary:
            s = summary[name]
            print(f"  {name}: {s['payments_per_s']:.1f}/s; answers {s['ok_by_status']} errors {s['errors_by_code']}; "
                  f"p50 {s['latency_ms']['p50']:.1f} ms p99 {s['latency_ms']['p99']:.1f} ms")
    print("memory (S4):")
    print("\n".join(mem_lines) if mem_lines else "  not run")
    if inv:
        print(f"invariants: {inv}")
    result = {"machine": machine(), "params": {"seconds": secs, "accounts": naccts, "pool_size": pool,
                                               "concurrency": concs, "s4_latency_ms": s4lat,
                                               "elapsed_s": elapsed},
              "summary": summary, "invariants": inv, "runs": runs, "table_markdown": "\n".join(lines)}
    with open(os.path.join(out, "bench-results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nresults: {os.path.join(out, 'bench-results.json')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pgbench":
        pgbench(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "table":
        table(sys.argv[2:])
    else:
        sys.exit(__doc__)
