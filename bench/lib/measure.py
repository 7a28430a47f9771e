"""One measurement of one tunnel: run a load generator, read the tunnel's cost, append a
JSON record to the run's records file.

Every subcommand is bounded in time (and the load generators in duration or count) and
talks to 127.0.0.1 only. The tunnel's CPU is read before and after the load, so the
figure is the tunnel's own work for exactly that load. run.sh pins this process (and so
the load generators it starts) to the core the tunnel is not on.

Usage: measure.py SUBCOMMAND --out FILE --tunnel NAME --round N [options]
"""

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import procstat

HOST = "127.0.0.1"


def main() -> int:
    args = parse_args()
    result = SUBCOMMANDS[args.cmd](args)
    record = {"tunnel": args.tunnel, "round": args.round, "workload": args.workload or args.cmd}
    record.update(result)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return 0 if result.get("ok", True) else 1


# --- HTTP load: wrk and h2load ----------------------------------------------------------


def cmd_wrk(a) -> dict:
    """Workloads 1 and 2: 1 KiB GETs over keep-alive, or a new connection per request."""
    cmd = ["wrk", "-t1", f"-c{a.conns}", f"-d{a.duration}s", "--latency", "--timeout", "5s"]
    if a.close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://{HOST}:{a.port}{a.path}")
    gw_before = gateway_handshakes(a.gw_admin, a.gw_listener) if a.gw_listener else None
    cpu0 = procstat.cpu_seconds(a.pid)
    out = run(cmd, a.duration + 30)
    cpu = procstat.cpu_seconds(a.pid) - cpu0
    r = parse_wrk(out)
    r.update(cmd=" ".join(cmd), cpu_s=round(cpu, 3))
    r["cpu_us_per_req"] = round(cpu * 1e6 / r["requests"], 2) if a.pid and r["requests"] else None
    r["ok"] = r["requests"] > 0 and r["errors"] <= r["requests"] * 0.01
    if gw_before is not None:
        gw_after = gateway_handshakes(a.gw_admin, a.gw_listener)
        full = (gw_after[0] - gw_after[1]) - (gw_before[0] - gw_before[1])
        resumed = gw_after[1] - gw_before[1]
        r.update(gw_full_handshakes=full, gw_resumed_handshakes=resumed)
    return r


def parse_wrk(out: str) -> dict:
    def dur_ms(s: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s|m)", s)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    reqs = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    requests = int(reqs.group(1)) if reqs else 0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "requests": requests,
        "errors": errors,
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": round(dur_ms(pct["50"]), 3) if "50" in pct else None,
        "p99_ms": round(dur_ms(pct["99"]), 3) if "99" in pct else None,
    }


def gateway_handshakes(admin_port: int, listener_port: int) -> tuple[int, int]:
    """(handshakes, resumed) seen by the gateway's mTLS listener, from its admin stats."""
    url = f"http://{HOST}:{admin_port}/stats?filter=ssl\\.(handshake|session_reused)$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    stats = dict(re.findall(rf"listener\.127\.0\.0\.1_{listener_port}\.ssl\.(\w+): (\d+)", text))
    return int(stats.get("handshake", 0)), int(stats.get("session_reused", 0))


def cmd_h2load(a) -> dict:
    """Workload 3: h2c with prior knowledge, many streams per connection."""
    cmd = ["h2load", "-t1", f"-c{a.conns}", f"-m{a.streams}", f"-D{a.duration}",
           f"http://{HOST}:{a.port}{a.path}"]
    cpu0 = procstat.cpu_seconds(a.pid)
    out = run(cmd, a.duration + 30)
    cpu = procstat.cpu_seconds(a.pid) - cpu0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded", out)
    done = int(m.group(4)) if m else 0
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    r = {
        "cmd": " ".join(cmd), "requests": done, "rps": float(rps.group(1)) if rps else 0.0,
        "mean_ms": _h2_ms(mean.group(1)) if mean else None, "cpu_s": round(cpu, 3),
        "cpu_us_per_req": round(cpu * 1e6 / done, 2) if a.pid and done else None,
    }
    r["ok"] = done > 0
    return r


def _h2_ms(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", s)
    return round(float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)], 3)


# --- bulk transfers ---------------------------------------------------------------------


