"""A plain gRPC client (no xDS) that exercises every call shape against TARGET and prints one
line per reply: unary, server streaming, client streaming, bidirectional streaming.

Usage: stream_client.py TARGET
"""
import sys

import grpc


def main():
    target = sys.argv[1]
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        print("unary:", channel.unary_unary("/mesh.e2e.Echo/Say")(b"hi", timeout=10).decode())
        for reply in channel.unary_stream("/mesh.e2e.Echo/ServerStream")(b"s", timeout=10):
            print("server-stream:", reply.decode())
        parts = iter([b"a", b"b", b"c"])
        print("client-stream:", channel.stream_unary("/mesh.e2e.Echo/ClientStream")(parts, timeout=10).decode())
        for reply in channel.stream_stream("/mesh.e2e.Echo/BidiStream")(iter([b"x", b"y"]), timeout=10):
            print("bidi:", reply.decode())
        try:
            channel.unary_unary("/mesh.e2e.Echo/Fail")(b"", timeout=10)
        except grpc.RpcError as e:
            print("error:", e.code().name)


if __name__ == "__main__":
    main()
