"""The benchmark harness shared by bench/run, bench/calls, bench/register and
bench/failover-latency: a release lifeline-carrier on loopback, SIPp on both sides, figures
read from SIPp's statistics files, /proc and loopback captures.

Every case has a /24 of its own in 127.0.210.0/24-127.0.219.0/24 (NETS), so cases never meet
each other or another test on the machine. Inside a case's /24: .1 is the carrier, .2 the
upstream caller (or the registering client), .3 the PBX, .4 the PSTN gateway, .250 the
readiness probe. The API is off (api_listen = "") so nothing binds 127.0.0.1:8080.

Every loop that sends traffic is bounded twice: SIPp runs a fixed number of calls (-m) under a
global timeout (-timeout), and the process itself under a subprocess timeout; the readiness
probe sends at most a fixed number of OPTIONS.
"""
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BIN = os.path.join(ROOT, "target", "release", "lifeline-carrier")
HZ = os.sysconf("SC_CLK_TCK")

# One /24 per case (first three octets).
NETS = {
    "calls": "127.0.210",
    "cpu": "127.0.211",
    "register": "127.0.212",
    "failover-unregistered": "127.0.213",
    "failover-icmp": "127.0.214",
    "failover-silent": "127.0.215",
    "memory": "127.0.216",
}

DID = "+15550001111"
FAILOVER_NUMBER = "+15559990001"


# === Building ===

def build(quiet=False):
    """`cargo build --release --locked --bins`, as on a fresh clone."""
    cmd = ["cargo", "build", "--release", "--locked", "--bins"] + (["--quiet"] if quiet else [])
    subprocess.run(cmd, cwd=ROOT, check=True)
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} was not built")


# The Debian package of each tool the benchmarks run.
PACKAGES = {"sipp": "sip-tester", "tcpdump": "tcpdump"}


def need(*tools):
    """Exits unless every tool is on PATH; as root on Debian, installs the missing packages
    first (as scripts/test does for the tests), so a fresh machine needs one command."""
    missing = [t for t in tools if not shutil.which(t)]
    packages = [PACKAGES[t] for t in missing if t in PACKAGES]
    if packages and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(packages)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=False, env=env)
        missing = [t for t in tools if not shutil.which(t)]
    if missing:
        sys.exit("the benchmarks need " + ", ".join(missing)
                 + " (Debian packages: sipp is sip-tester, tcpdump is tcpdump; cargo from rustup)")


# === Processes ===

_procs = []


def spawn(cmd, cwd=None, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
    """Starts a process that `stop_all` ends: every benchmark process is one of these."""
    p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    _procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM, grace=10.0):
    """Ends one process we started, by its pid: the signal, then SIGKILL after `grace` s."""
    if p is None:
        return
    if p.poll() is None:
        try:
            p.send_signal(sig)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in _procs:
        _procs.remove(p)


def stop_all():
    for p in list(_procs):
        stop(p, grace=5.0)


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    except (OSError, IndexError):
        return 0


def machine_busy_ticks():
    """(busy, total) ticks of all CPUs from /proc/stat: user nice system idle iowait irq softirq
    steal (guest time is already in user and nice). Steal counts as busy: on a virtual machine
    it is the host's other load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def udp_drops():
    """The machine's UDP receive-buffer drops so far (/proc/net/snmp RcvbufErrors): a datagram
    dropped because a socket's buffer was full (the carrier's or SIPp's) shows up here."""
    with open("/proc/net/snmp") as f:
        rows = [l.split() for l in f if l.startswith("Udp:")]
    return int(dict(zip(rows[0][1:], rows[1][1:])).get("RcvbufErrors", 0))


def udp_socket_drops():
    """{(ip, port): drops} of every IPv4 UDP socket (/proc/net/udp, the last column)."""
    out = {}
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            v = line.split()
            ip_hex, port_hex = v[1].split(":")
            ip = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
            out[(ip, int(port_hex, 16))] = out.get((ip, int(port_hex, 16)), 0) + int(v[-1])
    return out


