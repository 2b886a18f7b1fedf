"""A throwaway Slurm cluster on loopback for tests: one slurmctld, two slurmd (node1, node2) and a private munged.

    with LocalSlurmCluster(tmp_dir) as cluster:
        job_id = cluster.submit(script_path)
        assert cluster.wait_for_job(job_id, timeout=120) == "COMPLETED"

Everything lives under the given work dir: slurm.conf, state, spool, logs. No system config is read or written
(/etc/slurm, /etc/munge stay untouched): every daemon gets `-f slurm.conf` and every client SLURM_CONF (see `env`).
Needs root (slurmd starts jobs as their user) and Debian's slurmctld, slurmd, slurm-client and munge packages.

munge: we always start our own munged, with its own random key, on its own socket, and point Slurm at it with
AuthInfo=socket=...; a munged that is already running (the system's, another cluster's) is neither used nor touched,
and no key is needed in /etc/munge. munged refuses a socket unless every directory above it is world-executable,
and pytest's tmp dirs sit under a 0700 directory, so the socket alone gets a small directory of its own under /tmp.

The settings in slurm.conf, and why (a few restate a default this setup relies on, marked "default"):
    SlurmctldHost=localhost(127.0.0.1)   slurmctld accepts "localhost" as this host whatever the machine is called
    SlurmctldPort, Port= per node        free ports chosen at start, so two clusters (or a real one) do not clash;
                                         both slurmd share one address, so each needs its own port
    NodeAddr=127.0.0.1                   "node1"/"node2" resolve nowhere (no DNS, no /etc/hosts entry); Slurm and jobs
                                         reach the nodes by this address (`scontrol show node node1` shows it)
    NodeHostname=<this host>             both slurmd run here; `slurmd -N nodeN` says which node each one is
    %n in SlurmdSpoolDir/PidFile/LogFile two slurmd on one host must not share a spool dir, pid file or log
    SlurmUser=root, SlurmdUser=root      (default) Debian's example config uses a slurm user, which would have to own
                                         the state dirs
    AuthInfo=socket=...                  our private munged (above)
    StateSaveLocation, *LogFile, *PidFile in the work dir instead of /var/spool, /var/log, /run
    SlurmdParameters=config_overrides    nodes offer the CPUs and memory declared here, not what slurmd detects
                                         (both nodes share this host's cores)
    ProctrackType=proctrack/linuxproc    the default, proctrack/cgroup, needs systemd or a writable cgroup tree,
                                         which containers lack
    TaskPlugin=task/none                 (default) no CPU binding or cgroup confinement, for the same reason
    JobAcctGatherType=jobacct_gather/none, AccountingStorageType=accounting_storage/none
                                         (default) no accounting daemon, nothing polls the jobs' processes
    SelectType=select/cons_tres, CR_Core jobs get CPUs, not whole nodes (the default, select/linear, gives nodes);
                                         memory is not a consumable resource
    MpiDefault=none                      (default) no PMIx library is installed (slurmd still logs that it could not
                                         load the pmix plugins: harmless)
    ReturnToService=2                    a node marked DOWN for not responding (a slow start) rejoins when it registers
    MinJobAge=3600                       finished jobs stay visible to `scontrol show job` for the whole test session
                                         (default 300 s)
    KillWait=5                           cancelled or timed-out jobs are killed 5 s after SIGTERM instead of 30
No cgroup.conf is needed: no cgroup plugin is loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("node1", "node2")
# Debian puts the daemons in /usr/sbin, which a non-login shell's PATH may lack.
PATH = os.pathsep.join(dict.fromkeys([*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/sbin", "/usr/sbin", "/sbin"]))
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY"}


class SlurmClusterError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts jobs as their user)"
    missing = [cmd for cmd in COMMANDS if shutil.which(cmd, path=PATH) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH: install slurm-wlm and munge (make test does it as root)"
    return None


def free_ports(count: int) -> list[int]:
    """Ports free right now on every interface (slurmctld and slurmd listen on all); held together so they differ."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: if pytest itself is killed (a CI timeout), the daemon gets SIGTERM instead of living
    on. (The kernel ties this to the thread that started the daemon: start clusters from the main thread.)"""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({err.strerror})"


def parse_scontrol(line: str) -> dict[str, str]:
    """`scontrol show ... -o` prints Key=Value pairs on one line; a value may hold spaces or '=' (TRES=cpu=2,node=2)."""
    info: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        name, sep, value = token.partition("=")
        if sep and re.fullmatch(r"[A-Za-z][\w:/]*", name):  # keys look like JobState, AllocNode:Sid, Socks/Node
            key, info[name] = name, value
        elif key is not None:  # a space inside the previous value
            info[key] += " " + token
    return info


class LocalSlurmCluster:
    def __init__(self, work_dir: str | Path, cpus_per_node: int = 2, memory_mb: int = 1000, start_timeout: float = 60):
        self.work_dir = Path(work_dir).resolve()
        self.conf = self.work_dir / "slurm.conf"
        self.logs = self.work_dir / "log"
        self.cpus_per_node, self.memory_mb, self.start_timeout = cpus_per_node, memory_mb, start_timeout
        self.socket_dir: Path | None = None
        self.processes: dict[str, subprocess.Popen] = {}  # name -> daemon, in start order

    # -- lifecycle --------------------------------------------------------------------------------------------

    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        try:
            for sub in ("log", "state", "spool", "munge"):
                (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
            self._start_munged()
            self._write_conf()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._start_daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_until_idle()
        except BaseException:
            self.stop()  # a half-started cluster must not outlive the failure
            raise

    def stop(self, timeout: float = 15) -> None:
        """Cancel jobs and let their processes end while slurmd still listens, then stop our daemons, newest first,
        by pid (SIGTERM, SIGKILL after timeout); last, SIGKILL whatever of the jobs is left (a stuck slurmstepd)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self._cancel_all_jobs(timeout)
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self._job_processes():
            _kill(pid)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    # -- client side ------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """For subprocesses: this cluster's config, and no SLURM_* from an outer job (tests run inside a real job
        would otherwise send sbatch/srun to that job's cluster and allocation)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_CONF=str(self.conf), PATH=PATH)
        return env

    def run(self, *args: str, timeout: float = 30, cwd: str | Path | None = None) -> str:
        result = subprocess.run(args, env=self.env, cwd=cwd or self.work_dir, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()}\n"
                                    f"{self.log_tails()}")
        return result.stdout

    def submit(self, script_path: str | Path, extra_args: tuple[str, ...] | list[str] = ()) -> str:
        """sbatch the script (from its own directory, where relative --output paths land); returns the job id."""
        script_path = Path(script_path).resolve()
        out = self.run("sbatch", "--parsable", *extra_args, str(script_path), cwd=script_path.parent)
        return out.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"

    def job_info(self, job_id: str) -> dict[str, str]:
        return parse_scontrol(self.run("scontrol", "show", "job", "-o", str(job_id)))

    def wait_for_job(self, job_id: str, timeout: float = 120) -> str:
        """Polls until the job reaches a final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} still {state} after {timeout} s: {info}\n{self.log_tails()}")
            time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(f"--- {path.name}\n{tail(path)}" for path in sorted(self.logs.glob("*")))

    # -- internals --------------------------------------------------------------------------------------------

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        # Foreground (-D/-F): the pid we hold is the daemon's own, and we reap it ourselves. stdout/stderr catch
        # what a daemon says before its log file is open (a bad slurm.conf, a port in use).
        with open(self.logs / f"{name}.out", "w") as out:
            self.processes[name] = subprocess.Popen(
                cmd, env=self.env, cwd=self.work_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)  # own session: a Ctrl-C reaches pytest only

    def _start_munged(self) -> None:
        munge = self.work_dir / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-"))
        self.socket_dir.chmod(0o755)
        self._start_daemon("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"])  # not /run, /var/lib
        self._wait_for(self.munge_socket.exists, "munged to create its socket")

    @property
    def munge_socket(self) -> Path:
        assert self.socket_dir is not None
        return self.socket_dir / "munge.socket"

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        w, host = self.work_dir, socket.gethostname()
        nodes = [f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} CPUs={self.cpus_per_node} "
                 f"RealMemory={self.memory_mb} State=UNKNOWN" for node, port in zip(NODES, node_ports)]
        self.conf.write_text("\n".join([
            "ClusterName=localtest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/slurmctld.pid",
            f"SlurmdPidFile={w}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.logs}/slurmctld.log",
            f"SlurmdLogFile={self.logs}/slurmd-%n.log",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=5",
            *nodes,
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def _wait_until_idle(self) -> None:
        def all_idle() -> bool:
            out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t")
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(node) == "idle" for node in NODES)

        self._wait_for(all_idle, f"sinfo to show {' and '.join(NODES)} idle", retry_errors=True)

    def _wait_for(self, ready, what: str, retry_errors: bool = False) -> None:
        """Polls ready() until start_timeout; fails at once if a daemon died, with every daemon log's tail."""
        deadline = time.monotonic() + self.start_timeout
        last_error = ""
        while time.monotonic() < deadline:
            dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise SlurmClusterError(f"waiting for {what}: daemon exited {dead}\n{self.log_tails()}")
            try:
                if ready():
                    return
            except SlurmClusterError as err:  # slurmctld not listening yet
                if not retry_errors:
                    raise
                last_error = str(err).splitlines()[0]
            time.sleep(0.25)
        raise SlurmClusterError(f"timed out after {self.start_timeout} s waiting for {what} ({last_error})\n"
                                f"{self.log_tails()}")

    def _cancel_all_jobs(self, timeout: float) -> None:
        """A job leaves squeue before its slurmstepd are done; stopping slurmd then would strand them, so we wait
        until no process of any job is left (KillWait bounds how long a cancelled task may take)."""
        try:
            active = self.run("squeue", "--noheader", "--format=%i").split()
            if active:  # not run(): a job that ends meanwhile makes scancel fail, which is fine
                subprocess.run(["scancel", *active], env=self.env, capture_output=True, timeout=30)
        except (SlurmClusterError, subprocess.TimeoutExpired):
            pass  # stopping the daemons matters more; the leftovers are killed after them
        deadline = time.monotonic() + timeout
        while self._job_processes() and time.monotonic() < deadline:
            time.sleep(0.25)

    def _job_processes(self) -> list[int]:
        """Processes of this cluster's jobs (slurmstepd, tasks, srun), found by our SLURM_CONF in their environment:
        every daemon gets it from env, and slurmd hands it on. Our daemons and their own children are left out."""
        daemons = {p.pid for p in self.processes.values()}
        marker = f"SLURM_CONF={self.conf}\0".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            pid = int(proc.name)
            try:
                if pid in daemons or _ppid(proc) in daemons or marker not in (proc / "environ").read_bytes():
                    continue
            except (OSError, ValueError, IndexError):
                continue  # it ended while we looked
            found.append(pid)
        return found


def _ppid(proc: Path) -> int:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, then ppid


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
