"""A throwaway two-node SLURM cluster on localhost, for running `launch/slurm.sbatch` for real.

Its own munge daemon and key, a controller and two `slurmd`s (nodes n1 and n2 on this host, at
127.0.0.1, so the node names need not resolve), all under one temporary directory and on free
ports; nothing of the machine's own SLURM or munge set-up is used or changed. Needs the Debian
packages slurmctld, slurmd, slurm-client and munge (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.distributed_utils import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")
USER = pwd.getpwuid(os.getuid()).pw_name


def available() -> bool:
    return all(shutil.which(daemon) for daemon in DAEMONS)


def _config(root: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 "
        "RealMemory=2000 State=UNKNOWN"
        for node in NODES
    )
    return f"""\
ClusterName=moeut-test
SlurmctldHost={host}
SlurmctldPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
SlurmUser={USER}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _start(stack: ExitStack, command: list[str], log: Path) -> None:
    output = stack.enter_context(open(log, "w"))  # noqa: SIM115 -- closed by the stack
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

    stack.callback(stop)


def _wait_for_idle_nodes(env: dict[str, str], root: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--format=%T"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        if states == ["idle"] * len(NODES):
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in root.glob("*.log"))
    raise RuntimeError(f"the test cluster's nodes did not come up (sinfo: {states}):\n{logs}")


@contextmanager
def slurm_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Start the cluster under `root`; yields the environment its client commands need."""
    for directory in ("state", *(f"spool/{node}" for node in NODES)):
        (root / directory).mkdir(parents=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_config(root, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    with ExitStack() as stack:
        _start(
            stack,
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed",
             f"--log-file={root}/munged.log"],
            root / "munged.out.log",
        )  # fmt: skip
        _start(stack, ["slurmctld", "-D", "-c", "-f", str(conf)], root / "slurmctld.out.log")
        for node in NODES:
            _start(stack, ["slurmd", "-D", "-N", node, "-f", str(conf)], root / f"{node}.out.log")
        _wait_for_idle_nodes(env, root)
        stack.callback(subprocess.run, ["scancel", "--full", f"--user={USER}"], env=env)
        yield env