def status_kib(pid, key):
    """A value of /proc/<pid>/status in KiB (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuMeter:
    """CPU seconds of some processes, and of everything else on the machine, over an interval."""

    def __init__(self, sockets=None, **procs):
        """`sockets`: {name: (ip, port)} of UDP sockets whose drops to count (a socket that
        does not exist yet starts at 0; one that is gone keeps its last sampled count)."""
        self.procs = procs
        self.sockets = sockets or {}
        now = udp_socket_drops()
        self.drops0 = {k: now.get(a, 0) for k, a in self.sockets.items()}
        self.drops_last = dict(self.drops0)
        self.start = {k: cpu_ticks(p.pid) for k, p in procs.items() if p}
        self.machine = machine_busy_ticks()
        self.drops = udp_drops()
        self.t0 = time.monotonic()

    def sample(self):
        """Updates the last known value of each process (a process may exit before `done`)."""
        self.last = {k: cpu_ticks(p.pid) for k, p in self.procs.items() if p}
        self._sample_drops()

    def _sample_drops(self):
        now = udp_socket_drops()
        for k, a in self.sockets.items():
            if a in now:
                self.drops_last[k] = now[a]

    def done(self, last=None):
        wall = time.monotonic() - self.t0
        self._sample_drops()
        busy0, total0 = self.machine
        busy1, total1 = machine_busy_ticks()
        now = {k: cpu_ticks(p.pid) for k, p in self.procs.items() if p}
        if last:
            now = {k: max(now.get(k, 0), last.get(k, 0)) for k in now}
        secs = {k: max(0, now[k] - self.start[k]) / HZ for k in now}
        ours = sum(secs.values())
        # /proc/stat counts USER_HZ ticks over all CPUs, like /proc/<pid>/stat.
        other = max(0.0, (busy1 - busy0) / HZ - ours)
        return {"wall": wall, "cpu": secs, "other_cores": other / wall if wall else 0.0,
                "udp_drops": udp_drops() - self.drops,
                "socket_drops": {k: self.drops_last[k] - self.drops0[k] for k in self.sockets}}


# === The carrier ===

class Carrier:
    """A release lifeline-carrier with its own data folder and config in `work`."""

    def __init__(self, work, net, log_level="warn", **config):
        self.work = work
        self.net = net
        self.addr = (f"{net}.1", 5060)
        self.data = os.path.join(work, "data")
        self.config_path = os.path.join(work, "carrier.toml")
        self.log_path = os.path.join(work, "carrier.log")
        self.proc = None
        lines = ["[carrier]", 'name = "trunk1"', f'sip_listen = ["udp:{net}.1:5060"]',
                 'api_listen = ""', f'log_level = "{log_level}"']
        for k, v in config.items():
            lines.append(f"{k} = {toml_value(v)}")
        # Extra [carrier] lines for experiments, e.g. LIFELINE_BENCH_CARRIER='worker_threads = 1'.
        extra = os.environ.get("LIFELINE_BENCH_CARRIER", "")
        lines += [line.strip() for line in extra.split(";") if line.strip()]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def admin(self, *args):
        return subprocess.run([BIN, "admin", "--config", self.config_path, "--data-dir", self.data,
                               *args], check=True, capture_output=True, text=True,
                              timeout=120).stdout.strip()

    def start(self, ready_timeout=60.0):
        """Starts the carrier and waits until it answers an OPTIONS; returns the seconds from
        the start of the process to that answer."""
        self.log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.started_wall = time.time()
        # A profiler in front for experiments, e.g. LIFELINE_BENCH_WRAP='valgrind --tool=callgrind'
        # (the CPU figures then count the wrapper's process, not the carrier). `stop` signals the
        # wrapper: one that does not pass SIGTERM on (heaptrack's script) leaves the carrier
        # running, answering the next run on the same address; wrap it in a script that traps
        # SIGTERM and forwards it.
        wrap = os.environ.get("LIFELINE_BENCH_WRAP", "").split()
        self.proc = spawn(wrap + [BIN, "--config", self.config_path, "--data-dir", self.data],
                          cwd=self.work, stderr=self.log)
        return wait_options(self.addr, f"{self.net}.250", self.proc, t0, ready_timeout)

    def stop(self):
        stop(self.proc, signal.SIGTERM, grace=15.0)
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            print(f"warning: the carrier exited with {self.proc.returncode}; log: {self.log_path}",
                  file=sys.stderr)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def log_tail(self, n=8):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def wait_options(addr, probe_ip, proc, t0, timeout, every=0.01):
    """Sends OPTIONS to `addr` every `every` s (at most timeout/every of them) until one gets
    a 200; returns the seconds since `t0`. Fails if `proc` exits or `timeout` passes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((probe_ip, 0))
    s.settimeout(every)
    port = s.getsockname()[1]
    try:
        for i in range(int(timeout / every) + 1):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the carrier exited with {proc.returncode} while starting")
            if time.monotonic() - t0 > timeout:
                break
            branch = f"z9hG4bKready{i}x{port}"
            msg = (f"OPTIONS sip:{addr[0]}:{addr[1]} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {probe_ip}:{port};branch={branch}\r\n"
                   f"From: <sip:bench@{probe_ip}>;tag=ready{i}\r\n"
                   f"To: <sip:{addr[0]}:{addr[1]}>\r\n"
                   f"Call-ID: ready-{port}-{i}@{probe_ip}\r\nCSeq: 1 OPTIONS\r\n"
                   f"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
            s.sendto(msg.encode(), addr)
            deadline = time.monotonic() + every
            while time.monotonic() < deadline:
                try:
                    data, _ = s.recvfrom(65535)
                except socket.timeout:
                    break
                except ConnectionRefusedError:  # not listening yet: wait out the interval
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    break
                if data.startswith(b"SIP/2.0 200") and branch.encode() in data:
                    return time.monotonic() - t0
        raise RuntimeError(f"the carrier at {addr[0]}:{addr[1]} did not answer OPTIONS "
                           f"within {timeout:.0f} s")
    finally:
        s.close()


def workdir(name):
    d = tempfile.mkdtemp(prefix=f"lifeline-bench-{name}-")
    os.chmod(d, 0o755)
    return d


def cleanup_workdir(d):
    if not os.environ.get("KEEP"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"kept {d}", file=sys.stderr)


# === SIPp ===

# SIPp's socket buffers: 4 MiB (Linux caps them at net.core.rmem_max/wmem_max), so that a
# SIPp descheduled for a few milliseconds on a busy machine does not drop datagrams.
SIPP_BUFFER = 4 * 1024 * 1024


def sipp_cmd(*args):
    return ["sipp", *args, "-nostdin", "-buff_size", str(SIPP_BUFFER)]


def read_stats(path):
    """The last line of a SIPp statistics file as {column: text}, with "elapsed" (seconds from
    StartTime to CurrentTime of that line, to the microsecond) and "series": (elapsed, line)
    for every line (SIPp writes one a second with -fd 1, and one at the end)."""
    with open(path) as f:
        lines = [l.rstrip("\n") for l in f if l.strip()]
    if len(lines) < 2:
        raise RuntimeError(f"{path}: no statistics written")
    header = lines[0].split(";")
    epoch = lambda v: float(v.split("\t")[-1])
    series = []
    for line in lines[1:]:
        r = dict(zip(header, line.split(";")))
        series.append((epoch(r["CurrentTime"]) - epoch(r["StartTime"]), r))
    row = dict(series[-1][1])
    row["elapsed"] = series[-1][0]
    row["series"] = series
    return row


def time_to_reach(row, column, count):
    """When the cumulative `column` reached `count`, interpolated between SIPp's statistics
    lines (seconds from SIPp's start), or None."""
    prev_t, prev_n = 0.0, 0
    for t, r in row["series"]:
        n = int(r.get(column, "0") or 0)
        if n >= count:
            if n == prev_n:
                return t
            return prev_t + (t - prev_t) * (count - prev_n) / (n - prev_n)
        prev_t, prev_n = t, n
    return None


def duration_ms(text):
    """SIPp's HH:MM:SS:USUSUS as milliseconds."""
    try:
        h, m, sec, us = (int(x) for x in text.split(":"))
    except (AttributeError, ValueError):
        return None
    return ((h * 60 + m) * 60 + sec) * 1000 + us / 1000


def stat(row, name):
    return int(row.get(name, "0") or 0)


def register_pbx(work, carrier, users_csv, ip, port, timeout=30):
    """One REGISTER with digest from ip:port (SIPp, bench/register.xml)."""
    log = os.path.join(work, f"register-{ip}-{port}.log")
    with open(log, "wb") as out:
        r = subprocess.run(sipp_cmd(f"{carrier.addr[0]}:{carrier.addr[1]}", "-sf",
                                    os.path.join(BENCH, "register.xml"), "-inf", users_csv,
                                    "-i", ip, "-p", str(port), "-m", "1", "-timeout", "10s"),
                           cwd=work, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-600:]
        raise RuntimeError(f"the PBX could not register ({ip}:{port}):\n{tail}\n"
                           f"carrier log:\n{carrier.log_tail()}")


def write_users(path, users):
    """SIPp's injection file: username; [authentication] keyword (SIPp 3.6 does not expand
    fields inside it)."""
    with open(path, "w") as f:
        f.write("SEQUENTIAL\n")
        for user, pw in users:
            f.write(f"{user};[authentication username={user} password={pw}]\n")


# === Case 1 and 2: calls through the proxy ===

def calls_setup(net):
    """A work folder and a provisioned carrier (not started): one trunk group `pbx`, one DID."""
    work = workdir("calls")
    carrier = Carrier(work, net, upstream=[f"{net}.2"],
                      # The PBX is SIPp running a call scenario: an OPTIONS probe would count
                      # as a failed call.
                      probe_interval_ms=0)
    carrier.admin("account", "add", "bench")
    carrier.admin("trunk-group", "add", "--account", "1", "--name", "pbx", "--username", "pbx",
                  "--password", "pw")
    carrier.admin("did", "add", DID, "--trunk-group", "1")
    write_users(os.path.join(work, "users.csv"), [("pbx", "pw")])
    return work, carrier


def calls_step(work, carrier, rate, seconds):
    """One step: a fresh carrier process, the PBX registers, then `rate` calls/s for `seconds`
    (rate * seconds calls). Returns the step's figures."""
    net = carrier.net
    total = int(rate * seconds)
    tag = f"{rate}-{time.monotonic_ns()}"
    carrier.start()
    uas = uac = None
    try:
        register_pbx(work, carrier, "users.csv", f"{net}.3", 5080)
        uas_stats = os.path.join(work, f"uas-{tag}.csv")
        uac_stats = os.path.join(work, f"uac-{tag}.csv")
        limit = seconds * 3 + 10
        uas = spawn(sipp_cmd("-sf", os.path.join(BENCH, "calls-uas.xml"), "-i", f"{net}.3",
                             "-p", "5080", "-m", str(total), "-timeout", f"{limit + 10}s",
                             "-trace_stat", "-stf", uas_stats, "-fd", "1", "-trace_err",
                             "-error_file", f"uas-{tag}.errors"), cwd=work)
        time.sleep(0.3)
        uac = spawn(sipp_cmd(f"{carrier.addr[0]}:{carrier.addr[1]}", "-sf",
                             os.path.join(BENCH, "calls-uac.xml"), "-i", f"{net}.2", "-p", "5070",
                             "-r", str(rate), "-m", str(total), "-l", str(max(rate * 2, 100)),
                             "-timeout", f"{limit}s", "-trace_stat", "-stf", uac_stats,
                             "-fd", "1", "-trace_err", "-error_file", f"uac-{tag}.errors"),
                    cwd=work)
        meter = CpuMeter(carrier=carrier.proc, uac=uac, uas=uas,
                         sockets={"carrier": carrier.addr, "uac": (f"{net}.2", 5070),
                                  "uas": (f"{net}.3", 5080)})
        used = meter_until_done(meter, uac, carrier, limit + 15)
        # The PBX side has answered everything it will; give it a moment to write its stats.
        time.sleep(1.2)
        stop(uas, signal.SIGTERM, grace=5)
        a = read_stats(uac_stats)
        b = read_stats(uas_stats) if os.path.exists(uas_stats) else {}
    finally:
        stop(uac)
        stop(uas)
        carrier.stop()
    return step_result(rate, seconds, total, used, a, b)


def meter_until_done(meter, uac, carrier, limit):
    """Samples `meter` until the client SIPp ends (killed after `limit` s); returns what the
    processes used, with the carrier's resident size at the end."""
    last = None
    deadline = time.monotonic() + limit
    while uac.poll() is None and time.monotonic() < deadline:
        meter.sample()
        last = meter.last
        time.sleep(0.2)
    if uac.poll() is None:
        stop(uac, signal.SIGKILL)
    used = meter.done(last)
    used["rss_kib"] = status_kib(carrier.proc.pid, "VmRSS")
    return used


# === Case 3: registrations ===

def register_setup(net, groups):
    """A carrier (not started) with `groups` trunk groups generated straight into its store,
    and SIPp's users.csv for them."""
    import genstore
    work = workdir("register")
    carrier = Carrier(work, net, probe_interval_ms=0)
    carrier.admin("account", "add", "bench")
    genstore.generate(carrier.data, 1, groups, 0, 0, failover_mix=False)
    write_users(os.path.join(work, "users.csv"),
                [(genstore.username(j), genstore.password(j)) for j in range(1, groups + 1)])
    return work, carrier


def register_step(work, carrier, rate, seconds):
    net = carrier.net
    total = int(rate * seconds)
    tag = f"{rate}-{time.monotonic_ns()}"
    carrier.start()
    uac = None
    try:
        stats = os.path.join(work, f"reg-{tag}.csv")
        limit = seconds * 3 + 10
        uac = spawn(sipp_cmd(f"{carrier.addr[0]}:{carrier.addr[1]}", "-sf",
                             os.path.join(BENCH, "register.xml"), "-inf", "users.csv",
                             "-i", f"{net}.2", "-p", "5070", "-r", str(rate), "-m", str(total),
                             "-l", str(max(rate * 2, 100)), "-timeout", f"{limit}s",
                             "-trace_stat", "-stf", stats, "-fd", "1"), cwd=work)
        meter = CpuMeter(carrier=carrier.proc, sipp=uac,
                         sockets={"carrier": carrier.addr, "sipp": (f"{net}.2", 5070)})
        used = meter_until_done(meter, uac, carrier, limit + 15)
        a = read_stats(stats)
    finally:
        stop(uac)
        carrier.stop()
    return step_result(rate, seconds, total, used, a)


def step_result(rate, seconds, total, used, uac, uas=None):
    """A step's figures and verdict from the client's (and the PBX's) SIPp statistics. The
    pass rule: fewer than 0.1 % of the calls failed or unfinished, no retransmission on
    either side, and at least 95 % of the offered rate carried (SIPp itself keeping up)."""
    ok, failed = stat(uac, "SuccessfulCall(C)"), stat(uac, "FailedCall(C)")
    unfinished = max(0, total - ok - failed)
    retrans_uac, retrans_uas = stat(uac, "Retransmissions(C)"), stat(uas or {}, "Retransmissions(C)")
    retrans = retrans_uac + retrans_uas
    rtd = next((k[len("ResponseTime"):-3] for k in uac
                if k.startswith("ResponseTime") and k.endswith("(C)") and "StDev" not in k), None)
    # The rate carried: successful calls over the time until the last of them was done (not
    # until SIPp gave up on a straggler that failed).
    elapsed = time_to_reach(uac, "SuccessfulCall(C)", ok) if ok else None
    achieved = ok / elapsed if elapsed else 0.0
    fail_pct = 100.0 * (failed + unfinished) / total
    # SIPp's reasons for the failed calls, e.g. FailedUnexpectedMessage, FailedMaxUDPRetrans.
    causes = {k[len("Failed"):-3]: v for k, v in
              ((k, stat(uac, k)) for k in uac if k.startswith("Failed") and k.endswith("(C)")
               and k != "FailedCall(C)") if v}
    reasons = []
    if fail_pct >= 0.1:
        reasons.append(f"{fail_pct:.2f}% failed"
                       + (f" ({', '.join(f'{k} {v}' for k, v in causes.items())})" if causes else ""))
    if retrans:
        reasons.append(f"{retrans} retransmissions")
    if achieved < 0.95 * rate:
        reasons.append(f"only {achieved:.0f}/s carried")
    return {
        "rate": rate, "seconds": seconds, "total": total, "ok": ok, "failed": failed,
        "unfinished": unfinished, "fail_pct": fail_pct, "retrans": retrans,
        "retrans_uac": retrans_uac, "retrans_uas": retrans_uas, "fail_causes": causes,
        # SIPp's response time (ms resolution): INVITE -> 200, or first REGISTER -> 200.
        "rtd_ms": duration_ms(uac.get(f"ResponseTime{rtd}(C)")) if rtd else None,
        "rtd_sd_ms": duration_ms(uac.get(f"ResponseTime{rtd}StDev(C)")) if rtd else None,
        "elapsed": elapsed, "sipp_s": uac["elapsed"], "achieved": achieved, "passed": not reasons,
        "passed_but_retrans": fail_pct < 0.1 and achieved >= 0.95 * rate,
        "why": ", ".join(reasons) or "pass",
        "carrier_us_per_call": used["cpu"].get("carrier", 0) * 1e6 / ok if ok else None,
        "cpu_cores": {k: v / used["wall"] for k, v in used["cpu"].items()},
        "other_cores": used["other_cores"], "udp_drops": used["udp_drops"],
        "socket_drops": used["socket_drops"],
        # The carrier's resident size when the client finished (its call and transaction
        # state is kept for a while after each call).
        "rss_mib": used["rss_kib"] / 1024 if used.get("rss_kib") else None,
    }


def fmt_drops(r):
    """The step's UDP receive drops: carrier/client(/PBX) sockets, and the machine's total."""
    d = r["socket_drops"]
    return "/".join(str(v) for v in d.values()) + f" (machine {r['udp_drops']})"


def stepped(step, steps, log=print, lenient=False):
    """Runs `step(rate)` for each rate in order, stopping at the first that fails. Returns
    (highest rate that passed before the first failure, or 0; the highest rate that passed
    but for retransmissions; every step's result). With `lenient`, stepping goes on past steps
    that failed only on retransmissions (the first figure stays the strict one)."""
    results = []
    best = best_lenient = 0
    strict = True
    for rate in steps:
        r = step(rate)
        results.append(r)
        log(f"    {rate:>6}/s: {r['ok']} ok, {r['failed']} failed, {r['unfinished']} unfinished, "
            f"{r['retrans']} retrans, carried {r['achieved']:.0f}/s, carrier "
            f"{r['cpu_cores'].get('carrier', 0) * 100:.0f}% CPU, "
            f"other load {r['other_cores']:.2f} cores, UDP drops {fmt_drops(r)} -> {r['why']}")
        if r["passed"] and strict:
            best = rate
        strict = strict and r["passed"]
        if not r["passed_but_retrans"]:
            break
        best_lenient = rate
        if not (r["passed"] or lenient):
            break
    return best, best_lenient, results


# === Case 4: failover latency ===

def pcap_packets(path):
    """(timestamp, src, dst, kind, key) for the SIP INVITEs and the ICMP errors in a pcap file.
    kind is "invite" (key: (Call-ID, top Via branch)) or "icmp" (key: the top Via branch of
    the datagram it quotes, or None)."""
    out = []
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return out
        magic, = struct.unpack("<I", header[:4])
        nano = magic == 0xa1b23c4d
        linktype, = struct.unpack("<I", header[20:24])
        off = {1: 14, 113: 16, 276: 20, 0: 4}.get(linktype, 0)
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                break
            sec, frac, incl, _ = struct.unpack("<IIII", rec)
            pkt = f.read(incl)
            ts = sec + frac / (1e9 if nano else 1e6)
            ip = pkt[off:]
            if len(ip) < 28 or ip[0] >> 4 != 4:
                continue
            ihl = (ip[0] & 15) * 4
            src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
            if ip[9] == 17:
                payload = ip[ihl + 8:]
                if payload.startswith(b"INVITE "):
                    out.append((ts, src, dst, "invite", (sip_header(payload, (b"call-id", b"i")),
                                                          top_branch(payload))))
            elif ip[9] == 1 and len(ip) > ihl + 8 and ip[ihl] == 3:  # destination unreachable
                inner = ip[ihl + 8:]
                if len(inner) >= 28 and inner[9] == 17:
                    payload = inner[(inner[0] & 15) * 4 + 8:]
                    out.append((ts, src, dst, "icmp", top_branch(payload)))
    return out


def sip_header(payload, names):
    for line in payload.split(b"\r\n")[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() in names:
            return value.strip().decode(errors="replace")
    return None


def top_branch(payload):
    via = sip_header(payload, (b"via", b"v"))
    m = re.search(r";\s*branch=([^;,\s]+)", via or "")
    return m.group(1) if m else None


def start_capture(work, name, net):
    """tcpdump on lo for the case's /24 (UDP and ICMP); returns (process, pcap path) once it
    is capturing."""
    pcap = os.path.join(work, f"{name}.pcap")
    err = os.path.join(work, f"{name}.tcpdump.log")
    errf = open(err, "wb")
    p = spawn(["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-B", "8192", "-Z", "root", "-w", pcap,
               f"(udp or icmp) and net {net}.0/24"], cwd=work, stderr=errf)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(err, errors="replace") as f:
            if "listening on" in f.read():
                break
        if p.poll() is not None:
            raise RuntimeError(f"tcpdump exited: {open(err).read()}")
        time.sleep(0.05)
    else:
        raise RuntimeError("tcpdump did not start capturing within 10 s")
    time.sleep(0.2)
    return p, pcap


def failover_case(kind, net, calls, rate=5):
    """One failover case ("unregistered", "icmp" or "silent") with its own carrier: `calls`
    calls to a DID with a failover number; the PBX is not registered, registered but its
    port closed, or registered and silent. Returns per-call latencies in ms."""
    work = workdir(f"failover-{kind}")
    carrier = Carrier(work, net, upstream=[f"{net}.2"], pstn_gateway=f"sip:{net}.4:5060",
                      # Probing off: the closed and silent PBXs are tried (with probing they
                      # would soon be skipped like an unregistered one).
                      probe_interval_ms=0)
    caller, pbx, gw = f"{net}.2", f"{net}.3", f"{net}.4"
    dump = gws = silent = None
    try:
        carrier.admin("account", "add", "bench")
        carrier.admin("trunk-group", "add", "--account", "1", "--name", "pbx", "--username",
                      "pbx", "--password", "pw")
        carrier.admin("did", "add", DID, "--trunk-group", "1")
        carrier.admin("did", "failover", DID, "--number", FAILOVER_NUMBER)
        write_users(os.path.join(work, "users.csv"), [("pbx", "pw")])
        carrier.start()
        if kind in ("icmp", "silent"):
            # The PBX registers from the address calls then go to, and goes away: port closed.
            register_pbx(work, carrier, "users.csv", pbx, 5071)
        if kind == "silent":
            silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            silent.bind((pbx, 5071))
        dump, pcap = start_capture(work, kind, net)
        gws = spawn(sipp_cmd("-sf", os.path.join(BENCH, "calls-uas.xml"), "-i", gw, "-p", "5060",
                             "-m", str(calls), "-timeout", "120s"), cwd=work)
        time.sleep(0.3)
        subprocess.run(sipp_cmd(f"{carrier.addr[0]}:{carrier.addr[1]}", "-sf",
                                os.path.join(BENCH, "calls-uac.xml"), "-i", caller, "-p", "5070",
                                "-r", str(rate), "-m", str(calls), "-timeout", "60s"),
                       cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=90)
        time.sleep(0.3)
        stop(gws)
        stop(dump, signal.SIGINT)
        packets = pcap_packets(pcap)
    finally:
        stop(gws)
        stop(dump, signal.SIGINT)
        if silent:
            silent.close()
        carrier.stop()
        cleanup_workdir(work)
    arrived, to_pbx, to_gw, icmp = {}, {}, {}, {}
    branch_call = {}
    for ts, src, dst, what, key in packets:
        if what == "invite":
            call_id, branch = key
            if src == caller and dst == carrier.addr[0]:
                arrived.setdefault(call_id, ts)
            elif src == carrier.addr[0] and dst == pbx:
                to_pbx.setdefault(call_id, ts)
                branch_call[branch] = call_id
            elif src == carrier.addr[0] and dst == gw:
                to_gw.setdefault(call_id, ts)
        elif what == "icmp" and key in branch_call:
            icmp.setdefault(branch_call[key], ts)
    ms = lambda a, b: (b - a) * 1000
    total = [ms(arrived[c], to_gw[c]) for c in arrived if c in to_gw]
    result = {"calls": calls, "failed_over": len(total), "total_ms": total}
    if kind == "icmp":
        result["invite_to_icmp_ms"] = [ms(to_pbx[c], icmp[c]) for c in to_pbx if c in icmp]
        result["icmp_to_failover_ms"] = [ms(icmp[c], to_gw[c]) for c in icmp if c in to_gw]
    if kind == "silent":
        result["pbx_to_failover_ms"] = [ms(to_pbx[c], to_gw[c]) for c in to_pbx if c in to_gw]
    return result


def quantile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else None


def median(values):
    return statistics.median(values) if values else None


# === Case 5: memory and start-up with a large store ===

def memory_prepare(net, groups, dids, bindings, accounts):
    """A data folder with the carrier's own (empty) store and bindings file, then filled by
    genstore; returns (work, carrier, generator's counts). Kept as a template: each run copies
    the folder (`memory_run`)."""
    import genstore
    work = workdir("memory-template")
    carrier = Carrier(work, net, log_level="info")
    carrier.admin("account", "add", "bench")
    # The carrier creates bindings.sqlite3 (and calls.sqlite3) with its migrations at start.
    carrier.start()
    carrier.stop()
    done = genstore.generate(carrier.data, accounts, groups, dids, bindings,
                             local=f"{net}.1:5060", pbx_net=net)
    return work, carrier, done


PROBE_INTERVAL_S = 30  # the carrier's default probe_interval_ms, used by the memory case


def memory_run(template, net, settle=3.0, probe_round=False):
    """Starts the carrier on a copy of the template's data folder: seconds to the `listening`
    log line and to the first OPTIONS answer, VmRSS/VmHWM then and after `settle` s (and the
    carrier's CPU over those idle seconds), and the same after one configuration change (a DID
    added with the admin command: the carrier reloads the whole configuration).

    With `probe_round`, then also the first round of OPTIONS probes (default probing, every
    binding probed one interval after start; the generated contacts are closed ports, so each
    probe is answered by ICMP port unreachable): the carrier's CPU seconds and peak memory over
    the 30 s from just before the round is due."""
    work = workdir("memory")
    shutil.copytree(os.path.join(template, "data"), os.path.join(work, "data"))
    carrier = Carrier(work, net, log_level="info")
    out = {}
    try:
        out["ready_s"] = carrier.start(ready_timeout=120)
        ready_at = time.monotonic()
        pid = carrier.proc.pid
        out["rss_ready_kib"] = status_kib(pid, "VmRSS")
        idle0 = cpu_ticks(pid)
        time.sleep(settle)
        out["idle_cpu"] = (cpu_ticks(pid) - idle0) / HZ / settle
        out["rss_kib"] = status_kib(pid, "VmRSS")
        out["hwm_kib"] = status_kib(pid, "VmHWM")
        with open(carrier.log_path, errors="replace") as f:
            log = f.read()
        phases = log_times(carrier.log_path, carrier.started_wall,
                           ["customer configuration loaded", "bindings loaded", "listening",
                            "carrier started"])
        out["config_loaded_s"] = phases.get("customer configuration loaded")
        out["bindings_loaded_s"] = phases.get("bindings loaded")
        out["listening_s"] = phases.get("listening")
        m = re.search(r"bindings loaded.*?bindings=(\d+)", log)
        out["bindings_loaded"] = int(m.group(1)) if m else None
        m = re.search(r"customer configuration loaded.*?trunk_groups=(\d+).*?dids=(\d+)", log)
        out["config_loaded"] = (int(m.group(1)), int(m.group(2))) if m else None
        # One change: the carrier polls config_version (config_poll_ms) and reloads it all.
        before = log.count("customer configuration reloaded")
        t1, t1_wall = time.monotonic(), time.time()
        carrier.admin("did", "add", "+19990000001", "--trunk-group", "1")
        out["admin_s"] = time.monotonic() - t1
        added_wall = time.time()
        out["reload_s"] = None
        for _ in range(600):  # at most 60 s
            with open(carrier.log_path, errors="replace") as f:
                if f.read().count("customer configuration reloaded") > before:
                    break
            time.sleep(0.1)
        else:
            added_wall = None
        if added_wall:
            # From the end of the admin command to the reload's log line (its own stamp).
            stamps = log_times(carrier.log_path, added_wall, ["customer configuration reloaded"],
                               not_before=t1_wall)
            out["reload_s"] = stamps.get("customer configuration reloaded")
        time.sleep(1.0)
        out["rss_after_reload_kib"] = status_kib(pid, "VmRSS")
        out["hwm_after_reload_kib"] = status_kib(pid, "VmHWM")
        if probe_round:
            # The round is due PROBE_INTERVAL_S after the carrier's first tick (~ its start).
            due = ready_at + PROBE_INTERVAL_S
            time.sleep(max(0.0, due - 5 - time.monotonic()))
            t0, c0 = time.monotonic(), cpu_ticks(pid)
            busy, prev, last_pct = 0, c0, None
            for _ in range(30):  # 30 s, sampled each second
                time.sleep(1.0)
                cur = cpu_ticks(pid)
                last_pct = (cur - prev) / HZ
                busy += last_pct >= 0.5
                prev = cur
            out["probe_cpu_s"] = (prev - c0) / HZ
            out["probe_busy_s"] = busy
            out["probe_last_cpu"] = last_pct
            out["probe_window_s"] = time.monotonic() - t0
            out["rss_after_probes_kib"] = status_kib(pid, "VmRSS")
            out["hwm_after_probes_kib"] = status_kib(pid, "VmHWM")
    finally:
        carrier.stop()
        cleanup_workdir(work)
    return out


def log_times(path, started_wall, needles, not_before=None):
    """Seconds from `started_wall` (time.time() when the process was started) to the first log
    line holding each needle, from the lines' own UTC stamps (tracing's RFC 3339 format);
    lines stamped before `not_before` (a time.time()) are skipped."""
    import datetime
    found = {}
    with open(path, errors="replace") as f:
        for line in f:
            for n in needles:
                if n not in found and n in line:
                    stamp = line.split(" ", 1)[0].rstrip("Z")
                    try:
                        t = datetime.datetime.fromisoformat(stamp).replace(
                            tzinfo=datetime.timezone.utc).timestamp()
                    except ValueError:
                        continue
                    if not_before is None or t >= not_before:
                        found[n] = t - started_wall
    return found
