"""Package-level contracts: the public names resolve, and the pure packages import no Lightning."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import cm3leon_lightning


@pytest.mark.parametrize("name", cm3leon_lightning.__all__)
def test_public_names_resolve(name: str) -> None:
    assert getattr(cm3leon_lightning, name) is not None


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        cm3leon_lightning.no_such_thing  # noqa: B018


def test_pure_packages_do_not_import_lightning() -> None:
    """Nor the heavy stacks the package docstring names (open_clip, faiss, webdataset), nor LitServe."""
    code = (
        "import sys\n"
        "import cm3leon_lightning.model, cm3leon_lightning.config, cm3leon_lightning.objective\n"
        "import cm3leon_lightning.tokenization.vocab, cm3leon_lightning.generation\n"
        "import cm3leon_lightning.retrieval.select, cm3leon_lightning.model.weights, cm3leon_lightning.model.hf_opt\n"
        "import cm3leon_lightning.model.pretrained, cm3leon_lightning.generation.cli, cm3leon_lightning.export\n"
        "heavy = ('lightning', 'pytorch_lightning', 'open_clip', 'faiss', 'webdataset', 'litserve')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("command", ["generate", "serve", "export", "info"])
def test_extra_commands_start_without_lightning(command: str) -> None:
    """Through the console script's entry point (``cli.main``), as users run them: it imported LightningCLI at module
    level, so every extra command paid Lightning's import before it was dispatched."""
    code = (
        "import contextlib, io, sys\n"
        "from cm3leon_lightning.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main([{command!r}, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_cli_names_lightnings_subcommands() -> None:
    """``cli.main`` dispatches by ``LIGHTNING_COMMANDS`` without importing Lightning; it must stay LightningCLI's."""
    from cm3leon_lightning.cli import LIGHTNING_COMMANDS, CM3LeonCLI

    assert LIGHTNING_COMMANDS == tuple(CM3LeonCLI.subcommands())


ROOT = Path(__file__).resolve().parents[1]

# Third-party modules the package imports that come with a declared distribution rather than being declared themselves.
PROVIDED_BY = {
    "triton": "torch (its CUDA builds; imported only on CUDA, lazily)",
    "fsspec": "lightning",
    "huggingface_hub": "open_clip_torch",
    "fastapi": "litserve (serve extra)",
    "pydantic": "litserve (serve extra) and wandb",
    "pydantic_core": "pydantic (serve extra)",
}
# Declared runtime dependencies the package uses without importing them.
USED_WITHOUT_IMPORT = {
    "torch-fidelity": "torchmetrics' FrechetInceptionDistance feature extractor (metrics/fid.py)",
    "tensorboard": "Lightning's TensorBoardLogger (callbacks/samples.py, modules/vqgan.py)",
    "wandb": "Lightning's WandbLogger (callbacks/samples.py, configs/callbacks/samples.yaml)",
}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _third_party_imports() -> set[str]:
    """Top-level names of the non-stdlib modules ``cm3leon_lightning/`` imports anywhere (lazy imports included)."""
    names: set[str] = set()
    for path in (ROOT / "cm3leon_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "cm3leon_lightning"}


def test_every_third_party_import_is_declared() -> None:
    project = _pyproject()["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: distributions.get(module)
        for module in _third_party_imports() - set(PROVIDED_BY)
        if not declared & {_canonical(d) for d in distributions.get(module, [])}
    }
    assert undeclared == {}


def test_every_declared_dependency_is_used() -> None:
    imported = _third_party_imports()
    modules_of: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_canonical(dist), set()).add(module)
    unused = [
        name
        for name in map(_requirement_name, _pyproject()["project"]["dependencies"])
        if name not in USED_WITHOUT_IMPORT and not modules_of.get(name, set()) & imported
    ]
    assert unused == []


def test_version_matches_pyproject() -> None:
    assert cm3leon_lightning.__version__ == _pyproject()["project"]["version"]


def test_python_m_usage_names_cm3leon() -> None:
    run = subprocess.run([sys.executable, "-m", "cm3leon_lightning", "--help"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: cm3leon [-c CONFIG]")


def test_sdist_holds_the_whole_source(tmp_path: Path) -> None:
    """The sdist carries what the wheel leaves out (configs, the test suite with its conftest and fixtures, docs,
    examples, benchmarks, the Makefile and CI script), no bytecode, and builds without setuptools' deprecations."""
    pytest.importorskip("setuptools", minversion="77")  # `license` as an SPDX string
    src = tmp_path / "src"
    # __pycache__ too: another pytest-xdist worker may be renaming bytecode there while the tree is copied
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "runs", "lightning_logs", "*.ckpt")
    for name in ("cm3leon_lightning", "configs", "tests", "docs", "examples", "benchmarks", ".ci"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "setup.cfg", "README.md", "MANIFEST.in", "CHANGELOG.md", "Makefile"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    (src / "tests" / "__pycache__").mkdir()
    (src / "tests" / "__pycache__" / "stale.cpython-311.pyc").write_bytes(b"")
    code = "from setuptools import setup; setup()"
    run = subprocess.run(
        [sys.executable, "-c", code, "sdist", "-d", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "deprecated" not in run.stdout + run.stderr
    with tarfile.open(tmp_path / "dist" / f"cm3leon_lightning-{cm3leon_lightning.__version__}.tar.gz") as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not [n for n in names if n.endswith(".pyc")]
    expected = {
        p.relative_to(src).as_posix()
        for top in ("configs", "tests", "docs", "examples", "benchmarks", "cm3leon_lightning")
        for p in (src / top).rglob("*")
        if p.is_file() and p.suffix != ".pyc"
    }
    assert expected - names == set()
    assert {"CHANGELOG.md", "Makefile", ".ci/run", "tests/conftest.py", "configs/demo/vqgan.yaml"} <= names


def test_serve_without_litserve_says_what_to_install() -> None:
    """`cm3leon serve` without the serve extra: a one-line error naming the extra, not an ImportError traceback."""
    code = (
        "import sys\nsys.modules['litserve'] = None\n"
        "from cm3leon_lightning.cli import main\nsys.exit(main(['serve', '--ckpt', 'x.ckpt']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip() == "cm3leon serve: error: needs LitServe: pip install 'cm3leon_lightning[serve]'"
