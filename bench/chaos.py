"""Chaos: SIGINT, SIGTERM and SIGKILL to callers, flow workers and clusters at random points.

Each run is a caller process (``python -m bench.chaoscaller``) invoking a celery graph of two
or three branches that sleep 1-4 s between a ``.start`` and a ``.done`` marker. At a random
point a random signal goes to a random target: the caller, a flow worker's main process (then
restarted), one of its pool processes, a ``tea-dist cluster`` started for that run (the caller
uses its Redis), or nothing. A ``worker-dispatch`` run is a fan-out of six to ten short
branches whose flow worker main process is SIGKILLed 0.02-0.15 s after the caller starts
invoking, while the worker takes its messages: a message taken and not started yet must be
sent again, every branch must succeed. Everything else runs on an embedded Redis on a port of
its own and two flow workers the script starts; nothing touches another Redis or leaves
loopback.

It counts:

- runs that hung: a caller that had neither finished nor exited ``--hang-after`` s after it
  started;
- runs that lost branches: a ``worker-dispatch`` run that did not end with every branch
  successful;
- processes left running: anything this session started (every process seen in the trees of
  its callers, workers and clusters, and any process carrying its tag) still running once it
  should be gone: a caller's tree after it exits, a signalled worker's or cluster's tree
  ``GONE_WITHIN`` s after it exits, everything after the session stops;
- side effects after a cancel: a ``.done`` marker written after a SIGINT or SIGTERM reached a
  caller whose run was still going (plus ``--slack``), or after a SIGKILL (plus the caller
  lease and ``--slack``);
- keys left without a TTL under the session's key prefix (circuit hashes persist by design);

and, with them, the temporary folders and advertisements clusters left behind.

    python bench/chaos.py [--runs 50] [--seed S] [--quick] [--lease 3] [--hang-after 60]

``--quick`` is 20 runs, half of them worker-dispatch (about three minutes on two cores), the
smoke run of CI.

Exit status 1 when any count is not 0; 130 on Ctrl-C, after stopping everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaosprocs import TAG_ENV, Tracker, alive, describe, kill, wait_gone  # noqa: E402
from bench.common import command_line, progress, table  # noqa: E402

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
TARGETS = ("caller", "worker", "worker-child", "cluster", "none", "worker-dispatch")
WEIGHTS = (4, 2, 1, 2, 1, 3)
WORKER_TARGETS = ("worker", "worker-dispatch")  # a flow worker's main process is signalled
WORKER_SLOTS = ("flows1", "flows2")
GONE_WITHIN = 15.0  # s after a process exits (or is signalled) for its tree to be gone
WORKER_STOP = 30.0  # s a signalled worker gets to exit (a warm shutdown finishes its tasks)
POLL = 0.1


@dataclass(frozen=True)
class Plan:
    index: int
    target: str
    signum: int | None
    delay: float  # seconds after the caller started (worker-dispatch: started invoking)
    sleeps: dict[str, float]
    flower: bool  # a cluster run: with Flower
    pick: float  # which worker or pool process

    @property
    def case(self) -> tuple[str, str]:
        name = signal.Signals(self.signum).name if self.signum else "-"
        return name, self.target


def make_plans(runs: int, seed: int, dispatch_share: float | None = None) -> list[Plan]:
    """``dispatch_share``: the share of worker-dispatch runs (else as ``WEIGHTS`` say)."""
    rng = random.Random(seed)
    plans = []
    for index in range(runs):
        if dispatch_share is None:
            target = rng.choices(TARGETS, WEIGHTS)[0]
        elif rng.random() < dispatch_share:
            target = "worker-dispatch"
        else:  # the others, by their weights (worker-dispatch is the last target)
            target = rng.choices(TARGETS[:-1], WEIGHTS[:-1])[0]
        signum = None if target == "none" else rng.choice(SIGNALS)
        sleeps = {f"b{i}": round(rng.uniform(1.0, 4.0), 2) for i in range(rng.randint(2, 3))}
        delay = round(rng.uniform(0.2, 2.5 + max(sleeps.values())), 2)
        if target == "worker-dispatch":  # the worker dies while it takes the run's messages
            signum = signal.SIGKILL
            sleeps = {f"b{i}": round(rng.uniform(0.03, 0.2), 2) for i in range(rng.randint(6, 10))}
            delay = round(rng.uniform(0.02, 0.15), 3)
        plans.append(
            Plan(
                index=index,
                target=target,
                signum=int(signum) if signum else None,
                delay=delay,
                sleeps=sleeps,
                flower=target == "cluster" and rng.random() < 0.3,
                pick=rng.random(),
            )
        )
    return plans


@dataclass
class Outcome:
    plan: Plan
    run_id: str
    markers: Path
    started: float = 0.0  # epoch
    ended: float = 0.0  # epoch: the caller exited
    signalled_at: float | None = None  # epoch
    phase: str = ""  # where the run was when the signal was sent
    cancel: bool = False  # a cancelling signal reached a caller whose run was going
    exit_code: int | None = None
    exit_after: float | None = None  # seconds from the signal (or the start) to the exit
    hung: bool = False
    lost: bool = False  # a worker-dispatch run that did not end with every branch successful
    result: str = ""
    left: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    after_end: list[str] = field(default_factory=list)  # a branch ran after its run ended
    in_window: list[float] = field(default_factory=list)  # s after the signal: .done markers
    # written after a cancelling signal but within the window it may take to arrive
    keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def bad(self) -> bool:
        return bool(
            self.hung
            or self.lost
            or self.left
            or self.folders
            or self.late
            or self.after_end
            or self.keys
        )


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    label: str
    broker: str = ""
    folder: Path | None = None
    runtime: Path | None = None
    tmp: Path | None = None


class Session:
    """The embedded Redis, two flow workers, and every run's processes, started by PID."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"chaos-{self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="tea-chaos-"))
        self.tmp = self.dir / "tmp"
        for sub in ("tmp", "logs", "runs", "runtime"):
            (self.dir / sub).mkdir()
        for name in [k for k in os.environ if k.startswith("TEA_DIST_")]:
            del os.environ[name]  # nothing here may reach another broker
        os.environ.update({TAG_ENV: self.tag, "TMPDIR": str(self.tmp)})
        os.environ["TEA_DIST_RUNTIME_DIR"] = str(self.dir / "runtime")
        tempfile.tempdir = str(self.tmp)
        self.tracker = Tracker(self.tag)
        self.started: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        self.generation = 0
        self.last_kill = 0.0  # monotonic: the last signal to a worker
        self.redis: Any = None
        self.client: Any = None
        self.key_owner: dict[str, str] = {}
        self.keys_checked = 0

    # -- the fixed parts ----------------------------------------------------------------------

    @property
    def settings(self) -> Any:
        from tea_dist.distributed.settings import Settings

        return Settings(
            broker_url=self.redis.url,
            key_prefix=self.prefix,
            allowed=("bench",),
            caller_lease=self.args.lease,
            visibility_timeout=self.args.visibility,
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEA_DIST_")}
        env.update(
            PYTHONPATH=str(ROOT),
            TEA_DIST_KEY_PREFIX=self.prefix,
            TEA_DIST_ALLOWED="bench",
            TEA_DIST_CALLER_LEASE=str(self.args.lease),
            TEA_DIST_VISIBILITY_TIMEOUT=str(self.args.visibility),
            TEA_DIST_RUNTIME_DIR=str(self.dir / "runtime"),
        )
        env.update(extra)
        return env

    def start(self) -> None:
        import redis

        from tea_dist.distributed.local_cluster import EmbeddedRedis

        self.redis = EmbeddedRedis().start()
        assert self.redis.process is not None
        self.tracker.snapshot(self.redis.process.pid, "redis")
        if self.redis.reaper is not None:
            self.tracker.snapshot(self.redis.reaper.process.pid, "redis")
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        for slot in WORKER_SLOTS:
            self.start_worker(slot)
        progress(f"redis {self.redis.url}, workers up; session folder {self.dir}")

    def start_worker(self, slot: str) -> None:
        from tea_dist.distributed.worker import spawn_worker

        self.generation += 1
        label = f"worker {slot}-g{self.generation}"
        proc = spawn_worker(
            self.settings,
            "flows",
            concurrency=2,
            name=f"{slot}-g{self.generation}-{self.tag}@%h",
            log_path=self.dir / "logs" / f"{slot}-g{self.generation}.log",
            extra_env={"PYTHONPATH": str(ROOT)},
        )
        self.started.append(proc)
        self.workers[slot] = (proc, label)
        self.tracker.snapshot(proc.pid, label)

    def snapshot_workers(self) -> None:
        for proc, label in self.workers.values():
            self.tracker.snapshot(proc.pid, label)

    # -- one run ------------------------------------------------------------------------------

    def run(self, plan: Plan) -> Outcome:
        folder = self.dir / "runs" / f"{plan.index:03d}"
        markers = folder / "markers"
        markers.mkdir(parents=True)
        out = Outcome(plan, f"{self.prefix}-run{plan.index:03d}", markers)
        tmp = folder / "tmp"  # the caller's and the cluster's TMPDIR: must end up empty
        tmp.mkdir()
        cluster = None
        broker = self.redis.url
        if plan.target == "cluster":
            cluster = self.start_cluster(plan, folder)
            if not cluster.broker:
                out.notes.append("the cluster did not start: " + _tail(folder / "cluster.err"))
                self.end_cluster(cluster, out, None)
                return out
            broker = cluster.broker
        config = {"run_id": out.run_id, "marker_dir": str(markers), "sleep": plan.sleeps}
        caller = subprocess.Popen(
            [sys.executable, "-m", "bench.chaoscaller", json.dumps(config)],
            env=self.env(TEA_DIST_BROKER_URL=broker, TMPDIR=str(tmp)),
            cwd=ROOT,
            stdout=(folder / "caller.out").open("wb"),
            stderr=(folder / "caller.err").open("wb"),
            start_new_session=True,  # a Ctrl-C on the terminal reaches this script alone
            preexec_fn=_die_with_parent(),
        )
        self.started.append(caller)
        label = f"caller {plan.index}"
        out.started, began = time.time(), time.monotonic()
        dispatch = plan.target == "worker-dispatch"
        signal_at: float | None = None if dispatch else began + plan.delay
        sent_at: float | None = None  # monotonic
        victims: list[psutil.Process] = []
        while True:
            aiming = dispatch and sent_at is None and signal_at is not None
            if not aiming:  # a signal due within milliseconds is not delayed by snapshots
                self.tracker.snapshot(caller.pid, label)
                self.snapshot_workers()
                if cluster is not None:
                    self.tracker.snapshot(cluster.proc.pid, cluster.label)
            now = time.monotonic()
            ended = caller.poll() is not None
            if signal_at is None:
                invoked = _invoked_at(folder / "caller.out")
                if invoked is not None:  # the caller's clock: when it started invoking
                    signal_at = began + (invoked - out.started) + plan.delay
            due = signal_at is not None and now >= signal_at
            if plan.signum and sent_at is None and (due or ended):
                victims = self.send(plan, out, caller, cluster, folder)
                sent_at = time.monotonic()
            if ended:
                break
            if now - began > self.args.hang_after:
                out.hung = True
                out.notes.append(f"caller still running {self.args.hang_after:g}s after start")
                kill([psutil.Process(caller.pid)])
                break
            time.sleep(0.002 if dispatch and sent_at is None else POLL)
        caller.wait()
        ended_at, out.ended = time.monotonic(), time.time()
        out.exit_code = caller.returncode
        out.exit_after = ended_at - (sent_at if sent_at is not None else began)
        out.result = _result(folder / "caller.out", caller.returncode)
        self.expect_gone(out, self.tracker.of(label), GONE_WITHIN, "caller")
        if plan.target in WORKER_TARGETS and plan.signum:
            self.end_worker(plan, out, victims)
        if cluster is not None:
            self.end_cluster(cluster, out, sent_at)
        self.heal_workers(out)
        if cluster is None:
            out.folders += [str(p) for p in tmp.iterdir()]
        if out.result != "final" and not (out.cancel or plan.target == "cluster"):
            out.notes.append(f"the run did not finish: {_tail(folder / 'caller.err', 2)}")
            out.lost = dispatch
        if cluster is None:
            self.note_keys(out)
        return out

    def send(
        self,
        plan: Plan,
        out: Outcome,
        caller: subprocess.Popen[bytes],
        cluster: Cluster | None,
        folder: Path,
    ) -> list[psutil.Process]:
        """Send the plan's signal to its target; the processes expected to end because of it."""
        assert plan.signum is not None
        out.phase = self.phase(out, caller, folder)
        out.signalled_at = time.time()
        if plan.target == "caller":
            if caller.poll() is None:
                os.kill(caller.pid, plan.signum)
                out.cancel = out.phase != "ended"
            return []
        if plan.target in WORKER_TARGETS:
            slot = WORKER_SLOTS[int(plan.pick * len(WORKER_SLOTS))]
            proc, label = self.workers[slot]
            self.tracker.snapshot(proc.pid, label)
            victims = self.tracker.of(label)
            os.kill(proc.pid, plan.signum)
            self.last_kill = time.monotonic()
            out.notes.append(f"signalled {label} (pid {proc.pid})")
            return victims
        if plan.target == "worker-child":
            child = self.pick_child(plan, out)
            if child is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.send_signal(plan.signum)
                self.last_kill = time.monotonic()
            return []
        if plan.target == "cluster" and cluster is not None:
            self.tracker.snapshot(cluster.proc.pid, cluster.label)
            victims = self.tracker.of(cluster.label)
            os.kill(cluster.proc.pid, plan.signum)
            return victims
        return []

    def phase(self, out: Outcome, caller: subprocess.Popen[bytes], folder: Path) -> str:
        lines = (folder / "caller.out").read_text().splitlines()
        if caller.poll() is not None or len(lines) > 1:
            return "ended"
        if not lines:
            return "starting"
        starts = list(out.markers.glob("*.start"))
        if not starts:
            return "dispatching"
        done = {p.name.split("-")[0] for p in out.markers.glob("*.done")}
        return "fan-in" if len(done) == len(out.plan.sleeps) else "running"

    def pick_child(self, plan: Plan, out: Outcome) -> psutil.Process | None:
        """A pool process running a branch of this run, else any pool process."""
        children = []
        for proc, _ in self.workers.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                children += psutil.Process(proc.pid).children()
        running = {int(p.name.split("-")[1]) for p in out.markers.glob("*.start")}
        busy = [c for c in children if c.pid in running]
        pool = busy or children
        if not pool:
            out.notes.append("no pool process to signal")
            return None
        child = pool[int(plan.pick * len(pool))]
        out.notes.append(f"signalled pool process {child.pid} ({'busy' if busy else 'idle'})")
        return child

    def expect_gone(
        self, out: Outcome, processes: list[psutil.Process], timeout: float, what: str
    ) -> None:
        left = wait_gone(processes, timeout)
        if left:
            out.left += [f"{what}: {describe(p)}" for p in left]
            kill(left)

    def end_worker(self, plan: Plan, out: Outcome, victims: list[psutil.Process]) -> None:
        """The signalled worker must exit, its pool with it; then it is replaced."""
        slot = WORKER_SLOTS[int(plan.pick * len(WORKER_SLOTS))]
        proc, label = self.workers[slot]
        try:
            proc.wait(WORKER_STOP)
        except subprocess.TimeoutExpired:
            out.notes.append(f"{label} still running {WORKER_STOP:g}s after {plan.case[0]}")
            out.left.append(f"{label}: did not stop after {plan.case[0]}")
            kill([p for p in victims if alive(p)])
            proc.wait()
            return self.start_worker(slot)
        self.expect_gone(out, victims, GONE_WITHIN, label)
        self.start_worker(slot)

    def heal_workers(self, out: Outcome) -> None:
        """A worker that died without being told to (a pool signal, say) is noted, replaced."""
        for slot, (proc, label) in list(self.workers.items()):
            if proc.poll() is not None:
                out.notes.append(f"{label} exited ({proc.returncode}): replaced")
                self.expect_gone(out, self.tracker.of(label), GONE_WITHIN, label)
                self.start_worker(slot)

    # -- clusters -----------------------------------------------------------------------------

    def start_cluster(self, plan: Plan, folder: Path) -> Cluster:
        from tea_dist.distributed.local_cluster import free_port

        runtime, tmp = folder / "runtime", folder / "tmp"
        runtime.mkdir()
        flower = str(free_port()) if plan.flower else "0"
        argv = ["cluster", "--workers", "1", "--concurrency", "2", "--flower-port", flower]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tea_dist", *argv, "--allow", "bench"],
            env=self.env(TEA_DIST_RUNTIME_DIR=str(runtime), TMPDIR=str(tmp)),
            cwd=ROOT,
            stdout=(folder / "cluster.out").open("wb"),
            stderr=(folder / "cluster.err").open("wb"),
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self.started.append(proc)
        cluster = Cluster(proc, f"cluster {plan.index}", runtime=runtime, tmp=tmp)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            self.tracker.snapshot(proc.pid, cluster.label)
            if "ready" in (folder / "cluster.err").read_text():
                break
            time.sleep(POLL)
        for line in (folder / "cluster.out").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "broker":
                cluster.broker = value.strip()
            elif name == "logs":
                cluster.folder = Path(value.strip())
        self.tracker.snapshot(proc.pid, cluster.label)
        return cluster

    def end_cluster(self, cluster: Cluster, out: Outcome, sent_at: float | None) -> None:
        """A signalled cluster must be gone, with every process and folder, within
        ``GONE_WITHIN`` s of the signal; one never signalled is stopped here."""
        if sent_at is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(cluster.proc.pid, signal.SIGTERM)
            sent_at = time.monotonic()
        remaining = max(0.0, sent_at + GONE_WITHIN - time.monotonic())
        self.expect_gone(out, self.tracker.of(cluster.label), remaining, "cluster")
        with contextlib.suppress(subprocess.TimeoutExpired):
            cluster.proc.wait(5)
        deadline = time.monotonic() + max(1.0, sent_at + GONE_WITHIN - time.monotonic())
        leftovers: list[Path] = []
        while time.monotonic() < deadline:
            leftovers = [cluster.folder] if cluster.folder and cluster.folder.exists() else []
            leftovers += list(cluster.runtime.iterdir()) if cluster.runtime else []
            leftovers += list(cluster.tmp.iterdir()) if cluster.tmp else []
            if not leftovers:
                break
            time.sleep(POLL)
        out.folders += [str(p) for p in leftovers]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        code = cluster.proc.returncode
        if out.plan.signum and out.plan.signum != signal.SIGKILL and code != 128 + out.plan.signum:
            out.notes.append(f"cluster exited with {code}")

    def drain(self, settle: float) -> str:
        """Let stragglers end, and the messages a killed worker held come back (after the
        visibility timeout; a starting worker sweeps them) and be delivered late, to runs
        that have ended: they must not run. What was left in the broker afterwards."""
        time.sleep(settle)
        unacked = self.client.hlen("unacked")
        if unacked:
            wait = self.last_kill + self.args.visibility + 1 - time.monotonic()
            progress(f"{unacked} messages of killed workers unacked: late delivery in {wait:.0f}s")
            time.sleep(max(0.0, wait))
            self.start_worker("sweeper")  # Kombu restores old unacked messages at start
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (
                self.client.hlen("unacked") or self.client.llen(self.settings.flows_queue)
            ):
                time.sleep(0.5)
            time.sleep(settle)  # a late delivery that did run would finish by now
        left = self.client.hlen("unacked"), self.client.llen(self.settings.flows_queue)
        return f"{unacked} unacked after the runs; left unacked {left[0]}, queued {left[1]}"

    # -- keys ---------------------------------------------------------------------------------

    def note_keys(self, out: Outcome) -> None:
        """Keys first seen now belong to this run (runs go one at a time)."""
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            self.key_owner.setdefault(key, out.run_id)

    def keys_without_ttl(self) -> dict[str, list[str]]:
        """Keys under the prefix with no TTL, by the run that first had them."""
        persistent = (f"{self.prefix}:circuit:", f"{self.prefix}:circuits")
        found: dict[str, list[str]] = defaultdict(list)
        self.keys_checked = 0
        for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            if key.startswith(persistent):
                continue
            self.keys_checked += 1
            if self.client.ttl(key) == -1:
                found[self.key_owner.get(key, "")].append(key)
        return found

    def other_keys(self) -> dict[str, int]:
        """Keys outside the prefix without a TTL (Celery's and kombu's), by shape."""
        shapes: dict[str, int] = defaultdict(int)
        for key in self.client.scan_iter(count=1000):
            if key.startswith(f"{self.prefix}:") or self.client.ttl(key) != -1:
                continue
            kind = self.client.type(key)
            size = {"list": self.client.llen, "hash": self.client.hlen, "zset": self.client.zcard}
            shapes[f"{key} ({kind}, {size[kind](key) if kind in size else '-'})"] += 1
        return dict(shapes)

    # -- the end --------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop everything this session started, by PID; what was left running, and the
        folders left in the session's temporary folder."""
        from tea_dist.distributed.children import stop_groups

        workers = [proc for proc, _ in self.workers.values()]
        self.snapshot_workers()
        for proc in self.started:
            if proc.poll() is None and proc not in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        stop_groups(workers)
        if self.redis is not None:
            self.redis.stop()
        left = wait_gone(self.tracker.living(), GONE_WITHIN)
        left += [p for p in self.tracker.sweep() if p not in left]
        kill(left)
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        return [describe(p) for p in left]


def _die_with_parent() -> Any:
    from tea_dist.distributed.children import die_with_parent

    return die_with_parent()


def _invoked_at(path: Path) -> float | None:
    """When the caller started invoking (its first line), on its clock; None until then."""
    try:
        first = path.read_text().partition("\n")
    except OSError:
        return None
    if not first[1]:
        return None
    return float(json.loads(first[0])["at"])


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def _result(path: Path, code: int | None) -> str:
    """What the caller ended with: ``final``, ``error:Type``, or how its process ended."""
    lines = path.read_text().splitlines() if path.exists() else []
    if len(lines) > 1:
        last = json.loads(lines[-1])
        if last["type"] == "final":
            return f"final({'+'.join(last['failed'])} failed)" if last.get("failed") else "final"
        return f"error:{last.get('error_type')}"
    if code is not None and code < 0:
        return f"killed:{signal.Signals(-code).name}"
    return f"exit:{code}"


# -- checks after the runs ----------------------------------------------------------------------


def side_effects(outcomes: list[Outcome], lease: float, slack: float) -> None:
    """A ``.done`` written after a cancelling signal reached a running caller, beyond the
    window it may take to arrive (``slack``; plus the lease for a SIGKILL); for any other
    run, a ``.done`` written after its caller exited (``slack`` later): a late delivery that
    ran for a run that no longer exists."""
    for out in outcomes:
        for marker in sorted(out.markers.glob("*.done")):
            written, branch = float(marker.read_text()), marker.name.split("-")[0]
            if out.cancel and out.signalled_at is not None:
                window = slack + (lease if out.plan.signum == signal.SIGKILL else 0.0)
                after = written - out.signalled_at
                if after > window:
                    out.late.append(f"{branch} done {after:.2f}s after the signal")
                elif after > 0:
                    out.in_window.append(after)
            elif out.ended and written - out.ended > slack:
                after = written - out.ended
                out.after_end.append(f"{branch} done {after:.2f}s after its caller exited")


def report(outcomes: list[Outcome], args: argparse.Namespace) -> dict[str, int]:
    cases: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for out in outcomes:
        cases[out.plan.case].append(out)
    rows = []
    for (sig, target), outs in sorted(cases.items(), key=lambda c: (c[0][1], c[0][0])):
        results: dict[str, int] = defaultdict(int)
        for out in outs:
            results[out.result] += 1
        exits = [
            o.exit_after
            for o in outs
            if o.exit_after is not None and o.signalled_at and o.phase != "ended"
        ]
        rows.append(
            [
                f"{sig} -> {target}",
                len(outs),
                sum(o.cancel for o in outs),
                sum(o.hung for o in outs),
                sum(o.lost for o in outs),
                sum(len(o.left) for o in outs),
                sum(len(o.late) for o in outs),
                sum(len(o.after_end) for o in outs),
                sum(len(o.keys) for o in outs),
                sum(len(o.folders) for o in outs),
                f"{max(exits):.1f}" if exits else "-",
                ", ".join(f"{k} {v}" for k, v in sorted(results.items())),
            ]
        )
    header = [
        "signal -> target",
        "runs",
        "cancels",
        "hung",
        "lost",
        "left",
        "late",
        "after end",
        "keys",
        "folders",
        "exit s",
        "caller ended with",
    ]
    print(table("Per case (signal -> target)", header, rows))
    print(
        "cancels: a SIGINT/SIGTERM/SIGKILL reached a caller whose run was going; lost: a "
        "worker-dispatch run that did not end with every branch successful; left: "
        "processes still running when they should be gone; late: .done after a cancel; after end: "
        ".done after the caller of a run that was not cancelled exited; keys: "
        "keys without TTL; folders: temporary folders left by a cluster or caller, or adverts; "
        "exit s: longest time from the signal to the caller's exit (signals sent before the "
        "run ended)"
    )
    return {
        "runs that hung": sum(o.hung for o in outcomes),
        "runs that lost branches": sum(o.lost for o in outcomes),
        "processes left running": sum(len(o.left) for o in outcomes),
        "side effects after a cancel": sum(len(o.late) for o in outcomes),
        "keys left without a TTL": sum(len(o.keys) for o in outcomes),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="20 runs, half worker-dispatch (the smoke of CI)"
    )
    parser.add_argument(
        "--dispatch-share",
        type=float,
        default=None,
        help="share of worker-dispatch runs (default: by the targets' weights)",
    )
    parser.add_argument("--lease", type=float, default=3.0, help="TEA_DIST_CALLER_LEASE")
    parser.add_argument("--hang-after", type=float, default=60.0)
    parser.add_argument(
        "--visibility",
        type=float,
        default=30.0,
        help="TEA_DIST_VISIBILITY_TIMEOUT: messages of a killed worker come back this soon",
    )
    parser.add_argument(
        "--slack", type=float, default=1.0, help="s a cancel may take to reach a branch"
    )
    args = parser.parse_args()
    if args.quick:
        args.runs = 20
        args.dispatch_share = 0.5 if args.dispatch_share is None else args.dispatch_share
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    plans = make_plans(args.runs, seed, args.dispatch_share)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    began = time.monotonic()
    session = Session(args)
    outcomes: list[Outcome] = []
    try:
        session.start()
        for plan in plans:
            out = session.run(plan)
            outcomes.append(out)
            sig, target = plan.case
            progress(
                f"run {plan.index + 1}/{len(plans)}: {sig} -> {target} at {plan.delay:.1f}s "
                f"({out.phase or '-'}): {out.result}"
                + (f", exit {out.exit_after:.1f}s after" if out.signalled_at else "")
                + ("  << " + "; ".join(out.left + out.folders + out.notes) if out.bad else "")
            )
        settle = args.lease + max(max(p.sleeps.values()) for p in plans) + args.slack + 2
        progress(f"waiting {settle:.0f}s for stragglers, then checking")
        broker = session.drain(settle)
        side_effects(outcomes, args.lease, args.slack)
        for out in outcomes:
            record = json.dumps(asdict(out), default=str, indent=1)
            (out.markers.parent / "outcome.json").write_text(record)
        by_run = {o.run_id: o for o in outcomes}
        unowned = []
        for run_id, keys in session.keys_without_ttl().items():
            if run_id in by_run:
                by_run[run_id].keys += keys
            else:
                unowned += keys
        others = session.other_keys()
    except KeyboardInterrupt:
        progress("interrupted: stopping everything this session started")
        session.close()
        shutil.rmtree(session.dir, ignore_errors=True)
        return 130
    except BaseException:
        session.close()
        raise
    left_at_close = session.close()
    leftovers = [p for p in session.tmp.iterdir()] + list((session.dir / "runtime").iterdir())
    took = time.monotonic() - began

    print(f"# {command_line()}")
    print(
        f"# seed {seed}, {len(plans)} runs, lease {args.lease:g}s, slack {args.slack:g}s, "
        f"{took / 60:.1f} min, load {os.getloadavg()[0]:.1f}"
    )
    totals = report(outcomes, args)
    totals["processes left running"] += len(left_at_close)
    totals["keys left without a TTL"] += len(unowned)
    window = sorted(a for o in outcomes for a in o.in_window)
    print()
    for out in outcomes:
        if out.bad or out.notes or out.in_window:
            sig, target = out.plan.case
            what = out.left + out.folders + out.late + out.after_end + out.keys + out.notes
            what += [f"done {a:.2f}s after the signal (within the window)" for a in out.in_window]
            print(
                f"run {out.plan.index:03d} {sig} -> {target} at {out.plan.delay:.2f}s "
                f"({out.phase or '-'}), sleeps {out.plan.sleeps}: {out.result}; " + "; ".join(what)
            )
    for line in left_at_close:
        print(f"left running after the session stopped: {line}")
    for key in unowned:
        print(f"key without TTL (no run): {key}")
    for path in leftovers:
        print(f"left in the flow workers' temporary folder (not counted): {path}")
    print(f"broker messages: {broker}")
    print(
        f"keys under the prefix at the end: {session.keys_checked} checked "
        f"({len(session.key_owner)} seen during the runs)"
    )
    if others:
        print(
            "keys outside the prefix without TTL (kombu's): "
            + ", ".join(f"{k}" for k in sorted(others))
        )
    print(
        f"branches done after a cancel, within the window (not counted): {len(window)}"
        + (f", {window[0]:.2f}-{window[-1]:.2f}s after the signal" if window else "")
    )
    print()
    for name, count in totals.items():
        print(f"{name}: {count}")
    print(f"temporary folders left by clusters: {sum(len(o.folders) for o in outcomes)}")
    print(f"branches run after their run ended: {sum(len(o.after_end) for o in outcomes)}")
    bad = any(totals.values()) or any(o.folders or o.after_end for o in outcomes)
    if bad:
        print(f"logs and markers kept in {session.dir}")
        return 1
    shutil.rmtree(session.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
