"""A loopback TCP proxy that adds a fixed latency to each direction.

Used by benchmarks (and usable from tests) to make a local server, such as the
Cloud Tasks emulator, answer like a remote one::

    from latency_proxy import LatencyProxy

    with LatencyProxy(emulator.host, delay_seconds=0.020) as proxy:
        client = make_client(proxy.host)       # every RPC now takes >= 40 ms more

Every chunk read from one side is written to the other ``delay_seconds`` after
it arrived: latency without a bandwidth cap, so concurrent requests multiplexed
on one connection (gRPC over HTTP/2) overlap their waits instead of queueing
behind each other. Order within a direction is preserved.

The proxy runs an asyncio loop in a daemon thread, listens on 127.0.0.1 only,
and has a bounded lifetime: after ``max_lifetime_seconds`` it closes its
listener and every connection by itself, so a forgotten proxy cannot outlive
a benchmark. Run it alone to try it::

    .venvs/dev/bin/python bench/latency_proxy.py 127.0.0.1:8123 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from types import TracebackType
from typing import Any

__all__ = ["LatencyProxy"]

_CHUNK = 65_536


class LatencyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` (``host:port``), delaying each direction."""

    def __init__(
        self,
        target: str,
        *,
        delay_seconds: float = 0.020,
        max_lifetime_seconds: float = 900.0,
        start_timeout_seconds: float = 5.0,
    ) -> None:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"target must be host:port, got {target!r}")
        if delay_seconds < 0 or max_lifetime_seconds <= 0:
            raise ValueError("delay_seconds must be >= 0 and max_lifetime_seconds > 0")
        self.target_host, self.target_port = host, int(port)
        self.delay_seconds = delay_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self._start_timeout_seconds = start_timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._port: int | None = None
        #: Connections accepted so far (for sanity checks in benchmarks).
        self.connections = 0

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LatencyProxy:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout_seconds):
            raise RuntimeError("latency proxy did not start in time")
        if self._error is not None:
            raise RuntimeError(f"latency proxy failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Close the listener and every connection; wait for the thread (bounded)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._request_stop)
            thread.join(timeout=5.0)
        self._thread = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy is not running")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:N``: connect here instead of to the target."""
        return f"127.0.0.1:{self.port}"

    # -- the loop thread -------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() if it happened before ready
            self._error = exc
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self.max_lifetime_seconds)
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                upstream_r, upstream_w = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                client_w.close()
                return
            try:
                await asyncio.gather(
                    self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w)
                )
            finally:
                for writer in (client_w, upstream_w):
                    writer.close()
        except asyncio.CancelledError:
            client_w.close()
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy reader -> writer, each chunk released ``delay_seconds`` after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(_CHUNK)
                    queue.put_nowait((loop.time() + self.delay_seconds, data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                queue.put_nowait((loop.time(), b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="loopback TCP proxy adding latency")
    parser.add_argument("target", help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="per direction")
    parser.add_argument("--lifetime-seconds", type=float, default=600.0)
    args = parser.parse_args()
    with LatencyProxy(
        args.target,
        delay_seconds=args.delay_ms / 1000,
        max_lifetime_seconds=args.lifetime_seconds,
    ) as proxy:
        print(f"listening on {proxy.host} -> {args.target} (+{args.delay_ms:g} ms each way)")
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.lifetime_seconds)


if __name__ == "__main__":
    main()
