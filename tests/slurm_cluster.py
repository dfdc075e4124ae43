"""A private one-node Slurm for tests: munged, slurmctld and slurmd on this machine, in a temporary folder.

``start()`` returns a running :class:`SlurmCluster` (or raises :class:`SlurmUnavailable` with the reason,
which the tests turn into a skip: they never fake Slurm); ``SlurmCluster.stop()`` kills the jobs and
the daemons it started, and only those. ``.ci/run`` installs the packages (``slurm-wlm``, ``munge``)
with apt where they are missing.

Facts of this container (Debian 12, Slurm 22.05, munge 0.5.15) that a working setup needed:

- No systemd, so nothing starts the daemons: munged runs as the ``munge`` user
  (``runuser -u munge -- /usr/sbin/munged``). Here it is a private munged on its own socket, key, pid,
  seed and log file in the temporary folder (``AuthInfo=socket=...`` points Slurm at it), so it never
  touches or depends on a system munged in /run/munge. munged refuses group/world-writable
  directories (a sticky /tmp is fine) and must be able to traverse the path: pytest's tmp_path
  (``/tmp/pytest-of-root``, mode 0700) is not usable, hence ``tempfile.mkdtemp`` in /tmp, mode 0755.
  The key must belong to ``munge``, mode 0600.
- No cgroups: ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``,
  ``JobAcctGatherType=jobacct_gather/none``, no accounting (``AccountingStorageType=accounting_storage/none``).
- Everything as root: ``SlurmUser=root``; slurmctld and slurmd run in the foreground (``-D``) as children
  of the test process, each in its own session, so teardown kills exactly them.
- ``NodeName=<hostname> NodeAddr=127.0.0.1`` and ``SlurmctldHost=<hostname>(127.0.0.1)``: the node name
  must be what ``hostname`` says (slurmd finds its own entry by it), the addresses loopback.
- ``CPUs=`` as ``nproc`` says (2 here); ``SelectType=select/cons_tres`` with ``CR_Core`` (memory not
  tracked, so no ``--mem`` is needed).
- Fake GPUs for the scripts' ``--gpus-per-node``: ``GresTypes=gpu``, ``Gres=gpu:N`` on the node and a
  gres.conf next to slurm.conf with ``AutoDetect=off`` and one ``File=`` per GPU (empty regular files in
  the temporary folder); ``Count=`` alone makes the node INVAL (issue 19). Batch jobs with
  ``--gpus-per-node=N`` then see ``SLURM_GPUS_PER_NODE=N`` (no ``CUDA_VISIBLE_DEVICES``: the files are
  no devices), which the scripts read as GPUs per node; they train on the CPU (``DS_ACCELERATOR=cpu``).
- State, spool, pid and log files in the temporary folder; ports from the kernel's free ones
  (``SlurmctldPort``, ``SlurmdPort``, ``SrunPortRange``), a random ``ClusterName``: two clusters (two
  test sessions) never clash. Client commands find the cluster through ``SLURM_CONF`` in their
  environment; jobs inherit it, so ``scontrol``/``scancel`` inside a job talk to the same cluster.
- A requeued job is held for the job credential's lifetime before it may start again
  (``AuthInfo=cred_expire``, default 120 s): set to 10 s here. The main scheduler loop runs every
  ``sched_interval`` (default 60 s) and backfill every ``bf_interval`` (30 s): 2 s and 2 s here, so
  the requeued job starts ~12 s after ``scontrol requeue`` (measured). Not ``MinJobAge``: it only says
  how long a finished job stays visible to ``scontrol show job``; 120 s here (default 300), long
  enough for the tests to read every job's final state.
- ``KillWait`` (SIGTERM -> SIGKILL on scancel/requeue) is left at its 30 s default: the trainer has
  that long to save its checkpoint, as on a real cluster. ``scancel --signal=KILL JOB`` is no
  untrappable kill: Slurm turns it into a plain cancel (SIGTERM first), which the batch script's trap
  sees; to end a job for good, ``scontrol update JobId=JOB Requeue=0`` first.
- Every private cluster numbers its jobs from 1, so the scripts' default ``MASTER_PORT`` (29500 + job
  id) is the same in two clusters at once: the tests pass a free ``MASTER_PORT``.
- With slurm-client installed but no cluster configured, ``scontrol show hostnames`` fails ("Could
  not establish a configuration source"); slurm/common.sh then falls back to slurm/hostlist.py, so the
  dry-run tests are unaffected by the packages.
- Teardown: ``scancel`` every job, SIGTERM each daemon's session, then SIGKILL whatever process still
  has this cluster's ``SLURM_CONF`` in its environment (slurmstepd, srun, batch shells, ranks).
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun")


class SlurmUnavailable(RuntimeError):
    """Why a private Slurm cannot run here (the tests skip with this message)."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@dataclass
