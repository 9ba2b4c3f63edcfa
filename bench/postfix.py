"""A throwaway Postfix instance for the benchmark: same load, same sink, same disk.

Takes a work directory (on the same filesystem as the relay's spool), a loopback port
to listen on and the sink's port; writes its own config directory and queue under the
work directory (never touching /etc/postfix or the system queue), starts it with
`postfix -c DIR start`, and stops it again. Loopback only: inet_interfaces=127.0.0.1,
mydestination empty, relayhost = the sink. Durability is Postfix's default (every queue
file fsynced before the 250). Needs root (Postfix's master runs as root and drops to
the postfix user) and the Debian `postfix` package; `available()` says whether both hold.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

_MASTER_CF = "/etc/postfix/master.cf"


def available() -> bool:
    return (os.geteuid() == 0 and shutil.which("postfix") is not None
            and Path(_MASTER_CF).exists())


class Postfix:
    def __init__(self, workdir: Path, port: int, sink_port: int, max_size: int = 60 << 20):
        self.dir = workdir / "postfix"
        self.conf = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.port, self.sink_port, self.max_size = port, sink_port, max_size

    def _main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{self.sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = {self.max_size}
# 200 concurrent sessions must each get an smtpd (the default limit is 100).
default_process_limit = 250
maillog_file = {self.dir}/postfix.log
biff = no
"""

    def _master_cf(self) -> str:
        out = []
        for line in Path(_MASTER_CF).read_text().splitlines():
            f = line.split()
            if f and not line[0].isspace() and not line.startswith("#"):
                if f[0] == "smtp" and f[1] == "inet":
                    f[0] = f"127.0.0.1:{self.port}"
                if len(f) >= 8 and f[1] in ("inet", "unix", "unix-dgram", "fifo", "pass"):
                    f[4] = "n"      # no chroot: nothing to copy into the queue dir
                line = " ".join(f)
            out.append(line)
        return "\n".join(out) + "\n"

    def start(self) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as the postfix user: it must traverse to the queue.
        for p in [self.dir, *self.dir.parents]:
            if p == Path("/"):
                break
            os.chmod(p, os.stat(p).st_mode | 0o011)
        shutil.chown(self.data, "postfix")
        (self.conf / "main.cf").write_text(self._main_cf())
        (self.conf / "master.cf").write_text(self._master_cf())
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        subprocess.run(["postfix", "-c", str(self.conf), "set-permissions"], env=env,
                       check=False, capture_output=True)
        subprocess.run(["postfix", "-c", str(self.conf), "check"], env=env, check=True,
                       capture_output=True)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], env=env, check=True,
                       capture_output=True)

    def master_pid(self, timeout: float = 15.0) -> int:
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError("postfix master did not start; see " + str(self.dir / "postfix.log"))

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.queue / sub
            if d.exists() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True

    def stop(self) -> None:
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], env=env, check=False,
                       capture_output=True, timeout=60)
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            try:
                os.kill(int(pidfile.read_text().split()[0]), 0)
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.1)
