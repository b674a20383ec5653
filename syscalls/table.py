"""The syscall table: every system call of llmasos.v1.Kernel, as xv6's syscalls[] lists them.

number  the syscall's stable number (logged and shown by tools)
name    the RPC name in kernel.proto
cap     the capability the caller needs (security service; root holds all)
handler the kernel's handler function name (kernel/syscalls.py binds it)
check   argument validation, run before any state changes
needs   services the call cannot work without (UNAVAILABLE when one has FAILED)
stream  server-streaming reply
audit   always written to the audit log (kernel/audit.py); refusals and calls on another
        user's job are audited whatever this says
bidi    the requests stream too (Poll): `check` runs on each job a request names, and a bad
        one is refused in the reply stream without ending it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmasos.syscalls import limits
from llmasos.syscalls import validate as v

CAP_PROC = "proc"      # spawn, wait, read, kill, nice, stat, ps on one's own jobs
CAP_MODELS = "models"  # list models
CAP_SYSTEM = "system"  # whoami, services
CAP_ADMIN = "admin"    # deploy/undeploy, others' jobs, everyone's ps, negative nice, quotas, audit
ALL_CAPS = (CAP_PROC, CAP_MODELS, CAP_SYSTEM, CAP_ADMIN)
DEFAULT_USER_CAPS = (CAP_PROC, CAP_MODELS, CAP_SYSTEM)


@dataclass(frozen=True)
class Syscall:
    number: int
    name: str
    cap: str
    handler: str
    check: Callable[[Any], None]
    needs: tuple[str, ...] = ()
    stream: bool = False
    audit: bool = False
    bidi: bool = False


SYSCALLS: tuple[Syscall, ...] = (
    #      no  name        cap         handler         check       needs            stream audit
    Syscall(1, "Spawn",    CAP_PROC,   "sys_spawn",    v.spawn,    ("inference", "scheduler")),
    Syscall(2, "Wait",     CAP_PROC,   "sys_wait",     v.pid),
    Syscall(3, "Read",     CAP_PROC,   "sys_read",     v.pid,      (),                     True),
    Syscall(29, "Poll",    CAP_PROC,   "sys_poll",     v.pid,      (),         True, bidi=True),
    Syscall(4, "Kill",     CAP_PROC,   "sys_kill",     v.kill),
    Syscall(5, "Nice",     CAP_PROC,   "sys_nice",     v.nice),
    Syscall(6, "Ps",       CAP_PROC,   "sys_ps",       v.ps),
    Syscall(7, "Stat",     CAP_PROC,   "sys_stat",     v.pid),
    Syscall(8, "Models",   CAP_MODELS, "sys_models",   v.nothing,  ("inference",)),
    Syscall(9, "Deploy",   CAP_ADMIN,  "sys_deploy",   v.deploy,   ("inference",), False, True),
    # Deploy streaming its load's progress: the same checks and handling (handlers.deploy_events)
    Syscall(28, "DeployStream", CAP_ADMIN, "sys_deploy_stream", v.deploy, ("inference",),
            True, True),
    Syscall(10, "Undeploy", CAP_ADMIN, "sys_undeploy", v.undeploy, ("inference",), False, True),
    Syscall(11, "WhoAmI",  CAP_SYSTEM, "sys_whoami",   v.nothing),
    Syscall(12, "Services", CAP_SYSTEM, "sys_services", v.nothing),
    Syscall(13, "SetQuota", CAP_ADMIN, "sys_setquota", v.setquota, ("security",), False, True),
    Syscall(14, "Audit",   CAP_ADMIN,  "sys_audit",    v.audit,    (),              False, True),
    # Mailboxes: "proc" because they are how jobs and their users talk; who may use *which*
    # mailbox is the mailbox's owner and mode, decided by the IPC service.
    Syscall(20, "MboxCreate", CAP_PROC, "sys_mbox_create", v.mbox_create, ("ipc",)),
    Syscall(21, "MboxSend",  CAP_PROC,  "sys_mbox_send",   v.mbox_send,   ("ipc",)),
    Syscall(22, "MboxRecv",  CAP_PROC,  "sys_mbox_recv",   v.mbox_recv,   ("ipc",)),
    Syscall(23, "MboxList",  CAP_PROC,  "sys_mbox_list",   v.mbox_list,   ("ipc",)),
    Syscall(24, "MboxRemove", CAP_PROC, "sys_mbox_remove", v.mbox_remove, ("ipc",)),
    # Shared KV segments: the pager's blocks are the kernel's; owner and mode decide who attaches.
    Syscall(25, "ShmCreate", CAP_PROC,  "sys_shm_create",  v.shm_create,  ("inference",)),
    Syscall(26, "ShmRemove", CAP_PROC,  "sys_shm_remove",  v.shm_name),
    Syscall(27, "ShmList",   CAP_PROC,  "sys_shm_list",    v.nothing),
    Syscall(15, "Metrics", CAP_SYSTEM, "sys_metrics",  v.nothing),
    Syscall(17, "Alias",   CAP_ADMIN,  "sys_alias",    v.alias),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in SYSCALLS}
BY_NUMBER: dict[int, Syscall] = {s.number: s for s in SYSCALLS}

# Signals a job understands (numbers as on Linux; kernel.proto's Signal enum).
SIGNALS = limits.SIGNALS
