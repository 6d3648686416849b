"""A tiny HTTP backend for the demo: answers every GET with its name. Usage: PORT NAME"""
import http.server
import sys

NAME = sys.argv[2].encode() + b"\n"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(NAME)))
        self.end_headers()
        self.wfile.write(NAME)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
