"""report.py - the figures of test/bench/run.sh.

  report.py pgbench NAME CLIENTS SECS B0 T0 B1 T1 OUTFILE LOGDIR
      one pgbench run as JSON on stdout (tps from pgbench's summary,
      latency percentiles from its per-transaction logs, machine CPU busy
      from the /proc/stat jiffies sampled around it)
  report.py wal RUNJSON "W0" "W1" [EXTRA]
      adds PostgreSQL's WAL figures of one run to its JSON: W0 and W1 are
      "wal_sync wal_bytes wal_records wal_write" of pg_stat_wal before and
      after it; per payment = delta / the run's successful payments (a
      daemon run's succeeded_total, warm-up and drain included; pgbench's
      transactions; EXTRA: payments made in the same span besides the run's)
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
    pg0, pg1 = int(args[9]), int(args[10])
    times = []
    for tok in (args[11].split() if len(args) > 11 else []):
        try:
            times.append(float(tok))
        except ValueError:
            pass
    times = times[-2:]                          # user, system of `time` (last line)
    hz = int(args[12]) if len(args) > 12 else 100
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
    tps = float(m.group(1)) if m and not aborted else 0.0
    n = len(lat)
    pg_cpu = (pg1 - pg0) / hz
    bench_cpu = sum(times)
    machine_s = (b1 - b0) / hz
    other = machine_s - pg_cpu - bench_cpu
    print(json.dumps({
        "label": name, "kind": "pgbench", "connections": clients, "window_s": secs,
        "answers": n, "payments_per_s": tps,
        "pg_cpu_s": round(pg_cpu, 3), "pg_cpu_s_per_1000": round(pg_cpu * 1000 / n, 4) if n else 0.0,
        "bench_cpu_s": round(bench_cpu, 3),
        "other_cpu_pct": round(100.0 * other * hz / (t1 - t0), 1) if t1 > t0 else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                       "p999": pct(lat, 99.9), "max": lat[-1] if lat else 0.0},
        "failed": int(failed.group(1)) if failed else None, "aborted": aborted,
        "machine_cpu_busy_pct": round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else 0.0}))


def wal(args):
    path, w0, w1 = args[0], [int(x) for x in args[1].split()], [int(x) for x in args[2].split()]
    with open(path) as f:
        r = json.load(f)
    if r.get("kind") == "pgbench":
        n = r.get("answers") or 0
    else:
        n = r.get("succeeded_total") or r.get("answers_total") or r.get("answers") or 0
    n += int(args[3]) if len(args) > 3 else 0     # payments made besides the run's own (a warm-up)
    d = [b - a for a, b in zip(w0, w1)]
    r["wal"] = {"syncs": d[0], "bytes": d[1], "records": d[2], "writes": d[3], "payments": n,
                "syncs_per_payment": round(d[0] / n, 3) if n else None,
                "bytes_per_payment": round(d[1] / n) if n else None,
                "records_per_payment": round(d[2] / n, 2) if n else None}
    with open(path, "w") as f:
        json.dump(r, f)
        f.write("\n")


def machine(out_dir):
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
        with open(os.path.join(out_dir, "build-info.json")) as f:
            info.update(json.load(f))          # the commit the daemon was built from
            return info
    except (OSError, ValueError):
        pass
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


def median(vals):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    k = len(vals)
    return vals[k // 2] if k % 2 else (vals[k // 2 - 1] + vals[k // 2]) / 2.0


def table(args):
    out, secs, naccts, pool, maxc = args[0], float(args[1]), int(args[2]), int(args[3]), int(args[4])
    elapsed, s4lat, concs = int(args[5]), int(args[6]), [int(c) for c in args[7].split()]
    nrounds = int(args[8]) if len(args) > 8 else 1
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "run-*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        runs[os.path.basename(path)[4:-5]] = r
    inv = runs.pop("invariants", None)

    # Group the rounds of a run: "s1-c16-pool16-r2" -> "s1-c16-pool16", round 2.
    groups = {}
    for name, r in runs.items():
        m = re.match(r"(.*)-r(\d+)$", name)
        base, rnd = (m.group(1), int(m.group(2))) if m else (name, 0)
        groups.setdefault(base, {})[rnd] = r

    def tput_rounds(base):
        return {k: r["payments_per_s"] for k, r in groups.get(base, {}).items()}

    def tput(base):
        return median(tput_rounds(base).values())

    def paired_ratio(a, b):
        """Median over rounds of a/b, each ratio taken within one round."""
        ra, rb = tput_rounds(a), tput_rounds(b)
        vals = [ra[k] / rb[k] for k in ra if k in rb and rb[k]]
        m = median(vals)
        return (round(m, 2) if m is not None else None), [round(v, 2) for v in vals]

    def pick_median_round(g):
        """The round whose throughput is the median (for its latency figures)."""
        items = sorted(g.items(), key=lambda kv: kv[1]["payments_per_s"])
        return items[(len(items) - 1) // 2][1]

    rows = []
    agg = {}
    order = sorted(groups, key=lambda b: (not b.startswith("pgbench"), not b.startswith("s1"),
                                          b.replace("s1alt-", "s1-"), b))
    for base in order:
        g = groups[base]
        if any("hold" in r for r in g.values()):
            continue
        rm = pick_median_round(g)
        tp = [r["payments_per_s"] for r in g.values()]
        lat = rm.get("latency_ms", {})
        dcpu = median([r.get("daemon", {}).get("cpu_s_per_1000") for r in g.values()])
        pgcpu = median([r.get("pg_cpu_s_per_1000") for r in g.values()])
        wsync = median([(r.get("wal") or {}).get("syncs_per_payment") for r in g.values()])
        wbytes = median([(r.get("wal") or {}).get("bytes_per_payment") for r in g.values()])
        hwm = max([r.get("daemon", {}).get("vmhwm_kb", 0) for r in g.values()] or [0])
        other = median([r.get("other_cpu_pct") for r in g.values()])
        busy = median([r.get("machine_cpu_busy_pct") for r in g.values()])
        errs, st = {}, {}
        for r in g.values():
            for k, v in (r.get("errors_by_code") or {}).items():
                errs[k] = errs.get(k, 0) + v
            for k, v in (r.get("ok_by_status") or {}).items():
                if k != "succeeded":
                    st[k] = st.get(k, 0) + v
        notes = []
        if errs:
            notes.append("errors " + " ".join(f"{k}={v}" for k, v in sorted(errs.items())))
        if st:
            notes.append("status " + " ".join(f"{k}={v}" for k, v in sorted(st.items())))
        if any(r.get("aborted") for r in g.values()):
            notes.append("pgbench aborted")
        vs2 = vs1 = vsd = None
        vsbase = None
        if base.startswith("s1alt-") and base.replace("s1alt-", "s1-") in groups:
            vsbase = paired_ratio(base, base.replace("s1alt-", "s1-"))[0]
            notes.append(f"BENCH_ALT_DAEMON / this build = {vsbase} (paired rounds)")
        if "s1ref-pools" in groups and (re.match(r"s1-c%d-pool(\d+)$" % maxc, base) and int(re.match(r"s1-c%d-pool(\d+)$" % maxc, base).group(1)) != pool
                                        or base.endswith("-lognotice")):
            notes.append(f"x adjacent reference run {round(median(tp) / tput('s1ref-pools'), 2)}")
        if base == "s2-pc1100" and "s1ref-s2" in groups:
            notes.append(f"x adjacent reference run {round(median(tp) / tput('s1ref-s2'), 2)}")
        m = re.match(r"s1(?:alt)?-c(\d+)-pool", base)
        if m:
            c = m.group(1)
            vs2 = paired_ratio(base, f"pgbench-2pc-c{c}")[0] if f"pgbench-2pc-c{c}" in groups else None
            vs1 = paired_ratio(base, f"pgbench-1pc-c{c}")[0] if f"pgbench-1pc-c{c}" in groups else None
            vsd = paired_ratio(base, f"pgbench-daemonsql-c{c}")[0] if f"pgbench-daemonsql-c{c}" in groups else None
            # pool variants ran once, outside the rounds: compare with the median ceiling
            if vs2 is None and tput(f"pgbench-2pc-c{c}"):
                vs2 = round(median(tp) / tput(f"pgbench-2pc-c{c}"), 2)
                vs1 = round(median(tp) / tput(f"pgbench-1pc-c{c}"), 2) if tput(f"pgbench-1pc-c{c}") else None
        inflight = (rm.get("connections") or 0) * (rm.get("depth") or 1)
        spread = f"{min(tp):.0f}-{max(tp):.0f}" if len(tp) > 1 else ""
        agg[base] = {"rounds": len(g), "payments_per_s_median": median(tp), "payments_per_s_rounds": tp,
                     "latency_ms_median_round": lat, "daemon_cpu_s_per_1000": dcpu, "pg_cpu_s_per_1000": pgcpu,
                     "wal_syncs_per_payment": wsync, "wal_bytes_per_payment": wbytes,
                     "daemon_vmhwm_kb": hwm or None, "machine_cpu_busy_pct": busy, "other_cpu_pct": other,
                     "errors_by_code": errs, "other_statuses": st,
                     "vs_pgbench_2pc": vs2, "vs_pgbench_1pc": vs1, "vs_pgbench_daemonsql": vsd,
                     "vs_baseline_build": vsbase}
        rows.append([base, inflight, fmt(median(tp)), spread, fmt(lat.get("p50"), 2), fmt(lat.get("p99"), 2),
                     fmt(lat.get("p999"), 2), fmt(dcpu, 3), fmt(pgcpu, 3), fmt(wsync, 2),
                     fmt(round(wbytes) if wbytes is not None else None),
                     fmt(round(hwm / 1024.0, 1)) if hwm else "-", fmt(busy, 0), fmt(other, 0),
                     fmt(vs2, 2), fmt(vs1, 2), "; ".join(notes)])

    hdr = ["run", "in flight", "payments/s", "rounds min-max", "p50 ms", "p99 ms", "p99.9 ms",
           "daemon cpu s/1000", "postgres cpu s/1000", "WAL flushes/payment", "WAL bytes/payment",
           "daemon VmHWM MiB", "machine cpu %", "others' cpu %",
           "x pgb-2PC", "x pgb-1PC", "notes"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")

    summary = {"rounds": nrounds}
    for c in concs:
        base = f"s1-c{c}-pool{pool}"
        for kind in ("2pc", "1pc", "daemonsql"):
            if f"pgbench-{kind}-c{c}" in groups and base in groups:
                med, per = paired_ratio(base, f"pgbench-{kind}-c{c}")
                summary[f"s1_c{c}_vs_pgbench_{kind}"] = med
                summary[f"s1_c{c}_vs_pgbench_{kind}_rounds"] = per
        alt = f"s1alt-c{c}-pool{pool}"
        if alt in groups and base in groups:
            med, per = paired_ratio(base, alt)
            summary[f"s1_c{c}_vs_alt_daemon"] = med
            summary[f"s1_c{c}_vs_alt_daemon_rounds"] = per
    ceiling = tput("s1ref-s2") or tput(f"s1-c{maxc}-pool{pool}")
    s2 = tput("s2-pc1100")
    if s2 is not None:
        bound_latency = 1000 / 0.200
        bound = min(bound_latency, ceiling) if ceiling else bound_latency
        summary.update({"s2_bound_in_flight_over_latency": bound_latency, "s2_ceiling_daemon_s1": ceiling,
                        "s2_ceiling_from": "s1ref-s2 (run just before S2)" if tput("s1ref-s2") else "S1 rounds",
                        "s2_bound": bound, "s2_payments_per_s": s2, "s2_vs_bound": round(s2 / bound, 2),
                        "s2_default_proc_conns_payments_per_s": tput("s2-pc64"),
                        "s2_default_proc_conns_vs_bound": round(tput("s2-pc64") / bound, 2) if tput("s2-pc64") else None,
                        "s2_pgbench_2pc_ceiling": tput(f"pgbench-2pc-c{maxc}")})
    for name in ("s3-hot10", "s3-hot10-lat200", "s3alt-hot10-lat200"):
        if name in runs:
            summary[name] = {"payments_per_s": runs[name]["payments_per_s"],
                             "ok_by_status": runs[name].get("ok_by_status"),
                             "errors_by_code": runs[name].get("errors_by_code"),
                             "latency_ms": runs[name].get("latency_ms")}
    mem_lines = []
    mem_names = {"s4-hold": "S4, each payment's request open at a slow processor",
                 "s4alt-hold": "S4 with BENCH_ALT_DAEMON",
                 "s4-pending": "S4b, each payment answered 'pending' by the processor, polled"}
    for name in mem_names:
        r = runs.get(name)
        if not r:
            continue
        h = r.get("hold", [])
        bpf = r.get("bytes_per_in_flight")
        w = r.get("wal") or {}
        summary[name] = {"steps": h, "bytes_per_in_flight": bpf, "not_measured": r.get("not_measured"),
                         "bytes_per_in_flight_from_idle": r.get("bytes_per_in_flight_from_idle"),
                         "vmrss_idle_kb": r.get("daemon", {}).get("vmrss_idle_kb"),
                         "vmhwm_kb": r.get("daemon", {}).get("vmhwm_kb"), "wal": w,
                         "ok_by_status": r.get("ok_by_status"), "errors_by_code": r.get("errors_by_code")}
        steps = "; ".join(
            f"step {s['target']}: in_flight {s['in_flight']}, processor requests open {s['processor_in_flight']}, "
            f"prepared {s['prepared']}, VmRSS {s['vmrss_kb'] / 1024:.1f} MiB"
            + ("" if s.get("reached") else f" (NOT REACHED: {s.get('why')})") for s in h)
        if bpf is None:
            fig = f"bytes per in-flight payment: not measured: {r.get('not_measured')}"
        else:
            fig = (f"bytes per in-flight payment = {bpf:.0f} (target <= 4096; from idle to the first step "
                   f"{r.get('bytes_per_in_flight_from_idle'):.0f}, which includes start-up growth)")
            if not 512 <= bpf <= 262144:
                fig += " IMPLAUSIBLE: look at the steps"
        mem_lines.append(f"  {name} ({mem_names[name]}, mode {r.get('hold_mode')}): "
                         f"idle VmRSS {r.get('daemon', {}).get('vmrss_idle_kb', 0) / 1024:.1f} MiB; {steps}")
        mem_lines.append(f"    {fig}")
        mem_lines.append(f"    answers {r.get('ok_by_status')} errors {r.get('errors_by_code')}; "
                         f"WAL {w.get('syncs_per_payment')} flushes, {w.get('bytes_per_payment')} bytes per payment")

    print()
    print(f"paycoord benchmark: {secs:.0f}s per run, {nrounds} interleaved rounds of the S1/pgbench block "
          f"(medians), {naccts} accounts, daemon pool_size {pool} unless the name says otherwise; "
          f"total {elapsed}s")
    print("\n".join(lines))
    print()
    info = machine(out)
    alt_name = f"{info.get('alt_daemon') or '?'}, {info.get('alt_daemon_version') or '?'}"
    print("targets:")
    for c in concs:
        print(f"  S1 c{c}: daemon / pgbench-2PC = {summary.get(f's1_c{c}_vs_pgbench_2pc')} "
              f"(rounds {summary.get(f's1_c{c}_vs_pgbench_2pc_rounds')}; target >= 1.0); "
              f"/ pgbench-1PC = {summary.get(f's1_c{c}_vs_pgbench_1pc')}; "
              f"/ pgbench running the daemon's SQL = {summary.get(f's1_c{c}_vs_pgbench_daemonsql')}")
        if f"s1_c{c}_vs_alt_daemon" in summary:
            spread = tput_rounds(f"s1-c{c}-pool{pool}").values()
            print(f"  S1 c{c}: this build / BENCH_ALT_DAEMON ({alt_name}) = {summary[f's1_c{c}_vs_alt_daemon']} "
                  f"(rounds {summary[f's1_c{c}_vs_alt_daemon_rounds']}; this build's own rounds "
                  f"{min(spread):.0f}-{max(spread):.0f}/s)")
    if s2 is not None:
        print(f"  S2: {s2:.1f}/s vs bound min(1000/0.2s = 5000, daemon ceiling {ceiling}) = {summary['s2_bound']:.1f}: "
              f"{summary['s2_vs_bound']} (target >= 0.9); with processor_max_connections=64: "
              f"{summary['s2_default_proc_conns_payments_per_s']}/s = {summary['s2_default_proc_conns_vs_bound']}")
    for name in ("s3-hot10", "s3-hot10-lat200", "s3alt-hot10-lat200"):
        if name in summary:
            x = summary[name]
            print(f"  {name}: {x['payments_per_s']:.1f}/s; answers {x['ok_by_status']} errors {x['errors_by_code']}; "
                  f"p50 {x['latency_ms']['p50']:.1f} ms p99 {x['latency_ms']['p99']:.1f} ms")
    print("memory (S4):")
    print("\n".join(mem_lines) if mem_lines else "  not run")
    if inv:
        print(f"invariants: {inv}")
    result = {"machine": info, "params": {"seconds": secs, "rounds": nrounds, "accounts": naccts,
                                               "pool_size": pool, "concurrency": concs, "s4_latency_ms": s4lat,
                                               "elapsed_s": elapsed},
              "summary": summary, "aggregated": agg, "invariants": inv, "runs": runs,
              "table_markdown": "\n".join(lines)}
    with open(os.path.join(out, "bench-results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nresults: {os.path.join(out, 'bench-results.json')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "pgbench":
        pgbench(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "wal":
        wal(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "table":
        table(sys.argv[2:])
    else:
        sys.exit(__doc__)
