"""`saelab export` and `saelab dashboard` on a real study: the session's `saelab sweep
sweep=smoke` study (tests/conftest.py: real Hydra, real Optuna on SQLite, real training
on the default model, tiny settings), shared with test_report.py and test_sweep.py."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import saelab  # noqa: F401  (before mlx.core)
import mlx.core as mx

from saelab.export import export_main
from saelab.sae import SAE
from saelab.selection import Rule, fmt_value, select_trials

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.slow]


def single_objective_copy(smoke, name: str) -> optuna.Study:
    """A single-objective (val/nmse) study in the same SQLite file, holding the real trials' records."""
    src = smoke.load()
    study = optuna.create_study(study_name=name, storage=smoke.storage, direction="minimize")
    study.set_user_attr("objectives", ["val/nmse"])
    for t in src.get_trials(states=(TrialState.COMPLETE,)):
        study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=t.user_attrs["metrics"]["val/nmse"],
            user_attrs=t.user_attrs))
    return study


def weights(path) -> dict:
    sae = SAE.load(path)
    return {k: np.array(v) for k, v in sae.parameters().items()}


def raw_activations(config: dict, env: dict, n: int = 256) -> np.ndarray:
    """Validation activations of the trial's (layer, component) from the study's activation cache."""
    from saelab.cache import ensure_activations
    from saelab.configs import trial_from_dict

    cfg = trial_from_dict(config)
    entry = ensure_activations(cfg.model, cfg.data, [(cfg.layer, cfg.component)],
                               root=env["SAELAB_ACT_CACHE"])[(cfg.layer, cfg.component)]
    split = entry.split(cfg.sae.validation_split, cfg.data.split_seed)
    return entry.validation(split, cfg.data.max_val_tokens)[:n]


def test_pareto_export_writes_everything_and_reruns(smoke, tmp_path, capsys):
    study = smoke.load()
    out = tmp_path / "export"
    assert export_main(["smoke", "--storage", smoke.storage, "--out", str(out), "--saelens"]) == 0
    printed = capsys.readouterr().out

    pareto = sorted(t.number for t in study.best_trials)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["number"] for r in summary["exported"]] == pareto
    assert summary["objectives"] == ["val/nmse", "val/dead_fraction"] and summary["n_complete"] == 4
    by_number = {t.number: t for t in study.trials}
    for r in summary["exported"]:
        t = by_number[r["number"]]
        assert r["params"] == t.params and r["metrics"] == t.user_attrs["metrics"]
        assert (out / r["config"]).is_file() and (out / r["saelens"] / "cfg.json").is_file()
        exported, original = weights(out / r["sae"]), weights(t.user_attrs["sae_path"])
        assert exported.keys() == original.keys()
        assert all(np.array_equal(exported[k], original[k]) for k in original)
    md = (out / "summary.md").read_text()
    assert all(f"| {n} | " in md for n in pareto) and "val/nmse" in md
    first = by_number[pareto[0]].user_attrs["metrics"]  # the shared formatter: 4 digits, whole as int
    assert f"| {fmt_value(first['val/nmse'])} |" in md and f"| {int(first['train/tokens'])} |" in md
    assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    runs = [t.user_attrs["wandb_run_dir"] for t in study.trials]
    sync = next(line for line in printed.splitlines() if "wandb sync" in line)
    assert all(r in sync for r in runs) and summary["wandb_sync"].split()[2:] == runs

    # the exported config re-runs as is, without the sweep file or conf/ groups
    n = pareto[0]
    rerun_out = tmp_path / "rerun_outputs"
    p = subprocess.run([sys.executable, "-m", "saelab.cli", "train", "--config-path", str(out),
                        "--config-name", f"trial_{n}"], cwd=tmp_path, capture_output=True, text=True,
                       env={**smoke.env, "SAELAB_OUTPUTS": str(rerun_out)}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run_dir,) = [d for d in (rerun_out / "runs").glob("*/*") if d.name.endswith(f"smoke-trial_{n}")]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    want = by_number[n].user_attrs["metrics"]
    assert metrics["val/nmse"] == pytest.approx(want["val/nmse"], rel=0.03)
    assert metrics["train/tokens"] == want["train/tokens"]
    assert SAE.load(run_dir / "sae.mlx").d_hidden == SAE.load(out / f"trial_{n}" / "sae.mlx").d_hidden


