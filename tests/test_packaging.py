"""saelab installed from its wheel, not from this clone: the wheel carries the configs
and the shipped sweeps, the ``saelab`` console script composes a sweep from an empty
directory, and a ``./sweeps/NAME.yaml`` there is the option ``sweep=NAME``."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # builds a wheel and a venv

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "outputs", "build", "dist",
                                    "*.egg-info", "__pycache__", "multirun", "wandb",
                                    ".pytest_cache", ".ruff_cache", "*.so")

WHERE = """
import json, sys
import saelab, saelab.configs as c
import hydra_plugins.saelab_configs.saelab_configs as plugin
print(json.dumps({"saelab": saelab.__file__, "conf": str(c.conf_dir()),
                  "sweeps": str(c.shipped_sweeps_dir()), "plugin": plugin.__file__,
                  "editable": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()]
                              + [m for m in sys.modules if m.startswith("__editable__")]}))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A new venv holding only the wheel built from this tree (plus its console script).

    Its dependencies come from the running venv's site-packages through a .pth line: an
    honest install of saelab itself in ~10 s, where a full ``pip install WHEEL`` downloads
    ~800 MB of dependencies (measured: 2 min). The running venv's editable hook for saelab
    is a .pth file there, and .pth files in a directory that a .pth line adds are not
    processed, so this clone stays out of sys.path (asserted below, not assumed)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"  # a copy: an in-tree build could pack stale files left in build/
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src),
                    "-w", str(tmp / "wheels")], check=True)
    (wheel,) = (tmp / "wheels").glob("saelab-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    return venv


def run_in(venv: Path, cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    p = subprocess.run(args, cwd=cwd, env={**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_wheel_ships_configs_and_sweeps(fresh, tmp_path):
    where = json.loads(run_in(fresh, tmp_path, str(fresh / "bin" / "python"), "-c", WHERE))
    assert where["editable"] == []
    for key in ("saelab", "conf", "sweeps", "plugin"):
        assert Path(where[key]).is_relative_to(fresh), (key, where[key])
    conf, sweeps = Path(where["conf"]), Path(where["sweeps"])
    assert {p.name for p in conf.iterdir()} >= {"config.yaml", "model", "data", "sae", "train"}
    assert not (conf / "sweep").exists()  # one copy of the sweep files: saelab.sweeps
    assert sorted(p.stem for p in sweeps.glob("*.yaml")) == sorted(
        p.stem for p in (REPO / "sweeps").glob("*.yaml"))
    if importlib.util.find_spec("saelab._kernels"):  # a compiler built it here: the wheel too
        kernel = run_in(fresh, tmp_path, str(fresh / "bin" / "python"), "-c",
                        "import saelab._kernels as k; print(k.__file__)").strip()
        assert Path(kernel).is_relative_to(fresh) and kernel.endswith(".so"), kernel


def test_installed_cli_composes_shipped_and_user_sweeps(fresh, tmp_path):
    saelab = str(fresh / "bin" / "saelab")
    cfg = yaml.safe_load(run_in(fresh, tmp_path, saelab, "train", "--cfg", "job", "sweep=quick"))
    shipped = yaml.safe_load((REPO / "sweeps" / "quick.yaml").read_text())
    assert cfg["study"]["name"] == "quick"
    assert cfg["study"]["params"] == shipped["study"]["params"]
    assert cfg["data"]["max_tokens"] == shipped["data"]["max_tokens"]

    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text(
        "# @package _global_\nstudy:\n  name: mine\n  params:\n    sae.k: choice(8, 16)\n")
    cfg = yaml.safe_load(run_in(fresh, tmp_path, saelab, "train", "--cfg", "job", "sweep=mine"))
    assert cfg["study"]["name"] == "mine" and cfg["study"]["params"] == {"sae.k": "choice(8, 16)"}
