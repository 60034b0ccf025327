"""milterd throughput / CPU / latency / memory benchmark against a real private Postfix.

    .venv/bin/python bench/bench.py [--rounds N] [--messages M] [--sessions S]

Postfix's ``smtp-source`` (1 KiB messages, a new SMTP connection per message, S sessions in
parallel) → one private Postfix (PostfixLab, loopback, no TLS) relaying everything through
``relayhost`` → Postfix's ``smtp-sink`` on loopback.  Configurations, run round-robin in one
invocation (the machine is noisy: ratios are taken within the same run, medians across rounds):

  none            no milter
  passthrough     bench/passthrough_milter.py: Milter.Base, accepts everything (unix socket)
  milterd-unix    milterd, every built-in plugin, receive_domains=[woodgrovebank.test], metrics
                  on, senders from fabrikam.test (covered by nothing: the common case)
  milterd-inet    the same over inet:PORT@127.0.0.1

The one Postfix instance is switched between configurations by rewriting main.cf
(``smtpd_milters``) and ``postfix reload``; the bench then waits until every smtpd process of
the previous configuration has exited and sends a small unmeasured warm-up batch.  Each measured
run is timed from smtp-source's start to its exit (SMTP ingestion rate); the queue is drained to
the sink (and the sink's delivered count checked) before the next run.

Also measured: milter CPU seconds per 1000 messages (utime+stime from /proc/PID/stat, whole
process), milterd callback latency p50/p99 per stage from its ``/metrics`` histogram
``milterd_callback_duration_seconds`` (bucket-interpolated like PromQL histogram_quantile, so
a quantile is only as precise as its bucket), milterd's VmRSS with --rss-sessions SMTP sessions
held open at MAIL FROM, and the one-session (-s 1) inet penalty.  ``--ablation`` adds milterd without the message_log
plugin and without any plugin; ``--profile-rounds N`` runs N extra rounds through milterd with
cProfile around its callbacks (bench/milterd_variant.py; py-spy cannot attach to this pyenv
interpreter) and prints the merged profile; ``--experiments`` adds milterd variants (GIL switch
interval 1 ms, logging through a QueueHandler, both) run by bench/milterd_variant.py.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from milterd.lab.metrics import scrape
from milterd.lab.net import free_port, wait_for_port, wait_for_unix_socket
from milterd.lab.postfix import PostfixLab
from milterd.lab.proc import MilterdProcess

REPO = Path(__file__).resolve().parents[1]

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SENDER = "bench@fabrikam.test"
RCPT = "sink@sink.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def children_named(ppid: int, comm: str) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        rest = s.rsplit(")", 1)[1].split()
        if name == comm and int(rest[1]) == ppid:
            out.add(int(d))
    return out


def host_busy_seconds() -> float:
    """CPU time the whole machine spent busy (user+nice+system+irq+softirq, all cores), minus
    this bench process's own (it polls Postfix's log).  Steal time (other VMs) is not busy time,
    so this cost is steadier than msg/s on a shared host."""
    with open("/proc/stat") as stat:
        f = stat.readline().split()
    busy = sum(int(x) for x in (f[1], f[2], f[3], f[6], f[7])) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy - (own.user + own.system)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class Proc:
    """A helper process started by the bench, stopped by its PID."""

    def __init__(self, argv: list[str], log: Path, ready, *, env: dict[str, str] | None = None):
        self.log = log
        with open(log, "ab") as f:
            self.p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})})
        if not ready():
            self.stop()
            raise RuntimeError(f"{argv[0]} did not become ready:\n{log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, timeout: float = 20) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


# -- metrics histogram -------------------------------------------------------------------------
_BUCKET = re.compile(r'^milterd_callback_duration_seconds_bucket\{(.*)\}$')


def scrape_buckets(port: int) -> dict[tuple[str, float], float]:
    out = {}
    for key, value in scrape(port).items():
        m = _BUCKET.match(key)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        out[(labels["stage"], le)] = value
    return out


def bucket_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """PromQL histogram_quantile: linear interpolation inside the bucket holding rank q."""
    cumulative = sorted(cumulative)
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    total = cumulative[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in cumulative:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


# -- the lab -----------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    socket: str | None                 # smtpd_milters value
    proc: object = None                # Proc | MilterdProcess | None
    metrics_port: int | None = None
    rates: list[float] = field(default_factory=list)
    cpu_per_1000: list[float] = field(default_factory=list)
    host_ms: list[float] = field(default_factory=list)   # whole machine's busy CPU per message
    hist: dict[tuple[str, float], float] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="milterd-bench-"))
        os.chmod(self.root, 0o755)
        self.procs: list = []
        self.sink_port = free_port()
        self.sunk = 0
        self.lab: PostfixLab | None = None
        self.current: str | None = "unset"

    # setup --------------------------------------------------------------------------------------
    def start(self) -> dict[str, Config]:
        a = self.args
        sink = Proc([SMTP_SINK, "-u", "postfix", f"127.0.0.1:{self.sink_port}", "512"],
                    self.root / "sink.log", lambda: wait_for_port("127.0.0.1", self.sink_port, 15))
        self.procs.append(sink)
        self.lab = PostfixLab(milter_socket=None, tls=None, base=self.root / "postfix", extra={
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "default_process_limit": str(max(200, a.rss_sessions + 100)),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "smtp_tls_security_level": "none",
        })
        self.lab.start()
        self.current = None
        configs = {"none": Config("none", None)}

        self.add_passthrough(configs, "passthrough")
        if a.single_messages:
            self.add_passthrough(configs, "passthrough-inet", inet=True)
        for name in a.configs.split(","):
            # passthrough-mail, passthrough-helo+mail+rcpt+header, ...: the pass-through also
            # subscribed to those stages (what each stage costs any pymilter milter)
            if name.startswith("passthrough-") and name not in configs:
                self.add_passthrough(configs, name,
                                     stages=name.split("-", 1)[1].replace("+", ","))
        self.add_milterd(configs, "milterd-unix", "unix")
        self.add_milterd(configs, "milterd-inet", "inet")
        if a.pool_python:
            # the same two milters on Debian's worker-pool libmilter (another venv's pymilter)
            self.add_passthrough(configs, "passthrough-pool", python=a.pool_python)
            self.add_milterd(configs, "milterd-pool", "unix", python=a.pool_python)
        if a.ablation:
            self.add_milterd(configs, "milterd-nolog", "unix", disable=("message_log",))
            self.add_milterd(configs, "milterd-nods", "unix", disable=("domain_security",))
            self.add_milterd(configs, "milterd-nostamp", "unix", disable=("stamp",))
            self.add_milterd(configs, "milterd-noplugins", "unix",
                             disable=("domain_security", "stamp", "counters", "message_log"))
        if a.experiments:
            self.add_milterd(configs, "milterd-si1ms", "unix",
                             variant=("--switch-interval", "0.001"))
            self.add_milterd(configs, "milterd-qlog", "unix", variant=("--queue-log",))
            self.add_milterd(configs, "milterd-qlog-si1ms", "unix",
                             variant=("--queue-log", "--switch-interval", "0.001"))
        return configs

    def add_passthrough(self, configs: dict, name: str, *, inet: bool = False, stages: str = "",
                        python: str = sys.executable) -> Config:
        """bench/passthrough_milter.py (``stages``: its --stages) on a unix socket or inet."""
        if inet:
            port = free_port()
            spec, pf_spec = f"inet:{port}@127.0.0.1", f"inet:127.0.0.1:{port}"
            ready = lambda: wait_for_port("127.0.0.1", port, 15)  # noqa: E731
        else:
            sock = self.root / name / "pt.sock"
            sock.parent.mkdir()
            os.chmod(sock.parent, 0o755)
            spec = pf_spec = f"unix:{sock}"
            ready = lambda: wait_for_unix_socket(sock, 15)  # noqa: E731
        argv = [python, str(REPO / "bench" / "passthrough_milter.py"), spec]
        if stages:
            argv += ["--stages", stages]
        p = Proc(argv, self.root / f"{name}.log", ready)
        self.procs.append(p)
        cfg = configs[name] = Config(name, pf_spec, p)
        return cfg

    def add_milterd(self, configs: dict, name: str, kind: str, *, disable: tuple = (),
                    variant: tuple[str, ...] = (), python: str = sys.executable) -> Config:
        """milterd with every built-in plugin (minus ``disable``); ``variant``: options of
        bench/milterd_variant.py (tweaks applied from outside, milterd itself unchanged)."""
        d = self.root / name
        d.mkdir()
        os.chmod(d, 0o755)
        spec = f"unix:{d}/milter.sock" if kind == "unix" else f"inet:{free_port()}@127.0.0.1"
        mport = free_port()
        text = (f'[milter]\nlisten = "{spec}"\n'
                f'[metrics]\nlisten = "127.0.0.1:{mport}"\n'
                '[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n')
        if disable:
            text += "[plugins]\ndisable = [" + ", ".join(f'"{x}"' for x in disable) + "]\n"
        (d / "milterd.toml").write_text(text)
        if variant:
            ready = ((lambda: wait_for_unix_socket(spec[5:], 20)) if kind == "unix" else
                     (lambda: wait_for_port("127.0.0.1", int(spec[5:].split("@")[0]), 20)))
            mp = Proc([sys.executable, str(REPO / "bench" / "milterd_variant.py"),
                       str(d / "milterd.toml"), *variant], d / "milterd.log", ready)
        else:
            mp = MilterdProcess(d / "milterd.toml", spec, log_path=d / "milterd.log",
                                python=python).start()
        self.procs.append(mp)
        if not wait_for_port("127.0.0.1", mport, 15):
            raise RuntimeError("milterd metrics did not come up")
        # Postfix spells inet milters inet:HOST:PORT; libmilter inet:PORT@HOST.
        pf_spec = spec if kind == "unix" else "inet:127.0.0.1:" + spec[5:].split("@")[0]
        cfg = configs[name] = Config(name, pf_spec, mp, mport)
        return cfg

    def stop(self) -> None:
        if self.lab is not None:
            self.lab.stop()
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {p}: {exc}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"kept {self.root}")

    # switching ---------------------------------------------------------------------------------
    def switch(self, cfg: Config) -> None:
        if self.current == cfg.name:
            return
        lab = self.lab
        master = lab.master_pid()
        old = children_named(master, "smtpd")
        lab.milter_socket = cfg.socket
        lab.reload()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in old):
            if time.monotonic() > deadline:
                raise RuntimeError(f"smtpd processes of the old config still alive: {old}")
            time.sleep(0.05)
        self.current = cfg.name
        self.load(min(self.args.sessions, 20), 100)   # warm-up, not measured

    # load ----------------------------------------------------------------------------------------
    def load(self, sessions: int, messages: int) -> float:
        cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(self.args.size),
               "-M", "client.fabrikam.test", "-f", SENDER, "-t", RCPT, f"127.0.0.1:{self.lab.port}"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if r.returncode != 0 or r.stderr.strip() or r.stdout.strip():
            raise RuntimeError(f"smtp-source failed rc={r.returncode}: {r.stdout}{r.stderr}"
                               f"{self.lab.log_tail()}")
        self.drain(messages)
        return wall

    def drain(self, expect: int, timeout: float = 300) -> None:
        """Wait until the sink got every message (counted in Postfix's maillog)."""
        want = self.sunk + expect
        pat = f"relay=127.0.0.1[127.0.0.1]:{self.sink_port},"
        deadline = time.monotonic() + timeout
        while True:
            n = sum(1 for line in self.lab.log_text().splitlines()
                    if pat in line and "status=sent" in line)
            if n >= want:
                self.sunk = n
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n - self.sunk}/{expect} messages reached the sink"
                                   f"{self.lab.log_tail()}")
            time.sleep(0.1)

    def measured_run(self, cfg: Config, sessions: int, messages: int) -> float:
        self.switch(cfg)
        before_cpu = cpu_seconds(cfg.pid) if cfg.pid else 0.0
        before_h = scrape_buckets(cfg.metrics_port) if cfg.metrics_port else {}
        host0 = host_busy_seconds()
        t0 = time.perf_counter()
        cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(self.args.size),
               "-M", "client.fabrikam.test", "-f", SENDER, "-t", RCPT, f"127.0.0.1:{self.lab.port}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if r.returncode != 0 or r.stderr.strip():
            raise RuntimeError(f"smtp-source failed rc={r.returncode}: {r.stdout}{r.stderr}")
        after_cpu = cpu_seconds(cfg.pid) if cfg.pid else 0.0
        if cfg.metrics_port:
            after_h = scrape_buckets(cfg.metrics_port)
            for k, v in after_h.items():
                cfg.hist[k] = cfg.hist.get(k, 0.0) + v - before_h.get(k, 0.0)
            eom = after_h.get(("eom", float("inf")), 0) - before_h.get(("eom", float("inf")), 0)
            if eom < messages:
                raise RuntimeError(f"{cfg.name}: milterd saw {eom} eom for {messages} messages")
        self.drain(messages)   # to the sink: the whole pipeline's work for these messages
        cfg.host_ms.append((host_busy_seconds() - host0) * 1000 / messages)
        rate = messages / wall
        cpu = (after_cpu - before_cpu) * 1000 / messages
        return rate, cpu


