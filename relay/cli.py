"""The `relay` command: serve, check-config, queue and quarantine tools, passwd.

    relay serve [-c FILE]             run (embedded defaults when no file is given)
    relay check-config FILE           validate; names the key of the first mistake
    relay queue list|show ID|delete ID|hold ID|release ID|flush [--json]
    relay queue drain --to HOST:PORT  hand every queued message to another relay
    relay quarantine list|show ID|release ID|delete ID [--json]
    relay passwd                      hash a password for a users file

The config file may also come from RELAY_CONFIG; RELAY_<SECTION>__<KEY> variables
override single keys (containers).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import inspect
import json
import os
import sys

from relay import config as config_mod
from relay.config import ConfigError


def _load(path: str | None) -> config_mod.Config:
    return config_mod.load(path or os.environ.get("RELAY_CONFIG") or None)


def _when(ts: float) -> str:
    if not ts:
        return "now"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_serve(args) -> int:
    path = args.config or os.environ.get("RELAY_CONFIG") or None
    cfg = config_mod.load(path)
    from relay.workers import available_cpus
    if (cfg.workers or available_cpus()) > 1:
        _multiprocess_metrics()
    from relay.app import serve
    serve(cfg, path)
    return 0


def _multiprocess_metrics() -> None:
    """Workers' metrics add up only if prometheus_client is in multiprocess mode from
    its first import on: set the directory now, fresh for this run."""
    import glob
    import tempfile
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        for f in glob.glob(os.path.join(d, "*.db")):
            os.unlink(f)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")


def cmd_check(args) -> int:
    cfg = config_mod.load(args.file)
    from relay.pipeline import loader
    from relay.pipeline.protocol import FilterEnv, Resolver
    loader.load(cfg.filters, FilterEnv(hostname=cfg.fqdn, resolver=Resolver()))
    print(f"{args.file}: OK ({len(cfg.listeners)} listeners, {len(cfg.filters)} filters)")
    return 0


def cmd_queue(args) -> int:
    cfg = _load(args.config)
    from relay.queue import control, spool
    if args.action in ("list", "show"):
        envs = sorted(spool.scan(cfg.spool.path), key=lambda e: e.arrival)
        if args.action == "show":
            envs = [e for e in envs if e.queue_id == args.id]
            if not envs:
                print(f"{args.id}: no such message in the queue", file=sys.stderr)
                return 1
        if args.json:
            print(json.dumps([{**e.to_json(), "queue": e.queue_name().value} for e in envs],
                             indent=2))
            return 0
        for e in envs:
            print(f"{e.queue_id}  {e.queue_name().value:8}  {e.size:>9}  {_when(e.arrival)}  "
                  f"<{e.sender}>")
            for r in e.recipients:
                line = f"    <{r.address}>  {r.state.value}"
                if r.state.value == "pending":
                    line += f", attempts={r.attempts}, next={_when(r.next_attempt)}"
                if r.last_error:
                    line += f"\n        last error: {r.last_error}"
                print(line)
        if not envs:
            print("queue is empty")
        return 0
    if args.action == "drain":
        if not args.to:
            print("relay queue drain: --to HOST:PORT is required", file=sys.stderr)
            return 2
        from relay.queue.drain import drain
        try:
            n = drain(cfg, args.to)
        except ValueError as e:
            print(f"relay queue drain: {e}", file=sys.stderr)
            return 2
        print(f"drained {n} messages to {args.to}")
        return 0
    if args.action != "flush" and not args.id:
        print(f"relay queue {args.action}: a queue id (or ALL) is required", file=sys.stderr)
        return 2
    ids = control.request(cfg, args.action, args.id)
    if args.json:
        print(json.dumps({"action": args.action, "ids": ids}))
    else:
        print(f"{args.action}: {len(ids)} message(s)" + (": " + " ".join(ids) if ids else ""))
    return 0 if ids or args.action == "flush" else 1


def cmd_quarantine(args) -> int:
    cfg = _load(args.config)
    from relay.quarantine import cli as qcli
    from relay.quarantine.release import ReleaseError
    if args.action != "list" and not args.id:
        print(f"relay quarantine {args.action}: a quarantine id is required", file=sys.stderr)
        return 2
    try:
        if args.action == "list":
            out = qcli.list_messages(cfg, json=args.json)
        elif args.action == "show":
            out = qcli.show(cfg, args.id)
        elif args.action == "release":
            out = qcli.release(cfg, args.id, _offline_enqueue(cfg))
        else:
            out = qcli.delete(cfg, args.id)
        if inspect.isawaitable(out):
            out = asyncio.run(_awaited(out))
    except ReleaseError as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1
    if isinstance(out, bytes):
        sys.stdout.buffer.write(out)
    elif out is not None:
        print(out if isinstance(out, str) else json.dumps(out, indent=2))
    return 0


async def _awaited(aw):
    return await aw


def _offline_enqueue(cfg):
    """Release from the CLI: the message goes into the queue through a running relay's
    spool writer if there is one (control request), else straight into the spool."""
    from relay.queue.drain import enqueue_via_smtp_or_spool
    return lambda env, message: enqueue_via_smtp_or_spool(cfg, env, message)


def cmd_passwd(args) -> int:
    from relay.smtp.auth import hash_password
    pw = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if sys.stdin.isatty() and getpass.getpass("Again: ") != pw:
        print("passwords differ", file=sys.stderr)
        return 1
    h = hash_password(pw)
    print(f"{args.user}:{h}" if args.user else h)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="SMTP relay and mail gateway")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the relay")
    s.add_argument("-c", "--config", help="YAML config file (default: embedded defaults)")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(func=cmd_check)
    q = sub.add_parser("queue", help="inspect and manage the queue")
    q.add_argument("action", choices=["list", "show", "delete", "hold", "release", "flush",
                                      "drain"])
    q.add_argument("id", nargs="?")
    q.add_argument("--to", help="drain: HOST:PORT of the relay that takes the mail")
    q.add_argument("--json", action="store_true")
    q.add_argument("-c", "--config")
    q.set_defaults(func=cmd_queue)
    qq = sub.add_parser("quarantine", help="review held mail")
    qq.add_argument("action", choices=["list", "show", "release", "delete"])
    qq.add_argument("id", nargs="?")
    qq.add_argument("--json", action="store_true")
    qq.add_argument("-c", "--config")
    qq.set_defaults(func=cmd_quarantine)
    pw = sub.add_parser("passwd", help="print a password hash for a users file")
    pw.add_argument("user", nargs="?")
    pw.set_defaults(func=cmd_passwd)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"relay: config error: {e}", file=sys.stderr)
        return 2
    except (TimeoutError, RuntimeError, OSError) as e:
        print(f"relay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
