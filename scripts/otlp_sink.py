#!/usr/bin/env python3
"""An OTLP/gRPC trace sink for benchmarks: accepts TraceService/Export, keeps nothing but counts.

Usage: otlp_sink.py PORT   (prints "ready" once listening; on SIGTERM prints the counts as JSON)
"""
import json
import signal
import sys
import threading
from concurrent import futures

import grpc

counts = {"exports": 0, "bytes": 0}
lock = threading.Lock()


def export(request, context):
    with lock:
        counts["exports"] += 1
        counts["bytes"] += len(request)
    # An empty ExportTraceServiceResponse is zero bytes of protobuf.
    return b""


def main():
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(1)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
