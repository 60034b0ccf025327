#!/usr/bin/env python3
"""Soak: ≥ 50,000 messages through Postfix → milterd (all built-ins, unix socket) → smtp-sink.

Reports milterd's RSS after a warm-up and after every chunk, the growth over the run and bytes of
growth per message, so a leak (pymilter has an open report of one at high volume) shows as a
steady climb rather than noise.  Bounded: every chunk has a timeout; everything started is stopped.

    .venv/bin/python bench/soak.py [--messages 50000] [--chunk 5000] [--sessions 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from milterd.lab.net import free_port, wait_for_port
from milterd.lab.postfix import PostfixLab
from milterd.lab.proc import MilterdProcess


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_chunk(port: int, messages: int, sessions: int, timeout: float) -> float:
    start = time.monotonic()
    subprocess.run(["/usr/sbin/smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "1024",
                    "-f", "bench@fabrikam.test", "-t", "user@sink.test", f"127.0.0.1:{port}"],
                   check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=50000)
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="milterd-soak-"))
    os.chmod(base, 0o755)
    sink_port, metrics_port = free_port(), free_port()
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "nobody", "-c",
                             f"127.0.0.1:{sink_port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = base / "milter.sock"
    cfg = base / "milterd.toml"
    cfg.write_text(f"""
[milter]
listen = "unix:{sock}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[domain_security]
receive_domains = ["woodgrovebank.test"]
send_domains = ["woodgrovebank.test"]
""")
    milterd = MilterdProcess(cfg, f"unix:{sock}", log_path=base / "milterd.log",
                             extra_args=("--log-format", "json"))
    pf = PostfixLab(milter_socket=f"unix:{sock}", base=base / "postfix", extra={
        "transport_maps": f"inline:{{sink.test=smtp:[127.0.0.1]:{sink_port}}}",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject",
        "default_destination_concurrency_limit": "50",
        "smtp_connection_cache_on_demand": "yes",
    })
    try:
        if not wait_for_port("127.0.0.1", sink_port):
            raise RuntimeError("smtp-sink did not start")
        milterd.start()
        pf.start()
        pid = milterd.pid
        t = run_chunk(pf.port, args.warmup, args.sessions, timeout=600)
        warm = rss_kib(pid)
        cpu0 = cpu_seconds(pid)
        print(f"warm-up: {args.warmup} messages in {t:.1f}s; milterd RSS {warm / 1024:.1f} MiB")
        sent = 0
        total_time = 0.0
        while sent < args.messages:
            n = min(args.chunk, args.messages - sent)
            t = run_chunk(pf.port, n, args.sessions, timeout=900)
            sent += n
            total_time += t
            print(f"  {sent:>6} msgs  {n / t:6.0f} msg/s  RSS {rss_kib(pid) / 1024:7.1f} MiB",
                  flush=True)
        end = rss_kib(pid)
        cpu = cpu_seconds(pid) - cpu0
        growth = (end - warm) * 1024
        print(f"soak: {sent} messages after warm-up in {total_time:.0f}s "
              f"({sent / total_time:.0f} msg/s), milterd CPU {cpu:.1f}s "
              f"({cpu / sent * 1000:.2f}s per 1000)")
        print(f"RSS after warm-up {warm / 1024:.1f} MiB, at end {end / 1024:.1f} MiB: growth "
              f"{growth / 1048576:.2f} MiB = {growth / sent:.1f} bytes/message "
              f"(target ≤ 10 MiB over the run)")
        return 0 if growth <= 10 * 1048576 else 1
    finally:
        pf.stop()
        milterd.stop()
        sink.send_signal(signal.SIGTERM)
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