class SlurmCluster:
    root: Path
    hostname: str
    gpus: int
    cpus: int
    procs: dict = field(default_factory=dict)  # name -> Popen

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        """The environment client commands (and jobs submitted with it) need: SLURM_CONF, no stray SLURM_*."""
        e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        e["SLURM_CONF"] = str(self.conf)
        e["PATH"] = _PATH  # the daemons and munged live in /usr/sbin
        return e

    def run(self, *argv: str, timeout: float = 30, check: bool = True, env: Optional[dict] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(argv), env=env or self.env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def sbatch(self, *argv: str, env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *argv, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (empty once the job record is gone)."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", r.stdout))

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "GONE")

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.5):
        """Poll ``predicate()`` until it returns something true; fail after ``timeout`` s with the logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            self.check_alive()
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")

    def wait_state(self, job_id: int, states, timeout: float) -> str:
        states = {states} if isinstance(states, str) else set(states)
        return self.wait(lambda: (s := self.state(job_id)) in states and s, timeout,
                         f"job {job_id} in {sorted(states)} (now {self.state(job_id)})")

    def idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.split() == ["idle"]

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        parts = []
        for name in ("slurmctld", "slurmd"):
            parts.append(f"--- {name}.log (tail)\n{_tail(self.root / 'log' / f'{name}.log', 1500)}")
        r = self.run("squeue", "-a", "-o", "%i %T %r %S", check=False, timeout=10)
        parts.append(f"--- squeue\n{r.stdout}{r.stderr}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this cluster, stop the daemons it started, kill what is left of its jobs,
        remove the folder (``IGPT_KEEP_SLURM=1`` keeps it)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--signal=KILL", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=15)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                   timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        # What is left of the jobs (slurmstepd, srun, batch shells, ranks) carries this cluster's SLURM_CONF.
        for pid in self._job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()
        if os.environ.get("IGPT_KEEP_SLURM", "0") == "0":
            shutil.rmtree(self.root, ignore_errors=True)

    def _job_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids


def _missing() -> Optional[str]:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (slurmd, SlurmUser=root, munged as user munge)"
    missing = [c for c in (*CLIENTS, "slurmctld", "slurmd") if shutil.which(c, path=_PATH) is None]
    if missing:
        return f"Slurm not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge"
    if shutil.which("munged", path=_PATH) is None or shutil.which("runuser", path=_PATH) is None:
        return "munge not installed: apt-get install -y munge"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    if not Path("/proc/self/environ").is_file():
        return "needs /proc"
    return None


_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def _which(name: str) -> str:
    return shutil.which(name, path=_PATH)


def _conf(root: Path, hostname: str, cpus: int, gpus: int, ports: list[int]) -> str:
    log, socket_path = root / "log", root / "munge" / "munge.socket"
    return f"""\
ClusterName=igpt{secrets.token_hex(3)}
SlurmctldHost={hostname}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SrunPortRange={ports[2]}-{ports[2] + 99}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=10
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=120
ReturnToService=2
GresTypes=gpu
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
"""


def start(gpus: int = 2, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd in a new temporary folder; return once the node is idle."""
    why = _missing()
    if why:
        raise SlurmUnavailable(why)
    hostname = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="igpt-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for d in ("state", "spool", "log", "gpu"):
        (root / d).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)
    user = pwd.getpwnam("munge")
    os.chown(munge_dir, user.pw_uid, user.pw_gid)
    key = munge_dir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    os.chown(key, user.pw_uid, user.pw_gid)
    key.chmod(0o600)
    for i in range(gpus):
        (root / "gpu" / f"gpu{i}").touch()
    (root / "gres.conf").write_text(
        "AutoDetect=off\n" + "".join(f"NodeName={hostname} Name=gpu File={root / 'gpu' / f'gpu{i}'}\n"
                                     for i in range(gpus)))
    (root / "slurm.conf").write_text(_conf(root, hostname, cpus, gpus, _free_ports(3)))
    cluster = SlurmCluster(root, hostname, gpus, cpus)

    def daemon(name, argv):
        log = open(root / "log" / f"{name}.stdout", "w")
        cluster.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=cluster.env, cwd=str(root), start_new_session=True)
        log.close()

    try:
        daemon("munged", [_which("runuser"), "-u", "munge", "--", _which("munged"), "--foreground",
                          f"--socket={munge_dir / 'munge.socket'}", f"--key-file={key}",
                          f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                          f"--seed-file={munge_dir / 'munged.seed'}"])
        deadline = time.monotonic() + 15
        while not (munge_dir / "munge.socket").exists():
            if cluster.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start: {_tail(root / 'log' / 'munged.stdout', 500)}"
                                       f"{_tail(munge_dir / 'munged.log', 500)}")
            time.sleep(0.1)
        daemon("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(cluster.conf)])
        daemon("slurmd", [_which("slurmd"), "-D", "-f", str(cluster.conf)])
        deadline = time.monotonic() + timeout
        while not cluster.idle():
            for name, p in cluster.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode}: "
                                           f"{_tail(root / 'log' / f'{name}.stdout', 800)}"
                                           f"{_tail(root / 'log' / f'{name}.log', 800)}")
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"node not idle after {timeout:.0f} s\n{cluster.diagnostics()}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster
