"""A proxyless gRPC client: resolves TARGET through xDS (GRPC_XDS_BOOTSTRAP) and calls METHOD
COUNT times, printing each reply on its own line.

Usage: xds_client.py TARGET METHOD COUNT
"""
import sys

import grpc
import grpc.experimental  # noqa: F401  (registers the xds: resolver)


def main():
    target, method, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        for _ in range(count):
            reply = call(b"ping", timeout=20, wait_for_ready=True)
            print(reply.decode(), flush=True)


if __name__ == "__main__":
    main()
