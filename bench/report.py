"""Turn one run's records into bench/results/<stamp>.md, .json and PNG plots, and put the
summary table into bench/README.md between its results markers.

Every figure is the median over rounds; with more than one round its spread is shown as
±half the min-max range, in percent of the median. Ratios divide a tunnel's median by
HAProxy's and by Envoy tcp_proxy's median in the same run (lower is better for costs).
"""

import argparse
import json
import os
import statistics
from collections import defaultdict

PEERS = ["envoy-tcp", "envoy-http", "haproxy", "stunnel", "nginx"]
ORDER = ["runnel"] + PEERS + ["plain", "direct"]
REFS = [("haproxy", "×haproxy"), ("envoy-tcp", "×envoy-tcp")]
# runnel in red in every plot; the peers and baselines keep one colour each.
COLORS = {"runnel": "tab:red", "envoy-tcp": "tab:blue", "envoy-http": "tab:cyan", "haproxy": "tab:orange",
          "stunnel": "tab:purple", "nginx": "tab:green", "plain": "tab:gray", "direct": "black"}
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def main() -> int:
    a = parse_args()
    run = load(a.run_dir)
    summary = summarize(run["records"])
    tunnels = [t for t in ORDER if t in summary]
    os.makedirs(a.results, exist_ok=True)
    base = os.path.join(a.results, a.stamp)
    plots = make_plots(run, summary, tunnels, base)
    md = render_markdown(run, summary, tunnels, plots, a.stamp)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": run["meta"], "versions": run["versions"], "summary": summary,
                   "targets": targets(summary), "records": run["records"],
                   "runnel_metrics": run["runnel_metrics"]}, f, indent=1)
    if a.readme:
        update_readme(a.readme, run, summary, tunnels, plots, a.stamp)
    print(md)
    return 0


# --- loading and aggregation --------------------------------------------------------------


