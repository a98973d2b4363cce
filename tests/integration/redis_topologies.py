"""Redis as operators run it, started for tests: a Redis Cluster (masters with replicas), a Sentinel-managed
master with a replica, a TLS-only server. Real redis-server processes on free loopback ports, no persistence.
Every wait here is for a state (a poll with a deadline that fails loudly), never a fixed sleep."""
from __future__ import annotations

import os
import socket
import subprocess
import time

from tests.conftest import free_port

_QUIET = ("--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--repl-diskless-sync-delay", "0")


def _start(args, cwd, name) -> subprocess.Popen:
    os.makedirs(cwd, exist_ok=True)
    with open(os.path.join(cwd, name + ".log"), "ab") as log:    # the server's log, for a failing test
        return subprocess.Popen(["redis-server", *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def cli(port: int, *args, tls=None, check=True) -> str:
    """redis-cli against 127.0.0.1:port; its output."""
    cmd = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]
    if tls is not None:
        cmd += ["--tls", "--cacert", tls]
    out = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(map(str, args))}: {out.stdout}{out.stderr}")
    return out.stdout


def wait_for(what: str, cond, timeout: float = 30.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (OSError, RuntimeError, subprocess.SubprocessError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def _answers(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))


def replicated(port: int):
    """Wait until every replica of the master on `port` has acknowledged what the master had written when asked
    (its replication offset then; it keeps growing with sentinel hellos and pings, so "equal" may never hold)."""
    def offsets():
        info = cli(port, "INFO", "replication")
        acks = [int(part.split("=")[1]) for line in info.splitlines() if line.startswith("slave")
                for part in line.split(",") if part.startswith("offset=")]
        return int(info.split("master_repl_offset:")[1].split()[0]), acks
    written = offsets()[0]
    wait_for(f"the replicas of {port} to catch up", lambda: (acks := offsets()[1]) and min(acks) >= written)


class Cluster:
    """`masters` masters with `replicas` replicas each, made with `redis-cli --cluster create`."""

    def __init__(self, workdir: str, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 500):
        self.dir = workdir
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.procs: dict[int, subprocess.Popen] = {}
        for port in self.ports:
            self.procs[port] = _start(["--port", str(port), "--cluster-enabled", "yes", "--cluster-port",
                                       str(free_port()), "--cluster-config-file", f"nodes-{port}.conf",
                                       "--cluster-node-timeout", str(node_timeout_ms), *_QUIET], workdir, str(port))
        for port in self.ports:
            wait_for(f"redis-server on {port}", lambda: _answers(port))
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", str(replicas),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self.wait_ok()
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    @classmethod
    def single_node(cls, workdir: str) -> "Cluster":
        """One cluster-enabled node with no slots: enough for CLUSTER KEYSLOT."""
        self = cls.__new__(cls)
        self.dir = workdir
        port = free_port()
        self.ports = [port]
        self.procs = {port: _start(["--port", str(port), "--cluster-enabled", "yes", "--cluster-port",
                                    str(free_port()), "--cluster-config-file", f"nodes-{port}.conf", *_QUIET],
                                   workdir, str(port))}
        wait_for(f"redis-server on {port}", lambda: _answers(port))
        return self

    def keyslots(self, keys: list[str]) -> list[int]:
        """CLUSTER KEYSLOT of every key, pipelined on one connection (keys may hold any bytes)."""
        import hiredis
        reader = hiredis.Reader()
        out = []
        with socket.create_connection(("127.0.0.1", self.ports[0]), timeout=10) as s:
            s.sendall(b"".join(hiredis.pack_command(("CLUSTER", "KEYSLOT", k.encode("utf-8", "surrogatepass")))
                               for k in keys))
            while len(out) < len(keys):
                reader.feed(s.recv(65536))
                while (r := reader.gets()) is not False:
                    out.append(r)
        return out

    def alive(self):
        return [p for p in self.ports if self.procs[p].poll() is None]

    def wait_ok(self):
        """Every live node reports cluster_state:ok and they all agree on who serves every slot."""
        def ok():
            views = set()
            for p in self.alive():
                info = cli(p, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                    return False
                views.add(frozenset(self.slot_owners(p).items()))
            return len(views) == 1
        wait_for("the cluster to be ok", ok)

    def nodes(self, port=None) -> list[dict]:
        """CLUSTER NODES as node `port` (default: any live one) sees it: id, port, flags, master id, slots."""
        out = cli(port or self.alive()[0], "CLUSTER", "NODES")
        rows = []
        for line in out.strip().splitlines():
            f = line.split()
            rows.append({"id": f[0], "port": int(f[1].split("@")[0].rsplit(":", 1)[1]), "flags": f[2].split(","),
                         "master": f[3], "slots": [r for r in f[8:] if not r.startswith("[")]})
        return rows

    def masters(self, port=None) -> list[dict]:
        return [n for n in self.nodes(port) if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]]

    def slot_owners(self, port=None) -> dict[str, int]:
        """slot range -> master port."""
        return {r: n["port"] for n in self.masters(port) for r in n["slots"]}

    def owner_of(self, slot: int) -> int:
        for r, port in self.slot_owners().items():
            a, _, b = r.partition("-")
            if int(a) <= slot <= int(b or a):
                return port
        raise AssertionError(f"no master serves slot {slot}")

    def keyslot(self, key: str) -> int:
        return int(cli(self.alive()[0], "CLUSTER", "KEYSLOT", key).strip())

    def wait_replicated(self):
        """Every master's replicas have acknowledged all of its writes (so a failover loses none)."""
        for m in self.masters():
            replicated(m["port"])

    def kill(self, port: int):
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _replica_ready(sentinel: int) -> bool:
    """The sentinel has the replica's INFO (its run id) and sees it linked to the master: it can promote it
    (before that, SENTINEL FAILOVER answers NOGOODSLAVE)."""
    f = cli(sentinel, "SENTINEL", "replicas", "mymaster").split("\n")
    fields = dict(zip(f[0::2], f[1::2]))
    return bool(fields.get("runid")) and fields.get("flags") == "slave" and fields.get("master-link-status") == "ok"


class Sentinels:
    """A master, a replica, and three sentinels watching the master as "mymaster"."""

    def __init__(self, workdir: str, down_after_ms: int = 400):
        self.dir = workdir
        self.master = free_port()
        self.replica = free_port()
        self.procs = {}
        self.args = {self.master: ["--port", str(self.master), *_QUIET]}
        self.procs[self.master] = _start(self.args[self.master], workdir, "master")
        self.procs[self.replica] = _start(["--port", str(self.replica), "--replicaof", "127.0.0.1",
                                           str(self.master), *_QUIET], workdir, "replica")
        for p in (self.master, self.replica):
            wait_for(f"redis-server on {p}", lambda: _answers(p))
        wait_for("the replica to sync", lambda: "master_link_status:up" in cli(self.replica, "INFO", "replication"))
        self.sentinels = [free_port() for _ in range(3)]
        for i, port in enumerate(self.sentinels):
            conf = os.path.join(workdir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\nsentinel resolve-hostnames no\n"
                        f"sentinel monitor mymaster 127.0.0.1 {self.master} 2\n"
                        f"sentinel known-replica mymaster 127.0.0.1 {self.replica}\n"
                        f"sentinel down-after-milliseconds mymaster {down_after_ms}\n"
                        f"sentinel failover-timeout mymaster 5000\n")
            self.procs[port] = _start([conf, "--sentinel"], workdir, f"sentinel-{port}")
        for port in self.sentinels:
            wait_for(f"sentinel on {port}", lambda: _answers(port))
            # A forced failover (SENTINEL FAILOVER) needs no agreement between sentinels (finding each other takes
            # seconds), only that the sentinel knows the replica.
            wait_for("the sentinel to know the replica", lambda: _replica_ready(port))
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + "/mymaster/0"

    def master_port(self) -> int:
        live = [p for p in self.sentinels if self.procs[p].poll() is None]
        out = cli(live[0], "SENTINEL", "get-master-addr-by-name", "mymaster").split()
        return int(out[1])

    def wait_replicated(self):
        replicated(self.master_port())

    def kill(self, port: int):
        self.procs[port].kill()
        self.procs[port].wait(10)

    def restart(self, port: int):
        """The killed master again, empty (no persistence)."""
        self.procs[port] = _start(self.args[port], self.dir, "master-again")
        wait_for(f"redis-server on {port}", lambda: _answers(port))

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
