"""A gRPC server that answers any unary method with '<name> <method>' (raw bytes, no protos).

Usage: echo_server.py PORT NAME
"""
import sys
from concurrent import futures

import grpc


class Echo(grpc.GenericRpcHandler):
    def __init__(self, name):
        self.name = name

    def service(self, details):
        method = details.method
        name = self.name

        def unary(request, context):
            return f"{name} {method}".encode()

        return grpc.unary_unary_rpc_method_handler(unary)


def main():
    port, name = int(sys.argv[1]), sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((Echo(name),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"ready {bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