def cmd_bulk(a) -> dict:
    """Workload 4: one large download or upload through the tunnel, with curl."""
    url = f"http://{HOST}:{a.port}"
    if a.upload:
        cmd = ["curl", "-sS", "-o", "/dev/null", "-H", "Expect:", "-T", a.upload, f"{url}/upload",
               "-w", "%{http_code} %{size_upload} %{time_total}"]
    else:
        cmd = ["curl", "-sS", "-o", "/dev/null", f"{url}{a.path}",
               "-w", "%{http_code} %{size_download} %{time_total}"]
    cmd += ["--max-time", str(a.timeout)]
    cpu0 = procstat.cpu_seconds(a.pid)
    out = run(cmd, a.timeout + 10)
    cpu = procstat.cpu_seconds(a.pid) - cpu0
    try:
        code, size, secs = out.split()[-3:]
        size, secs = int(float(size)), float(secs)
    except ValueError:
        code, size, secs = "000", 0, 0.0
    gb = size / 1e9
    return {
        "cmd": " ".join(cmd), "http_code": code, "bytes": size, "seconds": round(secs, 3),
        "mb_per_s": round(size / 1e6 / secs, 1) if secs else None, "cpu_s": round(cpu, 3),
        "cpu_s_per_gb": round(cpu / gb, 3) if a.pid and gb else None,
        "ok": code == "200" and size >= a.expect_bytes,
    }


# --- memory with idle connections --------------------------------------------------------


def cmd_idle(a) -> dict:
    """Workload 5: hold N keep-alive connections, each after one proxied request."""
    base = procstat.pss_kib(a.pid)
    ok, pss = asyncio.run(_hold(a.port, a.path, a.n, a.timeout, a.pid))
    r = {"n": a.n, "held": ok, "pss_base_kib": base, "pss_kib": pss}
    r["pss_per_conn_kib"] = round((pss - base) / ok, 2) if a.pid and ok else None
    r["ok"] = ok >= a.n * 0.99
    return r


async def _hold(port: int, path: str, n: int, timeout: float, pid: int) -> tuple[int, int]:
    """Open n connections (100 at a time: no SYN-queue overflow), read PSS, close all."""
    sem = asyncio.Semaphore(100)
    writers = []
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    async def one():
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await reader.readexactly(length)
                writers.append(writer)
                if b" 200 " in head.split(b"\r\n", 1)[0]:
                    return True
            except (OSError, asyncio.IncompleteReadError, AttributeError, asyncio.LimitOverrunError):
                pass
            return False

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    ok = sum(1 for t in done if not t.cancelled() and t.exception() is None and t.result())
    await asyncio.sleep(0.5)  # let the tunnel settle its buffers after the last response
    pss = procstat.pss_kib(pid)
    for w in writers:
        w.transport.abort()
    await asyncio.sleep(0)
    return ok, pss


# --- start-up ---------------------------------------------------------------------------


def cmd_startup(a) -> dict:
    """Workload 6: fork -> port accepting -> first proxied 200.

    Started before the tunnel, so the interpreter's own start-up is not in the figure:
    it writes --t0-file + ".ready", polls the port (refused, cheaply) until the tunnel
    accepts, then GETs until a 200. run.sh writes "T0 PID" (fork time, tunnel PID) into
    --t0-file right after forking the tunnel.
    """
    open(a.t0_file + ".ready", "w").close()
    deadline = time.time() + a.timeout
    accept_at = first_at = None
    t0, pid = _read_t0(a.t0_file, 0.0)
    while time.time() < deadline and accept_at is None:
        try:
            socket.create_connection((HOST, a.port), timeout=1).close()
            accept_at = time.time()
        except OSError:
            if not t0:
                t0, pid = _read_t0(a.t0_file, 0.0)
            elif pid and not _alive(pid):
                break
            time.sleep(0.0005)
    while accept_at is not None and time.time() < deadline and first_at is None:
        if _get_status(a.port, a.path) == 200:
            first_at = time.time()
        else:
            time.sleep(0.001)
    t0, pid = _read_t0(a.t0_file, 5.0) if not t0 else (t0, pid)
    ok = first_at is not None and t0 > 0
    return {
        "pid": pid,
        "accept_ms": round((accept_at - t0) * 1e3, 2) if ok else None,
        "first_200_ms": round((first_at - t0) * 1e3, 2) if ok else None,
        "pss_idle_kib": procstat.pss_kib(pid),
        "ok": ok,
    }


