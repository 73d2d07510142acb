"""The documentation site and the deployment files: the docs build with no broken link, the
Python examples marked runnable run, the Kubernetes manifests and systemd units are valid, and
the wheel installs nothing but ``tea_dist``.

A runnable example is a ```` ```python ```` block right after the line ``<!-- run -->`` in a
page of ``docs/``; it must need no service (in-process strategies only). The site build and the
manifest validation need the ``docs`` extra (``pip install -e ".[docs]"``) and skip without it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
RUNNABLE = re.compile(r"^<!-- run -->\n```python\n(.*?)^```", re.S | re.M)
# the warm shutdown's budget per worker role (docs: Rolling upgrades; compose: stop_grace_period)
GRACE = {"flows": 60, "runs": 15}


def _missing(*modules: str) -> str | None:
    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ModuleNotFoundError:  # its parent package is not installed either
            return True

    return ", ".join(m for m in modules if absent(m)) or None


def _runnable_blocks() -> list[Any]:
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for match in RUNNABLE.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            blocks.append(pytest.param(page, line, match.group(1), id=f"{page.name}:{line}"))
    return blocks


def test_docs_mark_examples_runnable() -> None:
    assert len(_runnable_blocks()) >= 4


@pytest.mark.parametrize(("page", "line", "code"), _runnable_blocks())
def test_docs_runnable_example_runs(page: Path, line: int, code: str) -> None:
    # line numbers in a traceback are the page's own
    source = "\n" * (line - 1) + code
    exec(compile(source, str(page), "exec"), {"__name__": f"docs_{page.stem}"})


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    missing = _missing("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    if missing:
        pytest.skip(f"not installed: {missing} (pip install -e '.[docs]')")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "reference" / "index.html").read_text().count("add_parallel_map") > 0


def test_readme_links_to_docs_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links to the docs pages"
    for link in links:
        assert (ROOT / link).is_file(), link
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = {page for entry in nav for page in entry.values()}
    assert pages == {p.name for p in DOCS.glob("*.md")}, "every page is in the nav, and only those"


# -- Kubernetes ---------------------------------------------------------------------------------


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_kubernetes_manifests_match_the_schema() -> None:
    if _missing("kubernetes_validate"):
        pytest.skip("not installed: kubernetes-validate (pip install -e '.[docs]')")
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    manifests = _manifests()
    assert len(manifests) >= 6
    for path, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_kubernetes_workers_probe_their_role_and_cover_the_warm_shutdown() -> None:
    deployments = {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for _, doc in _manifests()
        if doc["kind"] == "Deployment"
    }
    for role, name in (("flows", "tea-dist-flow-worker"), ("runs", "tea-dist-run-worker")):
        pod = deployments[name]
        (container,) = pod["containers"]
        command = container["command"]
        assert command[:4] == ["tea-dist", "worker", "--role", role], command
        for probe in ("readinessProbe", "livenessProbe"):
            ping = container[probe]["exec"]["command"]
            assert ping[:4] == ["tea-dist", "worker-ping", "--role", role], (name, probe)
        assert pod["terminationGracePeriodSeconds"] == GRACE[role], name
        assert not any("secret" in str(arg).lower() for arg in command), "no secret on argv"


def test_the_grace_periods_agree_with_compose_and_systemd() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "60s" in compose["flow-worker"]["stop_grace_period"]
    assert compose["run-worker"]["stop_grace_period"] == f"{GRACE['runs']}s"
    for role, unit in (("flows", "flow"), ("runs", "run")):
        text = (SYSTEMD / f"tea-dist-{unit}-worker.service").read_text()
        assert f"TimeoutStopSec={GRACE[role]}\n" in text
        assert "KillMode=mixed\n" in text  # SIGTERM to the main process only
        assert f"worker --role {role}" in text


# -- systemd ------------------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    tea_dist = shutil.which("tea-dist", path=str(Path(sys.executable).parent)) or "/bin/true"
    units = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        # the units name /opt/tea-dist; verify checks that ExecStart's program exists
        text = unit.read_text().replace("/opt/tea-dist/bin/tea-dist", tea_dist)
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
    assert len(units) == 2
    done = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and "System has not been booted with systemd" in output:
        pytest.skip(f"systemd-analyze cannot run here: {output}")
    # systemd-analyze exits 0 even for a setting it ignores: any message is a defect
    assert done.returncode == 0 and not output, output


# -- packaging ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel, as ``pip install tea-dist`` would get it."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "Could not find a version that satisfies" in done.stderr:
        pytest.skip(f"the build backend cannot be installed here: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    (built,) = out.glob("tea_dist-*.whl")
    return built


def test_the_wheel_installs_only_tea_dist(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"tea_dist", wheel.name.split("-py")[0] + ".dist-info"}, sorted(top)
    for data in ("tea_dist/py.typed", "tea_dist/distributed/breaker.lua"):
        assert data in names


def test_the_readme_example_runs_from_the_installed_wheel_outside_the_repository(
    wheel: Path, tmp_path: Path
) -> None:
    """A fresh virtualenv with the wheel installed (not editable; its dependencies are this
    environment's, offline), run from a folder outside the repository: the README's first
    example works, and no ``examples`` package came with tea_dist."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = [str(python), "-c", example]
    done = subprocess.run(run, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['web: celery', 'docs: celery']"
    where = [str(python), "-c", "import tea_dist; print(tea_dist.__file__)"]
    found = subprocess.run(where, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert str(venv) in found.stdout  # the installed wheel, not the checkout
    examples = [str(python), "-c", "import examples"]
    done = subprocess.run(examples, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "No module named 'examples'" in done.stderr
