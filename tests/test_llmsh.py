"""llmsh: parsing, jobs, completion; scripting through -c, FILE and stdin; the interactive
shell through a pseudo-terminal (line editing, history, completion, Ctrl-C, chat)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import psutil
import pytest

from llmasos import LLMClient, errors
from llmasos.shell.complete import Completer
from llmasos.shell.jobs import Jobs
from llmasos.shell.parse import parse

from conftest import System, embedded_gguf, kill_live_jobs

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}

# -- pure parts -----------------------------------------------------------------------------------


def test_parse_words_separators_background_comments():
    cmds = parse("run -n 5 'a b' & ; ps -a # a comment")
    assert [c.argv for c in cmds] == [["run", "-n", "5", "a b"], ["ps", "-a"]]
    assert [c.background for c in cmds] == [True, False]
    assert cmds[0].text == "run -n 5 'a b' &"
    assert parse("  ") == [] and parse("; ps;")[0].argv == ["ps"]
    assert [c.background for c in parse("run a &; run b")] == [True, False]
    assert [c.argv for c in parse('ask "what; now?"')] == [["ask", "what; now?"]]


@pytest.mark.parametrize("line", ["run 'unterminated", "& ps", "ps && ps", "ps ;; ps"])
def test_parse_errors(line):
    with pytest.raises(ValueError):
        parse(line)


def test_jobs_resolve():
    jobs = Jobs()
    a, b = jobs.add(100, "run a &"), jobs.add(200, "run b &")
    assert (a.number, b.number) == (1, 2)
    assert jobs.resolve("%1") == 100 and jobs.resolve("%+") == 200 and jobs.resolve("7") == 7
    for bad in ("%9", "%x", "abc", "0"):
        with pytest.raises(ValueError):
            jobs.resolve(bad)
    jobs.remove(200)
    assert jobs.latest() is a
    jobs.remove(100)
    assert jobs.add(300, "x").number == 1  # numbering restarts when the table empties


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_completion_candidates_without_kernel():
    comp = Completer(LLMClient(address=_dead_address(), token="x", timeout=2),
                     ["run", "ps", "help", "kill"])
    assert comp.candidates("", "r") == ["run "]
    assert comp.candidates("ps; ", "h") == ["help "]
    assert comp.candidates("help ", "k") == ["kill "]
    assert comp.candidates("kill ", "") == []  # unreachable kernel: no pids, no crash
    assert comp.candidates("run hello ", "w") == []


# -- scripting ------------------------------------------------------------------------------------


def llmsh(*args: str, stdin: str | None = None, env: dict | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmasos.shell.main", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**CLEAN_ENV, "LLMASOS_ADDR": _dead_address(), **(env or {})})


@pytest.mark.parametrize("line,status,msg", [
    ("bogus", 127, "command not found"), ("run", 2, "give the prompt"),
    ("ps -o nope", 2, "unknown field"), ("kill", 2, "no pid"), ("kill -HUP 3", 2, "signal"),
    ("nice x 1", 2, "invalid int"), ("wait %3", 2, "no such job"), ("fg", 2, "no current job"),
    ("run 'oops", 2, "syntax error"), ("ps &", 2, "cannot run in the background"),
    ("deploy /no/such/file m", 2, "no such file"), ("help nosuch", 2, "no such command"),
    ("whoami", 1, "cannot reach llmosd")])
def test_bad_input_gives_readable_error_and_status(line, status, msg):
    out = llmsh("-c", line)
    assert out.returncode == status, out.stderr
    assert msg in out.stderr and "Traceback" not in out.stderr


def test_help_exit_and_errexit():
    out = llmsh("-c", "help; exit 3; help")
    assert out.returncode == 3 and out.stdout.count("leave the shell") == 1
    out = llmsh("-c", "help\nbogus\nhelp")
    assert out.returncode == 127 and out.stdout.count("leave the shell") == 1
    out = llmsh("--keep-going", "-c", "bogus\nhelp")
    assert out.returncode == 127 and out.stdout.count("leave the shell") == 1


def test_script_file_and_stdin(tmp_path):
    script = tmp_path / "s.llmsh"
    script.write_text("# a script\nhelp ps\n\nexit 4\n")
    out = llmsh(str(script))
    assert out.returncode == 4 and "usage: ps" in out.stdout
    out = llmsh(stdin="help kill\n")
    assert out.returncode == 0 and "usage: kill" in out.stdout
    assert llmsh(str(tmp_path / "missing")).returncode == 2


def test_no_colour_when_not_a_tty():
    out = llmsh("-c", "bogus")
    assert "\033[" not in out.stderr and "\033[" not in out.stdout


# -- through a pseudo-terminal --------------------------------------------------------------------

# The child makes the pty its controlling terminal, so ^C reaches it as SIGINT.
CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[1:]])")


class Pty:
    def __init__(self, *args: str, env: dict | None = None,
                 module: str = "llmasos.shell.main") -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-c", CTTY, module, *args], stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True,
                                     env={**CLEAN_ENV, "TERM": "xterm", **(env or {})})
        os.close(slave)
        self.fd, self.buf = master, ""

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        """Read until the regex matches what came since the last match; consume up to it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in output: {self.buf!r}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"EOF waiting for {pattern!r}: {self.buf!r}")
                self.buf += data.decode(errors="replace")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.fd)


