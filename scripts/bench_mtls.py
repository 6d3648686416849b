#!/usr/bin/env python3
"""mTLS benchmark: traffic through two mesh-proxies (client sidecar -> server sidecar -> nginx),
with mutual TLS between them against plaintext (both proxies --identity-off), in one run.

Two scenarios:
- reused: a declared HTTP port; the client proxy keeps one HTTP/2 connection to the server
  proxy, so TLS costs only encryption. Max rps (64 keep-alive connections), and latency at a
  fixed rate.
- new connection per request: a declared TCP port and a load generator without keep-alive, so
  every request is a new connection to the client proxy and a new (mesh TLS) connection to the
  server proxy: max rps here is handshakes per second.

Both proxies run on core 1 with one worker each; oha, nginx, mesh-ca and the controller on
core 0. Rounds interleave plaintext and mTLS; the table shows medians and ranges.

Usage: bench_mtls.py [--rounds N] [--seconds S] [--json FILE]
Needs: oha, nginx, release builds of mesh-proxy, mesh-controller and mesh-ca.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as bp  # noqa: E402

VIP = "10.96.9.9"


def ready(admin_port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"proxy with admin port {admin_port} not ready after {timeout}s")


def metric(admin_port, prefix):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(bp.ROOT, "target"))
    rel = os.path.join(target, "release")
    work = tempfile.mkdtemp(prefix="mesh-bench-mtls-")
    procs = []

    def spawn(args, name, cpu, env=None):
        p = bp.Proc(args, os.path.join(work, name + ".log"), cpu=cpu,
                    env={"MESH_LOG": "warn", **(env or {})})
        procs.append(p)
        return p

    try:
        backend = bp.free_port()
        spawn(["nginx", "-c", bp.backend_conf(work, backend), "-p", work], "backend", 0)
        bp.wait_port(backend)

        ca_dir = os.path.join(work, "ca")
        ca_port, ca_admin = bp.free_port(), bp.free_port()
        spawn([os.path.join(rel, "mesh-ca"), "serve", "--dir", ca_dir, "--local-tokens",
               "--addr", f"127.0.0.1:{ca_port}", "--admin-addr", f"127.0.0.1:{ca_admin}"],
              "ca", 0)
        bp.wait_port(ca_port)

        def token(sa):
            path = os.path.join(work, sa + ".token")
            out = subprocess.run([os.path.join(rel, "mesh-ca"), "token", "--dir", ca_dir,
                                  "-n", "default", "--service-account", sa],
                                 capture_output=True, text=True, check=True).stdout
            with open(path, "w") as f:
                f.write(out)
            return path

        tokens = {"client": token("client"), "server": token("server")}
        # Below the ephemeral range, so that the load generator's own connections (thousands
        # without keep-alive) never hold it when a server proxy starts.
        inbound = 20000 + os.getpid() % 10000
        cfg = os.path.join(work, "config")
        os.mkdir(cfg)
        with open(os.path.join(cfg, "bench.yaml"), "w") as f:
            f.write(f"""apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: default}}
spec:
  clusterIP: {VIP}
  selector: {{app: bench}}
  ports:
  - {{name: http, port: 80, targetPort: {backend}, protocol: TCP}}
  - {{name: tcp, port: 81, targetPort: {backend}, protocol: TCP}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-0, namespace: default, labels: {{app: bench, mesh.dev/proxy: 'true'}}}}
