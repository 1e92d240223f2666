"""A throwaway `redis-server` (or `valkey-server`) for tests, benchmarks and trying fleet mode on one machine.

It listens on a Unix socket in the directory it is given (no TCP port, so nothing clashes), keeps nothing on
disk, and allows `DEBUG` from local connections (to slow it down on purpose). The server binary is
`$SIDECARD_REDIS_SERVER`, else `redis-server`, else `valkey-server`, from PATH; a missing or too old one is
`ServerMissing` with what to install, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Final

import hiredis

from .connection import MIN_MAJOR_VERSION, ProtocolError, ReplyError

START_TIMEOUT_S: Final = 10.0
INSTALL_HINT: Final = (
    "fleet mode's tests need redis-server (Redis 7+) or valkey-server: `make test` installs Debian's redis-server "
    "package when it can (apt-get install redis-server); or point SIDECARD_REDIS_SERVER at a server binary"
)


class ServerMissing(RuntimeError):
    pass


def find_server() -> str:
    """The server binary to run, checked to be version 7 or later."""
    configured = os.environ.get("SIDECARD_REDIS_SERVER")
    binary = configured or shutil.which("redis-server") or shutil.which("valkey-server")
    if not binary:
        raise ServerMissing(f"no redis-server or valkey-server on PATH. {INSTALL_HINT}")
    try:
        banner = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError as exc:
        raise ServerMissing(f"{binary} cannot run ({exc.strerror}). {INSTALL_HINT}") from None
    version = next((word.partition("=")[2] for word in banner.split() if word.startswith("v=")), "")
    major = version.partition(".")[0]
    if not major.isdigit() or int(major) < MIN_MAJOR_VERSION:
        raise ServerMissing(f"{binary} is version {version or 'unknown'}; fleet mode needs 7 or later. {INSTALL_HINT}")
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_certificates(directory: Path) -> None:
    """ca.pem, and server.pem + server.key for localhost signed by it (EC keys: made in milliseconds)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerMissing("a TLS store for the tests needs the openssl command (Debian: apt-get install openssl)")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for command in (
        [openssl, "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sidecard test CA"],
        [openssl, "req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "2", "-extfile", "san.cnf"],
    ):
        subprocess.run(command, cwd=directory, check=True, capture_output=True, timeout=30)


class LocalStore:
    """One server process on `<directory>/store.sock`; `stop()` and `start()` again keep the socket path.

    With `tls`, it also listens for TLS on a free loopback port, with a certificate for "localhost" signed by a
    throwaway CA (`ca_file`; made with the `openssl` command), and `url` is that `rediss://` one.
    """

    def __init__(self, directory: str | os.PathLike[str], *, binary: str | None = None, tls: bool = False) -> None:
        self.directory = Path(directory)
        self.binary = binary or find_server()
        self.socket_path = str(self.directory / "store.sock")
        self.log_path = self.directory / "store.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.tls_port: int | None = None
        self.ca_file = str(self.directory / "ca.pem")
        if tls:
            self.directory.mkdir(parents=True, exist_ok=True)
            make_certificates(self.directory)
            self.tls_port = free_port()

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.tls_port}" if self.tls_port else f"unix://{self.socket_path}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--logfile", str(self.log_path), "--enable-debug-command", "local",
        ]
        if self.tls_port:
            d = self.directory
            args += ["--tls-port", str(self.tls_port), "--bind", "127.0.0.1", "--tls-cert-file", str(d / "server.pem"),
                     "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        # In its directory: whatever it might write (a dump, a log) lands there, never in the caller's directory.
        self.process = subprocess.Popen(args, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self.command("PING") == b"PONG":
                    return
            except (OSError, ReplyError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.stop()
                raise ServerMissing(f"{self.binary} did not start on {self.socket_path}:\n{tail}")
            time.sleep(0.01)

    def __enter__(self) -> LocalStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (its data is gone: nothing is kept on disk)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered, until `resume()`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def slow(self, seconds: float) -> None:
        """`DEBUG SLEEP`: the server answers nobody for `seconds`. Returns once the sleep has begun (a PING
        left unanswered shows it), so what the caller sends next is sure to wait."""
        with socket.socket(socket.AF_UNIX) as sleeper:
            sleeper.connect(self.socket_path)
            sleeper.sendall(hiredis.pack_command(("DEBUG", "SLEEP", seconds)))
            deadline = time.monotonic() + seconds + START_TIMEOUT_S
            while time.monotonic() < deadline:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(0.05)
                    probe.connect(self.socket_path)
                    probe.sendall(hiredis.pack_command(("PING",)))
                    try:
                        probe.recv(64)
                    except TimeoutError:
                        return  # asleep
            raise RuntimeError("DEBUG SLEEP never took hold")

    def command(self, *args: Any) -> Any:
        """One command on a fresh connection (test set-up and inspection); an error reply is returned."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.socket_path)
            sock.sendall(hiredis.pack_command(args))
            reader = hiredis.Reader(replyError=ReplyError, protocolError=ProtocolError)
            while (reply := reader.gets()) is False:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the store closed the connection")
                reader.feed(data)
            return reply