def _read_t0(path: str, wait: float) -> tuple[float, int]:
    """(fork time, tunnel PID) from run.sh, waiting up to `wait` seconds for the file."""
    end = time.time() + wait
    while True:
        try:
            with open(path, encoding="ascii") as f:
                t0, pid = f.read().split()
                return float(t0), int(pid)
        except (OSError, ValueError):
            if time.time() >= end:
                return 0.0, 0
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _get_status(port: int, path: str) -> int:
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
            return int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    except (OSError, ValueError, IndexError):
        return 0


# --- latency with a round trip -------------------------------------------------------------


def cmd_latency(a) -> dict:
    """Workload 7: one request per new connection, low concurrency; every latency kept."""
    request = f"GET {a.path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    samples: list[float] = []
    failures = [0]
    lock = threading.Lock()
    todo = [a.warmup + a.n]
    deadline = time.time() + a.timeout

    def worker():
        while time.time() < deadline:
            with lock:
                if todo[0] <= 0:
                    return
                todo[0] -= 1
                keep = todo[0] < a.n
            t = time.perf_counter()
            ok = _one_request(a.port, request)
            dt = (time.perf_counter() - t) * 1e3
            with lock:
                if not ok:
                    failures[0] += 1
                elif keep:
                    samples.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(a.conc)]
    cpu0 = procstat.cpu_seconds(a.pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = procstat.cpu_seconds(a.pid) - cpu0
    if a.samples_out:
        with open(a.samples_out, "w", encoding="utf-8") as f:
            f.write("\n".join(f"{s:.3f}" for s in samples))
    r = {"n": len(samples), "failures": failures[0], "conc": a.conc, "cpu_s": round(cpu, 3)}
    if samples:
        q = statistics.quantiles(samples, n=100, method="inclusive")
        r.update(p50_ms=round(statistics.median(samples), 3), p99_ms=round(q[98], 3),
                 samples_file=a.samples_out)
    r["ok"] = len(samples) >= a.n * 0.95
    return r


def _one_request(port: int, request: bytes) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return False
                buf += chunk
            head, body = buf.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    return False
                body += chunk
            return b" 200 " in head.split(b"\r\n", 1)[0]
    except (OSError, AttributeError, ValueError):
        return False


# --- physical limits ---------------------------------------------------------------------


def cmd_speed(a) -> dict:
    """openssl speed for the two AEADs, on the tunnel's core: bytes/s per core."""
    r = {"ok": True}
    for name, evp in (("aes_128_gcm", "aes-128-gcm"), ("chacha20_poly1305", "chacha20-poly1305")):
        cmd = ["taskset", "-c", a.cpu, "openssl", "speed", "-seconds", str(a.duration),
               "-bytes", "16384", "-evp", evp]
        out = run(cmd, a.duration + 30)
        m = re.findall(r"([\d.]+)k\s*$", out, re.M)
        r[f"{name}_mb_per_s"] = round(float(m[-1]) / 1e3, 1) if m else None
        r[f"{name}_cmd"] = " ".join(cmd)
    return r


# --- plumbing ------------------------------------------------------------------------------


def run(cmd: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")


SUBCOMMANDS = {"wrk": cmd_wrk, "h2load": cmd_h2load, "bulk": cmd_bulk, "idle": cmd_idle,
               "startup": cmd_startup, "latency": cmd_latency, "speed": cmd_speed}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=SUBCOMMANDS)
    p.add_argument("--out", required=True)
    p.add_argument("--tunnel", default="")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--workload", default="")
    p.add_argument("--pid", type=int, default=0, help="tunnel PID (0: none, e.g. direct)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--path", default="/1k")
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--close", action="store_true")
    p.add_argument("--gw-admin", type=int, default=0)
    p.add_argument("--gw-listener", type=int, default=0)
    p.add_argument("--upload", default="")
    p.add_argument("--expect-bytes", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--conc", type=int, default=2)
    p.add_argument("--samples-out", default="")
    p.add_argument("--t0-file", default="")
    p.add_argument("--cpu", default="1")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