spec: {{serviceAccountName: server, containers: [{{name: app}}]}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: bench-1, namespace: default, labels: {{kubernetes.io/service-name: bench}}}}
addressType: IPv4
ports: [{{name: http, port: {inbound}, protocol: TCP}}, {{name: tcp, port: {inbound}, protocol: TCP}}]
endpoints: [{{addresses: ['127.0.0.1'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: server-0, namespace: default}}}}]
""")
        xds = bp.free_port()
        spawn([os.path.join(rel, "mesh-controller"), "--config-dir", cfg,
               "--xds-addr", f"127.0.0.1:{xds}", "--admin-addr", f"127.0.0.1:{bp.free_port()}"],
              "controller", 0)
        bp.wait_port(xds)

        def proxies(mtls, port):
            """Server then client sidecar; returns them and the client's outbound port."""
            common = [os.path.join(rel, "mesh-proxy"), "--xds", f"127.0.0.1:{xds}",
                      "--workers", "1", "--transparent", "true"]

            def identity(sa):
                if not mtls:
                    return ["--identity-off"]
                return ["--ca-addr", f"127.0.0.1:{ca_port}",
                        "--ca-root", os.path.join(ca_dir, "ca.crt"),
                        "--ca-token-file", tokens[sa], "--service-account", sa]

            def start(name, args):
                # A port picked free may be taken by the time the proxy binds it (the load
                # generator opens thousands of connections): try again with others.
                for attempt in range(5):
                    admin = bp.free_port()
                    p = spawn(common + args() + ["--admin-addr", f"127.0.0.1:{admin}",
                                                 "--metrics-addr", f"127.0.0.1:{bp.free_port()}"],
                              name, 1)
                    try:
                        ready(admin)
                        return p, admin
                    except RuntimeError:
                        p.stop()
                        if attempt == 4:
                            raise

            server, s_admin = start("server-proxy", lambda: identity("server") + [
                "--node", "default/server-0",
                "--inbound-addr", f"127.0.0.1:{inbound}",
                "--inbound-orig-dst", f"127.0.0.1:{backend}",
                "--outbound-addr", f"127.0.0.1:{bp.free_port()}"])
            picked = {}

            def client_args():
                picked["outbound"] = bp.free_port()
                return identity("client") + [
                    "--node", "default/client-0",
                    "--outbound-addr", f"127.0.0.1:{picked['outbound']}",
                    "--outbound-orig-dst", f"{VIP}:{port}",
                    "--inbound-addr", f"127.0.0.1:{bp.free_port()}"]

            client, _ = start("client-proxy", client_args)
            return server, client, picked["outbound"], s_admin

        results = {}
        for rnd in range(a.rounds):
            for scenario, port, keepalive in (("reused", 80, True), ("new-conn", 81, False)):
                for mode in ("plaintext", "mtls"):
                    server, client, outbound, s_admin = proxies(mode == "mtls", port)
                    url, to = "http://bench.default/", f"bench.default:80:127.0.0.1:{outbound}"
                    extra = [] if keepalive else ["--disable-keepalive"]
                    warm = bp.oha(["-z", "2s", "-c", "16"] + extra, url, to)
                    codes = warm.get("statusCodeDistribution", {})
                    if set(codes) != {"200"}:
                        raise RuntimeError(f"{scenario} {mode}: warm-up answered {codes} "
                                           f"{warm.get('errorDistribution')}")
                    row = {}
                    if keepalive:
                        r = bp.oha(["-z", "5s", "-q", str(a.rate), "-c", "16",
                                    "--latency-correction"], url, to)
                        row["p50_ms"] = r["latencyPercentiles"]["p50"] * 1000
                        row["p99_ms"] = r["latencyPercentiles"]["p99"] * 1000
                    h0 = metric(s_admin, 'mesh_proxy_tls_handshakes_total{direction="inbound"}')
                    pids = server.pids() + client.pids()
                    c0 = bp.cpu_ticks(pids)
                    m = bp.oha(["-z", f"{a.seconds}s", "-c", "64" if keepalive else "16"] + extra,
                               url, to)
                    c1 = bp.cpu_ticks(pids)
                    h1 = metric(s_admin, 'mesh_proxy_tls_handshakes_total{direction="inbound"}')
                    ok = m.get("statusCodeDistribution", {}).get("200", 0)
                    row["max_rps"] = m["summary"]["requestsPerSec"]
                    row["ok"] = ok
                    row["errors"] = sum(v for k, v in m.get("errorDistribution", {}).items()
                                        if "deadline" not in k)
                    row["handshakes_per_s"] = (h1 - h0) / a.seconds
                    row["cpu_us_per_req"] = (sum(c1) - sum(c0)) / bp.CLK_TCK / max(ok, 1) * 1e6
                    key = f"{scenario}/{mode}"
                    results.setdefault(key, []).append(row)
                    print(f"round {rnd + 1} {key}: " + json.dumps(
                        {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                        flush=True)
                    client.stop()
                    server.stop()
                    time.sleep(0.5)

        def med(key, field):
            vals = [r[field] for r in results[key] if r.get(field) is not None]
            return statistics.median(vals), min(vals), max(vals)

        print()
        print("| path | max rps | handshakes/s | CPU µs/req (both proxies) | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|")
        for key in results:
            cells = []
            for field, digits in (("max_rps", 0), ("handshakes_per_s", 0), ("cpu_us_per_req", 1),
                                  ("p50_ms", 3), ("p99_ms", 3)):
                if any(field in r for r in results[key]):
                    m, lo, hi = med(key, field)
                    cells.append(f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})")
                else:
                    cells.append("-")
            print(f"| {key} | " + " | ".join(cells) + " |")
        for scenario in ("reused", "new-conn"):
            ratio = med(f"{scenario}/mtls", "max_rps")[0] / med(f"{scenario}/plaintext", "max_rps")[0]
            print(f"{scenario}: mTLS max rps is {ratio:.2f}x plaintext ({(1 - ratio) * 100:.1f} % lower)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for p in reversed(procs):
            p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
