"""A team MLflow tracking server on PostgreSQL, run from a folder in the project (``tumorseg server``).

:func:`start` runs PostgreSQL (Debian's ``postgresql`` package) on a free loopback port with its
data in ``<dir>/pgdata``, and ``mlflow server`` with that database as its backend store and
``<dir>/artifacts`` as its served artifact store (``--artifacts-destination``, ``--serve-artifacts``)
in a process group of its own; it waits until ``GET /health`` answers and returns the
``MLFLOW_TRACKING_URI`` to export. :func:`stop` ends that whole process group (the ``mlflow server``
launcher, uvicorn and its workers, MLflow's job runners: SIGKILL of the launcher alone leaves the
others serving the port) and stops PostgreSQL with ``pg_ctl stop -m fast``, then checks that none
of the processes it started is left. :func:`status` reports without changing anything.

``<dir>/server.json`` (ports, pids, the URI) is written atomically. Processes are recognised by pid
*and* start time (``/proc/<pid>/stat``) within one boot, so state left by a crash or a reboot is
known to be stale (and cleaned by the next :func:`start`) and a reused pid is never signalled. A
restart keeps the previous ports when they are free, so an exported URI stays valid.

**Running as root.** PostgreSQL refuses to run as root. As root, ``initdb``, ``pg_ctl`` and so the
server run as the ``postgres`` system user that Debian's package creates (``subprocess`` switches
user, group and supplementary groups: no ``sudo``/``runuser`` needed); ``<dir>/pgdata`` belongs to
it with mode 0750 (``initdb --allow-group-access``: members of its group can read it, e.g. to back
it up, and root can read everything), and the folders above it must be open to it (``o+x``). The
MLflow server itself runs as the calling user, as do the artifacts and logs. As any other user,
everything runs as that user.

**Security.** The database listens on 127.0.0.1 only, without a Unix socket, and trusts every
connection from there (no password): acceptable for a development or lab server on a machine
whose users are trusted, not beyond. MLflow has no authentication either, so it binds to 127.0.0.1
unless ``host`` says otherwise (the CLI warns). A cloud deployment swaps in a managed PostgreSQL,
object storage and an authenticating proxy: README, "Scaling out".

Linux is the supported platform (``/proc`` identifies processes; elsewhere the recorded pids are
trusted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorseg.errors import ServerError  # noqa: F401 - raised here, defined with the other user errors
from tumorseg.io import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(".mlflow-server")
STATE_FILE = "server.json"
LOOPBACK = "127.0.0.1"
DATABASE = "mlflow"  # the database, and the PostgreSQL superuser that owns it (initdb -U)
DB_USER = "mlflow"
SERVICE_USER = "postgres"  # PostgreSQL's account when we run as root (Debian's package creates it)
DRIVER = "postgresql+psycopg"  # SQLAlchemy 2.1 defaults to psycopg 3 for postgresql://; named, so 2.0 agrees
INSTALL_HINT = "install PostgreSQL: sudo apt-get install postgresql"
STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
LOCK_WAIT_S = 300.0
_PG_SETTINGS = """
# tumorseg server (src/tumorseg/server.py): TCP on loopback only, no Unix socket; the port is
# given at each start (pg_ctl -o "-p PORT")
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
"""
_PG_HBA = """# tumorseg server (src/tumorseg/server.py): connections from this machine's loopback only,
# without a password (a local development server; anyone with a shell here can use the database)
host all all 127.0.0.1/32 trust
"""


@dataclass(frozen=True)
class Layout:
    """Where one server keeps everything: the state folder and what it holds."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def postgres_log(self) -> Path:
        return self.logs / "postgres.log"

    @property
    def mlflow_log(self) -> Path:
        return self.logs / "mlflow.log"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock(self) -> Path:
        return self.root / "lock"


def layout(root: str | Path = DEFAULT_DIR) -> Layout:
    """Resolved (symlinks too): PostgreSQL is recognised by the data folder it was started on."""
    return Layout(Path(root).resolve())


