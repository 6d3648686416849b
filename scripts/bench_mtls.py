#!/usr/bin/env python3
"""The mesh's real path: client -> client sidecar -> server sidecar -> backend, with mutual TLS
between the sidecars, for a pair of mesh-proxies and a pair of Envoys configured by the same
controller, and for the mesh-proxy pair in plaintext (both --identity-off), in one run.

Pairs:
- mesh-proxy/mtls: two mesh-proxies that get their SVIDs from mesh-ca themselves;
- envoy/mtls: two stock Envoys joined with `meshctl bootstrap envoy --sds-socket`, each with a
  `mesh-proxy agent` serving it its SVID and trust bundle over SDS (as Istio's pilot-agent
  does); a pair's CPU and RSS include its agents;
- mesh-proxy/plaintext: the mesh-proxy pair without identity, to show what TLS costs.

Scenarios, each against a backend nginx on core 0:
- http1: HTTP/1.1 from the load generator, kept-alive connections. At a fixed open-loop rate
  (--rate, 16 connections, latency correction): p50/p99 and the pair's CPU per request; then
  closed loop over 64 connections: max rps and CPU per request at saturation.
- grpc: gRPC unary (POST application/grpc, a framed message, read in full by the backend and
  answered with a framed message and the grpc-status trailer) over HTTP/2 prior knowledge, the
  same two measurements (4 connections x 4 streams at the fixed rate, 8 x 8 at saturation).
  The saturated run uses h2load (one thread, on core 0 as oha), which spends less CPU per
  call than oha over HTTP/2, so that the load generator limits the pair less.
  Every round first checks with nghttp that the answer through the pair carries the reply and
  `grpc-status: 0`; a request answered 200 that the backend did not count (a proxy's own gRPC
  error, which Envoy answers as HTTP 200) counts as failed.
- new-conn: HTTP/1.1 without keep-alive to the client sidecar, and a TrafficPolicy of
  maxRequestsPerConnection 1 on the Service, so that every request is a new connection on both
  hops and a mesh TLS handshake between the sidecars: max rps is handshakes per second.

Added latency is the pair's percentile minus the direct path's (load generator -> backend) in
the same round; max rps counts answered requests only, and "pair's core share" (the pair's CPU
over the run, in cores) below 1 means something else limited the rate. Both sidecars of a pair run on core 1 with one worker each; oha, nginx, mesh-ca
and the controller on core 0. Rounds interleave pairs; tables show medians and ranges.

Usage: bench_mtls.py [--rounds N] [--seconds S] [--rate RPS] [--pairs a,b] [--scenarios a,b]
                     [--json FILE]
Needs: oha, nginx, nghttp and h2load, .venv/bin/envoy (or MESH_ENVOY), release builds of mesh-proxy,
mesh-controller, mesh-ca and meshctl.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_proxy as bp  # noqa: E402

PAIRS = ("mesh-proxy/plaintext", "mesh-proxy/mtls", "envoy/mtls")
SCENARIOS = ("http1", "grpc", "new-conn")
# A gRPC message: not compressed, 4 bytes, protobuf field 1 = "hi" (the request) or "ok".
GRPC_REQUEST = b"\x00\x00\x00\x00\x04\x0a\x02hi"
GRPC_REPLY = b"\x00\x00\x00\x00\x04\x0a\x02ok"
GRPC_PATH = "/bench.Echo/Call"


def h2load(args, url, connect_to):
    """h2load closed loop through `connect_to` (HOST:PORT), as much of oha's JSON as the
    saturated run reads: answers by status, errors, and the run's length in seconds."""
    out = subprocess.run(
        ["taskset", "-c", "0", "h2load", "-t", "1", "--connect-to", connect_to] + args + [url],
        capture_output=True, text=True, check=True).stdout
    finished = re.search(r"^finished in ([\d.]+)(m?s),", out, re.M)
    counts = re.search(r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", out, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    if not (finished and counts and codes):
        raise RuntimeError(f"h2load: no summary in its output:\n{out[-2000:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    by_status = {k: int(v) for k, v in zip(("200", "3xx", "4xx", "5xx"), codes.groups())
                 if int(v)}
    # h2load's "failed" counts the errored and the non-2xx answers, and "errored" the timed
    # out: the errored alone, with the answers by status, count each failure once.
    errored = int(counts.group(5))
    errors = {"errored": errored} if errored else {}
    return {"statusCodeDistribution": by_status, "errorDistribution": errors,
            "summary": {"total": seconds}}


def ready(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def scrape(url, match):
    """Sum of the values of the lines of a metrics or stats page for which `match` holds."""
    with urllib.request.urlopen(url, timeout=2) as r:
        total = 0.0
        for line in r.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name and match(name.rstrip(":")):
                total += float(value)
        return total


def grpc_backend_confs(work, port, app_port):
    """nginx as a gRPC unary server on `port` (HTTP/2 prior knowledge): it reads each request's
    message in full, as a gRPC server does, then answers the framed reply with the trailer
    `grpc-status: 0`. The reply comes from a second nginx on `app_port`, whose `/stub` counts
    the requests that got that far (stub_status counts a whole process). Returns the paths of
    both configs."""
    common = "events { worker_connections 4096; }\n"
    front = os.path.join(work, "grpc-backend.conf")
    with open(front, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/grpc-backend.pid; error_log {work}/grpc-backend.err warn;
{common}http {{ access_log off; keepalive_requests 1000000;
  upstream app {{ server 127.0.0.1:{app_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port} http2;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
      add_trailer grpc-status 0; }} }} }}
""")
    app = os.path.join(work, "grpc-app.conf")
    with open(app, "wb") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/grpc-app.pid; error_log {work}/grpc-app.err warn;
{common}http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{app_port};
    location = /stub {{ stub_status; }}
    location / {{ default_type application/grpc; return 200 \"""".encode() + GRPC_REPLY
                + b"\"; } } }\n")
    return front, app


