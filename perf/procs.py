"""Process plumbing for the benchmark driver: start pinned processes, wait for ports, and read the kernel's
CPU and memory accounting for a whole process tree from /proc (no psutil needed)."""
import os
import signal
import socket
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpus():
    """The CPUs this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def pinned(cmd, cpu):
    """Prefix `cmd` with taskset so it runs on one CPU; unchanged when cpu is None."""
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


class Proc:
    """A child process we started, with its output going to a log file under the run directory."""

    def __init__(self, name, cmd, log_path, env=None, cwd=None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout=5.0):
        """SIGTERM the process group we created, then SIGKILL what is left."""
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait()
        else:
            # the leader may be gone while workers it forked into our session linger
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host, port, proc, timeout=30.0):
    """Wait until something accepts connections on host:port; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {host}:{port} within {timeout}s:\n{proc.log_tail()}")


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # the command name may contain spaces and parentheses: split after the last ')'
    return data[data.rindex(")") + 2:].split()


def tree(root):
    """`root` and all its descendants (scanning /proc, since /proc/<pid>/task/*/children is optional)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(entry)[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root):
    """User + system CPU seconds of the tree: every live process (all its threads) plus the children it
    already reaped (cutime/cstime), so a worker that exits mid-run still counts."""
    ticks = 0
    for pid in tree(root):
        try:
            f = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        # fields after the name: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_peak_rss_bytes(root):
    """Sum of each live process's peak resident set (VmHWM): an upper bound of the tree's peak."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def status_kb(pid, field):
    """A kB field of /proc/<pid>/status (VmRSS: resident now, VmHWM: its peak); 0 when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def open_fds(pid):
    """Descriptors the process holds (its sockets, when it serves connections)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def leaf_pids(root):
    """Processes of the tree that have no children: the workers that handle requests."""
    pids = tree(root)
    parents = set()
    for pid in pids:
        try:
            parents.add(int(_stat_fields(pid)[1]))
        except (OSError, ValueError):
            pass
    return [p for p in pids if p not in parents] or [root]
