"""A private network namespace with a rate-limited loopback, for bandwidth-bound benchmarks.

``tools/bench_ddp.py --link 1gbit,10gbit`` re-runs itself through :func:`reexec_in_netns`:
``unshare -n`` gives the process (and the ranks it spawns) a network namespace of its own,
holding nothing but a loopback device that starts down. Inside it :func:`bring_up_loopback`
brings ``lo`` up and :func:`set_rate` puts a token-bucket filter on it
(``tc qdisc replace dev lo root tbf rate R burst 512kb latency 100ms``), so every byte the
ranks exchange over 127.0.0.1 crosses a link of rate R. The host's interfaces are never
touched: :func:`bring_up_loopback` refuses to run where any device besides ``lo`` is
visible, i.e. outside a fresh namespace.

Where namespaces or ``tc`` are not permitted (no CAP_SYS_ADMIN and no unprivileged user
namespaces, a seccomp-filtered container, ``iproute2`` missing), :func:`probe` returns the
reason and the caller skips with it. ``tc`` and ``ip`` come from Debian's ``iproute2``
(``apt-get install iproute2``).

One tbf on ``lo`` shapes the *sum* of all ranks' traffic (every packet leaves through
``lo`` once): the ranks share one link of rate R, as on a hub, not one link each, as
behind a switch. docs/distributed.md's cost model says how the two relate.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ENV_MARK = "APPROXCOMPILE_PRIVATE_NETNS"  # set in the re-executed process: it is inside the namespace
BURST, LATENCY = "512kb", "100ms"
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def parse_rate(spec: str) -> float | None:
    """``'1gbit'`` -> 1e9 bits/s; ``'unlimited'`` -> None (no qdisc: the loopback's own speed)."""
    s = spec.strip().lower()
    if s in ("unlimited", "none", "inf"):
        return None
    for unit, scale in UNITS.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return value * scale
    raise ValueError(f"link speed {spec!r}: give a rate such as 100mbit, 1gbit, 2.5gbit, or 'unlimited'")


def inside() -> bool:
    return os.environ.get(ENV_MARK) == "1"


def _unshare_cmd() -> list[str] | None:
    """The first of ``unshare -n`` (root) and ``unshare -rn`` (user namespace) that works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for flags in (["-n"], ["-r", "-n"]):
        cmd = [unshare, *flags, "--"]
        try:
            ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


def probe() -> tuple[list[str] | None, str]:
    """``(unshare command, '')`` when a namespace with a shaped loopback works, else ``(None, why)``."""
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found (tc and ip: apt-get install iproute2)"
    cmd = _unshare_cmd()
    if cmd is None:
        return None, "creating a network namespace is not permitted here (unshare -n and unshare -rn failed)"
    script = f"ip link set lo up && tc qdisc add dev lo root tbf rate 1gbit burst {BURST} latency {LATENCY}"
    done = subprocess.run([*cmd, "sh", "-c", script], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        return None, f"tc cannot shape the namespace's loopback: {done.stderr.strip() or done.returncode}"
    return cmd, ""


def reexec_in_netns(argv: list[str]) -> int:
    """Run ``python argv`` inside a new network namespace; its exit status, or 77 with the reason."""
    cmd, why = probe()
    if cmd is None:
        print(f"skipped: {why}", file=sys.stderr)
        return 77  # the automake/ctest convention for "skipped"
    env = dict(os.environ, **{ENV_MARK: "1"})
    return subprocess.run([*cmd, sys.executable, *argv], env=env).returncode


def bring_up_loopback() -> None:
    """Bring ``lo`` up; refuse unless it is the only device (i.e. this is a fresh namespace)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines() if line.strip()]
    if names != ["lo"]:
        raise RuntimeError(
            f"netns: devices {names} are visible, so this is not a private network namespace; "
            "refusing to shape them (run through tools/bench_ddp.py --link, which calls unshare -n)"
        )
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def qdisc() -> str:
    """What shapes this namespace's loopback now (``tc qdisc show dev lo``), for the record."""
    return subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout.strip()


def set_rate(bits_per_s: float | None) -> None:
    """Shape this namespace's loopback to ``bits_per_s`` (None: remove the shaping)."""
    if bits_per_s is None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)  # none: fine
        return
    rate = f"{bits_per_s / 1e3:.0f}kbit"
    subprocess.run(
        [
            "tc",
            "qdisc",
            "replace",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            BURST,
            "latency",
            LATENCY,
        ],
        check=True,
        capture_output=True,
    )
