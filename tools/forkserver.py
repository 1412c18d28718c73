"""Run pytest in a fork of a process that has already imported torch: ``tools/mutate.py``'s runner.

Importing torch costs seconds per test run, which is most of a mutant's time when one runs
after another. The server imports torch, pytest and the other heavy dependencies once, but
not ``approxcompile`` or the tests; for each request it forks, and the child imports the
(mutated) package from its working directory afresh and runs ``pytest.main``. The client is
what cosmic-ray runs as its test command: it sends pytest's arguments over a Unix socket and
exits with pytest's exit code.

    python tools/forkserver.py serve SOCKET            # in the directory the tests run in
    python tools/forkserver.py run SOCKET -- ARGS...   # exit code of ``pytest ARGS``
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys


def serve(path: str) -> None:
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest
    import torch  # noqa: F401
    import torch.fx  # noqa: F401
    import torch.nn.functional  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401

    # Imported by approxcompile or the tests: ~1 s per mutant when each child imports them.
    for name in ("torch.export", "torch.distributed", "torch.nn.parallel", "onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:  # optional extras: the tests that need them skip
            pass

    sys.path.insert(0, os.getcwd())
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        conn, _ = server.accept()
        with conn:
            args = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:  # the child: a fresh import of the package under test
                server.close()
                for name in [m for m in sys.modules if m.split(".")[0] in ("approxcompile", "tests")]:
                    del sys.modules[name]
                os.setpgid(0, 0)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                code = pytest.main(args)
                os._exit(int(code))
            code = _wait(pid, conn)
            if code is not None:
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass


def _wait(pid: int, conn: socket.socket) -> int | None:
    """The child's exit code; ``None`` when the client went away first (cosmic-ray's timeout
    killed it), in which case the child's process group is killed too."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1, socket.MSG_PEEK):  # EOF: the client is gone
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None


def run(path: str, args: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall((json.dumps(args) + "\n").encode())
    reply = client.makefile().readline().strip()
    return int(reply) if reply else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "run":
        rest = sys.argv[3:]
        sys.exit(run(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve SOCKET | run SOCKET -- PYTEST_ARGS")