def test_saelens_export_reconstructs_raw_activations(smoke, tmp_path):
    """cfg.json + sae_weights.safetensors read the way SAELens 6.x reads them, and
    its TopK forward on raw activations (numpy) equals the saelab SAE's."""
    from safetensors.numpy import load_file

    study = smoke.load()
    out = tmp_path / "export"
    assert export_main(["smoke", "--storage", smoke.storage, "--out", str(out), "--saelens"]) == 0
    t = study.best_trials[0]
    sl_dir = out / "saelens" / f"trial_{t.number}"
    cfg = json.loads((sl_dir / "cfg.json").read_text())
    # TopKSAEConfig's fields in SAELens 6.x, plus the architecture key
    assert set(cfg) == {"architecture", "d_in", "d_sae", "k", "rescale_acts_by_decoder_norm", "dtype",
                        "device", "apply_b_dec_to_input", "normalize_activations",
                        "reshape_activations", "metadata"}
    assert cfg["architecture"] == "topk" and cfg["normalize_activations"] == "none"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # no legacy-config path
    assert cfg["metadata"]["hook_name"] == "blocks.10.hook_mlp_out"
    sae = SAE.load(t.user_attrs["sae_path"])
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (sae.d_model, sae.d_hidden, sae.k)

    w = load_file(str(sl_dir / "sae_weights.safetensors"))
    assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"]) and w["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
    assert all(v.dtype == np.float32 for v in w.values())

    x = raw_activations(t.user_attrs["config"], smoke.env)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens TopKSAE.encode, apply_b_dec_to_input
    idx = np.argpartition(-pre, cfg["k"] - 1, axis=-1)[:, : cfg["k"]]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    recon = codes @ w["W_dec"] + w["b_dec"]
    ours = np.array(sae(mx.array(x)))
    assert np.abs(recon - ours).max() <= 1e-4 * np.abs(ours).max()
    nmse = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert nmse == pytest.approx(t.user_attrs["metrics"]["val/nmse"], rel=0.05)

    # the real library, where a Python with sae-lens is given (it pulls torch: not in the project venv)
    python = os.environ.get("SAELAB_SAELENS_PYTHON")
    if not python:
        pytest.skip("SAELAB_SAELENS_PYTHON unset: set it to a Python with sae-lens installed to "
                    "also load the export with sae_lens.SAE.load_from_disk")
    np.savez(tmp_path / "xy.npz", x=x, y=ours)
    script = ("import sys, numpy as np, torch; from sae_lens import SAE\n"
              "d = np.load(sys.argv[2]); sae = SAE.load_from_disk(sys.argv[1])\n"
              "y = sae(torch.tensor(d['x'])).detach().numpy()\n"
              "print(type(sae).__name__, float(np.abs(y - d['y']).max() / np.abs(d['y']).max()))")
    p = subprocess.run([python, "-c", script, str(sl_dir), str(tmp_path / "xy.npz")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    kind, rel = p.stdout.split()[-2:]
    assert kind == "TopKSAE" and float(rel) < 1e-5


def test_single_objective_top_n_and_rules(smoke, tmp_path, capsys):
    study = single_objective_copy(smoke, "single")
    ranked = sorted(study.trials, key=lambda t: t.value)
    assert [t.number for t in select_trials(study, top=2)[0]] == [t.number for t in ranked[:2]]
    assert len(select_trials(study)[0]) == 3  # default top 3

    multi = smoke.load()
    lowest_dead = min(multi.trials, key=lambda t: t.user_attrs["metrics"]["val/dead_fraction"])
    bound = lowest_dead.user_attrs["metrics"]["val/dead_fraction"]
    (best,), how = select_trials(multi, rule=f"min val/nmse where val/dead_fraction<={bound}")
    assert best.number == lowest_dead.number and "rule" in how
    (most_dead,), _ = select_trials(multi, rule="max val/dead_fraction where sae.k >= 1")
    assert most_dead.number == max(multi.trials, key=lambda t: t.values[1]).number

    out = tmp_path / "export"
    assert export_main(["single", "--storage", smoke.storage, "--out", str(out), "--top", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["exported"][0]["number"] == ranked[0].number
    assert {p.name for p in out.iterdir()} == {f"trial_{ranked[0].number}.yaml", f"trial_{ranked[0].number}",
                                               "summary.json", "summary.md", "report.html"}

    for rule, bad in [("min val/nmse where val/dead_fraction=0.05", "'=0.05'"),
                      ("avg val/nmse", "'avg'"), ("min val/nmse and sae.k<3", "'and'"),
                      ("min val/nmse where sae.k <= big", "'big'"), ("min val/nmze", "'val/nmze'")]:
        with pytest.raises(ValueError, match=bad):
            select_trials(multi, rule=rule)
    with pytest.raises(ValueError, match="no finished trial satisfies"):
        select_trials(multi, rule="min val/nmse where val/dead_fraction<0")
    assert str(Rule.parse("min  val/nmse where val/l0<=32")) == "min val/nmse where val/l0<=32"


def test_errors_are_clear_and_write_nothing(smoke, tmp_path, capsys):
    out = tmp_path / "export"
    failed = optuna.create_study(study_name="nothing_done", storage=smoke.storage)
    failed.tell(failed.ask(), state=TrialState.FAIL)
    cases = [
        (["nope", "--storage", smoke.storage], "study='nope' is not in .*allowed: .*smoke"),
        (["smoke", "--storage", f"sqlite:///{tmp_path}/missing.db"], "does not exist"),
        (["smoke", "--storage", f"journal:///{tmp_path}/missing.log"], "does not exist"),
        (["nothing_done", "--storage", smoke.storage], "no finished .* trial.*FAIL"),
        (["smoke", "--storage", smoke.storage, "--top", "2"], "--top=2 is not valid for the multi"),
        (["smoke", "--storage", smoke.storage, "--rule", "min x"], "unknown name 'x'"),
    ]
    for argv, message in cases:
        before = sorted(tmp_path.rglob("*"))
        assert export_main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert sorted(tmp_path.rglob("*")) == before, argv  # nothing written (no empty db either)

    # a failing export leaves an earlier one intact
    assert export_main(["smoke", "--storage", smoke.storage, "--out", str(out)]) == 0
    first = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert export_main(["smoke", "--storage", smoke.storage, "--out", str(out), "--rule", "min y"]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == first
    # and a second export replaces the first whole
    assert export_main(["smoke", "--storage", smoke.storage, "--out", str(out),
                        "--rule", "min val/dead_fraction"]) == 0
    assert len(list(out.glob("trial_*.yaml"))) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_storage(smoke, tmp_path, capsys):
    from saelab.trials import dashboard_main

    assert dashboard_main(["smoke", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "none.db").exists()

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saelab.cli", "dashboard", "smoke", "--storage",
                             smoke.storage, "--port", str(port)], env=smoke.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer within 60 s"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert "smoke" in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)