# -- reporting ---------------------------------------------------------------------------------
def _ms(q: float | None, cum: list[tuple[float, float]]) -> str:
    """A quantile in ms; inside the lowest bucket interpolation means nothing: say '<bound'."""
    if q is None:
        return "-"
    first = min(le for le, _ in cum)
    if q <= first:
        return f"<{first * 1e3:g} ms"
    return f"{q * 1e3:.3f} ms"


def latency_rows(cfg: Config) -> list[str]:
    rows = []
    stages = sorted({s for s, _ in cfg.hist})
    for stage in stages:
        cum = [(le, c) for (s, le), c in cfg.hist.items() if s == stage]
        n = max(c for _, c in cum)
        if n <= 0:
            continue
        p50, p99 = bucket_quantile(0.5, cum), bucket_quantile(0.99, cum)
        rows.append(f"  {cfg.name:18s} {stage:8s} n={int(n):7d}  p50={_ms(p50, cum):>10s}  "
                    f"p99={_ms(p99, cum):>10s}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--configs", default="none,passthrough,milterd-unix,milterd-inet")
    ap.add_argument("--rss-sessions", type=int, default=500,
                    help="SMTP sessions held open for the RSS measurement (0: skip)")
    ap.add_argument("--single-messages", type=int, default=200,
                    help="messages per -s 1 run for the inet penalty (0: skip)")
    ap.add_argument("--single-rounds", type=int, default=2)
    ap.add_argument("--profile-rounds", type=int, default=0,
                    help="extra runs through a cProfile-wrapped milterd (bench/milterd_variant.py)")
    ap.add_argument("--ablation", action="store_true",
                    help="also run milterd without message_log / domain_security / stamp, "
                         "and without any plugin")
    ap.add_argument("--experiments", action="store_true",
                    help="also run milterd with a 1 ms GIL switch interval, with queued logging, "
                         "and both (bench/milterd_variant.py)")
    ap.add_argument("--pool-python", metavar="PYTHON",
                    help="a venv's python whose pymilter uses Debian's worker-pool libmilter: "
                         "adds passthrough-pool and milterd-pool (see bench/README.md)")
    ap.add_argument("--stage-cpu", type=int, default=0, metavar="ROUNDS",
                    help="extra runs through milterd with CPU time per libmilter entry point "
                         "(bench/milterd_variant.py --stage-cpu)")
    ap.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (private Postfix instance)", file=sys.stderr)
        return 2

    b = Bench(args)
    try:
        configs = b.start()
        order = [configs[n] for n in args.configs.split(",")]
        extra = (("milterd-nolog", "milterd-nods", "milterd-nostamp", "milterd-noplugins")
                 if args.ablation else ()) + (
            ("milterd-si1ms", "milterd-qlog", "milterd-qlog-si1ms") if args.experiments else ())
        if args.pool_python:
            extra += ("passthrough-pool", "milterd-pool")
        order += [configs[n] for n in extra if configs[n] not in order]
        print(f"# {args.rounds} rounds x {len(order)} configs, smtp-source -s {args.sessions} "
              f"-m {args.messages} -l {args.size}; Postfix {postfix_version()}; "
              f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
        for rnd in range(args.rounds):
            # rotate the start so no config always runs right after the same neighbour
            seq = order[rnd % len(order):] + order[:rnd % len(order)]
            line = []
            for cfg in seq:
                rate, cpu = b.measured_run(cfg, args.sessions, args.messages)
                cfg.rates.append(rate)
                if cfg.pid:
                    cfg.cpu_per_1000.append(cpu)
                line.append(f"{cfg.name}={rate:.0f}/s" + (f" cpu={cpu:.2f}s/1k" if cfg.pid else ""))
            print(f"round {rnd + 1}: " + "  ".join(line), flush=True)

        base = statistics.median(configs["none"].rates) if configs["none"].rates else None
        print()
        if not args.rounds:
            order = []
        host_base = (statistics.median(configs["none"].host_ms) if configs["none"].host_ms
                     else None)
        print(f"{'config':16s} {'msg/s (median)':>14s} {'min-max':>11s} {'ratio':>6s} "
              f"{'CPU s/1000 msg':>15s} {'host CPU ms/msg':>16s} {'cost ratio':>10s}")
        for cfg in order:
            med = statistics.median(cfg.rates)
            ratio = f"{med / base:.2f}" if base else "-"
            cpu = f"{statistics.median(cfg.cpu_per_1000):.2f}" if cfg.cpu_per_1000 else "-"
            host = statistics.median(cfg.host_ms)
            cost = f"{host_base / host:.2f}" if host_base else "-"
            print(f"{cfg.name:16s} {med:14.0f} {min(cfg.rates):5.0f}-{max(cfg.rates):<5.0f} "
                  f"{ratio:>6s} {cpu:>15s} {host:16.2f} {cost:>10s}")
        # per-round ratios are steadier than ratios of medians on a noisy box
        if base and order and "milterd-unix" in configs and configs["milterd-unix"].rates:
            per_round = [m / n for m, n in zip(configs["milterd-unix"].rates,
                                               configs["none"].rates)]
            print("milterd-unix / none per round: "
                  + " ".join(f"{x:.2f}" for x in per_round)
                  + f"  (median {statistics.median(per_round):.2f}; target >= 0.85)")
        print("\nmilterd callback latency (from /metrics milterd_callback_duration_seconds, "
              "bucket-interpolated; all measured rounds):")
        for cfg in order:
            if cfg.metrics_port:
                for row in latency_rows(cfg):
                    print(row)

        if args.single_messages:
            print(f"\n# one session: smtp-source -s 1 -m {args.single_messages}, "
                  f"{args.single_rounds} rounds")
            singles = [configs[n] for n in ("none", "passthrough", "passthrough-inet",
                                             "milterd-unix", "milterd-inet")]
            res: dict[str, list[float]] = {c.name: [] for c in singles}
            for _ in range(args.single_rounds):
                for cfg in singles:
                    rate, _cpu = b.measured_run(cfg, 1, args.single_messages)
                    res[cfg.name].append(rate)
            for name, rates in res.items():
                med = statistics.median(rates)
                print(f"{name:20s} {med:8.1f} msg/s  {1000 / med:7.2f} ms/msg  "
                      f"ratio {med / statistics.median(res['none']):.2f}")

        if args.rss_sessions:
            rss_test(b, configs["milterd-unix"], args.rss_sessions)

        if args.profile_rounds:
            profile(b, configs, args)
        if args.stage_cpu:
            stage_cpu(b, configs, args)
    finally:
        b.stop()
    return 0


def postfix_version() -> str:
    r = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True)
    return r.stdout.strip()