def load(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "records.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    out = {"records": records, "run_dir": run_dir}
    out["runnel_metrics"] = {}
    for f in sorted(os.listdir(run_dir)):
        if f.startswith("runnel-metrics-") and f.endswith(".txt"):
            lines = open(os.path.join(run_dir, f), encoding="utf-8").read().splitlines()
            out["runnel_metrics"][f[15:-4]] = [l for l in lines if l and not l.startswith("#")]
    for name in ("meta", "versions"):
        path = os.path.join(run_dir, f"{name}.json")
        out[name] = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    return out


def summarize(records: list[dict]) -> dict:
    """tunnel -> workload -> metric -> {median, min, max, n}, over the rounds."""
    values: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                values[r["tunnel"] or "-"][r["workload"]][k].append(v)
        values[r["tunnel"] or "-"][r["workload"]]["failed"].append(0 if r.get("ok", True) else 1)
    return {t: {w: {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
                    for k, v in ms.items()} for w, ms in ws.items()} for t, ws in values.items()}


def get(summary, tunnel, workload, metric):
    return summary.get(tunnel, {}).get(workload, {}).get(metric, {}).get("median")


def cell(summary, tunnel, workload, metric, digits=1):
    s = summary.get(tunnel, {}).get(workload, {}).get(metric)
    if not s:
        return "n/a"
    text = fmt(s["median"], digits)
    if s["n"] > 1 and s["median"]:
        text += f" ±{(s['max'] - s['min']) / 2 / abs(s['median']) * 100:.0f}%"
    return text


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(summary, tunnel, ref, workload, metric):
    v, r = get(summary, tunnel, workload, metric), get(summary, ref, workload, metric)
    return f"{v / r:.2f}" if v is not None and r else "n/a"


# --- markdown -------------------------------------------------------------------------------

# (title, workload, [(column, metric, digits)], metric the ratios are taken on)
TABLES = [
    ("1. HTTP/1.1 keep-alive, 1 KiB GET (wrk, 32 connections)", "keepalive",
     [("CPU µs/req", "cpu_us_per_req", 1), ("req/s", "rps", 0), ("p50 ms", "p50_ms", 2),
      ("p99 ms", "p99_ms", 2)], "cpu_us_per_req"),
    ("2. New connection per request (wrk, `Connection: close`)", "newconn",
     [("CPU µs/req", "cpu_us_per_req", 1), ("req/s", "rps", 0), ("p50 ms", "p50_ms", 2),
      ("p99 ms", "p99_ms", 2), ("gateway full hs", "gw_full_handshakes", 0),
      ("gateway resumed hs", "gw_resumed_handshakes", 0)], "cpu_us_per_req"),
    ("3. h2c with prior knowledge (h2load, 32 connections × 10 streams)", "h2c",
     [("CPU µs/req", "cpu_us_per_req", 1), ("req/s", "rps", 0), ("mean ms", "mean_ms", 2)],
     "cpu_us_per_req"),
    ("4a. Bulk download (curl, 1 GiB)", "download",
     [("CPU s/GB", "cpu_s_per_gb", 2), ("MB/s", "mb_per_s", 0)], "cpu_s_per_gb"),
    ("4b. Bulk upload (curl -T, 256 MiB)", "upload",
     [("CPU s/GB", "cpu_s_per_gb", 2), ("MB/s", "mb_per_s", 0)], "cpu_s_per_gb"),
    ("6. Start-up: fork → port accepting → first proxied 200 (PSS when idle)", "startup",
     [("ms to first 200", "first_200_ms", 1), ("ms to accept", "accept_ms", 1),
      ("idle PSS KiB", "pss_idle_kib", 0)], "first_200_ms"),
]


def render_markdown(run, summary, tunnels, plots, stamp) -> str:
    meta, versions = run["meta"], run["versions"]
    out = [f"# runnel bench: {stamp}", ""]
    out += conditions(meta, versions)
    out += ["", "## Targets (runnel against the peers in this run)", ""]
    out += targets_table(targets(summary))
    for title, workload, cols, rmetric in TABLES:
        out += ["", f"## {title}", ""]
        out += workload_table(summary, tunnels, workload, cols, rmetric)
    out += ["", "## 5. Memory: idle keep-alive connections held through the tunnel", ""]
    out += memory_table(summary, tunnels, meta.get("params", {}).get("idle_counts", [1000]))
    out += ["", "## 7. Latency with a round trip (new connection per request, 1 KiB GET)", ""]
    out += latency_table(summary, tunnels, meta.get("params", {}).get("rtts_ms", [1, 5]))
    out += ["", "## runnel's own counters (from its /metrics, at the end of each phase)", ""]
    out += runnel_counters(run["runnel_metrics"])
    out += ["", "## Physical limits (same run)", ""]
    out += limits(summary)
    if plots:
        out += ["", "## Plots", ""] + [f"![{name}]({os.path.basename(p)})" for name, p in plots]
    failed = [(t, w) for t, ws in summary.items() for w, ms in ws.items()
              if ms.get("failed", {}).get("max")]
    out += ["", "## Failures", ""]
    out += [f"- {t}: {w}" for t, w in failed] or ["none"]
    return "\n".join(out) + "\n"


def conditions(meta, versions) -> list[str]:
    m, p = meta.get("machine", {}), meta.get("params", {})
    lines = [
        f"- **Command:** `{meta.get('command', '?')}`",
        f"- **Commit:** {meta.get('commit', '?')} ({meta.get('uncommitted_files', '?')} uncommitted files)",
        f"- **Machine:** {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('mem_gib', '?')} GiB, "
        f"{m.get('os', '?')}, kernel {m.get('kernel', '?')}",
        f"- **Pinning:** tunnel alone on CPU {p.get('tunnel_cpu')}; load generators, gateway, "
        f"backend and delayer on CPU {p.get('load_cpu')}",
        f"- **Rounds:** {p.get('rounds')} (tunnels rotate order each round), {p.get('duration_s')} s per "
        f"load; figures are medians, ± is half the min–max range over rounds",
        f"- **Load average** (1/5/15 min) at start: {meta.get('loadavg_start', '?')}, at end: "
        f"{' '.join(meta.get('loadavg_end', []))} (above ~2 means other work shared the machine)",
        "- **Versions:** " + "; ".join(f"{k}: {v}" for k, v in versions.items()),
    ]
    return lines


def workload_table(summary, tunnels, workload, cols, rmetric) -> list[str]:
    head = ["tunnel"] + [c for c, _, _ in cols[:1]] + [r for _, r in REFS] + [c for c, _, _ in cols[1:]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tunnels:
        if workload not in summary.get(t, {}):
            continue
        c0 = cols[0]
        row = [t, cell(summary, t, workload, c0[1], c0[2])]
        row += [ratio(summary, t, ref, workload, rmetric) for ref, _ in REFS]
        row += [cell(summary, t, workload, m, d) for _, m, d in cols[1:]]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def grouped_table(summary, tunnels, groups, first, last, skip_missing) -> list[str]:
    """One group of columns per workload: `first` (header, metric, digits), its ratios to
    the reference tunnels, then `last`; headers are formatted with the group's key."""
    head = ["tunnel"]
    for key, _ in groups:
        head += [first[0].format(key), *(r for _, r in REFS), last[0].format(key)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tunnels:
        if skip_missing and not any(w in summary.get(t, {}) for _, w in groups):
            continue
        row = [t]
        for _, w in groups:
            row += [cell(summary, t, w, first[1], first[2])]
            row += [ratio(summary, t, ref, w, first[1]) for ref, _ in REFS]
            row += [cell(summary, t, w, last[1], last[2])]
        rows.append("| " + " | ".join(row) + " |")
    return rows


def memory_table(summary, tunnels, counts) -> list[str]:
    return grouped_table(summary, tunnels, [(n, f"idle_{n}") for n in counts],
                         ("KiB/conn @{}", "pss_per_conn_kib", 1), ("held @{}", "held", 0), False)


def latency_table(summary, tunnels, rtts) -> list[str]:
    rows = grouped_table(summary, tunnels, [(r, f"rtt{r}") for r in rtts],
                         ("p50 ms @{} ms", "p50_ms", 2), ("p99 ms @{} ms", "p99_ms", 2), True)
    s = summary.get("delayer", {}).get("delay_check", {})
    if s:
        rows += ["", "Delayer check: a TCP connect to the delayed gateway port (one full round trip) "
                 f"took {fmt(s['connect_ms']['min'], 2)}–{fmt(s['connect_ms']['max'], 2)} ms over the "
                 "RTTs and rounds of this run (best of 5 per check)."]
    return rows


def runnel_counters(metrics: dict) -> list[str]:
    """Pool hits and misses, full and resumed handshakes: why runnel's figures are what they are."""
    if not metrics:
        return ["runnel was not measured in this run."]
    rows = ["| phase | pool hits | pool misses | full handshakes | resumed handshakes |", "|---|---|---|---|---|"]
    for label, lines in metrics.items():
        def total(prefix, *needles):
            return sum(float(l.rsplit(" ", 1)[1]) for l in lines
                       if l.startswith(prefix) and all(n in l for n in needles))
        hit, miss = total("runnel_pool_checkouts_total", 'result="hit"'), \
            total("runnel_pool_checkouts_total", 'result="miss"')
        full = total("runnel_upstream_handshakes_total", 'kind="full"', 'result="ok"')
        resumed = total("runnel_upstream_handshakes_total", 'kind="resumed"', 'result="ok"')
        rows.append(f"| {label} | {hit:.0f} | {miss:.0f} | {full:.0f} | {resumed:.0f} |")
    rows += ["", "`throughput-rN` covers workloads 6, 5, 1, 2, 3 and 4 of round N on one process; "
             "`rttX-rN` the workload 7 process at X ms RTT. Counters are cumulative per process."]
    return rows


def limits(summary) -> list[str]:
    s = summary.get("-", {}).get("speed", {})
    rows = []
    if s:
        rows.append(f"- `openssl speed` on the tunnel core, 16 KiB blocks: AES-128-GCM "
                    f"{fmt(s.get('aes_128_gcm_mb_per_s', {}).get('median'), 0)} MB/s, ChaCha20-Poly1305 "
                    f"{fmt(s.get('chacha20_poly1305_mb_per_s', {}).get('median'), 0)} MB/s "
                    "(one direction; a tunnel decrypts nothing and encrypts what it forwards upstream, "
                    "decrypts what comes back).")
    rows.append("- `plain` (HAProxy relay, no TLS) and `direct` (load generator straight to nginx) rows in "
                "the tables above are the floor: what relaying costs without TLS, and the path without a "
                "tunnel or gateway.")
    return rows


# --- targets --------------------------------------------------------------------------------


def targets(summary) -> list[dict]:
    """The issue's targets for runnel, each with the figure, the bound and where it stands."""
    if "runnel" not in summary:
        return []

    def best(workload, metric):
        vals = [(get(summary, p, workload, metric), p) for p in PEERS]
        vals = [(v, p) for v, p in vals if v is not None]
        return min(vals) if vals else (None, None)

    out = []

    def add(name, value, bound, basis):
        met = None if value is None or bound is None else value <= bound
        out.append({"target": name, "runnel": value, "bound": bound, "basis": basis, "met": met})

    hap = get(summary, "haproxy", "keepalive", "cpu_us_per_req")
    add("keep-alive CPU µs/req ≤ 0.55× HAProxy", get(summary, "runnel", "keepalive", "cpu_us_per_req"),
        hap * 0.55 if hap else None, f"haproxy {fmt(hap)}")
    b, p = best("newconn", "cpu_us_per_req")
    add("new-conn CPU µs/req ≤ 0.8× best peer", get(summary, "runnel", "newconn", "cpu_us_per_req"),
        b * 0.8 if b else None, f"{p} {fmt(b)}")
    for rtt in (1, 5):
        eh = get(summary, "envoy-http", f"rtt{rtt}", "p50_ms")
        add(f"p50 @{rtt} ms RTT ≤ Envoy HTTP", get(summary, "runnel", f"rtt{rtt}", "p50_ms"), eh,
            f"envoy-http {fmt(eh, 2)}")
    hp = get(summary, "haproxy", "rtt5", "p50_ms")
    add("p50 @5 ms RTT ≤ 0.4× HAProxy", get(summary, "runnel", "rtt5", "p50_ms"),
        hp * 0.4 if hp else None, f"haproxy {fmt(hp, 2)}")
    for w in ("download", "upload"):
        b, p = best(w, "cpu_s_per_gb")
        add(f"{w} CPU s/GB ≤ 0.8× best peer", get(summary, "runnel", w, "cpu_s_per_gb"),
            b * 0.8 if b else None, f"{p} {fmt(b, 2)}")
    idle = [w for w in summary["runnel"] if w.startswith("idle_")]
    for w in sorted(idle, key=lambda w: int(w[5:])):
        add(f"PSS per idle conn @{w[5:]} ≤ 8 KiB", get(summary, "runnel", w, "pss_per_conn_kib"), 8.0, "fixed")
    add("idle process PSS ≤ 3 MB (2,930 KiB)", get(summary, "runnel", "startup", "pss_idle_kib"), 2929.7, "fixed")
    b, p = best("startup", "first_200_ms")
    add("start-up to first 200 ≤ 0.5× fastest peer", get(summary, "runnel", "startup", "first_200_ms"),
        b * 0.5 if b else None, f"{p} {fmt(b)}")
    return out


def targets_table(ts) -> list[str]:
    if not ts:
        return ["runnel was not measured in this run."]
    rows = ["| target | runnel | bound | basis (same run) | met |", "|---|---|---|---|---|"]
    for t in ts:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        rows.append(f"| {t['target']} | {fmt(t['runnel'], 2)} | {fmt(t['bound'], 2)} | {t['basis']} | {met} |")
    return rows


# --- plots ------------------------------------------------------------------------------------


def make_plots(run, summary, tunnels, base) -> list[tuple[str, str]]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots = []
    samples_dir = os.path.join(run["run_dir"], "samples")
    rtts = run["meta"].get("params", {}).get("rtts_ms", [1, 5])
    fig, axes = plt.subplots(1, len(rtts), figsize=(6 * len(rtts), 4.5), squeeze=False)
    any_samples = False
    for ax, rtt in zip(axes[0], rtts):
        for t in tunnels:
            xs = []
            for f in sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []:
                if f.startswith(f"rtt{rtt}-{t}-r"):
                    xs += [float(x) for x in open(os.path.join(samples_dir, f)) if x.strip()]
            if xs:
                any_samples = True
                xs.sort()
                ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=t,
                        color=COLORS.get(t), linewidth=2.4 if t == "runnel" else 1.2)
        ax.set_title(f"new connection per request, {rtt} ms RTT to the gateway")
        ax.set_xlabel("latency, ms")
        ax.set_xlim(left=0)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if any_samples:
        fig.tight_layout()
        fig.savefig(base + "-latency-cdf.png", dpi=90)
        plots.append(("latency CDFs", base + "-latency-cdf.png"))
    plt.close(fig)

    bar_sets = [("cpu-per-request", "tunnel CPU per request, µs (lower is better)",
                 [("keep-alive", "keepalive"), ("new conn", "newconn"), ("h2c", "h2c")], "cpu_us_per_req"),
                ("cpu-per-gb", "tunnel CPU per GB, s (lower is better)",
                 [("download", "download"), ("upload", "upload")], "cpu_s_per_gb")]
    for slug, title, groups, metric in bar_sets:
        names = [t for t in tunnels if any(get(summary, t, w, metric) for _, w in groups)]
        if not names:
            continue
        # One panel per workload: their scales differ by 100x (new connections vs reuse).
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.2), squeeze=False)
        for ax, (label, w) in zip(axes[0], groups):
            vals = [get(summary, t, w, metric) or 0 for t in names]
            colors = ["tab:red" if t == "runnel" else "tab:gray" if t in ("plain", "direct")
                      else "tab:blue" for t in names]
            bars = ax.bar(names, vals, color=colors)
            ax.bar_label(bars, fmt="%.1f" if metric == "cpu_us_per_req" else "%.2f", fontsize=7)
            ax.set_title(label)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(f"{base}-{slug}.png", dpi=90)
        plt.close(fig)
        plots.append((title, f"{base}-{slug}.png"))
    return plots


