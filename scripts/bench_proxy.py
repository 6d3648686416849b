#!/usr/bin/env python3
"""Data-plane benchmark: mesh-proxy against Envoy 1.40 (configured by our controller), nginx,
HAProxy and the direct path, in one run; and mesh-proxy with per-request telemetry off, as
shipped, and exporting its sampled spans over OTLP (to scripts/otlp_sink.py). See
docs/benchmarks.md for how to read it.

Every proxy under test runs on core 1 with one worker; the load generator (oha), the backend
(nginx) and the controller share core 0. For each peer and round it measures, at a fixed open-loop
rate with latency correction, p50/p99/p99.9 latency, the proxy's CPU per request (utime+stime from
/proc), and then its max rps on one core (closed loop). Rounds interleave peers (A B C ... A B C)
and the table shows medians with ranges. Added latency is the peer's percentile minus the direct
path's in the same round.

Usage: bench_proxy.py [--rounds N] [--rate RPS] [--seconds S] [--only peer,peer] [--json FILE]
Needs: oha, nginx, haproxy on PATH (or OHA=...), .venv/bin/envoy, release builds of mesh-proxy,
mesh-controller and meshctl in $TARGET_DIR/release.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def release_dir():
    """Where the release builds are: $CARGO_TARGET_DIR/release, else target/release."""
    return os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def tree_pids(root):
    """The process and all its descendants."""
    pids, frontier = [root], [root]
    while frontier:
        p = frontier.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        pids += kids
        frontier += kids
    return pids


def cpu_ticks(pids):
    """(user, system) clock ticks of the processes."""
    user = system = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user, system


def cpu_seconds(c0, c1):
    """CPU time (user + system) between two `cpu_ticks` readings, in seconds."""
    return (sum(c1) - sum(c0)) / CLK_TCK


def cpu_us_per(c0, c1, n):
    """CPU µs per one of `n` (requests) between two `cpu_ticks` readings."""
    return cpu_seconds(c0, c1) / n * 1e6


def spread(vals):
    """Median, min and max."""
    return statistics.median(vals), min(vals), max(vals)


def rss_kib(pids, key):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Proc:
    def __init__(self, args, log, cpu=None, env=None):
        cmd = (["taskset", "-c", str(cpu)] if cpu is not None else []) + args
        self.log = log
        self.p = subprocess.Popen(
            cmd,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def pids(self):
        return tree_pids(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.p.pid, signal.SIGKILL)


class Run:
    """A benchmark run's scratch directory and the processes it starts; `stop` ends them all
    and removes the directory."""

    def __init__(self, prefix):
        self.work = tempfile.mkdtemp(prefix=prefix)
        self.procs = []

    def spawn(self, *args, **kw):
        p = Proc(*args, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def bench_service(ns, backend_port):
    """The Service `bench` of namespace `ns` (port 80) and its one endpoint, the backend on
    127.0.0.1:`backend_port`, as manifests for the controller's directory."""
    return f"""apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: {ns}}}
spec:
  clusterIP: 10.96.9.9
  selector: {{app: bench}}
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: bench-1, namespace: {ns}, labels: {{kubernetes.io/service-name: bench}}}}
addressType: IPv4
ports: [{{name: http, port: {backend_port}, protocol: TCP}}]
endpoints: [{{addresses: ['127.0.0.1'], conditions: {{ready: true}}}}]
"""