def _read_reply(f) -> str:
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return b"".join(lines).decode(errors="replace")


def rss_test(b: Bench, cfg: Config, n: int) -> None:
    b.switch(cfg)
    pid = cfg.pid
    idle_rss = proc_status(pid, "VmRSS")
    socks = []
    ok = 0
    t0 = time.monotonic()
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", b.lab.port), timeout=60)
            f = s.makefile("rb")
            socks.append((s, f))
            if not _read_reply(f).startswith("220"):
                continue
            s.sendall(b"EHLO hold%d.fabrikam.test\r\n" % i)
            if not _read_reply(f).startswith("250"):
                continue
            s.sendall(b"MAIL FROM:<hold%d@fabrikam.test>\r\n" % i)
            if _read_reply(f).startswith("250"):
                ok += 1
        opened = time.monotonic() - t0
        threads = proc_status(pid, "Threads")
        held_rss = proc_status(pid, "VmRSS")
        smtpds = len(children_named(b.lab.master_pid(), "smtpd"))
        print(f"\n# {n} SMTP sessions held at MAIL FROM ({ok} got 250; {smtpds} smtpd processes; "
              f"opened in {opened:.1f}s)")
        print(f"milterd VmRSS idle {idle_rss}, with {n} sessions {held_rss}, "
              f"threads {threads}, VmHWM {proc_status(pid, 'VmHWM')}")
    finally:
        for s, f in socks:
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            f.close()
            s.close()
    deadline = time.monotonic() + 60
    while int(proc_status(pid, "Threads") or 0) > 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"after closing: VmRSS {proc_status(pid, 'VmRSS')}, threads "
          f"{proc_status(pid, 'Threads')}")


