"""Run The Edge Agent's own parallel tests against tea_dist, once per strategy.

    python bench/tea_suite.py /path/to/the_edge_agent [--strategies thread,process,asyncio,celery]

TEA's tests are run unmodified from a checkout of ``fabceolin/the_edge_agent`` that stays
outside this project. Only their imports are redirected: a ``sys.meta_path`` finder answers
every ``the_edge_agent`` / ``the_edge_agent.*`` module with a stand-in whose attributes are the
same names looked up in ``tea_dist.interfaces.tea`` (the TEA-facing API), then in
``tea_dist``. A TEA name
with no tea_dist equivalent resolves to a placeholder that skips the test using it with the
reason ``missing: <name>``, so missing names are counted, not hidden.

Each strategy runs in its own pytest process. The tests name no strategy (or name ``thread``),
so the strategy under test is bound to the name ``thread`` with ``tea_dist.register_executor``;
for ``celery`` this script starts a ``LocalCluster`` (embedded Redis, flow workers) and stops
it afterwards (pytest and its workers find the agents it writes in one agents directory). The
table counts, per strategy: passed, failed, skipped, missing (a TEA name tea_dist lacks),
refused (a node the strategy cannot carry, refused with its error: a closure on celery), the
failures that meet a difference docs/tea.md lists, the hangs, and TEA's tests of its
own docs and example files. ``--list`` prints every test's outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
import time
import types
import unittest
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# TEA's test files about parallel execution: fan-out/fan-in, strategies and executors, circuit
# breakers, retries, callbacks, reliability (python/tests/ of the checkout).
TEA_FILES = (
    "test_stategraph_parallel.py",
    "test_stategraph_parallel_reliability.py",
    "test_stategraph_stream.py",
    "test_parallel_executors.py",
    "test_parallel_integration.py",
    "test_parallel_serialization_integration.py",
    "test_yaml_parallel_strategy.py",
    "test_yaml_enhanced_parallel.py",
    "test_yaml_dynamic_parallel.py",
    "test_yaml_run_variables_parallel.py",
    "test_dx_001_5_dynamic_parallel_errors.py",
)

# Where a TEA name is looked up, in order.
TARGETS = ("tea_dist.interfaces.tea", "tea_dist")

STRATEGIES = ("thread", "process", "asyncio", "celery")
EXECUTORS = {
    "process": "tea_dist.executors.process:ProcessExecutor",
    "asyncio": "tea_dist.executors.asyncio:AsyncioExecutor",
    "celery": "tea_dist.distributed.driver:CeleryExecutor",
}

# Words in a failure that mean the strategy refused a node it cannot carry, by design.
REFUSALS = ("cannot be pickled", "no lambdas or closures", "cannot import")

# Tests that meet a difference docs/tea.md lists: (test name ending, strategies or () for
# every strategy, the difference). They count as "differs", not as failures, when they fail.
DIFFERENCES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("test_available_strategies_includes_all", (), "no 'remote' (SSH) strategy"),
    ("test_circuit_breaker_reset_api", (), "compile() requires an entry point"),
    ("test_stream_parallel_three_branches", (), "stream() fan-ins get ParallelFlowResults"),
    ("test_001_1_yaml_005_invalid_strategy_warning", (), "an unknown strategy is an error"),
    ("test_parallel_results_structure", (), "timing_ms is a float"),
    ("test_int_001_matrix_with_actions", (), "TEA's built-in actions are not provided"),
    ("test_retry_eventually_succeeds", ("process", "celery"), "a closure's memory is copied"),
    ("test_thread_branches_race_on_shared_variables", ("process", "celery"), "no shared memory"),
)

# Tests that check TEA's own documentation and example files, not the library.
TEA_FILES_TESTS = (
    "TestExampleYAMLValidation::test_parallel_strategies_demo_parseable",
    "TestExampleYAMLValidation::test_parallel_remote_distributed_parseable",
    "TestExampleYAMLValidation::test_example_yaml_has_required_sections",
    "TestDocumentationSections::test_yaml_reference_has_parallel_strategies_section",
    "TestDocumentationSections::test_yaml_reference_has_trade_offs_table",
)


# -- the shim ------------------------------------------------------------------------------


class MissingName(unittest.SkipTest):
    """Raised (a skip) when a test uses a TEA name that tea_dist does not have."""


class _MissingMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise MissingName(f"missing: {cls.__qualname__}")

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingName(f"missing: {cls.__qualname__}")

    def __instancecheck__(cls, instance: Any) -> bool:
        raise MissingName(f"missing: {cls.__qualname__}")


def _missing_attribute(self: Any, name: str) -> Any:
    raise MissingName(f"missing: {type(self).__qualname__}")


def missing(qualified: str) -> type:
    """A placeholder for a TEA name with no tea_dist equivalent."""
    namespace = {"__qualname__": qualified, "__getattr__": _missing_attribute}
    return _MissingMeta(qualified, (Exception,), namespace)


class _TeaModule(types.ModuleType):
    """A stand-in for a TEA module: attributes come from tea_dist, by name."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in TARGETS:
            try:
                module = importlib.import_module(target)
            except ImportError:
                continue
            if hasattr(module, name):
                value = getattr(module, name)
                setattr(self, name, value)
                return value
        placeholder = missing(f"{self.__name__}.{name}")
        setattr(self, name, placeholder)
        return placeholder


class TeaFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``the_edge_agent`` and its submodules with ``_TeaModule`` stand-ins."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "the_edge_agent" or fullname.startswith("the_edge_agent."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _TeaModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_shim() -> None:
    """Put the finder first, so a real TEA on ``sys.path`` is never imported."""
    if not any(isinstance(f, TeaFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TeaFinder())


# -- the pytest plugin (loaded in each strategy's pytest process) ----------------------------

_outcomes: dict[str, dict[str, str]] = {}


def pytest_configure(config: Any) -> None:
    install_shim()
    strategy = os.environ.get("TEA_SUITE_STRATEGY", "thread")
    if strategy != "thread":
        from tea_dist import register_executor

        register_executor("thread", _executor_class(strategy))


def _executor_class(strategy: str) -> type:
    """The executor of ``strategy``, to serve under the name ``thread``."""
    module, _, attr = EXECUTORS[strategy].partition(":")
    cls: type = getattr(importlib.import_module(module), attr)
    if strategy != "celery":
        return cls

    class CeleryAsThread(cls):  # type: ignore[valid-type,misc]
        """Celery's compile-time check looks for configs named "celery": show it them."""

        def check(self, spec: Any, fanout: Any) -> None:
            configs = tuple(
                c.model_copy(update={"strategy": "celery"}) if c.strategy == "thread" else c
                for c in fanout.configs
            )
            super().check(spec, dataclasses.replace(fanout, configs=configs))

    return CeleryAsThread


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "call" or (report.when == "setup" and not report.passed):
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.failed:
            message = _first_error_line(str(report.longrepr))
        _outcomes[report.nodeid] = {"outcome": report.outcome, "message": message}
    elif report.when == "teardown" and report.failed and report.nodeid in _outcomes:
        _outcomes[report.nodeid] = {"outcome": "failed", "message": "teardown failed"}


def _first_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    return (lines[0][1:].strip() if lines else text.strip().splitlines()[-1:][0])[:300]


def pytest_sessionfinish(session: Any) -> None:
    path = os.environ.get("TEA_SUITE_REPORT")
    if path:
        Path(path).write_text(json.dumps(_outcomes))


# -- running and counting --------------------------------------------------------------------


KINDS = ("passed", "failed", "hang", "skipped", "missing", "refused", "differs", "tea-files")


def _kind(test: str, outcome: dict[str, str], strategy: str) -> str:
    """passed, failed; hang (stopped by the per-test timeout); skipped; missing (a TEA name
    tea_dist lacks); refused (a node the strategy cannot carry: a closure on celery, a lock
    captured by a closure on process); differs (failed on a difference docs/tea.md lists);
    tea-files (checks TEA's own docs or examples)."""
    message = outcome["message"]
    if any(test.endswith(name) for name in TEA_FILES_TESTS):
        return "tea-files"
    if outcome["outcome"] == "skipped":
        return "missing" if message.removeprefix("Skipped: ").startswith("missing:") else "skipped"
    if outcome["outcome"] != "failed":
        return outcome["outcome"]
    if "Timeout >" in message:  # pytest-timeout stopped it
        return "hang"
    if any(word in message for word in REFUSALS):
        return "refused"
    for name, strategies, _ in DIFFERENCES:
        if test.endswith(name) and (not strategies or strategy in strategies):
            return "differs"
    return "failed"


SITECUSTOMIZE = """\
import os

if os.environ.get("TEA_SUITE_SHIM"):  # every Python process of the run gets the shim
    from bench.tea_suite import install_shim

    install_shim()
"""


def suite_env(checkout: Path, workdir: Path) -> dict[str, str]:
    """The environment of every process of a run: the shim installed at start-up
    (``sitecustomize``), tea_dist and the checkout's tests importable."""
    (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = [str(workdir), str(ROOT), str(checkout / "python"), os.environ.get("PYTHONPATH", "")]
    # pytest (which writes agents given as dicts) and the celery workers (which load them)
    # run in different folders: both find agents relative to the same agents directory
    return {
        **os.environ,
        "TEA_SUITE_SHIM": "1",
        "PYTHONPATH": os.pathsep.join(path),
        "TEA_DIST_AGENTS_DIR": str(workdir),
    }


@contextlib.contextmanager
def celery_cluster(env: dict[str, str], workdir: Path) -> Iterator[str]:
    """A ``LocalCluster`` (embedded Redis, flow workers) whose workers have the shim; yields
    its broker URL and stops every process it started."""
    from tea_dist.distributed.local_cluster import LocalCluster

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env)  # the workers inherit the shim and the import path
    os.chdir(workdir)  # the cluster puts its working directory first on the workers' path
    cluster = LocalCluster(flow_workers=1, concurrency=2, run_workers=0)
    try:
        cluster.start()
        yield cluster.redis_url
    finally:
        cluster.stop()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_strategy(
    checkout: Path, strategy: str, files: Sequence[str], timeout: int, env: dict[str, str]
) -> dict:
    """Run TEA's files under one strategy in a fresh pytest process; the outcomes by test id."""
    tests = checkout / "python" / "tests"
    with tempfile.TemporaryDirectory(prefix="tea-suite-") as tmp:
        report = Path(tmp) / "report.json"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        run_env = {**env, "TEA_SUITE_STRATEGY": strategy, "TEA_SUITE_REPORT": str(report)}
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-c",
            str(ini),
            "--rootdir",
            str(checkout / "python"),
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-p",
            "bench.tea_suite",
            f"--timeout={timeout}",
            *[str(tests / f) for f in files],
        ]
        proc = subprocess.run(argv, env=run_env, cwd=tmp, capture_output=True, text=True)
        if not report.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pytest did not finish for strategy {strategy}")
        return json.loads(report.read_text())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of fabceolin/the_edge_agent")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--files", default=",".join(TEA_FILES))
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--list", action="store_true", help="print every test's outcome")
    args = parser.parse_args(argv)
    files = [f for f in args.files.split(",") if f]
    missing_files = [f for f in files if not (args.checkout / "python" / "tests" / f).exists()]
    if missing_files:
        raise SystemExit(f"not in the checkout's python/tests: {', '.join(missing_files)}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tea-suite-shim-") as workdir:
        env = suite_env(args.checkout, Path(workdir))
        for strategy in args.strategies.split(","):
            started = time.monotonic()
            if strategy == "celery":
                with celery_cluster(env, Path(workdir)) as broker:
                    run_env = {**env, "TEA_DIST_BROKER_URL": broker}
                    results[strategy] = run_strategy(
                        args.checkout, strategy, files, args.timeout, run_env
                    )
            else:
                results[strategy] = run_strategy(args.checkout, strategy, files, args.timeout, env)
            print(f"{strategy}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(f"{'strategy':10}" + "".join(f"{k:>10}" for k in KINDS) + f"{'total':>8}")
    for strategy, outcomes in results.items():
        counts = Counter(_kind(t, o, strategy) for t, o in outcomes.items())
        row = "".join(f"{counts[k]:>10}" for k in KINDS)
        print(f"{strategy:10}{row}{len(outcomes):>8}")
    if args.list:
        for strategy, outcomes in results.items():
            for test, outcome in sorted(outcomes.items()):
                kind = _kind(test, outcome, strategy)
                print(f"{strategy:8} {kind:9} {test}  {outcome['message'][:160]}")


if __name__ == "__main__":
    main()