PROMPT = r"llmsh.*\$ "


def test_interactive_editing_completion_history_ctrl_c(tmp_path):
    env = {"LLMASOS_HOME": str(tmp_path), "LLMASOS_ADDR": _dead_address()}
    sh = Pty(env=env)
    try:
        assert "\033[" in sh.expect(PROMPT).group(0)  # coloured on a terminal
        sh.send("hel\t")  # tab completes the command
        sh.expect("help ")
        sh.send("ps\r")
        sh.expect("usage: ps")
        sh.expect(PROMPT)
        sh.send("help pz\x7fs\x01\x05\r")  # backspace, ^A, ^E: line editing
        sh.expect("usage: ps")
        sh.expect(PROMPT)
        sh.send("half a line")
        sh.expect("half a line")
        time.sleep(0.3)  # readline is back in select(); a ^C sooner can sit unseen (CPython)
        sh.send("\x03")  # ^C abandons the line; the shell stays
        sh.expect(PROMPT)
        sh.send("\x1b[A\r")  # up arrow recalls the previous command
        sh.expect("usage: ps")
        sh.expect(PROMPT)
        sh.send("exit\r")
        assert sh.close() == 0
    finally:
        if sh.proc.poll() is None:
            sh.proc.kill()
    assert "help ps" in (tmp_path / "llmsh_history").read_text()
    sh = Pty(env=env)  # history survives across sessions
    sh.expect(PROMPT)
    sh.send("\x1b[A\x1b[A\r")  # up, up: past `exit` to `help ps`
    sh.expect("usage: ps")
    sh.expect(PROMPT)
    sh.send("\x04")  # ^D leaves
    assert sh.close() == 0


# -- against a booted kernel ----------------------------------------------------------------------


def _env(system: System, token: str | None = None) -> dict:
    return {"LLMASOS_ADDR": system.address, "LLMASOS_HOME": str(system.home),
            "LLMASOS_TOKEN": token or system.root_token}


def test_system_commands(bare_system):
    out = llmsh("-c", "whoami; whoami -v; services; models; ps -a; jobs",
                env=_env(bare_system))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "root" and "capabilities=" in lines[1]
    assert any(line.startswith("inference") for line in lines)
    assert any(line.split()[:2] == ["NAME", "ARCH"] for line in lines)
    out = llmsh("-c", "kill 987654", env=_env(bare_system))
    assert out.returncode == 1 and "(987654)" in out.stderr


def test_top_live_view_quits_on_q(bare_system):
    top = Pty("-d", "0.3", env=_env(bare_system), module="llmasos.tools.top")
    try:
        top.expect("llm-top - ")
        top.expect("inference healthy")
        top.expect("llm-top - ")  # refreshed
        top.send("q")
        assert top.close() == 0
    finally:
        if top.proc.poll() is None:
            top.proc.kill()
    sh = Pty(env=_env(bare_system))  # the shell's `top` is the same view
    try:
        sh.expect(PROMPT)
        sh.send("top -d 0.3\r")
        sh.expect("scheduler healthy")
        sh.send("q")
        sh.expect(PROMPT)
        sh.send("whoami\r")
        sh.expect("root")
        sh.send("exit\r")
        assert sh.close() == 0
    finally:
        if sh.proc.poll() is None:
            sh.proc.kill()


def test_admin_commands_need_root_and_known_names(bare_system):
    gguf = os.path.abspath(__file__)  # an existing file: the kernel decides, not the shell
    alice = bare_system.adduser("alice-sh")
    out = llmsh("-c", f"deploy {gguf} x", env=_env(bare_system, token=alice))
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.strip()
    out = llmsh("-c", "undeploy no-such-model", env=_env(bare_system))
    assert out.returncode == 1 and "no-such-model" in out.stderr
    out = llmsh("-c", "whoami", env=_env(bare_system, token=alice))
    assert out.stdout.strip() == "alice-sh"