def profile(b: Bench, configs: dict, args: argparse.Namespace) -> None:
    out = b.root / "profile.txt"
    cfg = b.add_milterd(configs, "milterd-prof", "unix", variant=("--profile", str(out)))
    for _ in range(args.profile_rounds):
        rate, cpu = b.measured_run(cfg, args.sessions, args.messages)
        print(f"profiled milterd-unix: {rate:.0f} msg/s, {cpu:.2f} CPU s/1k (cProfile overhead)")
    b.switch(configs["none"])
    cfg.proc.stop(60)
    b.procs.remove(cfg.proc)
    print("\n# cProfile of milterd's callbacks (all libmilter threads merged)")
    print(out.read_text() if out.exists() else "no profile written")


def stage_cpu(b: Bench, configs: dict, args: argparse.Namespace) -> None:
    out = b.root / "stage-cpu.txt"
    cfg = b.add_milterd(configs, "milterd-stagecpu", "unix", variant=("--stage-cpu", str(out)))
    total_msgs = 0
    cpus = []
    for _ in range(args.stage_cpu):
        rate, cpu = b.measured_run(cfg, args.sessions, args.messages)
        total_msgs += args.messages
        cpus.append(cpu)
    b.switch(configs["none"])
    cfg.proc.stop(60)
    b.procs.remove(cfg.proc)
    total_msgs += 100  # the warm-up run after switching is counted by the process too
    print(f"\n# milterd CPU by entry point (thread CPU time, {total_msgs} messages incl. "
          f"warm-up; whole process {statistics.median(cpus) * 1000:.0f} us/msg)")
    rows = [line.rsplit(None, 2) for line in out.read_text().splitlines()] if out.exists() else []
    inside = 0.0
    for name, calls, total in sorted(rows, key=lambda r: r[0].strip()):
        per_msg = float(total) * 1e6 / total_msgs
        if not name.startswith(" "):
            inside += per_msg
        print(f"  {name:20s} calls/msg {int(calls) / total_msgs:5.2f}  {per_msg:7.1f} us/msg  "
              f"{float(total) * 1e6 / max(int(calls), 1):7.1f} us/call")
    print(f"  {'in Python callbacks':20s} {inside:24.1f} us/msg")


if __name__ == "__main__":
    sys.exit(main())
