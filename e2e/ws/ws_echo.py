"""WebSocket peers from the Python `websockets` library.

Usage:
  ws_echo.py serve PORT          echo server; prints 'ready' once listening
  ws_echo.py call URL N          sends N text messages and one binary, prints each echo
"""
import asyncio
import sys

import websockets


async def serve(port):
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with websockets.serve(echo, "127.0.0.1", port):
        print("ready", flush=True)
        await asyncio.Future()


async def call(url, n):
    async with websockets.connect(url, open_timeout=10) as ws:
        for i in range(n):
            await ws.send(f"message {i}")
            print(await asyncio.wait_for(ws.recv(), 10), flush=True)
        await ws.send(b"\x00\x01binary")
        print(repr(await asyncio.wait_for(ws.recv(), 10)), flush=True)


def main():
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        asyncio.run(call(sys.argv[2], int(sys.argv[3])))


if __name__ == "__main__":
    main()