# --- README -----------------------------------------------------------------------------------


def update_readme(path, run, summary, tunnels, plots, stamp):
    if not os.path.exists(path):
        return
    text = open(path, encoding="utf-8").read()
    if README_BEGIN not in text or README_END not in text:
        return
    rtts = run["meta"].get("params", {}).get("rtts_ms", [1, 5])
    counts = run["meta"].get("params", {}).get("idle_counts", [1000])
    head = ["tunnel", "keep-alive CPU µs/req", "new-conn CPU µs/req", "h2c CPU µs/req",
            "download CPU s/GB", "upload CPU s/GB", f"PSS KiB/conn @{counts[-1]}", "idle PSS KiB",
            "ms to first 200"] + [f"p50 ms @{r} ms RTT" for r in rtts]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tunnels:
        row = [t, cell(summary, t, "keepalive", "cpu_us_per_req"), cell(summary, t, "newconn", "cpu_us_per_req"),
               cell(summary, t, "h2c", "cpu_us_per_req"), cell(summary, t, "download", "cpu_s_per_gb", 2),
               cell(summary, t, "upload", "cpu_s_per_gb", 2),
               cell(summary, t, f"idle_{counts[-1]}", "pss_per_conn_kib"),
               cell(summary, t, "startup", "pss_idle_kib", 0), cell(summary, t, "startup", "first_200_ms")]
        row += [cell(summary, t, f"rtt{r}", "p50_ms", 2) for r in rtts]
        if any(c != "n/a" for c in row[1:]):  # direct has no tunnel to cost
            rows.append("| " + " | ".join(row) + " |")
    meta = run["meta"]
    block = [README_BEGIN, "",
             f"Latest run: [`results/{stamp}.md`](results/{stamp}.md) — `{meta.get('command', '?')}`, "
             f"commit {meta.get('commit', '?')} ({meta.get('uncommitted_files', '?')} uncommitted files), "
             f"{meta.get('params', {}).get('rounds', '?')} round(s), load average at start "
             f"{meta.get('loadavg_start', '?')}. `direct` (no tunnel) is in the results file.", ""]
    block += rows + [""]
    block += ["Targets for runnel in that run:", ""] + targets_table(targets(summary)) + [""]
    block += [f"![{name}](results/{os.path.basename(p)})" for name, p in plots]
    block += ["", README_END]
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + "\n".join(block) + text[end:])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--readme", default="", help="README.md whose results block to replace")
    p.add_argument("--stamp", required=True)
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
