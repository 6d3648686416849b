"""A gRPC server with raw-bytes messages (no protos).

Methods ending in Fail fail with NOT_FOUND, ServerStream answer with three messages, ClientStream with one message
joining all it got, BidiStream echo each message back; any other method answers a unary call
with '<name> <method>'.

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

        if method.endswith("Fail"):
            def fail(request, context):
                context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

            return grpc.unary_unary_rpc_method_handler(fail)
        if method.endswith("ServerStream"):
            def server_stream(request, context):
                for i in range(3):
                    yield f"{name} {request.decode()} {i}".encode()

            return grpc.unary_stream_rpc_method_handler(server_stream)
        if method.endswith("ClientStream"):
            def client_stream(requests, context):
                return (name + " " + "+".join(r.decode() for r in requests)).encode()

            return grpc.stream_unary_rpc_method_handler(client_stream)
        if method.endswith("BidiStream"):
            def bidi(requests, context):
                for r in requests:
                    yield f"{name} {r.decode()}".encode()

            return grpc.stream_stream_rpc_method_handler(bidi)

        def unary(request, context):
            return f"{name} {method}".encode()

        return grpc.unary_unary_rpc_method_handler(unary)


def main():
    port, name = int(sys.argv[1]), sys.argv[2]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((Echo(name),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"ready {bound}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
