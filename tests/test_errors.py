"""Bad input to every command: one line on stderr naming the full key, the value and
what is allowed, exit code 2, no traceback, and nothing expensive started (no model
load, no capture). Real subprocesses of the ``saelab`` console script; the README's
"Troubleshooting" section lists these cases."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saelab.config import StudyConfig
from saelab.study import open_study

pytestmark = pytest.mark.slow  # a `saelab` subprocess per case (~1-2 s each)

SAELAB = str(Path(sys.executable).parent / "saelab")

# (command line, a substring of the one line); DB/NONE/BUSY are filled in per test
CASES = [
    # train / prepare: Hydra composition, then saelab's own checks, before any model load
    (["train", "sae.k=0"], "saelab train: sae.k=0 is not valid; allowed: an integer >= 1"),
    (["train", "sae.kk=1"], "sae.kk=1 is not valid: no such key; allowed: the keys of sae: "),
    (["train", "+sae.kk=1"], "sae.kk=1 is not valid; allowed: the keys of sae: "),
    (["train", "foo=1"], "foo=1 is not valid: no such key; allowed: the keys of the config: "),
    (["train", "sae.k=many"], "sae.k=many is not valid: Value 'many' of type 'str' could not be "
                              "converted to Integer; allowed: a value of type int"),
    (["train", "sae.learning_rate=-1"], "sae.learning_rate=-1.0 is not valid; allowed: a positive"),
    (["train", "sae.k=600", "sae.expansion_factor=1"],
     "sae.k=600 is not valid; allowed: at most d_hidden = sae.expansion_factor * d_model = 576"),
    (["train", "layer=40"], "layer=40 is not valid for smollm2_135m; allowed: 0..29"),
    (["train", "component=ffn"], "component='ffn' is not valid; allowed: mlp, attn, output"),
    (["train", "model=nope"], "model=nope is not valid: no such config; allowed: llama32_1b, path"),
    (["train", "train=nope"], "train=nope is not valid: no such config; allowed: default, reference"),
    (["train", "model.dtype=float64"], "model.dtype='float64' is not valid; allowed: float32"),
    (["train", "data.source=files"], "data.paths=[] is not valid; allowed: at least one file"),
    (["train", "study.constraints={a:1}"], "study.constraints.a is not valid: no such key; "
                                           "allowed: existing keys of study.constraints, or ++"),
    (["train", "layer=1,2"], "layer=1,2 is not valid: one run takes one value; allowed: "),
    (["train", "sae.k=("], "sae.k=( is not valid: extraneous input '('"),
    (["train", "--bogus"], "--bogus is not valid: unknown option; allowed: Hydra's options"),
    (["train", "--cfg", "everything"], "argument --cfg/-c: invalid choice: 'everything'"),
    (["prepare", "data.max_tokens=0"], "saelab prepare: data.max_tokens=0 is not valid; allowed: "),
    # sweep: the sweep file, the search space (every corner), the storage
    (["sweep"], "saelab sweep: sweep=NAME is missing; allowed: sweep=NAME, NAME one of "),
    (["sweep", "sweep=nope"], "sweep=nope is not valid: no such config; allowed: "),
    (["sweep", "sweep=smoke", "study.sampler=bogus"], "study.sampler='bogus' is not valid; allowed: "
                                                      "tpe, nsga2"),
    (["sweep", "sweep=smoke", "study.n_jobs=0"], "study.n_jobs=0 is not valid; allowed: an integer"),
    (["sweep", "sweep=smoke", "layer=choice(3,99)"], "layer=99: layer=99 is not valid for "
                                                     "smollm2_135m; allowed: 0..29"),
    (["sweep", "sweep=smoke", "sae.kk=choice(1,2)"], "sae.kk is not a key of the trial config"),
    (["sweep", "sweep=smoke", "sae.learning_rate=interval(1e-2,1e-4)"],
     "sae.learning_rate: interval(0.01, 0.0001) is empty or invalid; allowed: start < end"),
    (["sweep", "sweep=smoke", "study.storage=nosuch://x"],
     "study.storage='nosuch://x' cannot be opened"),
    (["train", "-m", "sweep=smoke", "sae.k=0"], "saelab train: sae.k=0 is not valid"),
    # trials / export / dashboard: argparse and the storage
    (["trials"], "saelab trials: the following arguments are required: study (usage: "),
    (["trials", "s", "--storage", "DB", "--bogus"], "unrecognized arguments: --bogus"),
    (["trials", "nope", "--storage", "DB"], "study='nope' is not in sqlite:///"),
    (["trials", "s", "--storage", "NONE"], "does not exist: no such database file"),
    (["export", "s", "--storage", "DB", "--top", "x"], "argument --top: invalid int value: 'x'"),
    # eval / features: argparse and the SAE path, before any model load
    (["eval"], "saelab eval: the following arguments are required: sae"),
    (["eval", "NONE"], "is not a saved SAE: expected sae.json and sae.safetensors"),
    (["features", "NONE", "--bogus"], "saelab features: unrecognized arguments: --bogus"),
    (["features", "NONE"], "is not a saved SAE: expected sae.json and sae.safetensors"),
    (["export", "s", "--storage", "DB", "--rule", "bogus"], "--rule='bogus'"),
    (["export", "nope", "--storage", "DB"], "saelab export: study='nope' is not in"),
    (["dashboard", "s", "--storage", "DB", "--port", "99999"], "'99999' is not valid; allowed: "
                                                               "1..65535"),
    (["dashboard", "s", "--storage", "DB", "--port", "BUSY"], "is not valid (Address already in "
                                                              "use); allowed: "),
    (["doctor", "--fast"], "saelab doctor: --fast is not valid; allowed: no arguments"),
    (["evaluate"], "saelab: command 'evaluate' is not valid; allowed: doctor, prepare, train"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory with a one-trial study in ``optuna.db`` and a port that is taken."""
    d = tmp_path_factory.mktemp("errors")
    study = open_study(StudyConfig(name="s", storage=f"sqlite:///{d}/optuna.db"))
    t = study.ask()
    t.suggest_int("sae.k", 16, 64)
    study.tell(t, [0.1, 0.0])
    busy = socket.create_server(("127.0.0.1", 0))
    yield d, busy.getsockname()[1]
    busy.close()


def run(argv, cwd: Path, **env):
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    base.update(SAELAB_OUTPUTS=str(cwd / "out"), SAELAB_ACT_CACHE=str(cwd / "cache"), **env)
    t = time.perf_counter()
    p = subprocess.run([SAELAB, *argv], cwd=cwd, env=base, capture_output=True, text=True,
                       timeout=120)
    return p, time.perf_counter() - t


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line(workdir, argv, expected):
    d, port = workdir
    fill = {"DB": f"sqlite:///{d}/optuna.db", "NONE": f"sqlite:///{d}/none.db", "BUSY": str(port)}
    p, seconds = run([fill.get(a, a) for a in argv], d)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert expected in lines[0], lines[0]
    assert not (d / "cache").exists() and not (d / "out/cache").exists()  # nothing captured
    assert not (d / "none.db").exists()
    print(f"{seconds:.2f}s  {lines[0][:100]}")


def test_hydra_full_error_keeps_the_traceback(workdir):
    d, _ = workdir
    p, _ = run(["train", "sae.k=0"], d, HYDRA_FULL_ERROR="1")
    assert p.returncode == 1
    assert "Traceback" in p.stderr and "ValueError: sae.k=0 is not valid" in p.stderr
