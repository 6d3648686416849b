#!/usr/bin/env python3
"""Gateway benchmark: HTTPS termination at a Gateway, mesh-proxy (`--gateway`) against Envoy 1.40
(`meshctl bootstrap envoy --gateway`), both configured by our controller, in one run.

Each proxy runs on core 1 with one worker; the load generator (oha), the backend (nginx) and the
controller share core 0. The Gateway has one HTTPS listener (an ECDSA P-256 certificate, SNI
gw.example.com) and one route to the backend. For each peer and round it measures:
  - keep-alive, closed loop (64 connections): requests per second on one core, and the proxy's
    CPU per request;
  - keep-alive at a fixed open-loop rate: p50/p99 latency and CPU per request;
  - a new connection per request (closed loop, 16 connections): new TLS connections per
    second, and CPU per connection (oha's TLS client may resume sessions; both proxies offer
    resumption).
Rounds interleave peers; the table shows medians with ranges, and the ratios mesh-proxy / Envoy.
See docs/benchmarks.md.

Usage: bench_gateway.py [--rounds N] [--rate RPS] [--seconds S] [--json FILE]
Needs: oha (or OHA=...), nginx, openssl, .venv/bin/envoy, release builds of mesh-proxy,
mesh-controller and meshctl in $CARGO_TARGET_DIR/release.
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_proxy import (  # noqa: E402
    ENVOY, Proc, Run, backend_conf, bench_service, cpu_ticks, cpu_us_per, free_port, oha,
    release_dir, spread, wait_port,
)

HOST = "gw.example.com"


def manifests(port, backend_port, cert, key):
    b64 = lambda s: base64.b64encode(s.encode()).decode()
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: mesh}}
spec: {{controllerName: mesh.dev/mesh-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: bench}}
spec:
  gatewayClassName: mesh
  listeners:
  - {{name: https, port: {port}, protocol: HTTPS, hostname: {HOST}, tls: {{certificateRefs: [{{name: edge-cert}}]}}}}
---
apiVersion: v1
kind: Secret
type: kubernetes.io/tls
metadata: {{name: edge-cert, namespace: bench}}
data: {{tls.crt: {b64(cert)}, tls.key: {b64(key)}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bench, namespace: bench}}
spec:
  parentRefs: [{{name: edge}}]
  rules: [{{backendRefs: [{{name: bench, port: 80}}]}}]
---
""" + bench_service("bench", backend_port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    rel = release_dir()
    run = Run("mesh-bench-gw-")
    work, spawn = run.work, run.spawn

    peers = []
    try:
        backend_port = free_port()
        spawn(["nginx", "-c", backend_conf(work, backend_port), "-p", work],
              os.path.join(work, "backend.log"), cpu=0)
        wait_port(backend_port)
        key, crt = os.path.join(work, "gw.key"), os.path.join(work, "gw.crt")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-keyout", key, "-out", crt, "-subj", f"/CN={HOST}",
             "-addext", f"subjectAltName=DNS:{HOST}"],
            check=True, capture_output=True)
        port = free_port()
        cfg = os.path.join(work, "config")
        os.mkdir(cfg)
        with open(os.path.join(cfg, "bench.yaml"), "w") as f:
            f.write(manifests(port, backend_port, open(crt).read(), open(key).read()))
        xds_port, cadmin = free_port(), free_port()
        spawn([os.path.join(rel, "mesh-controller"), "--config-dir", cfg,
               "--xds-addr", f"127.0.0.1:{xds_port}", "--admin-addr", f"127.0.0.1:{cadmin}"],
              os.path.join(work, "controller.log"), cpu=0, env={"MESH_LOG": "warn"})
        wait_port(xds_port)

        # Each proxy binds the Gateway's port on an address of its own.
        def mesh_proxy():
            return Proc([os.path.join(rel, "mesh-proxy"), "--xds", f"127.0.0.1:{xds_port}",
                         "--node", "bench/edge-1", "--gateway", "edge", "--gateway-addr", "127.0.0.2",
                         "--workers", "1", "--identity-off",
                         "--admin-addr", f"127.0.0.1:{free_port()}",
                         "--metrics-addr", f"127.0.0.1:{free_port()}"],
                        os.path.join(work, "mesh-proxy.log"), cpu=1, env={"MESH_LOG": "warn"})

        def envoy():
            boot = subprocess.run(
                [os.path.join(rel, "meshctl"), "bootstrap", "envoy", "--node", "bench/edge-0",
                 "--xds", f"127.0.0.1:{xds_port}", "--admin", f"127.0.0.1:{free_port()}",
                 "--gateway", "edge", "--gateway-addr", "127.0.0.3"],
                capture_output=True, text=True, check=True).stdout
            path = os.path.join(work, "envoy.yaml")
            with open(path, "w") as f:
                f.write(boot)
            return Proc([ENVOY, "-c", path, "--concurrency", "1", "-l", "warn",
                         "--base-id", str(os.getpid() % 1000)],
                        os.path.join(work, "envoy.log"), cpu=1)

        peers = [("mesh-proxy", mesh_proxy, "127.0.0.2"), ("envoy", envoy, "127.0.0.3")]
        url = f"https://{HOST}:{port}/"
        results = {name: [] for name, _, _ in peers}
        for rnd in range(a.rounds):
            for name, start, ip in peers:
                proc = start()
                try:
                    wait_port(port, 60, host=ip)
                    to = f"{HOST}:{port}:{ip}:{port}"
                    warm = oha(["--insecure", "-z", "2s", "-q", str(a.rate), "-c", "16"], url, to)
                    codes = warm.get("statusCodeDistribution", {})
                    if set(codes) != {"200"}:
                        raise RuntimeError(f"{name}: warm-up answered {codes}: {warm.get('errorDistribution')}")
                    pids = proc.pids()
                    c0 = cpu_ticks(pids)
                    fixed = oha(["--insecure", "-z", f"{a.seconds}s", "-q", str(a.rate), "-c", "16",
                                 "--latency-correction"], url, to)
                    c1 = cpu_ticks(pids)
                    fixed_ok = fixed.get("statusCodeDistribution", {}).get("200", 0)
                    s0 = cpu_ticks(pids)
                    sat = oha(["--insecure", "-z", f"{a.seconds}s", "-c", "64"], url, to)
                    s1 = cpu_ticks(pids)
                    sat_ok = sat.get("statusCodeDistribution", {}).get("200", 0)
                    h0 = cpu_ticks(pids)
                    new = oha(["--insecure", "-z", f"{a.seconds}s", "-c", "16", "--disable-keepalive"],
                              url, to)
                    h1 = cpu_ticks(pids)
                    new_ok = new.get("statusCodeDistribution", {}).get("200", 0)
                    pct = fixed["latencyPercentiles"]
                    row = {
                        "p50_ms": pct["p50"] * 1000,
                        "p99_ms": pct["p99"] * 1000,
                        "cpu_us_per_req": cpu_us_per(c0, c1, max(fixed_ok, 1)),
                        "max_rps": sat["summary"]["requestsPerSec"],
                        "sat_cpu_us_per_req": cpu_us_per(s0, s1, max(sat_ok, 1)),
                        "new_conn_per_s": new["summary"]["requestsPerSec"],
                        "cpu_us_per_new_conn": cpu_us_per(h0, h1, max(new_ok, 1)),
                        # Requests cut off by the end of a run are not failures.
                        "errors": {k: n for r in (fixed, sat, new)
                                   for k, n in r.get("errorDistribution", {}).items()
                                   if "deadline" not in k},
                    }
                    results[name].append(row)
                    print(f"round {rnd + 1} {name}: " + json.dumps(
                        {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                        flush=True)
                finally:
                    proc.stop()
                time.sleep(0.5)

        def med(name, key):
            return spread([r[key] for r in results[name]])

        def fmt(t, digits=1):
            m, lo, hi = t
            return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

        print()
        print(f"{a.rounds} rounds; HTTPS (TLS 1.3, ECDSA P-256, HTTP/1.1) to one route; keep-alive "
              f"at {a.rate} rps open loop and closed loop with 64 connections; a new connection per "
              f"request with 16; {a.seconds} s each")
        print()
        print("| gateway | p50 ms | p99 ms | CPU µs/request at the rate | max rps, keep-alive (1 core) | "
              "CPU µs/request at max | new TLS connections/s (1 core) | CPU µs per new connection |")
        print("|---|---|---|---|---|---|---|---|")
        for name, _, _ in peers:
            print(f"| {name} | {fmt(med(name, 'p50_ms'), 3)} | {fmt(med(name, 'p99_ms'), 3)} | "
                  f"{fmt(med(name, 'cpu_us_per_req'))} | {fmt(med(name, 'max_rps'), 0)} | "
                  f"{fmt(med(name, 'sat_cpu_us_per_req'))} | {fmt(med(name, 'new_conn_per_s'), 0)} | "
                  f"{fmt(med(name, 'cpu_us_per_new_conn'))} |")
        m, e = results["mesh-proxy"], results["envoy"]

        def ratio(key):
            return spread([x[key] / y[key] for x, y in zip(m, e)])

        print()
        print("mesh-proxy / Envoy, per round: CPU per request at the rate "
              f"{fmt(ratio('cpu_us_per_req'), 2)}x, max rps {fmt(ratio('max_rps'), 2)}x, CPU per "
              f"request at max {fmt(ratio('sat_cpu_us_per_req'), 2)}x, new connections/s "
              f"{fmt(ratio('new_conn_per_s'), 2)}x, CPU per new connection "
              f"{fmt(ratio('cpu_us_per_new_conn'), 2)}x")
        errors = [(name, r["errors"]) for name, rows in results.items() for r in rows if r["errors"]]
        print()
        print(f"failed requests: {errors}" if errors else "no request failed")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        run.stop()


if __name__ == "__main__":
    main()