@dataclass
class Status:
    """What :func:`status` found (``running``: both processes alive and ``/health`` answering)."""

    layout: Layout
    running: bool
    uri: str | None = None
    host: str | None = None
    mlflow_port: int | None = None
    postgres_port: int | None = None
    mlflow_pid: int | None = None
    postgres_pid: int | None = None
    problems: list[str] = field(default_factory=list)  # why it is not running, or what is left over


@dataclass
class Started:
    uri: str
    already_running: bool
    status: Status
    notes: list[str] = field(default_factory=list)


@dataclass
class Stopped:
    stopped: list[str]  # what was running and is now ended ("MLflow server (pid 12, 3 processes)", ...)


# --------------------------------------------------------------------------------------------
# PostgreSQL's binaries and account
# --------------------------------------------------------------------------------------------


def _version_key(path: str | Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(path)))


def postgres_bindir(pgdata: Path | None = None) -> Path:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``: the cluster's own major version when
    ``pgdata`` has one (``PG_VERSION``), else ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin`` (Debian keeps them off PATH), or PATH."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        if pgdata is not None and (pgdata / "PG_VERSION").is_file():
            candidates.append(Path(f"/usr/lib/postgresql/{(pgdata / 'PG_VERSION').read_text().strip()}/bin"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            if found:
                candidates.append(Path(found))
    candidates += sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=_version_key, reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres", "psql", "createdb")):
            return folder
    looked = "pg_config --bindir, /usr/lib/postgresql/*/bin, PATH"
    raise ServerError(f"PostgreSQL's server (initdb, pg_ctl, postgres) is not installed (looked in {looked}): {INSTALL_HINT}")


@dataclass(frozen=True)
class Account:
    """The user PostgreSQL runs as; ``switch`` when that is not us (we are root)."""

    name: str
    uid: int
    gid: int
    switch: bool


def postgres_account() -> Account:
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return Account(me.pw_name, me.pw_uid, me.pw_gid, switch=False)
    try:
        user = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL refuses to run as root and there is no '{SERVICE_USER}' user to run it as: "
            f"{INSTALL_HINT} creates one (or: useradd --system {SERVICE_USER}), or run tumorseg server as another user"
        ) from None
    return Account(user.pw_name, user.pw_uid, user.pw_gid, switch=True)


def _run_as(account: Account, command: list[Any], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a PostgreSQL tool as ``account`` (switching user only when we are root)."""
    switch: dict[str, Any] = {}
    if account.switch:
        switch = {"user": account.uid, "group": account.gid, "extra_groups": os.getgrouplist(account.name, account.gid)}
    env = {**os.environ, "LC_MESSAGES": "C"}
    try:
        return subprocess.run(
            [str(part) for part in command], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL, **switch
        )
    except subprocess.TimeoutExpired:
        raise ServerError(f"{Path(str(command[0])).name} did not finish within {timeout:.0f} s: {shlex.join(str(p) for p in command)}") from None


# --------------------------------------------------------------------------------------------
# Processes: identity (pid + start time within one boot), families, ending them
# --------------------------------------------------------------------------------------------

_HAVE_PROC = Path("/proc/self/stat").exists()


def boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, process group, start time in clock ticks) from /proc, None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def start_time(pid: int) -> int | None:
    info = _stat(pid)
    return info[3] if info else None


def alive(pid: int | None, started: int | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, given ``started``, is the process that started then."""
    if not pid:
        return False
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    info = _stat(pid)
    if info is None or info[0] in ("Z", "X"):
        return False
    return started is None or info[3] == started


def _processes() -> list[tuple[int, int, int, int]]:
    """Every live process: (pid, parent, process group, start time)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info and info[0] not in ("Z", "X"):
                found.append((int(entry.name), info[1], info[2], info[3]))
    return found


def family(leader: int, started: int, group: bool = True) -> dict[int, int]:
    """The live processes ``leader`` started (pid -> start time): itself, the members of its process
    group (``group``), and the descendants of all these (jobs in sessions of their own included).

    A process group keeps its number reserved while any member lives, so members found under
    ``leader``'s number after it died are its orphans; but once ``leader``'s pid belongs to a
    process that started later, the group is gone and nothing is returned.
    """
    if not _HAVE_PROC:
        try:
            if group:
                os.killpg(leader, 0)
            else:
                os.kill(leader, 0)
        except OSError:
            return {}
        return {leader: started}
    current = _stat(leader)
    if current is not None and current[3] != started:
        return {}
    processes = _processes()
    members = {pid: start for pid, _, pgrp, start in processes if pid == leader or (group and pgrp == leader)}
    children: dict[int, list[tuple[int, int]]] = {}
    for pid, parent, _, start in processes:
        children.setdefault(parent, []).append((pid, start))
    frontier = list(members)
    while frontier:
        for pid, start in children.get(frontier.pop(), []):
            if pid not in members:
                members[pid] = start
                frontier.append(pid)
    return members


def _signal_all(processes: dict[int, int], sig: int) -> None:
    for pid, started in processes.items():
        if alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status when it is our child (a server this process started), so
    that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _still_alive(leader: int, started: int, known: dict[int, int], group: bool) -> dict[int, int]:
    """``known`` processes still alive (also those re-parented when their parent died), plus any
    new member of the family."""
    _reap(leader)
    left = {pid: start for pid, start in known.items() if alive(pid, start)}
    left.update(family(leader, started, group))
    return left


def _wait_gone(leader: int, started: int, known: dict[int, int], timeout: float, group: bool = True) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        left = _still_alive(leader, started, known, group)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def end_family(leader: int, started: int, grace: float = STOP_GRACE_S) -> tuple[int, dict[int, int]]:
    """SIGTERM every process of ``leader``'s family, SIGKILL what is left after ``grace`` seconds.
    Returns (how many processes there were, those still alive at the end: should be none)."""
    known = family(leader, started)
    if not known:
        return 0, {}
    _signal_all(known, signal.SIGTERM)
    left = _wait_gone(leader, started, known, grace)
    for _ in range(3):  # a supervisor may fork a replacement worker while it is being killed
        if not left:
            break
        log.warning("%d process(es) of pid %d still running %.0f s after SIGTERM: SIGKILL", len(left), leader, grace)
        known.update(left)
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(leader, started, known, 5.0)
    return len(known), left


# --------------------------------------------------------------------------------------------
# Ports, health, state
# --------------------------------------------------------------------------------------------


def _bind_host(host: str) -> tuple[int, str]:
    return (socket.AF_INET6, host) if ":" in host else (socket.AF_INET, host)


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR as servers set it, so a port
    whose old connections linger in TIME_WAIT after a restart counts as free)."""
    family_, address = _bind_host(host)
    with socket.socket(family_, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    family_, address = _bind_host(host)
    with socket.socket(family_, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _choose_port(wanted: int | None, previous: int | None, host: str, what: str) -> int:
    if wanted:
        if not port_free(wanted, host):
            raise ServerError(f"{what} port {wanted} is in use on {host}: choose another --port, or leave it out for a free one")
        return wanted
    if previous and port_free(previous, host):
        return previous
    return free_port(host)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def exposure_warning(host: str) -> str | None:
    """The warning for a server reachable from other machines, or None on loopback."""
    if is_loopback(host):
        return None
    return (
        f"--host {host}: the MLflow server has NO authentication: anyone who can reach this machine's port can read, change "
        "and delete every run, artifact and model. Use it only on a trusted network, or keep 127.0.0.1 and put an "
        "authenticating proxy with TLS in front (README, Scaling out). MLflow itself still refuses Host headers other "
        "than localhost and private addresses unless its --allowed-hosts is set."
    )


def _url_host(host: str) -> str:
    """Where this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def host_name() -> str:
    """This machine's name as other machines may know it (for a server bound to all addresses)."""
    return socket.getfqdn()


def tracking_uri_for(host: str, port: int) -> str:
    return f"http://{_url_host(host)}:{port}"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send a loopback health check through HTTP_PROXY


def healthy(uri: str, timeout: float = 3.0) -> bool:
    try:
        with _NO_PROXY.open(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def read_state(where: Layout) -> dict[str, Any]:
    try:
        state = json.loads(where.state.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s): the server is taken as not running", where.state, exc)
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(where: Layout, state: dict[str, Any]) -> None:
    atomic_write_json(where.state, state)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_tail(path: Path, lines: int = 15, since: int = 0) -> list[str]:
    """The last ``lines`` non-blank lines written after byte ``since`` (this start's, not the last one's)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - 16384, since, 0))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def _failure(message: str, log_path: Path, since: int = 0) -> ServerError:
    """A ServerError whose message ends with the log's last lines; ``details`` holds more of them."""
    tail = _log_tail(log_path, since=since)
    error = ServerError(f"{message}; see {log_path}, which ends: {' | '.join(tail[-2:]) or '(empty)'}")
    error.details = tail  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def _locked(where: Layout) -> Iterator[None]:
    """One start/stop at a time on a state folder (two `make server` at once start one server)."""
    where.root.mkdir(parents=True, exist_ok=True)
    with open(where.lock, "a") as handle:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise ServerError(f"another tumorseg server start/stop holds {where.lock}: wait for it, or check that it is not hanging") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postmaster:
    pid: int
    started: int | None
    port: int


def _is_postgres(pid: int) -> bool:
    try:
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except (OSError, IndexError):
        return False
    return Path(program).name in ("postgres", "postmaster")


def _serves(pid: int, pgdata: Path) -> bool:
    """Whether the postgres process ``pid`` runs on ``pgdata`` (a postmaster works in its data folder)."""
    with contextlib.suppress(OSError):
        return os.path.samefile(f"/proc/{pid}/cwd", pgdata)
    with contextlib.suppress(OSError):
        return str(pgdata).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return False


def postmaster(where: Layout) -> Postmaster | None:
    """The PostgreSQL server running on ``pgdata``, from its ``postmaster.pid`` (pid, port), when
    that pid is a live ``postgres`` process working in this data folder."""
    try:
        lines = (where.pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    if not alive(pid):
        return None
    if _HAVE_PROC and not (_is_postgres(pid) and _serves(pid, where.pgdata)):
        return None
    return Postmaster(pid, start_time(pid), port)


def _init_cluster(where: Layout, bindir: Path, account: Account) -> None:
    """``initdb`` once, into a staging folder renamed into place when complete (an interrupted
    first start leaves no half-made cluster that PostgreSQL would refuse)."""
    if (where.pgdata / "PG_VERSION").is_file():
        return
    if where.pgdata.exists() and (not where.pgdata.is_dir() or any(where.pgdata.iterdir())):
        raise ServerError(f"{where.pgdata} exists but holds no PostgreSQL cluster (no PG_VERSION): move it away, or remove it to start with an empty database")
    for leftover in where.root.glob(".pgdata.init-*"):  # an interrupted initdb (we hold the lock: nobody else's)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = where.root / f".pgdata.init-{os.getpid()}"
    staging.mkdir(mode=0o750)
    try:
        if account.switch:
            os.chown(staging, account.uid, account.gid)
            if _run_as(account, ["test", "-w", staging], timeout=30).returncode != 0:
                raise ServerError(
                    f"PostgreSQL runs as the '{account.name}' user (it refuses root), who cannot reach {where.root}: a folder above it is "
                    "closed to other users; choose a --dir below folders open to all (o+x), or open them"
                )
        log.info("creating the PostgreSQL cluster in %s (initdb, once)", where.pgdata)
        result = _run_as(
            account,
            [bindir / "initdb", "-D", staging, "-U", DB_USER, "--auth=trust", "--encoding=UTF8", "--locale=C", "--allow-group-access"],
            timeout=300,
            cwd=staging,
        )
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            raise ServerError(f"initdb failed in {staging}: {' | '.join(lines[-3:])}")
        with open(staging / "postgresql.conf", "a") as conf:  # appending keeps the owner (postgres)
            conf.write(_PG_SETTINGS)
        (staging / "pg_hba.conf").write_text(_PG_HBA)
        if where.pgdata.is_dir():
            where.pgdata.rmdir()  # empty (checked above)
        staging.rename(where.pgdata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _clear_stale_pidfile(where: Layout) -> None:
    """Remove a ``postmaster.pid`` whose pid now belongs to a process that is no PostgreSQL at all
    (after a reboot), which PostgreSQL would take for a running server. A dead pid PostgreSQL
    handles itself; a live postgres process is never second-guessed (its file stays)."""
    pidfile = where.pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    if _HAVE_PROC and alive(pid) and not _is_postgres(pid):
        log.info("removing the stale %s (pid %d is no PostgreSQL now)", pidfile, pid)
        pidfile.unlink(missing_ok=True)


def _start_postgres(where: Layout, bindir: Path, account: Account, previous_port: int | None) -> Postmaster:
    _clear_stale_pidfile(where)
    port = _choose_port(None, previous_port, LOOPBACK, "PostgreSQL")
    where.postgres_log.touch()
    if account.switch:
        os.chown(where.postgres_log, account.uid, account.gid)
    log.info("starting PostgreSQL on %s:%d", LOOPBACK, port)
    command = [bindir / "pg_ctl", "start", "-D", where.pgdata, "-l", where.postgres_log, "-w", "-t", "120", "-o", f"-p {port}"]
    since = _log_size(where.postgres_log)
    result = _run_as(account, command, timeout=180, cwd=where.pgdata)
    running = postmaster(where)
    if result.returncode != 0 or running is None:
        said = " ".join((result.stderr or result.stdout).split())[-160:]
        raise _failure(f"PostgreSQL did not start on port {port} (pg_ctl: {said})", where.postgres_log, since)
    return running


def _stop_postgres(where: Layout, bindir: Path | None, account: Account, running: Postmaster) -> dict[int, int]:
    """``pg_ctl stop -m fast``, then ``-m immediate``, then SIGKILL (without the binaries: the
    signals those modes send); returns the postmaster's processes still alive at the end (none
    expected). Its workers are its children, each in a session of its own, so they are found by
    parentage, not by process group."""
    started = running.started if running.started is not None else 0
    known = family(running.pid, started, group=False)
    for mode, sig in (("fast", signal.SIGINT), ("immediate", signal.SIGQUIT)):
        if bindir is not None:
            result = _run_as(account, [bindir / "pg_ctl", "stop", "-D", where.pgdata, "-m", mode, "-w", "-t", "60"], timeout=90, cwd=where.pgdata)
            if result.returncode != 0:
                log.warning("pg_ctl stop -m %s: %s", mode, " ".join((result.stderr or result.stdout).split()))
        else:
            _signal_all({running.pid: started}, sig)
        left = _wait_gone(running.pid, started, known, 10.0, group=False)
        if not left:
            return {}
    _signal_all(left, signal.SIGKILL)
    return _wait_gone(running.pid, started, known, 5.0, group=False)


def _ensure_database(bindir: Path, port: int) -> None:
    where = ["-h", LOOPBACK, "-p", str(port), "-U", DB_USER]
    env = {**os.environ, "LC_MESSAGES": "C", "PGCONNECT_TIMEOUT": "10"}
    query = subprocess.run(
        [str(bindir / "psql"), "-X", "-q", *where, "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if query.returncode != 0:
        raise ServerError(f"PostgreSQL on port {port} does not answer psql: {' '.join(query.stderr.split())[:200]}")
    if query.stdout.strip() == "1":
        return
    created = subprocess.run([str(bindir / "createdb"), *where, DATABASE], capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    if created.returncode != 0:
        raise ServerError(f"cannot create the database {DATABASE!r} on port {port}: {' '.join(created.stderr.split())[:200]}")


# --------------------------------------------------------------------------------------------
# The MLflow server
# --------------------------------------------------------------------------------------------


def backend_store_uri(postgres_port: int) -> str:
    return f"{DRIVER}://{DB_USER}@{LOOPBACK}:{postgres_port}/{DATABASE}"


def _mlflow_command(where: Layout, postgres_port: int, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri(postgres_port),
        "--artifacts-destination", str(where.artifacts),
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def _spawn_mlflow(where: Layout, command: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's job runner (7 huey consumers, ~1.2 GB, for GenAI scorers and trace archival) serves
    # nothing this project logs; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in the environment keeps it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(where.mlflow_log, "ab") as output:
        output.write(f"\n--- tumorseg server start {datetime.now(UTC).isoformat(timespec='seconds')}: {shlex.join(command)}\n".encode())
        output.flush()
        # A session (and process group) of its own: stop ends the whole group, and a Ctrl-C in the
        # terminal that ran `tumorseg server start` does not reach the server.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, cwd=where.root, env=env, start_new_session=True)


def _wait_healthy(process: subprocess.Popen, uri: str, timeout: float, where: Layout, since: int) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise _failure(f"the MLflow server exited with code {code} before answering {uri}/health", where.mlflow_log, since)
        if healthy(uri):
            return
        if time.monotonic() > deadline:
            raise _failure(f"the MLflow server did not answer {uri}/health within {timeout:.0f} s (it was stopped again)", where.mlflow_log, since)
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# status / start / stop
# --------------------------------------------------------------------------------------------


def _mlflow_identity(state: dict[str, Any]) -> tuple[int, int] | None:
    """(pid, start time) of the recorded MLflow launcher, when it was started in this boot."""
    pid, started = state.get("mlflow_pid"), state.get("mlflow_started")
    if not pid or started is None or state.get("boot_id") != boot_id():
        return None
    return int(pid), int(started)


def _inspect(where: Layout, state: dict[str, Any]) -> Status:
    found = Status(where, running=False)
    found.uri, found.host, found.mlflow_port = state.get("uri"), state.get("host"), state.get("mlflow_port")
    database = postmaster(where)
    if database:
        found.postgres_pid, found.postgres_port = database.pid, database.port
    else:
        found.problems.append("PostgreSQL is not running")
    identity = _mlflow_identity(state)
    if identity and alive(*identity):
        found.mlflow_pid = identity[0]
        if not healthy(found.uri or ""):
            found.problems.append(f"the MLflow server (pid {identity[0]}) does not answer {found.uri}/health")
    else:
        found.problems.append("the MLflow server is not running")
        if state.get("mlflow_pid") and identity:
            orphans = family(*identity)
            if orphans:
                found.problems.append(f"{len(orphans)} orphaned MLflow process(es) of the dead launcher are still running: {sorted(orphans)}")
            else:
                found.problems.append(f"stale state: its launcher (pid {identity[0]}) is gone")
    found.running = not found.problems
    return found


def status(root: str | Path = DEFAULT_DIR) -> Status:
    """What runs now, read-only (stale state is reported, and cleaned by start or stop)."""
    where = layout(root)
    return _inspect(where, read_state(where))


def _end_mlflow(state: dict[str, Any], grace: float) -> str | None:
    identity = _mlflow_identity(state)
    if identity is None:
        return None
    count, left = end_family(*identity, grace=grace)
    if left:
        raise ServerError(f"MLflow server processes survived SIGKILL: {sorted(left)} (kill them by hand; check for a hung disk or D-state processes)")
    return f"MLflow server (pid {identity[0]}, {count} process(es))" if count else None


def start(
    root: str | Path = DEFAULT_DIR,
    *,
    host: str = LOOPBACK,
    port: int | None = None,
    workers: int = 2,
    timeout: float = 180.0,
    grace: float = STOP_GRACE_S,
) -> Started:
    """Start PostgreSQL and the MLflow server (each only if not running) and wait for ``/health``.

    ``port``: the MLflow server's port (default: the previous one if free, else any free one).
    Already running: nothing is started (``already_running``). Left-overs of a server that died
    (its pid gone, orphaned workers still holding the port) are ended first.
    """
    where = layout(root)
    account = postgres_account()
    bindir = postgres_bindir(where.pgdata)
    with _locked(where):
        state = read_state(where)
        found = _inspect(where, state)
        notes: list[str] = []
        if found.running:
            if (port and port != found.mlflow_port) or host != found.host:
                notes.append(f"already running with --host {found.host} --port {found.mlflow_port}: stop it first to change them")
            return Started(found.uri or "", True, found, notes)
        if state.get("mlflow_pid"):
            notes.append(f"cleaned up after a server that was not running properly ({'; '.join(found.problems)})")
        ended = _end_mlflow(state, grace)  # orphaned workers would keep the port
        if ended:
            log.info("ended the left-overs: %s", ended)
        same_host = state.get("host") == host
        mlflow_port = _choose_port(port, state.get("mlflow_port") if same_host else None, host, "the MLflow server's")
        for folder in (where.artifacts, where.logs):
            folder.mkdir(parents=True, exist_ok=True)
        _init_cluster(where, bindir, account)
        database = postmaster(where)
        started_postgres = database is None
        if database is None:
            database = _start_postgres(where, bindir, account, state.get("postgres_port"))
        process = None
        try:
            _ensure_database(bindir, database.port)
            uri = tracking_uri_for(host, mlflow_port)
            command = _mlflow_command(where, database.port, host, mlflow_port, workers)
            log.info("starting the MLflow server on %s:%d (workers %d); waiting for %s/health", host, mlflow_port, workers, uri)
            since = _log_size(where.mlflow_log)
            process = _spawn_mlflow(where, command)
            state = {
                "uri": uri,
                "host": host,
                "mlflow_port": mlflow_port,
                "postgres_port": database.port,
                "backend_store_uri": backend_store_uri(database.port),
                "artifacts_destination": str(where.artifacts),
                "mlflow_pid": process.pid,
                "mlflow_started": start_time(process.pid),
                "postgres_pid": database.pid,
                "postgres_user": account.name,
                "workers": workers,
                "boot_id": boot_id(),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": command,
            }
            _write_state(where, state)  # before waiting: an interrupted start can still be stopped
            _wait_healthy(process, uri, timeout, where, since)
        except BaseException:
            if process is not None and state.get("mlflow_started") is not None:
                end_family(process.pid, state["mlflow_started"], grace=grace)
            if started_postgres:
                _stop_postgres(where, bindir, account, database)
            _write_state(where, _stopped_state(state))
            raise
        return Started(uri, False, _inspect(where, state), notes)


def _stopped_state(state: dict[str, Any]) -> dict[str, Any]:
    """What stays after a stop: the ports and URI, preferred by the next start."""
    keep = ("uri", "host", "mlflow_port", "postgres_port", "workers")
    return {key: state[key] for key in keep if key in state} | {"stopped_at": datetime.now(UTC).isoformat(timespec="seconds")}


def stop(root: str | Path = DEFAULT_DIR, *, grace: float = STOP_GRACE_S) -> Stopped:
    """End the MLflow server's process group (SIGTERM, SIGKILL after ``grace`` s) and stop
    PostgreSQL; raise ServerError naming any process that is still alive afterwards."""
    where = layout(root)
    if not where.root.is_dir():
        return Stopped([])
    with _locked(where):
        state = read_state(where)
        stopped = [ended] if (ended := _end_mlflow(state, grace)) else []
        database = postmaster(where)
        if database is not None:
            try:
                bindir: Path | None = postgres_bindir(where.pgdata)
            except ServerError:  # uninstalled meanwhile: the signals pg_ctl would send
                bindir = None
            left = _stop_postgres(where, bindir, postgres_account(), database)
            if left:
                raise ServerError(f"PostgreSQL processes survived pg_ctl stop and SIGKILL: {sorted(left)}")
            stopped.append(f"PostgreSQL (pid {database.pid}, port {database.port})")
        if state:
            _write_state(where, _stopped_state(state))
        return Stopped(stopped)