def test_deploy_shows_the_load_progress(bare_system):
    env = _env(bare_system)
    out = llmsh("-c", f"deploy {embedded_gguf()} smol-sh; undeploy smol-sh", env=env,
                timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("deployed smol-sh: llama")   # stdout: the result alone
    lines = out.stderr.splitlines()   # not a terminal: a plain line per quarter of a stage
    assert all(line.startswith("deploy: ") for line in lines), lines
    assert "deploy: load 0/30 layers (0%)" in lines and "deploy: load 30/30 layers (100%)" in lines
    assert len(lines) <= 5 * 6, lines   # at most 0, 25, 50, 75 and 100% of each stage
    sh = Pty(env=env)   # on a terminal: one line redrawn in place, erased at the end
    try:
        sh.expect(PROMPT)
        sh.send(f"deploy {embedded_gguf()} smol-tty\r")
        sh.expect(r"\rdeploy: load \[#*\.*\] \d+/30 layers +\d+%", timeout=300)
        sh.expect(r"\r\x1b\[Kdeployed smol-tty: llama", timeout=300)
        sh.expect(PROMPT, timeout=60)
        sh.send("undeploy smol-tty\r")
        sh.expect("undeployed smol-tty")
        sh.send("exit\r")
        assert sh.close() == 0
    finally:
        if sh.proc.poll() is None:
            sh.proc.kill()


def test_completion_of_models(bare_system):
    c = LLMClient(address=bare_system.address, token=bare_system.root_token)
    comp = Completer(c, ["run"])
    assert comp.candidates("run -m ", "") == [m.name + " " for m in c.models()]


@pytest.fixture(scope="module")
def gen_system(model_system: System) -> System:
    with LLMClient(address=model_system.address, token=model_system.root_token) as c:
        try:
            c.spawn("x", max_tokens=1).wait()
        except errors.Unimplemented:
            pytest.skip("Spawn answers UNIMPLEMENTED: generation is not wired into llmosd yet")
    return model_system


def test_run_background_jobs_wait_kill(gen_system):
    env = _env(gen_system)
    out = llmsh("-c", "run -n 6 -t 0 Once upon a time", env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    script = ("run -n 6 -t 0 Once upon a time &\n"
              "run -n 4000 --ignore-eos Tell me a very long story &\n"
              "jobs\nkill %2\nwait %1\nwait %2\n")
    out = llmsh(stdin=script, env=env, timeout=300)
    assert out.returncode == 128 + 15 or out.returncode == 137, out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"\[1\] \d+", lines[0]) and re.fullmatch(r"\[2\] \d+", lines[1])
    assert any(line.startswith("[2]") and "Tell me" in line for line in lines[2:4])
    first = llmsh("-c", "run -n 6 -t 0 Once upon a time", env=env).stdout.strip()
    assert first in out.stdout  # wait %1 printed the same greedy text
    assert "killed" in out.stderr


def test_user_cannot_kill_anothers_job(gen_system):
    bob = gen_system.adduser("bob-sh")
    with LLMClient(address=gen_system.address, token=gen_system.root_token) as c:
        proc = c.spawn("Tell me a very long story.", max_tokens=4000, ignore_eos=True)
        try:
            out = llmsh("-c", f"nice 7 {proc.pid}", env=_env(gen_system))
            assert out.returncode == 0 and c.stat(proc.pid).nice == 7
            out = llmsh("-c", f"nice -5 {proc.pid}", env=_env(gen_system, token=bob))
            assert out.returncode == 1 and "Traceback" not in out.stderr
            out = llmsh("-c", f"kill -KILL {proc.pid}", env=_env(gen_system, token=bob))
            assert out.returncode == 1 and f"({proc.pid})" in out.stderr
            assert "Traceback" not in out.stderr
        finally:
            c.kill(proc.pid, "KILL")
            c.wait(proc.pid)


def test_ctrl_c_kills_foreground_job_and_chat(gen_system):
    sh = Pty(env=_env(gen_system))
    try:
        sh.expect(PROMPT)
        sh.send("run -n 4000 --ignore-eos Tell me a very long story about dragons\r")
        time.sleep(3)
        sh.send("\x03")
        sh.expect(r"job \d+ killed \(Ctrl-C\)")
        sh.expect(PROMPT)
        with LLMClient(address=gen_system.address, token=gen_system.root_token) as c:
            deadline = time.monotonic() + 30
            while any(p.state not in (6, 7) for p in c.ps()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert all(p.state in (6, 7) for p in c.ps())  # nothing left running
        sh.send("chat -n 8 -t 0\r")
        sh.expect("/bye")
        sh.send("Hello!\r")
        sh.expect(">>> ", timeout=120)
        sh.send("And again?\r")
        sh.expect(">>> ", timeout=120)
        sh.send("/bye\r")
        sh.expect(PROMPT)
        sh.send("exit 0\r")
        assert sh.close() == 0
    finally:
        if sh.proc.poll() is None:
            sh.proc.send_signal(signal.SIGKILL)
        kill_live_jobs(gen_system)


def test_chat_from_stdin(gen_system):
    out = llmsh("-c", "chat -n 6 -t 0\nHi there\n/bye\nwhoami", env=_env(gen_system))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("root") and len(out.stdout.strip()) > len("root")


def test_boot_opens_the_shell_and_shuts_down_on_exit(tmp_path):
    """`make run`'s path: boot llmosd, open llmsh on it, stop everything when the shell exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sh = Pty("--listen", f"127.0.0.1:{port}", "--home", str(tmp_path), "--no-embedded",
             module="llmasos.shell.boot")
    try:
        sh.expect(PROMPT, timeout=120)
        sh.send("whoami\r")
        sh.expect("root")
        sh.send("exit\r")
        assert sh.close(timeout=60) == 0
    finally:
        if sh.proc.poll() is None:
            sh.proc.kill()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "llmosd still listening"
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])], "left running"