def grpc_served(app_port):
    """Requests the gRPC backend has answered so far (less the one asking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/stub", timeout=2) as r:
        return int(r.read().decode().splitlines()[2].split()[2]) - 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true", help="keep the logs and configs (printed)")
    ap.add_argument("--perf", default="", help="write perf profiles of each pair to this "
                    "directory: SCENARIO-KIND-SECURITY.data/.txt at the fixed rate, and "
                    "...-saturated at saturation (the runs with profiles include perf's cost)")
    ap.add_argument("--callgrind", default="", help="run the mesh-proxy sidecars under "
                    "callgrind, writing its profiles to this directory, and report the pair's "
                    "user-space instructions per request at the fixed rate (per connection for "
                    "new-conn, saturated); mesh-proxy pairs only, and a low --rate")
    a = ap.parse_args()
    pairs = [p for p in a.pairs.split(",") if p]
    if a.callgrind and any(not p.startswith("mesh-proxy/") for p in pairs):
        ap.error("--callgrind: mesh-proxy pairs only (--pairs mesh-proxy/mtls,...)")
    cg = bp.Callgrind(a.callgrind) if a.callgrind else None
    scenarios = [s for s in a.scenarios.split(",") if s]
    for name, given, known in (("--pairs", pairs, PAIRS), ("--scenarios", scenarios, SCENARIOS)):
        bad = [g for g in given if g not in known]
        if bad:
            ap.error(f"{name}: unknown {', '.join(bad)} (known: {', '.join(known)})")

    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(bp.ROOT, "target"))
    rel = os.path.join(target, "release")
    work = tempfile.mkdtemp(prefix="mesh-bench-mtls-")
    procs = []

    def spawn(args, name, cpu, env=None):
        p = bp.Proc(args, os.path.join(work, name + ".log"), cpu=cpu,
                    env={"MESH_LOG": os.environ.get("MESH_BENCH_LOG", "warn"), **(env or {})})
        procs.append(p)
        return p

    try:
        backend, grpc_backend, grpc_app = bp.free_port(), bp.free_port(), bp.free_port()
        spawn(["nginx", "-c", bp.backend_conf(work, backend), "-p", work], "backend", 0)
        front, app = grpc_backend_confs(work, grpc_backend, grpc_app)
        spawn(["nginx", "-c", front, "-p", work], "grpc-backend", 0)
        spawn(["nginx", "-c", app, "-p", work], "grpc-app", 0)
        bp.wait_port(grpc_app)
        bp.wait_port(backend)
        bp.wait_port(grpc_backend)
        app_port = {"http1": backend, "grpc": grpc_backend, "new-conn": backend}

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
        identity = ["--ca-addr", f"127.0.0.1:{ca_port}", "--ca-root",
                    os.path.join(ca_dir, "ca.crt")]
        # Below the ephemeral range, so that the load generator's own connections (thousands
        # without keep-alive) never hold it when a server proxy starts.
        inbound = 20000 + os.getpid() % 10000
        # The server pods: mesh-proxy's on 127.0.0.1 behind one inbound port, Envoy's on
        # 127.0.0.2 with its inbound listener on the app's port there (the app on 127.0.0.1).
        server_pod = {"mesh-proxy": ("server-0", "127.0.0.1"),
                      "envoy": ("server-envoy-0", "127.0.0.2")}

        def manifests(kind, ip_octet):
            pod, addr = server_pod[kind]
            ep = {"mesh-proxy": (inbound, inbound), "envoy": (backend, grpc_backend)}[kind]
            return f"""---
