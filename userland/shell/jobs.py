"""The shell's background jobs: job number -> pid and the command that started it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    number: int
    pid: int
    text: str
    notified: bool = False  # "Done" already shown


@dataclass
class Jobs:
    table: dict[int, Job] = field(default_factory=dict)
    next_number: int = 1

    def add(self, pid: int, text: str) -> Job:
        job = Job(self.next_number, pid, text)
        self.table[job.number] = job
        self.next_number += 1
        return job

    def remove(self, pid: int) -> None:
        self.table = {n: j for n, j in self.table.items() if j.pid != pid}
        if not self.table:
            self.next_number = 1

    def latest(self) -> Job | None:
        return self.table[max(self.table)] if self.table else None

    def by_pid(self, pid: int) -> Job | None:
        return next((j for j in self.table.values() if j.pid == pid), None)

    def resolve(self, spec: str) -> int:
        """'%2' -> job 2's pid, '%%'/'%+' -> the latest job's, '1234' -> 1234; ValueError."""
        if spec in ("%", "%%", "%+"):
            job = self.latest()
            if job is None:
                raise ValueError("no current job")
            return job.pid
        if spec.startswith("%"):
            num = spec[1:]
            if not num.isdigit() or int(num) not in self.table:
                raise ValueError(f"{spec}: no such job (see jobs)")
            return self.table[int(num)].pid
        if not spec.isdigit() or int(spec) <= 0:
            raise ValueError(f"{spec!r} is not a pid or %job")
        return int(spec)
