"""Hosts for multi-host tests on one machine: Linux network namespaces joined by veth pairs, each
host its own network stack (its own loopback, addresses and ports), so traffic between them
crosses a link the test can cut. Made by the test and removed after it, even when it fails;
nothing is routed outside them. Needs root and `ip netns`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field


def unavailable() -> str:
    """Why namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests make network namespaces: run them as root"
    if shutil.which("ip") is None:
        return "multi-host tests need iproute2's `ip netns`"
    probe = f"llmprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def ip(*args: str, ns: str = "") -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


@dataclass
class Host:
    ns: str           # the namespace's name
    address: str      # its address on the link
    iface: str        # its end of the veth pair

    def popen(self, cmd: list[str], **kw: object) -> subprocess.Popen:
        """Start a process inside this host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)

    def run(self, cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], **kw)

    def link(self, up: bool) -> None:
        """Cut (or restore) this host's end of the link: packets stop both ways."""
        ip("link", "set", self.iface, "up" if up else "down", ns=self.ns)


@dataclass
class Network:
    """Hosts on one subnet: the first joined to each of the others by its own veth pair."""

    hosts: list[Host] = field(default_factory=list)
    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    def make(self, n: int) -> list[Host]:
        subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
        for i in range(n):
            ns = f"llmos-{self.tag}-{i}"
            ip("netns", "add", ns)
            self.hosts.append(Host(ns, f"{subnet}.{i + 1}", ""))
            ip("link", "set", "lo", "up", ns=ns)
        head = self.hosts[0]
        for i, host in enumerate(self.hosts[1:], start=1):   # names fit IFNAMSIZ (15)
            a, b = f"vh{self.tag}{i}", f"vn{self.tag}{i}"
            ip("link", "add", a, "netns", head.ns, "type", "veth", "peer", "name", b,
               "netns", host.ns)
            host.iface = b
            ip("addr", "add", f"{host.address}/24", "dev", b, ns=host.ns)
            ip("link", "set", b, "up", ns=host.ns)
            ip("link", "set", a, "up", ns=head.ns)
            if i == 1:
                ip("addr", "add", f"{head.address}/24", "dev", a, ns=head.ns)
                head.iface = a
            else:   # the head's further links reach one host each
                ip("route", "add", f"{host.address}/32", "dev", a, ns=head.ns)
                ip("route", "add", f"{head.address}/32", "dev", b, ns=host.ns)
        return self.hosts

    def remove(self) -> None:
        """Kill what still runs in the namespaces and delete them (their veths go with them)."""
        for host in self.hosts:
            pids = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2 if self.hosts else 0)
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        self.hosts.clear()