apiVersion: v1
kind: Service
metadata: {{name: bench-{kind}, namespace: default}}
spec:
  clusterIP: 10.96.9.{ip_octet}
  selector: {{app: bench-{kind}}}
  ports:
  - {{name: http, port: 80, targetPort: {backend}, protocol: TCP}}
  - {{name: grpc, port: 82, targetPort: {grpc_backend}, protocol: TCP, appProtocol: grpc}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: default, labels: {{app: bench-{kind}, mesh.dev/proxy: 'true'}}}}
spec: {{serviceAccountName: server, containers: [{{name: app, ports: [{{containerPort: {backend}}}, {{containerPort: {grpc_backend}}}]}}]}}
status: {{podIP: {addr}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: bench-{kind}-1, namespace: default, labels: {{kubernetes.io/service-name: bench-{kind}}}}}
addressType: IPv4
ports: [{{name: http, port: {ep[0]}, protocol: TCP}}, {{name: grpc, port: {ep[1]}, protocol: TCP, appProtocol: grpc}}]
endpoints: [{{addresses: ['{addr}'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}, namespace: default}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: conn-{kind}, namespace: default}}
spec:
  clusterIP: 10.96.9.{ip_octet + 1}
  selector: {{app: bench-{kind}}}
  ports: [{{name: http, port: 80, targetPort: {backend}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: conn-{kind}-1, namespace: default, labels: {{kubernetes.io/service-name: conn-{kind}}}}}
addressType: IPv4
ports: [{{name: http, port: {ep[0]}, protocol: TCP}}]
endpoints: [{{addresses: ['{addr}'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}, namespace: default}}}}]
---
apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: conn-{kind}, namespace: default}}
spec:
  targetRefs: [{{group: '', kind: Service, name: conn-{kind}}}]
  connectionLimits: {{maxRequestsPerConnection: 1}}
