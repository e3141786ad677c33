#!/usr/bin/env python3
"""Helpers for benches/peers.sh: parse each tool's output into one JSON object with the same
keys (rate, p50_us, p99_us, ...), and build the results files (JSON, Markdown, SVG chart).
Standard library only, so the harness needs no venv for its report and no plotting crate
in the build.

  report.py emit k=v ...        one JSON line; values that are JSON objects or numbers stay so
  report.py wrk < out           wrk --latency output
  report.py pgbench LOGS < out  pgbench output and its per-transaction logs (-l)
  report.py redis < csv         redis-benchmark --csv output
  report.py get KEY < json      one field, for the shell
  report.py build RESULTS.jsonl OUT_PREFIX
"""
import csv
import html
import json
import re
import sys


def emit(args):
    d = {}
    for a in args:
        k, _, v = a.partition("=")
        try:
            d[k] = json.loads(v) if v[:1] in "{[-0123456789" and v else v
        except ValueError:
            d[k] = v
    print(json.dumps(d))


def us(v):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        return None
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[m.group(2)]


def wrk(text):
    d = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        d["rate"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in", text):
        d["requests"] = int(m.group(1))
    for p in ("50", "99"):
        if m := re.search(rf"^\s+{p}%\s+(\S+)", text, re.M):
            d[f"p{p}_us"] = us(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    d["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    d["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return d


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals), max(1, -(-len(sorted_vals) * p // 1))) - 1
    return sorted_vals[int(i)]


def pgbench(text, logs):
    d = {}
    if m := re.search(r"tps = ([\d.]+) \(without initial connection time\)", text):
        d["rate"] = float(m.group(1))
    else:
        d["error"] = text.strip().splitlines()[-1] if text.strip() else "no output"
    if m := re.search(r"number of transactions actually processed: (\d+)", text):
        d["requests"] = int(m.group(1))
    if m := re.search(r"number of failed transactions: (\d+)", text):
        d["errors"] = int(m.group(1))
    lat = []
    for f in logs:
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
    lat.sort()
    d["p50_us"], d["p99_us"] = pct(lat, 0.5), pct(lat, 0.99)
    return d


def redis(text):
    rows = [r for r in csv.reader(text.splitlines()) if r and r[0] != "test"]
    if not rows:
        return {"error": text.strip()[-200:] or "no output"}
    r = rows[-1]
    return {"rate": float(r[1]), "p50_us": float(r[4]) * 1e3, "p99_us": float(r[6]) * 1e3}


# === build ===

PASS = ["direct", "spillway", "nginx", "haproxy", "envoy"]
ACCEPT = ["spillway", "spillway-one-commit-each", "spillway-one-redb-commit-each", "bare-redb", "spillway-nats", "redis", "postgresql", "nats-jetstream"]


def get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def fmt(v, unit=""):
    if v is None:
        return "–"
    if unit == "us":
        return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"
    if unit == "kb":
        return f"{v / 1024:.1f} MiB"
    if isinstance(v, float) and v < 100:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def build(results_path, prefix):
    rows = [json.loads(l) for l in open(results_path) if l.strip()]
    machine = next((r for r in rows if r.get("group") == "machine"), {})
    by = {(r["group"], r["name"]): r for r in rows if r.get("group") != "machine"}
    P = lambda n: by.get(("passthrough", n), {})
    A = lambda n: by.get(("accept", n), {})

    direct1 = get(P("direct"), "one")
    added = {}
    for n in PASS:
        for q in ("p50_us", "p99_us"):
            v, base = get(P(n), "one", q), get(direct1, q)
            if v is not None and base is not None:
                added[(n, q)] = v - base

    sw_rate = get(P("spillway"), "c50", "rate")
    pg_best = max([x for x in (get(A("postgresql"), "one", "rate"), get(A("postgresql"), "c50", "rate")) if x], default=None)
    acc = get(A("spillway"), "c50", "rate")
    million = by.get(("million", "spillway"), {})
    MiB = 1024
    targets = [
        ("passthrough req/s, spillway / HAProxy", ratio(sw_rate, get(P("haproxy"), "c50", "rate")), ">=", 1.0, "x"),
        ("passthrough req/s, spillway / nginx", ratio(sw_rate, get(P("nginx"), "c50", "rate")), ">=", 1.2, "x"),
        ("passthrough req/s, spillway / Envoy", ratio(sw_rate, get(P("envoy"), "c50", "rate")), ">=", 1.8, "x"),
        ("spillway added p99 at 1 connection (µs)", added.get(("spillway", "p99_us")), "<=", 100, "us"),
        ("spillway CPU per proxied request (µs)", get(P("spillway"), "cpu_us_per_req"), "<=", 15, "us"),
        ("spillway RSS idle (MiB)", (get(P("spillway"), "rss_idle_kb") or 0) / MiB or None, "<=", 10, "MiB"),
        ("spillway RSS peak under passthrough load (MiB)", (get(P("spillway"), "rss_peak_kb") or 0) / MiB or None, "<=", 20, "MiB"),
        ("durable accepts at 50 clients, spillway / Redis XADD always", ratio(acc, get(A("redis"), "c50", "rate")), ">=", 1.0, "x"),
        ("durable accepts at 50 clients, spillway / PostgreSQL best", ratio(acc, pg_best), ">=", 2.0, "x"),
        ("spillway accept p99 at 50 clients (ms)", (get(A("spillway"), "c50", "p99_us") or 0) / 1000 or None, "<=", 5, "ms"),
        ("durable accepts per s at 50 clients (issue 3)", acc, ">=", 40000, ""),
        ("durable accepts at 50 clients, spillway / bare HTTP-to-redb group commit",
         ratio(acc, get(A("bare-redb"), "c50", "rate")), None, None, "x"),
        ("group commit / one commit per request (a log append and fdatasync each)",
         ratio(acc, get(A("spillway-one-commit-each"), "c50", "rate")), ">=", 10, "x"),
        ("group commit / one durable redb commit per request (accept log off)",
         ratio(acc, get(A("spillway-one-redb-commit-each"), "c50", "rate")), ">=", 10, "x"),
        ("spillway RSS with 1,000,000 jobs queued (MiB)",
         (million.get("rss_peak_kb") or 0) / MiB if (million.get("jobs") or 0) >= 1_000_000 else None, "<=", 100, "MiB"),
    ]
    tgt = []
    for name, v, op, lim, unit in targets:
        # A row without a limit is a reading for context, not a target.
        met = None if v is None or op is None else (v >= lim if op == ">=" else v <= lim)
        status = "not measured" if v is None else ("reading" if op is None else ("met" if met else "not met"))
        if unit == "us" and v is not None and v < 0:
            # The direct baseline's own tail was the worse one: noise, not a result.
            met, status = None, "noise (the direct baseline's tail was higher)"
        tgt.append({"target": name, "value": v, "op": op, "limit": lim, "unit": unit, "met": met, "status": status})

    out = {"machine": machine, "results": rows, "added_latency_1conn_us": {f"{n}.{q}": v for (n, q), v in added.items()},
           "targets": tgt}
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=1)

    md = [f"# Peer benchmark {prefix.rsplit('/', 1)[-1]}", ""]
    md.append(f"Machine: {machine.get('nproc')} cores, {machine.get('cpu')}, kernel {machine.get('kernel')}, "
              f"{int(machine.get('mem_kb', 0)) // 1048576} GiB; {machine.get('seconds')} s per case; "
              f"load generators on the same cores. spillway {machine.get('spillway')}.")
    md.append("")
    md.append("Versions: " + "; ".join(f"{k}: {machine.get(k)}" for k in
                                        ("nginx", "haproxy", "envoy", "wrk", "postgres", "redis", "nats", "rustc") if machine.get(k)))
    md += ["", "## Passthrough", "",
           "| contender | req/s at 50 conns | p50 / p99 at 50 | p50 / p99 at 1 conn | added p50 / p99 at 1 conn | rate reached / p50 / p99 at half load | CPU µs/req | RSS idle / peak |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in PASS:
        r = P(n)
        if not r:
            continue
        if "skipped" in r:
            md.append(f"| {n} | skipped: {r['skipped']} |||||||")
            continue
        half = r.get("half", {})
        md.append(f"| {n} | {fmt(get(r, 'c50', 'rate'))} | {fmt(get(r, 'c50', 'p50_us'), 'us')} / {fmt(get(r, 'c50', 'p99_us'), 'us')} "
                  f"| {fmt(get(r, 'one', 'p50_us'), 'us')} / {fmt(get(r, 'one', 'p99_us'), 'us')} "
                  f"| {'–' if n == 'direct' else fmt(added.get((n, 'p50_us')), 'us') + ' / ' + fmt(added.get((n, 'p99_us')), 'us')} "
                  f"| {fmt(half.get('rate'))} / {fmt(half.get('p50_us'), 'us')} / {fmt(half.get('p99_us'), 'us')} "
                  f"| {'(upstream) ' if n == 'direct' else ''}{fmt(r.get('cpu_us_per_req'))} | {fmt(r.get('rss_idle_kb'), 'kb')} / {fmt(r.get('rss_peak_kb'), 'kb')} |")
    md += ["", "## Durable accept, 1 KiB bodies", "",
           f"Disk: {fmt(get(A('disk-fsync'), 'rate'))} synchronous 4 KiB writes/s (dd oflag=dsync).", "",
           "| contender | rate, 1 client | p50 / p99, 1 client | rate, 50 clients | p50 / p99, 50 clients |",
           "|---|---:|---:|---:|---:|"]
    for n in ACCEPT:
        r = A(n)
        if not r:
            continue
        if "skipped" in r:
            md.append(f"| {n} | skipped: {r['skipped']} ||||")
            continue
        cells = []
        for k in ("one", "c50"):
            x = r.get(k)
            if not isinstance(x, dict) or "error" in x:
                cells += [f"failed: {x.get('error') if isinstance(x, dict) else x}", ""]
                continue
            cells += [fmt(x.get("rate")), f"{fmt(x.get('p50_us'), 'us')} / {fmt(x.get('p99_us'), 'us')}"]
        note = f" ({r['settings']})" if r.get("settings") else ""
        md.append(f"| {n}{note} | " + " | ".join(cells) + " |")
    md += ["", "## Drain and memory", ""]
    for (g, n), r in by.items():
        if g == "drain":
            if "skipped" in r:
                md.append(f"- drain, {n}: skipped: {r['skipped']}")
            else:
                s = float(r["seconds"])
                md.append(f"- drain to the fast upstream, {n}: {r['jobs']:,} jobs in {s:.1f} s = "
                          f"{r['jobs'] / s if s else 0:,.0f} jobs/s ({r['left']} left); peak RSS {fmt(r.get('rss_peak_kb'), 'kb')}")
    if "skipped" in million:
        md.append(f"- 1,000,000 jobs queued: skipped: {million['skipped']}")
    elif million:
        md.append(f"- {million['jobs']:,} jobs queued ({million['queue_bytes'] / 2**30:.1f} GiB queue file): "
                  f"RSS {fmt(million.get('rss_kb'), 'kb')}, peak {fmt(million.get('rss_peak_kb'), 'kb')}")
    md += ["", "## Targets (ratios within this run)", "", "| target | value | wanted | |", "|---|---:|---:|---|"]
    for t in tgt:
        v = "–" if t["value"] is None else (f"{t['value']:,.0f}" if t["value"] >= 1000 else f"{t['value']:.2f}") + ("x" if t["unit"] == "x" else "")
        wanted = "–" if t["op"] is None else f"{t['op']} {t['limit']:,}{'x' if t['unit'] == 'x' else ''}"
        md.append(f"| {t['target']} | {v} | {wanted} | {t['status']} |")
    md += ["", f"![throughput and p99 per contender]({prefix.rsplit('/', 1)[-1]}.svg)", ""]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(md))

    panels = [
        ("Passthrough: req/s at 50 connections", [(n, get(P(n), "c50", "rate")) for n in PASS if P(n)], ""),
        ("Passthrough: p99 at 50 connections (ms)", [(n, (get(P(n), "c50", "p99_us") or 0) / 1e3 or None) for n in PASS if P(n)], "ms"),
        ("Durable accept: per s at 50 clients", [(n, get(A(n), "c50", "rate")) for n in ACCEPT if A(n)], ""),
        ("Durable accept: p99 at 50 clients (ms)", [(n, (get(A(n), "c50", "p99_us") or 0) / 1e3 or None) for n in ACCEPT if A(n)], "ms"),
    ]
    with open(prefix + ".svg", "w") as f:
        f.write(svg(panels, f"spillway and peers, {prefix.rsplit('/', 1)[-1]}, {machine.get('nproc')} cores"))
    print("\n".join(md))
    print(f"\nwrote {prefix}.json, {prefix}.md, {prefix}.svg")


def svg(panels, title):
    """Four horizontal bar charts in a 2x2 grid; spillway's bars in a stronger colour."""
    pw, ph, lab = 430, 200, 150
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * pw + 30}" height="{2 * ph + 70}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="15" y="22" font-size="15" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, bars, unit) in enumerate(panels):
        x0, y0 = 15 + (i % 2) * (pw + 10), 40 + (i // 2) * (ph + 20)
        out.append(f'<text x="{x0}" y="{y0 + 14}" font-weight="bold">{html.escape(name)}</text>')
        vals = [v for _, v in bars if v]
        top = max(vals) if vals else 1
        bh = min(24, (ph - 30) / max(1, len(bars)))
        for j, (n, v) in enumerate(bars):
            y = y0 + 24 + j * bh
            out.append(f'<text x="{x0 + lab - 6}" y="{y + bh * 0.65:.1f}" text-anchor="end">{html.escape(n)}</text>')
            if not v:
                out.append(f'<text x="{x0 + lab + 4}" y="{y + bh * 0.65:.1f}" fill="#888">skipped</text>')
                continue
            w = (pw - lab - 70) * v / top
            colour = "#d9480f" if n.startswith("spillway") else "#4c6ef5"
            out.append(f'<rect x="{x0 + lab}" y="{y + 2:.1f}" width="{w:.1f}" height="{bh - 4:.1f}" fill="{colour}"/>')
            txt = f"{v:.2f}" if unit == "ms" else f"{v:,.0f}"
            out.append(f'<text x="{x0 + lab + w + 4:.1f}" y="{y + bh * 0.65:.1f}">{txt}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "emit":
        emit(args)
    elif cmd == "wrk":
        print(json.dumps(wrk(sys.stdin.read())))
    elif cmd == "pgbench":
        print(json.dumps(pgbench(sys.stdin.read(), [a for a in args if not a.endswith("*")])))
    elif cmd == "redis":
        print(json.dumps(redis(sys.stdin.read())))
    elif cmd == "get":
        v = json.loads(sys.stdin.read() or "{}").get(args[0])
        print("" if v is None else v)
    elif cmd == "build":
        build(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