def backend_conf(work, port):
    """An nginx config answering a fixed 2-byte body on `port`, one worker; returns its path."""
    path = os.path.join(work, "backend.conf")
    with open(path, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/backend.pid; error_log {work}/backend.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok"; }} }} }}
""")
    return path


def oha(args, url, connect_to=None):
    cmd = [OHA, "--no-tui", "--output-format", "json", "--worker-threads", "1"]
    if connect_to:
        cmd += ["--connect-to", connect_to]
    out = subprocess.run(
        ["taskset", "-c", "0"] + cmd + args + [url],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


class Peer:
    """A proxy under test: how to start it and how to send through it."""

    def __init__(self, name, start, url, connect_to=None):
        self.name, self._start, self.url, self.connect_to = name, start, url, connect_to
        self.proc = None

    def start(self):
        self.proc = self._start()
        return self

    def pids(self):
        return self.proc.pids() if self.proc else []

    def stop(self):
        if self.proc:
            self.proc.stop()
            self.proc = None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--max-seconds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--only", default="")
    ap.add_argument("--sampling", default="1", help="percent of traces mesh-proxy-traced samples")
    ap.add_argument("--json", default="")
    ap.add_argument("--perf", default="", help="write perf profiles of each proxy to this directory: NAME.data/.txt at the "
                    "fixed rate, NAME-saturated.data/.txt at saturation (the figures of a run "
                    "with profiles include perf's own cost)")
    ap.add_argument("--strace", default="", help="write syscall counts of each proxy to this directory")
    ap.add_argument("--callgrind", default="", help="run mesh-proxy, nginx and HAProxy under "
                    "callgrind, writing its profiles to this directory, and report the "
                    "user-space instructions each runs per request at the fixed rate (use a "
                    "low --rate: a proxy under valgrind serves a few hundred per second)")
    a = ap.parse_args()
    cg = Callgrind(a.callgrind) if a.callgrind else None

    rel = release_dir()
    run = Run("mesh-bench-")
    work, spawn = run.work, run.spawn

    def wrap(args, name):
        return cg.wrap(args, name) if cg else args

    try:
        # Backend: nginx answering a fixed 2-byte body, one worker, on core 0.
        backend_port = free_port()
        bconf = backend_conf(work, backend_port)
        spawn(["nginx", "-c", bconf, "-p", work], os.path.join(work, "backend.log"), cpu=0)
        wait_port(backend_port)

        # Controller with one Service in front of the backend.
        cfg = os.path.join(work, "config")
        os.mkdir(cfg)
        with open(os.path.join(cfg, "bench.yaml"), "w") as f:
            f.write(bench_service("default", backend_port))
        xds_port, cadmin = free_port(), free_port()
        spawn(
            [os.path.join(rel, "mesh-controller"), "--config-dir", cfg,
             "--xds-addr", f"127.0.0.1:{xds_port}", "--admin-addr", f"127.0.0.1:{cadmin}"],
            os.path.join(work, "controller.log"), cpu=0, env={"MESH_LOG": "warn"})
        wait_port(xds_port)

        # An OTLP/gRPC sink for the traced variant, on core 0 with the other helpers, at the
        # lowest priority so that it never delays the load generator.
        sink_port = free_port()
        spawn(["nice", "-n", "19", PYTHON, os.path.join(ROOT, "scripts", "otlp_sink.py"), str(sink_port)],
              os.path.join(work, "otlp-sink.log"), cpu=0)
        wait_port(sink_port)

        def mesh_proxy_with(peer, extra):
            def start():
                port = free_port()
                p = Proc(
                    wrap([os.path.join(rel, "mesh-proxy"), "--xds", f"127.0.0.1:{xds_port}",
                          "--node", "default/bench-mesh", "--workers", "1", "--identity-off",
                          "--outbound-http-addr", f"127.0.0.1:{port}",
                          "--admin-addr", f"127.0.0.1:{free_port()}",
                          "--metrics-addr", f"127.0.0.1:{free_port()}"] + extra, peer.name),
                    os.path.join(work, f"{peer.name}.log"), cpu=1, env={"MESH_LOG": "warn"})
                wait_port(port)
                peer.connect_to = f"bench.default:80:127.0.0.1:{port}"
                return p
            return start

        def envoy():
            port, admin = free_port(), free_port()
            boot = subprocess.run(
                [os.path.join(rel, "meshctl"), "bootstrap", "envoy", "--node", "default/bench-envoy",
                 "--xds", f"127.0.0.1:{xds_port}", "--admin", f"127.0.0.1:{admin}",
                 "--outbound-http", f"127.0.0.1:{port}"],
                capture_output=True, text=True, check=True).stdout
            path = os.path.join(work, "envoy.yaml")
            with open(path, "w") as f:
                f.write(boot)
            p = Proc([ENVOY, "-c", path, "--concurrency", "1", "-l", "warn",
                      "--base-id", str(os.getpid() % 1000)],
                     os.path.join(work, "envoy.log"), cpu=1)
            wait_port(port, 60)
            env_peer.connect_to = f"bench.default:80:127.0.0.1:{port}"
            return p

        def nginx():
            port = free_port()
            conf = os.path.join(work, "nginx.conf")
            # Under callgrind, one process: a forked worker does not answer callgrind_control.
            single = "master_process off;" if cg else ""
            with open(conf, "w") as f:
                f.write(f"""{single}
worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host; }} }} }}
""")
            p = Proc(wrap(["nginx", "-c", conf, "-p", work], "nginx"),
                     os.path.join(work, "nginx.log"), cpu=1)
            wait_port(port)
            ngx.connect_to = f"bench.default:80:127.0.0.1:{port}"
            return p

        def haproxy():
            port = free_port()
            conf = os.path.join(work, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server s1 127.0.0.1:{backend_port}
""")
            p = Proc(wrap(["haproxy", "-f", conf, "-db"], "haproxy"),
                     os.path.join(work, "haproxy.log"), cpu=1)
            wait_port(port)
            hap.connect_to = f"bench.default:80:127.0.0.1:{port}"
            return p

        direct = Peer("direct", lambda: None, "http://bench.default/",
                      f"bench.default:80:127.0.0.1:{backend_port}")
        # mesh-proxy as it ships (request metrics on, 1 % of traces sampled, nothing exported);
        # with per-request telemetry off; and with the sampled spans exported over OTLP.
        mesh = Peer("mesh-proxy", None, "http://bench.default/")
        mesh._start = mesh_proxy_with(mesh, [])
        quiet = Peer("mesh-proxy-telemetry-off", None, "http://bench.default/")
        quiet._start = mesh_proxy_with(quiet, ["--telemetry", "false"])
        traced = Peer("mesh-proxy-traced", None, "http://bench.default/")
        traced._start = mesh_proxy_with(
            traced, ["--tracing-endpoint", f"http://127.0.0.1:{sink_port}", "--tracing-sampling", a.sampling])
        env_peer = Peer("envoy", envoy, "http://bench.default/")
        ngx = Peer("nginx", nginx, "http://bench.default/")
        hap = Peer("haproxy", haproxy, "http://bench.default/")
        peers = [direct, mesh, quiet, traced, env_peer, ngx, hap]
        if a.only:
            keep = set(a.only.split(",")) | {"direct"}
            peers = [p for p in peers if p.name in keep]

        results = {p.name: [] for p in peers}
        for rnd in range(a.rounds):
            for peer in peers:
                peer.start()
                time.sleep(1.0)
                idle = rss_kib(peer.pids(), "VmRSS")
                # Warm-up, and a check that the path answers 200.
                warm = oha(["-z", "2s", "-q", str(a.rate), "-c", str(a.connections),
                            "--latency-correction"], peer.url, peer.connect_to)
                codes = warm.get("statusCodeDistribution", {})
                if set(codes) != {"200"}:
                    raise RuntimeError(f"{peer.name}: warm-up answered {codes}")
                pids = peer.pids()
                perf = trace = None
                if a.perf and pids:
                    perf = Profile(a.perf, peer.name, pids, a.seconds)
                if a.strace and pids:
                    os.makedirs(a.strace, exist_ok=True)
                    trace = subprocess.Popen(
                        ["timeout", "-s", "INT", str(a.seconds - 1), "strace", "-c", "-f", "-o",
                         os.path.join(a.strace, f"{peer.name}.txt")]
                        + [x for p in pids for x in ("-p", str(p))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                counted = cg and pids and peer.name != "envoy"
                if counted:
                    cg.start(pids)
                c0 = cpu_ticks(pids)
                r = oha(["-z", f"{a.seconds}s", "-q", str(a.rate), "-c", str(a.connections),
                         "--latency-correction"], peer.url, peer.connect_to)
                c1 = cpu_ticks(pids)
                instructions = cg.finish(pids, f"{peer.name}-{rnd + 1}") if counted else None
                if trace:
                    trace.wait()
                if perf:
                    perf.finish()
                ok = sum(v for k, v in r.get("statusCodeDistribution", {}).items() if k == "200")
                sat_perf = None
                if a.perf and pids:
                    sat_perf = Profile(a.perf, f"{peer.name}-saturated", pids, a.max_seconds)
                s0 = cpu_ticks(pids)
                m = oha(["-z", f"{a.max_seconds}s", "-c", "64"], peer.url, peer.connect_to)
                s1 = cpu_ticks(pids)
                if sat_perf:
                    sat_perf.finish()
                sat_ok = m.get("statusCodeDistribution", {}).get("200", 0)
                pct = r["latencyPercentiles"]
                row = {
                    "p50_ms": pct["p50"] * 1000,
                    "p99_ms": pct["p99"] * 1000,
                    "p999_ms": pct["p99.9"] * 1000,
                    "ok": ok,
                    # Requests cut off by the end of the run are not failures.
                    "errors": sum(v for k, v in r.get("errorDistribution", {}).items()
                                  if "deadline" not in k),
                    "cpu_us_per_req": cpu_us_per(c0, c1, max(ok, 1)) if pids else None,
                    "user_us_per_req": (c1[0] - c0[0]) / CLK_TCK / max(ok, 1) * 1e6 if pids else None,
                    "max_rps": m["summary"]["requestsPerSec"],
                    "sat_cpu_us_per_req": cpu_us_per(s0, s1, max(sat_ok, 1)) if pids else None,
                    "idle_rss_mib": idle / 1024 if pids else None,
                    "peak_rss_mib": rss_kib(pids, "VmHWM") / 1024 if pids else None,
                    "instr_per_req": instructions / max(ok, 1) if instructions else None,
                }
                results[peer.name].append(row)
                print(f"round {rnd + 1} {peer.name}: " + json.dumps(
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                    flush=True)
                peer.stop()
                time.sleep(0.5)

        def med(name, key):
            vals = [r[key] for r in results[name] if r[key] is not None]
            if not vals:
                return None, None, None
            return spread(vals)

        def added(name, key):
            return spread([r[key] - d[key] for r, d in zip(results[name], results["direct"])])

        def fmt(t, digits=2):
            m, lo, hi = t
            if m is None:
                return "-"
            return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

        print()
        print(f"{a.rounds} rounds, {a.rate} rps open loop for {a.seconds} s, {a.connections} "
              f"connections; max rps closed loop, 64 connections, {a.max_seconds} s")
        print()
        print("| peer | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | "
              "CPU µs/request | of which user | max rps (1 core) | CPU µs/request at max | "
              "RSS idle MiB | RSS peak MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for p in peers:
            n = p.name
            add50 = fmt(added(n, "p50_ms"), 3) if n != "direct" else "-"
            add99 = fmt(added(n, "p99_ms"), 3) if n != "direct" else "-"
            print(f"| {n} | {fmt(med(n, 'p50_ms'), 3)} | {fmt(med(n, 'p99_ms'), 3)} | "
                  f"{fmt(med(n, 'p999_ms'), 3)} | {add50} | {add99} | "
                  f"{fmt(med(n, 'cpu_us_per_req'), 1)} | {fmt(med(n, 'user_us_per_req'), 1)} | "
                  f"{fmt(med(n, 'max_rps'), 0)} | {fmt(med(n, 'sat_cpu_us_per_req'), 1)} | "
                  f"{fmt(med(n, 'idle_rss_mib'), 1)} | {fmt(med(n, 'peak_rss_mib'), 1)} |")
        if cg:
            print()
            print("User-space instructions per request at the fixed rate (callgrind): " + ", ".join(
                f"{p.name} {fmt(med(p.name, 'instr_per_req'), 0)}" for p in peers
                if med(p.name, "instr_per_req")[0]))
        if "nginx" in results and "mesh-proxy" in results:
            print()
            cpu = med("mesh-proxy", "cpu_us_per_req")[0] / med("nginx", "cpu_us_per_req")[0]
            p99 = added("mesh-proxy", "p99_ms")[0] / added("nginx", "p99_ms")[0]
            rps = med("mesh-proxy", "max_rps")[0] / med("nginx", "max_rps")[0]
            sat = med("mesh-proxy", "sat_cpu_us_per_req")[0] / med("nginx", "sat_cpu_us_per_req")[0]
            print(f"mesh-proxy / nginx: CPU per request {cpu:.2f}x (at max rps {sat:.2f}x), "
                  f"added p99 {p99:.2f}x, max rps {rps:.2f}x")
        if "mesh-proxy-telemetry-off" in results and "mesh-proxy-traced" in results:
            off = med("mesh-proxy-telemetry-off", "cpu_us_per_req")[0]
            on = med("mesh-proxy", "cpu_us_per_req")[0] if "mesh-proxy" in results else None
            tr = med("mesh-proxy-traced", "cpu_us_per_req")[0]
            # Per round, so that drifts between rounds cancel.
            ratios = [t["cpu_us_per_req"] / o["cpu_us_per_req"]
                      for t, o in zip(results["mesh-proxy-traced"], results["mesh-proxy-telemetry-off"])]
            print()
            line = (f"telemetry: metrics + {a.sampling} % tracing exported / telemetry off: CPU per request "
                    f"{tr / off:.3f}x (median of per-round ratios {statistics.median(ratios):.3f}x, "
                    f"range {min(ratios):.3f}-{max(ratios):.3f})")
            if on:
                line += f"; as shipped (nothing exported) {on / off:.3f}x"
            print(line)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        for peer in [p for p in locals().get("peers", [])]:
            peer.stop()
        run.stop()


class Profile:
    """`perf record` of some processes for a while, and its report as text when finished."""

    def __init__(self, directory, name, pids, seconds):
        os.makedirs(directory, exist_ok=True)
        self.data = os.path.join(directory, f"{name}.data")
        self.text = os.path.join(directory, f"{name}.txt")
        self.proc = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-o", self.data, "-p",
             ",".join(map(str, pids)), "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self):
        self.proc.wait()
        with open(self.text, "w") as out:
            subprocess.run(["perf", "report", "-i", self.data, "--no-children",
                            "--percent-limit", "0.5", "--stdio", "-g", "none"],
                           stdout=out, stderr=subprocess.DEVNULL)


class Callgrind:
    """Counts the user-space instructions of processes run under callgrind (`wrap`), from
    `start` to `finish`: exact and repeatable, where CPU time on a shared machine is not."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
            raise RuntimeError("--callgrind needs valgrind (apt-get install valgrind)")

    def wrap(self, args, name):
        out = os.path.join(self.directory, f"{name}.%p.out")
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + args

    @staticmethod
    def _control(flag, pid):
        # callgrind_control exits 0 whatever happened: its output says.
        out = subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True,
                             text=True).stdout
        if "Error" in out or "No active" in out or "not detected" in out:
            raise RuntimeError(f"callgrind_control {flag} {pid}: {out.strip()}")

    def _dumps(self, pid):
        """The dumps callgrind_control made of `pid`, by number (NAME.PID.out.N)."""
        found = {}
        for f in os.listdir(self.directory):
            head, sep, n = f.rpartition(".")
            if sep and n.isdigit() and head.endswith(f".{pid}.out"):
                found[int(n)] = os.path.join(self.directory, f)
        return found

    def start(self, pids):
        """Zeroes the counts of `pids`."""
        for pid in pids:
            self._control("-z", pid)

    def finish(self, pids, label):
        """The instructions `pids` ran since `start`, from a new dump of each (kept as
        NAME.PID.out.N in the directory, `label` in its header)."""
        total = 0
        for pid in pids:
            before = set(self._dumps(pid))
            self._control(f"--dump={label}", pid)
            new = {n: f for n, f in self._dumps(pid).items() if n not in before}
            if not new:
                raise RuntimeError(f"callgrind wrote no dump for pid {pid} in {self.directory}")
            with open(new[max(new)]) as f:
                for line in f:
                    if line.startswith(("totals:", "summary:")):
                        total += int(line.split()[1])
                        break
        return total


OHA = os.environ.get("OHA") or shutil.which("oha") or "/var/tmp/oha-root/bin/oha"
ENVOY = os.environ.get("MESH_ENVOY") or os.path.join(ROOT, ".venv/bin/envoy")
PYTHON = os.environ.get("MESH_PYTHON") or os.path.join(ROOT, ".venv/bin/python")

if __name__ == "__main__":
    sys.exit(main())