"""

        cfg = os.path.join(work, "config")
        os.mkdir(cfg)
        with open(os.path.join(cfg, "bench.yaml"), "w") as f:
            f.write(manifests("mesh-proxy", 10) + manifests("envoy", 20))
        xds = bp.free_port()
        spawn([os.path.join(rel, "mesh-controller"), "--config-dir", cfg,
               "--xds-addr", f"127.0.0.1:{xds}", "--admin-addr", f"127.0.0.1:{bp.free_port()}"],
              "controller", 0)
        bp.wait_port(xds)

        def retried(start):
            """Starts a sidecar; a port picked free may be taken by the time it binds (the load
            generator opens thousands of connections), so try again with others."""
            for attempt in range(5):
                try:
                    return start()
                except RuntimeError:
                    if attempt == 4:
                        raise

        class Pair:
            """A client and a server sidecar (and their agents); `outbound` is the client's
            explicit HTTP listener, which routes by Host."""

            def __init__(self):
                self.procs, self.outbound, self.handshakes = [], None, None

            def pids(self):
                return [pid for p in self.procs for pid in p.pids()]

            def stop(self):
                for p in reversed(self.procs):
                    p.stop()

            def join(self, p, admin, timeout=30.0, check=lambda: None):
                """Takes sidecar `p` once its admin port says ready and `check` passes; stops
                it and raises otherwise. Returns the admin port."""
                try:
                    ready(f"http://127.0.0.1:{admin}/ready", timeout)
                    check()
                except RuntimeError:
                    p.stop()
                    raise
                self.procs.append(p)
                return admin

        def mesh_pair(mtls, scenario):
            pair = Pair()
            common = [os.path.join(rel, "mesh-proxy"), "--xds", f"127.0.0.1:{xds}",
                      "--workers", "1"]

            def ident(sa):
                if not mtls:
                    return ["--identity-off"]
                return identity + ["--ca-token-file", tokens[sa], "--service-account", sa]

            def start(name, args):
                def attempt():
                    admin = bp.free_port()
                    argv = common + args() + ["--admin-addr", f"127.0.0.1:{admin}",
                                              "--metrics-addr", f"127.0.0.1:{bp.free_port()}"]
                    p = spawn(cg.wrap(argv, name) if cg else argv, name, 1)
                    return pair.join(p, admin)
                return retried(attempt)

            s_admin = start("server-proxy", lambda: ident("server") + [
                "--node", "default/server-0", "--transparent", "true",
                "--inbound-addr", f"127.0.0.1:{inbound}",
                "--inbound-orig-dst", f"127.0.0.1:{app_port[scenario]}",
                "--outbound-addr", f"127.0.0.1:{bp.free_port()}"])

            def client_args():
                pair.outbound = bp.free_port()
                return ident("client") + [
                    "--node", "default/client-0",
                    "--outbound-http-addr", f"127.0.0.1:{pair.outbound}"]

            start("client-proxy", client_args)
            pair.handshakes = lambda: scrape(
                f"http://127.0.0.1:{s_admin}/metrics",
                lambda n: n == 'mesh_proxy_tls_handshakes_total{direction="inbound"}')
            return pair

        def envoy_pair(scenario):
            pair = Pair()
            base = os.getpid() % 1000 * 10

            def agent(pod, sa):
                socket = os.path.join(work, f"{pod}.sock")
                if os.path.exists(socket):
                    os.remove(socket)
                p = spawn([os.path.join(rel, "mesh-proxy"), "agent", "--node", f"default/{pod}",
                           "--service-account", sa, "--ca-token-file", tokens[sa],
                           "--sds-socket", socket] + identity, f"{pod}-agent", 1)
                pair.procs.append(p)
                deadline = time.time() + 20
                while not os.path.exists(socket):
                    if time.time() > deadline:
                        raise RuntimeError(f"agent of {pod}: no socket {socket} after 20 s")
                    time.sleep(0.05)
                return socket

            def envoy(pod, socket, args, check, base_id):
                def attempt():
                    admin = bp.free_port()
                    boot = subprocess.run(
                        [os.path.join(rel, "meshctl"), "bootstrap", "envoy",
                         "--node", f"default/{pod}", "--xds", f"127.0.0.1:{xds}",
                         "--admin", f"127.0.0.1:{admin}", "--sds-socket", socket] + args(),
                        capture_output=True, text=True, check=True).stdout
                    path = os.path.join(work, f"{pod}.yaml")
                    with open(path, "w") as f:
                        f.write(boot)
                    p = spawn([bp.ENVOY, "-c", path, "--concurrency", "1", "-l", "warn",
                               "--base-id", str(base_id)], pod, 1)
                    return pair.join(p, admin, 60, check)
                return retried(attempt)

            pod, addr = server_pod["envoy"]
            port = app_port[scenario]
            s_admin = envoy(pod, agent(pod, "server"), lambda: [
                "--outbound-http", f"127.0.0.1:{bp.free_port()}", "--transparent",
                "--inbound-addr", addr, "--inbound-port", str(port),
                "--outbound-port", str(bp.free_port())],
                lambda: bp.wait_port(port, host=addr), base)

            def client_args():
                pair.outbound = bp.free_port()
                return ["--outbound-http", f"127.0.0.1:{pair.outbound}"]

            envoy("client-envoy-0", agent("client-envoy-0", "client"), client_args,
                  lambda: bp.wait_port(pair.outbound), base + 1)
            pair.handshakes = lambda: scrape(
                f"http://127.0.0.1:{s_admin}/stats",
                lambda n: n.startswith("listener.") and n.endswith(".ssl.handshake"))
            return pair

        def start_pair(name, scenario):
            kind, mode = name.split("/")
            if kind == "envoy":
                return envoy_pair(scenario)
            return mesh_pair(mode == "mtls", scenario)

        def load(scenario, host, connect_to, rate=None, seconds=None, warm=False):
            """oha through `connect_to`: at `rate` with latency correction, or closed loop
            (h2load for gRPC)."""
            args = ["-z", f"{seconds}s"]
            if scenario == "grpc":
                url = f"http://{host}:82{GRPC_PATH}"
                body = os.path.join(work, "grpc-request.bin")
                with open(body, "wb") as f:
                    f.write(GRPC_REQUEST)
                if not (rate or warm):
                    # h2load's 2xx are all 200 here: the backend answers nothing else.
                    port = connect_to.rsplit(":", 1)[1]
                    return h2load(["-D", str(seconds), "-c", "8", "-m", "8", "-d", body,
                                   "-H", "content-type: application/grpc",
                                   "-H", "te: trailers"], url, f"127.0.0.1:{port}")
                args += ["--http2", "-m", "POST", "-H", "content-type: application/grpc",
                         "-H", "te: trailers", "-D", body]
                args += ["-c", "4", "-p", "4"] if rate or warm else ["-c", "8", "-p", "8"]
                connect_to = connect_to.replace(f"{host}:80:", f"{host}:82:")
            else:
                url = f"http://{host}/"
                if scenario == "new-conn":
                    args += ["--disable-keepalive", "-c", "16"]
                else:
                    args += ["-c", "16" if rate or warm else "64"]
            if rate:
                args += ["-q", str(rate), "--latency-correction"]
            return bp.oha(args, url, connect_to)

        def grpc_check(host, connect_port):
            """One gRPC call through the pair, answered with the reply and grpc-status 0."""
            out = subprocess.run(
                ["nghttp", "-v", "-d", os.path.join(work, "grpc-request.bin"),
                 "-H", "content-type: application/grpc", "-H", "te: trailers",
                 "-H", f":authority: {host}:82",
                 f"http://127.0.0.1:{connect_port}{GRPC_PATH}"],
                capture_output=True, timeout=10)
            text = out.stdout.decode(errors="replace")
            if "grpc-status: 0" not in text or "recv DATA frame <length=9," not in text \
                    or GRPC_REPLY[5:].decode() not in text:
                raise RuntimeError(f"gRPC through port {connect_port}: no reply with "
                                   f"grpc-status 0:\n{text[-2000:]}")

        def check_ok(what, r):
            codes = r.get("statusCodeDistribution", {})
            if set(codes) != {"200"}:
                raise RuntimeError(f"{what}: answered {codes} {r.get('errorDistribution')}")

        def served(scenario):
            return grpc_served(grpc_app) if scenario == "grpc" else None

        def unserved(scenario, before, ok):
            """Answered 200 without reaching the app: a proxy's own gRPC error (Envoy answers
            those as HTTP 200 with a grpc-status). At least this many: a call cut off by the
            end of the run may have reached the app unanswered, and hide one."""
            if before is None:
                return 0
            # Less the /stub request that read `before`.
            return max(0, ok - (served(scenario) - before - 1))

        results = {}
        for rnd in range(a.rounds):
            for scenario in scenarios:
                if scenario != "new-conn":
                    d = load(scenario, "bench.default",
                             f"bench.default:80:127.0.0.1:{app_port[scenario]}", a.rate,
                             a.seconds)
                    check_ok(f"{scenario} direct", d)
                    direct = {"p50_ms": d["latencyPercentiles"]["p50"] * 1000,
                              "p99_ms": d["latencyPercentiles"]["p99"] * 1000}
                    results.setdefault(f"{scenario}/direct", []).append(direct)
                # Each round starts with another pair, so that none always follows the same one.
                for name in pairs[rnd % len(pairs):] + pairs[:rnd % len(pairs)]:
                    kind = name.split("/")[0]
                    service = ("conn-" if scenario == "new-conn" else "bench-") + kind
                    host = f"{service}.default"
                    pair = start_pair(name, scenario)
                    time.sleep(1.0)
                    pids = pair.pids()
                    row = {"idle_rss_mib": bp.rss_kib(pids, "VmRSS") / 1024}
                    to = f"{host}:80:127.0.0.1:{pair.outbound}"
                    # Warm-up, until the pair has its config and certificates.
                    deadline = time.time() + 30
                    while True:
                        warm = load(scenario, host, to, seconds=2, warm=True)
                        if set(warm.get("statusCodeDistribution", {})) == {"200"}:
                            break
                        if time.time() > deadline:
                            check_ok(f"{scenario} {name} warm-up", warm)
                    if scenario == "grpc":
                        grpc_check(host, pair.outbound)
                    profile = f"{scenario}-{name.replace('/', '-')}"
                    if scenario != "new-conn":
                        s0 = served(scenario)
                        perf = bp.Profile(a.perf, profile, pids, a.seconds) if a.perf else None
                        if cg:
                            cg.start(pids)
                        c0 = bp.cpu_ticks(pids)
                        r = load(scenario, host, to, a.rate, a.seconds)
                        c1 = bp.cpu_ticks(pids)
                        instructions = cg.finish(pids, f"{profile}-{rnd + 1}") if cg else None
                        if perf:
                            perf.finish()
                        check_ok(f"{scenario} {name} at {a.rate} rps", r)
                        ok = r["statusCodeDistribution"]["200"]
                        lost = unserved(scenario, s0, ok)
                        if lost:
                            raise RuntimeError(f"{scenario} {name} at {a.rate} rps: {lost} "
                                               f"answered 200 without reaching the app")
                        row["p50_ms"] = r["latencyPercentiles"]["p50"] * 1000
                        row["p99_ms"] = r["latencyPercentiles"]["p99"] * 1000
                        row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
                        row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
                        row["cpu_us_per_req"] = bp.cpu_us_per(c0, c1, ok)
                        if instructions:
                            row["instr_per_req"] = instructions / max(ok, 1)
                    h0 = pair.handshakes()
                    s0 = served(scenario)
                    perf = (bp.Profile(a.perf, f"{profile}-saturated", pids, a.seconds)
                            if a.perf else None)
                    counted = cg and scenario == "new-conn"
                    if counted:
                        cg.start(pids)
                    c0 = bp.cpu_ticks(pids)
                    m = load(scenario, host, to, seconds=a.seconds)
                    c1 = bp.cpu_ticks(pids)
                    h1 = pair.handshakes()
                    instructions = cg.finish(pids, f"{profile}-{rnd + 1}") if counted else None
                    if perf:
                        perf.finish()
                    ok = m.get("statusCodeDistribution", {}).get("200", 0)
                    lost = unserved(scenario, s0, ok)
                    ok -= lost
                    # Answered requests only; oha's own rate counts failures too.
                    row["max_rps"] = ok / m["summary"]["total"]
                    row["ok"] = ok
                    # Below 1, the pair was not what limited the rate (the load generator
                    # and the backends share the other core).
                    row["pair_cpu_share"] = bp.cpu_seconds(c0, c1) / m["summary"]["total"]
                    failures = {k: v for k, v in m.get("errorDistribution", {}).items()
                                if "deadline" not in k}
                    failures.update({f"status {k}": v for k, v in
                                     m.get("statusCodeDistribution", {}).items() if k != "200"})
                    if lost:
                        failures["200 without reaching the app"] = lost
                    row["failed"] = sum(failures.values())
                    if failures:
                        row["failures"] = failures
                    row["handshakes_per_s"] = (h1 - h0) / a.seconds
                    row["sat_cpu_us_per_req"] = bp.cpu_us_per(c0, c1, max(ok, 1))
                    if instructions:
                        row["instr_per_req"] = instructions / max(ok, 1)
                    row["peak_rss_mib"] = bp.rss_kib(pids, "VmHWM") / 1024
                    key = f"{scenario}/{name}"
                    results.setdefault(key, []).append(row)
                    print(f"round {rnd + 1} {key}: " + json.dumps(
                        {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                        flush=True)
                    pair.stop()
                    time.sleep(0.5)

        def med(key, field):
            vals = [r[field] for r in results.get(key, []) if r.get(field) is not None]
            if not vals:
                return None
            return bp.spread(vals)

        fields = (("cpu_us_per_req", "CPU µs/req at rate", 1),
                  ("sat_cpu_us_per_req", "CPU µs/req saturated", 1),
                  ("added_p50_ms", "added p50 ms", 3), ("added_p99_ms", "added p99 ms", 3),
                  ("max_rps", "max rps", 0), ("handshakes_per_s", "handshakes/s", 0),
                  ("pair_cpu_share", "pair's core share saturated", 2),
                  ("idle_rss_mib", "RSS idle MiB", 1), ("peak_rss_mib", "RSS peak MiB", 1),
                  ("failed", "failed", 0))
        if cg:
            fields += (("instr_per_req", "instructions/req (callgrind)", 0),)
        print()
        print(f"{a.rounds} rounds; at rate: {a.rate} rps open loop for {a.seconds} s; saturated: "
              f"closed loop for {a.seconds} s. CPU and RSS are the pair's (both sidecars, and "
              f"Envoy's agents).")
        print()
        print("| scenario/pair | " + " | ".join(f[1] for f in fields) + " |")
        print("|---|" + "---|" * len(fields))
        for key in results:
            if key.endswith("/direct"):
                continue
            cells = []
            for field, _, digits in fields:
                t = med(key, field)
                cells.append("-" if t is None else
                             f"{t[0]:.{digits}f} ({t[1]:.{digits}f}-{t[2]:.{digits}f})")
            print(f"| {key} | " + " | ".join(cells) + " |")
        print()
        for scenario in scenarios:
            mesh, env = f"{scenario}/mesh-proxy/mtls", f"{scenario}/envoy/mtls"
            if mesh in results and env in results:
                parts = []
                for field, label, _ in fields[:5]:
                    m, e = med(mesh, field), med(env, field)
                    # A ratio of differences that are not both positive says nothing.
                    if m and e and m[0] > 0 and e[0] > 0:
                        parts.append(f"{label} {m[0] / e[0]:.2f}x")
                print(f"{scenario}: mesh-proxy pair / Envoy pair: " + ", ".join(parts))
            plain = f"{scenario}/mesh-proxy/plaintext"
            if mesh in results and plain in results:
                ratio = med(mesh, "max_rps")[0] / med(plain, "max_rps")[0]
                print(f"{scenario}: mesh-proxy mTLS max rps is {ratio:.2f}x plaintext")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for p in reversed(procs):
            p.stop()
        if a.keep:
            print(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
