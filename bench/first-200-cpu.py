#!/usr/bin/env python3
"""CPU time of a runnel process from exec to its first proxied 200.

    python3 bench/first-200-cpu.py [--runs 20] [--bin target/release/runnel] [--var K=V ...]

The gateway is `openssl s_server -www` (TLS 1.3, client certificate required, a 200
status page for every GET), on a throwaway PKI made with openssl, so nothing but
openssl and curl is needed. For each run: exec runnel (RUNNEL_* from files, the pool
off: s_server serves one connection at a time, so a pooled idle one would hold it; and
off, the figure is the cold start's one handshake), GET through it with curl until
a 200, then read runnel's CPU time at that moment: the sum of every thread's run time
from /proc/PID/task/*/schedstat (nanoseconds; /proc/PID/stat's utime and stime count
in 10 ms ticks, too coarse here). Prints one line per run and the median, in ms. The
figure covers runnel only (not curl, not the gateway).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NAME = "gateway.runnel.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: str) -> None:
    """A P-256 CA, a gateway and a client certificate, as bench/lib/pki.sh makes them."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2",
            "-subj", "/CN=runnel first-200 CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.pem", cwd=d)
    for name, subj, ext in [
        ("gateway", f"/CN={NAME}", [f"subjectAltName=DNS:{NAME},IP:127.0.0.1",
                                    "extendedKeyUsage=serverAuth"]),
        ("client", "/O=runnel", ["subjectAltName=URI:spiffe://cluster.local/ns/runnel/sa/runnel",
                                 "extendedKeyUsage=clientAuth"]),
    ]:
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write("\n".join(ext) + "\n")
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.sec1", cwd=d)
        openssl("pkcs8", "-topk8", "-nocrypt", "-in", f"{name}.sec1", "-out", f"{name}.key", cwd=d)
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=d)
    os.chmod(os.path.join(d, "client.key"), 0o600)


def cpu_ns(pid: int) -> int:
    """Run time of every live thread of `pid`, in nanoseconds."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def one_run(binary: str, env: dict, port: int, timeout: float) -> float:
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{port}/"
        while time.monotonic() < deadline:
            # curl's own start-up is not runnel's CPU: only runnel's threads are read.
            code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   "--max-time", "5", url], capture_output=True, text=True)
            if code.stdout == "200":
                return cpu_ns(proc.pid) / 1e6
            if proc.poll() is not None:
                sys.exit(f"runnel exited with {proc.returncode}")
            time.sleep(0.002)
        sys.exit("no proxied 200 within the deadline")
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default=os.path.join(REPO, "target/release/runnel"))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--var", action="append", default=[], help="an extra RUNNEL_* K=V")
    a = p.parse_args()
    for tool in ("openssl", "curl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed")
    with tempfile.TemporaryDirectory(prefix="runnel-first-200-") as d:
        make_pki(d)
        gw_port, port = free_port(), free_port()
        gateway = subprocess.Popen(
            ["openssl", "s_server", "-quiet", "-www", "-accept", f"127.0.0.1:{gw_port}",
             "-cert", "gateway.pem", "-key", "gateway.key", "-CAfile", "ca.pem",
             "-Verify", "1", "-alpn", "http/1.1"],
            cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", gw_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        sys.exit("openssl s_server did not listen")
                    time.sleep(0.01)
            env = {
                "PATH": os.environ.get("PATH", ""),
                "RUNNEL_UPSTREAM": f"127.0.0.1:{gw_port}",
                "RUNNEL_SERVER_NAME": NAME,
                "RUNNEL_TLS_CA_FILE": os.path.join(d, "ca.pem"),
                "RUNNEL_TLS_CERT_FILE": os.path.join(d, "client.pem"),
                "RUNNEL_TLS_KEY_FILE": os.path.join(d, "client.key"),
                "RUNNEL_LISTEN": f"127.0.0.1:{port}",
                "RUNNEL_METRICS_ADDR": "off",
                "RUNNEL_POOL_MAX": "0",
            }
            env.update(kv.split("=", 1) for kv in a.var)
            figures = []
            for i in range(a.runs):
                ms = one_run(a.bin, env, port, 20.0)
                figures.append(ms)
                print(f"run {i + 1}: {ms:.2f} ms CPU from exec to the first proxied 200")
            print(f"median {statistics.median(figures):.2f} ms, min {min(figures):.2f}, "
                  f"max {max(figures):.2f} ({a.runs} runs, {a.bin})")
        finally:
            gateway.terminate()
            gateway.wait()


if __name__ == "__main__":
    main()
