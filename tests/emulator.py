"""Run the third-party ``gcloud-tasks-emulator`` as a subprocess for integration tests.

The emulator (PyPI ``gcloud-tasks-emulator`` 0.6.2) pins ``protobuf<5``, which conflicts
with current google-cloud-tasks, so ``scripts/setup`` installs it into its own virtualenv
(``.venvs/emulator``) and this module only ever runs it as a separate process.

Binary lookup, first match wins:

1. ``$CELERY_CLOUDTASKS_EMULATOR_BIN`` (``scripts/test`` exports it);
2. ``.venvs/emulator/bin/gcloud-tasks-emulator`` under the repository root;
3. ``gcloud-tasks-emulator`` on ``PATH``.

If none exists, starting an :class:`Emulator` raises :class:`EmulatorError` telling you to
run ``scripts/setup``. Integration tests never skip.

Known differences from Cloud Tasks worth remembering in tests (see DESIGN.md): header
names arrive as ``X-cloudtasks-queuename`` (compare case-insensitively) and the queue
header carries the full queue path, not the short queue ID; no
deduplication, OIDC, retry_config or dispatch_deadline; get_task/delete_task are
UNIMPLEMENTED; a recreated queue name or a task name that is not a full path stops a
queue silently, so use a fresh queue ID per test. The emulator listens on all interfaces
(it binds ``[::]``); tests only talk to it on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

__all__ = ["BINARY_ENV_VAR", "Emulator", "EmulatorError", "find_binary", "find_free_port"]

BINARY_ENV_VAR = "CELERY_CLOUDTASKS_EMULATOR_BIN"
REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_BINARY = REPO_ROOT / ".venvs" / "emulator" / "bin" / "gcloud-tasks-emulator"

# Never route loopback gRPC through an HTTP proxy taken from the environment.
_CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
# Variables that would leak our interpreter setup (or a proxy) into the emulator's venv.
_SCRUBBED_ENV = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)
_PORT_IN_USE_MARKERS = (b"Failed to bind", b"Address already in use")
_SETUP_HINT = "run scripts/setup (it installs the emulator into .venvs/emulator)"


class EmulatorError(RuntimeError):
    """The emulator is missing, did not start in time, or died."""


def find_free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binary() -> str:
    """Locate the ``gcloud-tasks-emulator`` executable, or fail saying how to get it."""
    configured = os.environ.get(BINARY_ENV_VAR)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise EmulatorError(
            f"{BINARY_ENV_VAR}={configured!r} is not an executable file; {_SETUP_HINT}"
        )
    if LOCAL_BINARY.is_file() and os.access(LOCAL_BINARY, os.X_OK):
        return str(LOCAL_BINARY)
    on_path = shutil.which("gcloud-tasks-emulator")
    if on_path:
        return on_path
    raise EmulatorError(
        f"gcloud-tasks-emulator not found (checked ${BINARY_ENV_VAR}, {LOCAL_BINARY} and PATH); "
        f"{_SETUP_HINT}"
    )


def _kill_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Have the kernel kill the emulator if the test process dies without cleaning up.

    Linux ties this to the *thread* that started the process: start emulators from a
    thread that outlives them (pytest's main thread does).
    """
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class Emulator:
    """One ``gcloud-tasks-emulator`` process, reachable at :attr:`host` (``127.0.0.1:N``).

    Use as a context manager (or call :meth:`start` / :meth:`stop`)::

        with Emulator(max_retries=3) as emu:
            queue = emu.create_queue("proj", "loc", "t-abc123")
            emu.client().create_task(parent=queue, task=...)

    ``max_retries`` bounds redeliveries of failed tasks (the emulator's default is forever,
    every 0.1 s; ``max_retries=2`` means three deliveries in all). ``target_host`` /
    ``target_port`` only matter for App Engine tasks; HTTP tasks go to their full URL.

    :meth:`pause` freezes a shared emulator for every test: resume it in a ``finally``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        max_retries: int | None = None,
        target_host: str | None = None,
        target_port: int | None = None,
        quiet: bool = False,
        start_timeout_seconds: float = 20.0,
        binary: str | None = None,
    ) -> None:
        self._requested_port = port
        self._max_retries = max_retries
        self._target_host = target_host
        self._target_port = target_port
        self._quiet = quiet
        self._start_timeout_seconds = start_timeout_seconds
        self._binary = binary
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._paused = False
        self._transports: list[CloudTasksGrpcTransport] = []
        self._admin: tasks_v2.CloudTasksClient | None = None
        self.start_seconds: float | None = None
        """How long the last :meth:`start` took until the first successful gRPC call."""

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Emulator:
        """Start the process and wait until it answers a gRPC call."""
        if self._process is not None:
            raise EmulatorError("emulator already started")
        binary = self._binary or find_binary()
        began = time.monotonic()
        # A port picked by find_free_port() can be taken before the emulator binds it;
        # try a few fresh ports before giving up. An explicit port gets one attempt.
        attempts = 1 if self._requested_port else 3
        try:
            for attempt in range(1, attempts + 1):
                port = self._requested_port or find_free_port()
                self._launch(binary, port)
                try:
                    self._wait_ready(began + self._start_timeout_seconds)
                except _PortInUse:
                    if attempt == attempts:
                        raise EmulatorError(
                            f"emulator could not bind port {port}; log tail:\n{self.log_tail()}"
                        ) from None
                    self._terminate()
                    continue
                break
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the emulator (terminate, then kill), close channels and remove the log."""
        for transport in self._transports:
            with contextlib.suppress(Exception):
                transport.close()
        self._transports.clear()
        self._admin = None
        self._terminate()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
        self._port = None

    def pause(self) -> None:
        """Freeze the whole emulator process (SIGSTOP): calls hang, nothing is delivered."""
        os.kill(self._require_process().pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Continue a process frozen by :meth:`pause` (SIGCONT)."""
        os.kill(self._require_process().pid, signal.SIGCONT)
        self._paused = False

    # -- addresses and clients ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmulatorError("emulator is not running")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:N``: pass to ``grpc.insecure_channel``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._require_process().pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def channel(self) -> grpc.Channel:
        """A new insecure gRPC channel to the emulator (the caller closes it)."""
        return grpc.insecure_channel(self.host, options=_CHANNEL_OPTIONS)

    def client(self) -> tasks_v2.CloudTasksClient:
        """A new Cloud Tasks client on an insecure channel; closed by :meth:`stop`."""
        transport = CloudTasksGrpcTransport(channel=self.channel())
        self._transports.append(transport)
        return tasks_v2.CloudTasksClient(transport=transport)

    # -- helpers -----------------------------------------------------------------------

    def create_queue(
        self, project: str, location: str, queue_id: str, *, paused: bool = False
    ) -> str:
        """Create a queue and return its full path ``projects/P/locations/L/queues/Q``."""
        client = self._admin_client()
        path = client.queue_path(project, location, queue_id)
        client.create_queue(
            parent=client.common_location_path(project, location),
            queue=tasks_v2.Queue(name=path),
            timeout=10.0,
        )
        if paused:
            client.pause_queue(name=path, timeout=10.0)
        return path

    def list_tasks(self, queue_path: str) -> list[tasks_v2.Task]:
        """The tasks still waiting (or being retried) in a queue."""
        return list(self._admin_client().list_tasks(parent=queue_path, timeout=10.0))

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the emulator's combined stdout/stderr."""
        if self._log_dir is None:
            return "(no emulator log)"
        data = self._log_path().read_bytes()
        return b"\n".join(data.splitlines()[-lines:]).decode("utf-8", "replace")

    # -- internals ---------------------------------------------------------------------

    def _log_path(self) -> Path:
        assert self._log_dir is not None
        return Path(self._log_dir.name) / "emulator.log"

    def _admin_client(self) -> tasks_v2.CloudTasksClient:
        if self._admin is None:
            self._admin = self.client()
        return self._admin

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise EmulatorError("emulator is not running")
        return self._process

    def _command(self, binary: str, port: int) -> list[str]:
        command = [binary, "start", "--port", str(port)]
        if self._max_retries is not None:
            command += ["--max-retries", str(self._max_retries)]
        if self._target_host is not None:
            command += ["--target-host", self._target_host]
        if self._target_port is not None:
            command += ["--target-port", str(self._target_port)]
        if self._quiet:
            command.append("--quiet")
        return command

    def _launch(self, binary: str, port: int) -> None:
        if self._log_dir is None:
            self._log_dir = tempfile.TemporaryDirectory(prefix="cloudtasks-emulator-")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self._log_path(), "wb") as log:
            self._process = subprocess.Popen(
                self._command(binary, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: terminal signals don't reach it
                preexec_fn=_kill_with_parent if sys.platform.startswith("linux") else None,
            )
        self._port = port

    def _wait_ready(self, deadline: float) -> None:
        process = self._require_process()
        while True:
            returncode = process.poll()
            if returncode is not None:
                raise EmulatorError(
                    f"emulator exited with status {returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            # The emulator's gRPC thread dies on errors while the process lives on.
            log = self._log_path().read_bytes()
            if any(marker in log for marker in _PORT_IN_USE_MARKERS):
                raise _PortInUse
            if b"Exception in thread" in log:
                raise EmulatorError(f"emulator failed while starting; log tail:\n{self.log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise EmulatorError(
                    f"emulator on {self.host} did not answer within "
                    f"{self._start_timeout_seconds:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        """True once the port accepts TCP and a ListQueues call succeeds."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        # A fresh channel per probe: a channel that failed earlier would wait out its
        # reconnect backoff before trying again.
        with self.channel() as channel:
            client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
            try:
                client.list_queues(
                    parent="projects/harness/locations/probe", retry=None, timeout=2.0
                )
            except Exception:
                return False
        return True

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            if self._paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._paused = False


class _PortInUse(Exception):
    """The emulator lost the race for its port; retry on another one."""
