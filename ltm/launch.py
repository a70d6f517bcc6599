"""Local launches: `launch_local` starts N ranks of a Python command on this machine with the distributed environment
variables set (what torchrun does, without its agent), and forwards signals to them. It imports neither torch nor
anything a rank imports, so the process that only waits on the ranks (`ltm train --nproc N`, `ltm eval --nproc N`)
starts in a fraction of a second and holds no model libraries in memory. The ranks read the variables in
`ltm.distributed` (docs/scaling.md, "Distributed environment")."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # Ctrl-C reaches the ranks by itself


def _term_with_parent() -> None:
    """In a child before exec: SIGTERM when the launching process dies (even by SIGKILL), so no rank is orphaned;
    SIGTERM makes a training rank save and exit like a preemption."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def launch_local(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start `nproc` ranks of `python <argv>` on this machine (what torchrun does, without its agent).

    Each child gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (a free port). Signals sent to this process
    (SLURM's preemption warning, `kill`) are forwarded to every rank, so the ranks save together. When one rank
    fails the others are killed: they would otherwise wait in a collective until its timeout. Returns the first
    non-zero exit code, else 0.
    """
    port = free_port()
    base = dict(os.environ if env is None else env)
    for name in DIST_VARS:
        base.pop(name, None)
    children: list[subprocess.Popen] = []
    for rank in range(nproc):
        child_env = dict(base, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                         LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        children.append(subprocess.Popen([sys.executable, *argv], env=child_env, preexec_fn=_term_with_parent))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        code = 0
        while any(c.poll() is None for c in children):
            failed = [c for c in children if c.returncode not in (None, 0)]
            if failed and not code:
                code = failed[0].returncode
                log.error("rank %d exited with code %d; stopping the other ranks", children.index(failed[0]), code)
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.2)
        codes = [c.returncode for c in children]
        return code or next((c for c in codes if c != 0), 0)
    except KeyboardInterrupt:
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
