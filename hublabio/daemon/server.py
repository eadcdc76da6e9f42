"""hublabd's asyncio Unix-socket server: JSON lines in, events out (hublabio.protocol).

- several clients at once, several requests per connection (each event carries its request id);
- queued ops (generate, ask, models.load, benchmark, ...) run one at a time with batch_mode
  off, or up to `Service.concurrency()` at once with continuous batching (their decodes
  batched by hublabio.batching); at most `queue_size` wait behind the running ones, and one
  more gets an immediate `busy` error;
- `{"op": "cancel", "target": id}` cancels a waiting or running request; a client that
  disconnects cancels all of its requests; one that only shuts down its sending side
  (half-close) still gets its answers;
- writes never block (hublabio.daemon.sockwrite): a client that does not read is cut off from
  its own stream and stalls no other client, no worker thread and no generation;
- `Server.shutdown()` (SIGTERM in hublabd) stops accepting, cancels what runs, closes the
  model pool and removes the socket.

`start_in_thread()` runs the same server on an event loop in a background thread (the shell
uses it when no daemon is listening).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hublabio import paths, protocol
from hublabio.config import DaemonSettings
from hublabio.daemon.service import Service
from hublabio.daemon.sockwrite import ClientGone, SocketWriter
from hublabio.errors import (
    BusyError,
    Cancelled,
    DaemonUnavailable,
    HublabError,
    ProtocolError,
)

log = logging.getLogger("hublabd")

SOCKET_MODE = 0o660
MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes with the terminating NUL
SHUTDOWN_GRACE_S = 10.0
LIGHT_WORKERS = 16  # quick ops (hello, info, models.list, ...) running at once


@dataclass(eq=False)
class Job:
    id: str
    op: str
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the loop `cancelled` belongs to

    def request_cancel(self) -> None:
        """Cancel from any thread (an asyncio.Event may only be set on its loop's thread)."""
        self.cancel.set()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self.loop is None or here is self.loop:
            self.cancelled.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                self.loop.call_soon_threadsafe(self.cancelled.set)


PARALLEL_MAX = 16  # queued ops running at once at most (params: parallel <= 16)


class Turns:
    """Run slots for queued ops: at most `capacity()` at once (it may change: `ai config
    parallel`), granted in arrival order."""

    def __init__(self, capacity):
        self.capacity = lambda: max(1, min(PARALLEL_MAX, int(capacity())))
        self.held = 0
        self._queue: collections.deque[asyncio.Future] = collections.deque()

    def try_take(self) -> bool:
        if not self._queue and self.held < self.capacity():
            self.held += 1
            return True
        return False

    async def take(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(fut)
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give()  # granted as we were cancelled: pass it on
            raise

    def give(self) -> None:
        self.held -= 1
        self._grant()

    def _grant(self) -> None:
        while self._queue and self.held < self.capacity():
            fut = self._queue.popleft()
            if not fut.done():
                self.held += 1
                fut.set_result(True)


class Dispatcher:
    """Runs ops for any transport: light ops at once in a worker thread, queued ops one at a
    time behind a bounded queue. Events are handed to an async `send` callback."""

    def __init__(self, service: Service, queue_size: int):
        self.service = service
        self.queue_size = max(0, int(queue_size))
        self._turns = Turns(service.concurrency)
        self._light = asyncio.Semaphore(LIGHT_WORKERS)
        # Reused worker threads: handing a job to an idle one is one wake-up, where starting a
        # thread costs a start-up handshake (two context switches) before the op even begins.
        self._workers = ThreadPoolExecutor(max_workers=LIGHT_WORKERS + 2,
                                           thread_name_prefix="hublabd-op")
        # Queued ops (everything that runs llama.cpp) always run on this one thread. llama.cpp's
        # OpenMP build keeps a team of worker threads per calling thread: decodes that come from
        # changing threads leave several teams competing for the cores and cut generation to a
        # third (bench/bench_stream.py, docs/BENCHMARKS.md), while one calling thread keeps one
        # warm team.
        self._llama_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hublabd-llama")
        # With continuous batching several queued ops run at once, each on a thread of its
        # own; their decodes all go to the one decoder thread (hublabio.batching).
        self._batched = ThreadPoolExecutor(max_workers=PARALLEL_MAX,
                                           thread_name_prefix="hublabd-gen")
        self.running = 0
        self.waiting = 0
        self.jobs: set[Job] = set()  # every live job, for cancel by id from any connection
        self._tasks: set[asyncio.Task] = set()

    def new_job(self, request_id: str, op: str) -> Job:
        job = Job(request_id, op, loop=asyncio.get_running_loop())
        self.jobs.add(job)
        return job

    def cancel(self, request_id: str) -> bool:
        found = False
        for job in list(self.jobs):
            if job.id == request_id:
                job.request_cancel()
                found = True
        return found

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.request_cancel()

    async def submit(self, job: Job, params: dict, send, direct=None) -> None:
        """Run `job` and pass each of its events to `await send(ev)`; always ends with exactly
        one terminal event. `send` failing (client gone) cancels the job. With `direct` (a
        thread-safe blocking writer), the op's worker thread writes its events itself: tokens
        reach the client without a hop through the event loop."""
        async def safe_send(ev):
            try:
                await send(ev)
            except Exception:  # noqa: BLE001 - the client went away: stop the work
                job.request_cancel()

        try:
            try:
                spec = self.service.ops.spec(job.op)
                self.service.ops.check_params(spec, params)
            except HublabError as exc:
                await safe_send(protocol.error_event(exc, job.id))
                return
            if not spec.queued:
                async with self._light:  # bounds the worker threads of quick ops
                    await self._execute(job, params, safe_send, direct, self._workers)
                return
            if self.running >= self._turns.capacity() and self.waiting >= self.queue_size:
                with self.service._lock:
                    self.service.stats.busy += 1
                exc = BusyError(f"daemon busy: {self.running} running and {self.waiting} "
                                f"waiting (queue_size={self.queue_size}); try again shortly")
                await safe_send(protocol.error_event(exc, job.id))
                return
            if not await self._wait_turn(job):
                await safe_send(protocol.error_event(
                    Cancelled(f"request {job.id} cancelled while waiting in the queue"), job.id))
                return
            try:
                self.running += 1
                pool = self._batched if self._turns.capacity() > 1 else self._llama_thread
                await self._execute(job, params, safe_send, direct, pool)
            finally:
                self.running -= 1
                self._turns.give()
        finally:
            self.jobs.discard(job)

    async def _wait_turn(self, job: Job) -> bool:
        """Wait for a run slot unless cancelled first. True when a slot is now held."""
        if job.cancelled.is_set():
            return False
        if self._turns.try_take():  # fast path: room now, no loop round trips
            return True
        self.waiting += 1
        take = asyncio.ensure_future(self._turns.take())
        cancelled = asyncio.ensure_future(job.cancelled.wait())
        try:
            await asyncio.wait({take, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            cancelled.cancel()
            if not take.done():
                take.cancel()
        try:
            await take
        except asyncio.CancelledError:
            return False
        if job.cancelled.is_set():
            self._turns.give()
            return False
        return True

    async def _execute(self, job: Job, params: dict, send, direct, executor) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job.started = True
        gone = False

        def emit(ev):
            nonlocal gone
            if direct is None:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            elif not gone:
                try:
                    direct(ev)
                except OSError:  # the client went away: stop the work, drop the rest
                    gone = True
                    job.request_cancel()

        def work():
            try:
                for ev in self.service.run(job.op, params, request_id=job.id, cancel=job.cancel):
                    emit(ev)
            except BaseException as exc:  # noqa: BLE001 - report, never lose the terminal event
                with contextlib.suppress(RuntimeError):
                    emit(protocol.error_event(exc, job.id))
            finally:
                if direct is not None:
                    with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                        loop.call_soon_threadsafe(queue.put_nowait, None)

        try:
            executor.submit(work)
        except RuntimeError:  # shut down between the request and now
            await send(protocol.error_event(DaemonUnavailable("the daemon is shutting down"),
                                            job.id))
            return
        while True:
            ev = await queue.get()
            if ev is None:
                break
            await send(ev)
            if ev["type"] in protocol.TERMINAL:
                break
        # the worker's last act was that event: it ends now (no executor thread spent on a join)

    def close(self) -> None:
        """Let the worker threads go once their current op ends."""
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._llama_thread.shutdown(wait=False, cancel_futures=True)
        self._batched.shutdown(wait=False, cancel_futures=True)

    def track(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> bool:
        """Wait for running requests to finish (after cancel_all). True when all ended."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending


class Connection:
    """One client: its requests, and a SocketWriter that every event goes through (from the
    event loop or straight from an op's worker thread), so events of one request keep their
    order, lines never interleave, and a client that does not read stalls nobody else."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.out = SocketWriter(writer.get_extra_info("socket"), asyncio.get_running_loop())
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task] = set()

    def send_sync(self, ev: dict) -> None:
        """Write one event from any thread, never blocking. Raises ClientGone."""
        self.out.write(protocol.encode(ev))

    async def send(self, ev: dict) -> None:
        self.out.write(protocol.encode(ev))

    async def finish(self) -> None:
        """The client shut down its sending side (half-close): answer what it asked, then
        return. Should it hang up meanwhile, its requests are cancelled."""
        while self.tasks:
            await asyncio.wait(set(self.tasks), timeout=0.5)
            if self.out.hung_up():
                self.cancel_all()
        with contextlib.suppress(ClientGone):  # the writer's own stall limit bounds this
            await self.out.drain()

    def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            job.request_cancel()


class Server:
    """The Unix-socket front of a Service (and, when asked, the HTTP API on the same loop)."""

    def __init__(self, service: Service, socket_path: str | os.PathLike | None = None, *,
                 queue_size: int | None = None, http: str | None = None):
        self.service = service
        settings = service.settings
        self.socket_path = Path(socket_path or settings.socket or paths.socket_path()).absolute()
        self.http_listen = http if http is not None else settings.http
        self.http_address: tuple[str, int] | None = None
        self.queue_size = settings.queue_size if queue_size is None else queue_size
        self.dispatcher: Dispatcher | None = None
        self._server: asyncio.base_events.Server | None = None
        self._http = None
        self._stopped: asyncio.Event | None = None
        self._reaper: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self.service.tidy_at_start()  # before serving: the visible state is old or new
        self.dispatcher = Dispatcher(self.service, self.queue_size)
        self._stopped = asyncio.Event()
        _prepare_socket_path(self.socket_path)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path),
                                                       limit=protocol.MAX_LINE + 2)
        os.chmod(self.socket_path, SOCKET_MODE)
        if self.http_listen:
            from hublabio.daemon.http import start_http

            try:
                self._http, self.http_address = await start_http(self.dispatcher, self.service,
                                                                 self.http_listen)
            except BaseException:
                await self._close_socket()
                raise
        ttl = self.service.settings.idle_ttl_s
        if ttl and ttl > 0:
            self._reaper = asyncio.ensure_future(self._reap_loop(min(60.0, max(ttl / 4, 0.05))))
        log.info("listening on %s%s", self.socket_path,
                 f" and http://{self.http_address[0]}:{self.http_address[1]}" if self.http_address else "")

    def request_stop(self) -> None:
        """Ask serve_forever() to shut down (call on the loop's thread)."""
        if self._stopped is not None:
            self._stopped.set()

    async def serve_forever(self) -> None:
        await self._stopped.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        await self._close_socket()
        if self._http is not None:
            self._http.close()
            with contextlib.suppress(Exception):
                await self._http.wait_closed()
        if self._reaper is not None:
            self._reaper.cancel()
        self.dispatcher.cancel_all()
        if not await self.dispatcher.drain(SHUTDOWN_GRACE_S):
            log.warning("some requests did not stop within %.0f s", SHUTDOWN_GRACE_S)
        for task in list(self._connections):
            task.cancel()
        self.dispatcher.close()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.service.close), SHUTDOWN_GRACE_S)
        except Exception:  # noqa: BLE001 - shutting down regardless
            log.exception("closing the model pool failed")
        log.info("stopped")

    async def _close_socket(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def _reap_loop(self, every: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            if self.dispatcher.running:
                continue
            try:
                gone = await loop.run_in_executor(None, self.service.pool.reap_idle)
                if gone:
                    log.info("unloaded idle model(s): %s", ", ".join(gone))
            except Exception:  # noqa: BLE001
                log.exception("idle unload failed")

    # ---- connections ---------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        conn = Connection(writer)
        splitter = protocol.LineSplitter()
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    break
                if not data:
                    await conn.finish()  # a half-close still gets its answers
                    break
                for line in splitter.feed(data):
                    await self._on_line(conn, line)
        except asyncio.CancelledError:
            pass
        finally:
            conn.cancel_all()
            self._connections.discard(task)
            conn.out.close()
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 5.0)

    async def _on_line(self, conn: Connection, line) -> None:
        async def reply(ev):
            with contextlib.suppress(ClientGone):
                await conn.send(ev)

        if isinstance(line, protocol.TooLong):
            await reply(protocol.error_event(ProtocolError(
                f"request line of {line.size} bytes exceeds the {protocol.MAX_LINE}-byte limit")))
            return
        try:
            req = protocol.decode_request(line)
        except protocol.RequestError as exc:
            await reply(protocol.error_event(exc, exc.request_id))
            return
        if req.op == "cancel":
            target = req.params.get("target")
            if not isinstance(target, str):
                await reply(protocol.error_event(ProtocolError('cancel needs "target", the id of '
                                                               "the request to cancel"), req.id))
                return
            job = conn.jobs.get(target)
            if job is not None:
                job.request_cancel()
                found = True
            else:
                found = self.dispatcher.cancel(target)
            await reply(protocol.result({"target": target, "cancelled": found}, req.id))
            return
        if req.id in conn.jobs:
            await reply(protocol.error_event(ProtocolError(
                f"request id {req.id!r} is already in use by a running request"), req.id))
            return
        job = self.dispatcher.new_job(req.id, req.op)
        conn.jobs[req.id] = job

        async def run():
            try:
                await self.dispatcher.submit(job, req.params, conn.send, conn.send_sync)
            finally:
                conn.jobs.pop(req.id, None)

        task = self.dispatcher.track(run())
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)


def _prepare_socket_path(path: Path) -> None:
    """Create the folder; remove a stale socket; refuse when a daemon already listens there."""
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise DaemonUnavailable(f"socket path is {len(os.fsencode(path))} bytes, over the "
                                f"{MAX_SUN_PATH}-byte limit of Unix sockets: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonUnavailable(f"{path} exists and is not a socket; remove it or choose another "
                                "--socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale socket of a daemon that died
            return
        raise DaemonUnavailable(f"cannot use socket {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise DaemonUnavailable(f"a daemon is already listening on {path}")


# ---- running in a background thread ---------------------------------------------------------

class DaemonHandle:
    """A daemon running on its own event loop in a background thread."""

    def __init__(self, server: Server, thread: threading.Thread, loop: asyncio.AbstractEventLoop):
        self.server = server
        self.service = server.service
        self.socket_path = server.socket_path
        self.http_address = server.http_address
        self._thread = thread
        self._loop = loop

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down (cancel running requests, close the pool, remove the socket) and wait."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "DaemonHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(service_or_settings: Service | DaemonSettings | None = None,
                    socket_path: str | os.PathLike | None = None, *, http: str | None = None,
                    queue_size: int | None = None) -> DaemonHandle:
    """Start a daemon in a background thread and return once it listens (errors raised here)."""
    if isinstance(service_or_settings, Service):
        service = service_or_settings
    else:
        service = Service(service_or_settings)
    server = Server(service, socket_path, http=http, queue_size=queue_size)
    started = threading.Event()
    box: dict = {}

    def main():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        box["loop"] = loop
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
            started.set()
            loop.run_until_complete(loop.run_in_executor(None, service.close))
            loop.close()
            return
        started.set()
        try:
            loop.run_until_complete(server.serve_forever())
        finally:
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftover:  # e.g. idle HTTP keep-alive connections
                task.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    thread = threading.Thread(target=main, name="hublabd", daemon=True)
    thread.start()
    started.wait()
    if "error" in box:
        raise box["error"]
    return DaemonHandle(server, thread, box["loop"])
