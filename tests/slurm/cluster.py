"""A real, single-node SLURM cluster on this machine, for the tests and by hand.

    python -m tests.slurm.cluster start [STATE_DIR]   # prints `export SLURM_CONF=...`
    python -m tests.slurm.cluster stop STATE_DIR

Daemons: munged, mariadbd (for slurmdbd), slurmdbd (so that `sacct` works: submitit needs it to see
a finished job), slurmctld, slurmd; all run as root (SlurmUser=root), all state, sockets, logs and
pid files live under STATE_DIR, and every daemon listens on 127.0.0.1 only. The Debian packages
(slurmctld slurmd slurm-client munge slurmdbd mariadb-server) are installed with apt-get when
missing. Requeue is tuned to take seconds (cred_expire=10, KillWait=5, bf/sched interval 5 s).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "sbatch", "srun", "sacct", "scontrol", "munged", "mungekey",
            "mariadbd", "mariadb-install-db", "mariadb"]
DB_NAME, DB_USER, DB_PASS = "slurm_acct_db", "slurm", "dime-ds-local-only"


class ClusterUnavailable(RuntimeError):
    """The SLURM packages are missing and apt-get could not install them."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin")
                                       if (p := Path(d) / name).is_file()), None)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_packages() -> None:
    """apt-get install the Debian packages when a binary is missing; ClusterUnavailable if that fails."""
    if not missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM binaries missing ({', '.join(missing_binaries())}) and apt-get is not "
                                 "usable (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed:\n{run.stderr[-2000:]}")
    if missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get install: {missing_binaries()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir).resolve()
        self.conf = self.dir / "etc" / "slurm.conf"
        self.pids_file = self.dir / "pids.json"
        self.host = socket.gethostname().split(".")[0]  # `hostname -s`

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict:
        """What client commands (sbatch, sacct, submitit) need: SLURM_CONF."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self) -> dict:
        return {**os.environ, **self.env}

    def _pids(self) -> dict:
        return json.loads(self.pids_file.read_text()) if self.pids_file.is_file() else {}

    def _record(self, name: str, pid: int) -> None:
        pids = self._pids()
        pids[name] = pid
        self.pids_file.write_text(json.dumps(pids))

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env or self.client_env())
        log.close()
        self._record(name, proc.pid)
        return proc

    def _check(self, proc: subprocess.Popen, name: str) -> bool:
        if proc.poll() is not None:
            logs = [self.dir / "log" / f"{name}.out", self.dir / "log" / f"{name}.log"]
            tail = "".join(p.read_text(errors="replace")[-3000:] for p in logs if p.is_file())
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
        return True

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 60) -> "LocalCluster":
        ensure_packages()
        for sub in ("etc", "log", "run", "munge", "db", "ctld", "slurmd"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        try:
            self._start_munge()
            self._start_mariadb()
            self._write_slurm_conf()
            self._start_slurmdbd()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key, sock = self.dir / "munge" / "munge.key", self.dir / "munge" / "munge.socket"
        os.chmod(self.dir / "munge", 0o700)
        if not key.is_file():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        os.chmod(key, 0o600)
        self.munge_socket = sock
        proc = self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={sock}",
                                      f"--key-file={key}", f"--pid-file={self.dir / 'run' / 'munged.pid'}",
                                      f"--log-file={self.dir / 'log' / 'munged.log'}",
                                      f"--seed-file={self.dir / 'munge' / 'munged.seed'}"])
        _wait(lambda: self._check(proc, "munged") and sock.exists(), 15, "munged")

    def _start_mariadb(self) -> None:
        data, sock = self.dir / "db" / "data", self.dir / "db" / "mysqld.sock"
        self.db_port = _free_port()
        if not (data / "mysql").is_dir():
            run = subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                                  "--auth-root-authentication-method=socket", "--skip-test-db"],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"mariadb-install-db failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        proc = self._spawn("mariadbd", [
            _which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}", "--user=root",
            "--bind-address=127.0.0.1", f"--port={self.db_port}", f"--pid-file={self.dir / 'run' / 'mariadbd.pid'}",
            f"--log-error={self.dir / 'log' / 'mariadbd.log'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M"])
        mysql = [_which("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot"]
        _wait(lambda: self._check(proc, "mariadbd") and subprocess.run(
            [*mysql, "-e", "SELECT 1"], capture_output=True).returncode == 0, 60, "mariadbd",
            self.dir / "log" / "mariadbd.log")
        sql = (f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; "
               f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}'; "
               f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1'; FLUSH PRIVILEGES;")
        subprocess.run([*mysql, "-e", sql], check=True, capture_output=True)

    def _write_slurm_conf(self) -> None:
        d = self.dir
        self.ports = {"ctld": _free_port(), "slurmd": _free_port(), "dbd": _free_port()}
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        auth = f"AuthInfo=socket={self.munge_socket},cred_expire=10"
        lines = [
            "ClusterName=dimeds",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ports['ctld']}",
            f"SlurmdPort={self.ports['slurmd']}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", auth,
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            f"StateSaveLocation={d / 'ctld'}", f"SlurmdSpoolDir={d / 'slurmd'}",
            f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SwitchType=switch/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.ports['dbd']}", f"AccountingStoragePass={self.munge_socket}",
            "JobCompType=jobcomp/none",
            "KillWait=5", "SchedulerParameters=bf_interval=5,sched_interval=5", "MinJobAge=600",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "JobRequeue=1",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        dbd = self.conf.with_name("slurmdbd.conf")  # slurmdbd reads it beside SLURM_CONF
        dbd.write_text("\n".join([
            "AuthType=auth/munge", auth, "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.ports['dbd']}",
            "CommunicationParameters=NoInAddrAny",
            "SlurmUser=root", f"PidFile={d / 'run' / 'slurmdbd.pid'}", f"LogFile={d / 'log' / 'slurmdbd.log'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.db_port}",
            f"StorageUser={DB_USER}", f"StoragePass={DB_PASS}", f"StorageLoc={DB_NAME}",
        ]) + "\n")
        os.chmod(dbd, 0o600)

    def _listening(self, port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _start_slurmdbd(self) -> None:
        proc = self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        _wait(lambda: self._check(proc, "slurmdbd") and self._listening(self.ports["dbd"]), 60, "slurmdbd",
              self.dir / "log" / "slurmdbd.log")

    def _start_slurm(self) -> None:
        ctld = self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        _wait(lambda: self._check(ctld, "slurmctld") and self._listening(self.ports["ctld"]), 60, "slurmctld",
              self.dir / "log" / "slurmctld.log")
        slurmd = self._spawn("slurmd", [_which("slurmd"), "-D"])

        def node_idle() -> bool:
            self._check(slurmd, "slurmd")
            out = subprocess.run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%t"], capture_output=True,
                                 text=True, env=self.client_env()).stdout
            return out.strip().startswith("idle")

        _wait(node_idle, 60, "the node to become idle", self.dir / "log" / "slurmd.log")
        # The cluster must be known to slurmdbd for sacct; slurmctld registers it, make sure it did.
        _wait(lambda: "dimeds" in subprocess.run([_which("sacctmgr"), "-n", "-P", "list", "cluster", "format=cluster"],
                                                 capture_output=True, text=True, env=self.client_env()).stdout,
              30, "the cluster's registration with slurmdbd", self.dir / "log" / "slurmctld.log")

    # ------------------------------------------------------------------ stop
    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then stop the daemons (newest first); no process is left behind."""
        pids = self._pids()
        if pids.get("slurmctld") and _alive(pids["slurmctld"]):
            subprocess.run([_which("scancel") or "scancel", "--full", "--user=root"], env=self.client_env(),
                           capture_output=True)
            deadline = time.time() + timeout
            while time.time() < deadline:
                out = subprocess.run([_which("squeue") or "squeue", "-h", "-o", "%i"], env=self.client_env(),
                                     capture_output=True, text=True)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            pid = pids.get(name)
            if not pid or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while _alive(pid) and time.time() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
        if self.pids_file.is_file():
            self.pids_file.unlink()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("start", "stop") or (argv[0] == "stop" and len(argv) < 2):
        print(__doc__)
        return 2
    if argv[0] == "start":
        state = argv[1] if len(argv) > 1 else tempfile.mkdtemp(prefix="dime_ds_slurm_")
        cluster = LocalCluster(state).start()
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# stop with: python -m tests.slurm.cluster stop {cluster.dir}", file=sys.stderr)
        return 0
    LocalCluster(argv[1]).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
