"""The guide's Phase 2 on a real SAE of the default model's last MLP (where a feature's
logit effect is its direct path): analyze_text, the one-pass feature index against a
brute-force encoding, visualize_feature, steering inside a deferred trace, steered
generation, clear errors, the dashboard in headless Chromium, `saelab eval`/`features`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from saelab import SAEConfig
from saelab.analysis import check_model, feature_index, logit_effect
from saelab.cli import main as cli
from saelab.config import DataConfig, TrialConfig
from saelab.data import load_texts, pack_documents
from saelab.evals import DOWNSTREAM_METRICS

pytestmark = pytest.mark.slow  # loads the default model, trains SAEs
LAYER = 29
TRIAL_LAYER = 2  # the `saelab eval` / cached-corpus SAE: the capture's forward stops here
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phase2")
    old = os.environ.get("SAELAB_OUTPUTS")
    os.environ["SAELAB_OUTPUTS"] = str(root / "outputs")
    yield root
    if old is None:
        os.environ.pop("SAELAB_OUTPUTS")
    else:
        os.environ["SAELAB_OUTPUTS"] = old


@pytest.fixture(scope="module")
def model():
    from saelab import InterpretableModel

    return InterpretableModel("smollm2_135m")


@pytest.fixture(scope="module")
def texts():
    return load_texts(DataConfig())[:40]


@pytest.fixture(scope="module")
def sae(model, texts, outputs):
    # the steering test's "a promoted token is generated" holds for this SAE, trained with
    # the constant rate; on the linear-decay default's SAE its top feature's promoted tokens
    # do not come up in 8 tokens (the masses still rise with the strength)
    cfg = SAEConfig(expansion_factor=4, k=32, num_epochs=2, batch_size=256, downstream_eval="off",
                    learning_rate=1e-3, lr_decay="constant")
    return model.train_sae(layer=LAYER, dataset=texts, config=cfg, max_tokens=2000,
                           context_length=64, save_path=str(outputs / "sae.mlx"))


@pytest.fixture(scope="module")
def few(texts):
    return [t[:600] for t in texts[:8]]  # ~1.2k tokens, each traced to the last layer twice


def test_analyze_text_lists_each_tokens_strongest_features(model, sae):
    prompt = "Artificial intelligence is transforming society"
    top = sae.analyze_text(model, prompt=prompt, top_k=10)
    ids = model.tokenizer.encode(prompt)
    assert [t.token for t in top] == [model.tokenizer.decode([i]) for i in ids]
    codes = np.array(sae.encode(model.trace(prompt).activations[f"model.layers.{LAYER}.mlp"]))[0]
    for (_, feats), row in zip(top, codes, strict=True):
        assert 0 < len(feats) <= 10
        values = [a for _, a in feats]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(row.max(), rel=1e-5)
        assert all(row[f] == pytest.approx(a, rel=1e-5) for f, a in feats)


def test_feature_index_matches_brute_force_and_lookups_are_instant(model, sae, few):
    index = feature_index(sae, few, model)  # one pass, saved beside the SAE
    saved = list(Path(sae._phase2.path).glob("features-*.npz"))
    assert len(saved) == 1
    packed = pack_documents(model.tokenizer, few, 128, 10**15)
    name = f"model.layers.{LAYER}.mlp"
    acts = np.concatenate([np.array(model.trace(mx.array(packed.tokens[i:i + 8]),
                                                capture=[name]).activations[name])[
        packed.mask[i:i + 8]] for i in range(0, len(packed.tokens), 8)])
    codes = np.array(sae.encode(mx.array(acts)))
    assert index.n_tokens == len(codes)
    assert np.array_equal(index.counts, (codes > 0).sum(0))
    assert np.allclose(index.top_values[:, 0], codes.max(0), rtol=1e-5, atol=1e-6)
    assert index.hist.sum() == (codes > 0).sum()

    f = int(np.argmax(index.counts))
    times = []
    for g in (f, *np.argsort(-index.counts)[1:5].tolist()):
        t0 = time.perf_counter()
        sae.get_top_activating_texts(feature_idx=g, dataset=few, top_k=20)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 0.05, times  # the goal; each lookup only reads the index
    top = sae.get_top_activating_texts(feature_idx=f, dataset=few, top_k=20)
    assert len(top) == 20 and [t.activation for t in top] == sorted(
        (t.activation for t in top), reverse=True)
    order = np.argsort(-codes[:, f], kind="stable")[:20]
    assert [t.activation for t in top] == pytest.approx(codes[order, f].tolist(), rel=1e-5)
    flat = np.flatnonzero(packed.mask.ravel())
    for t in top[:5]:
        row = int(np.searchsorted(flat, t.sequence * packed.tokens.shape[1] + t.position))
        assert codes[row, f] == pytest.approx(t.activation, rel=1e-5)
        assert f"[[{t.token}]]" in t.text and t.text == f"{t.before}[[{t.token}]]{t.after}"
        assert t.token == model.tokenizer.decode([int(packed.tokens[t.sequence, t.position])])
    # a fresh SAE object (another process, say) reads the saved index instead of recomputing
    again = model.load_sae(sae._phase2.path)
    assert again.get_top_activating_texts(feature_idx=f, dataset=few, top_k=3) == top[:3]


def test_visualize_feature(model, sae, few, tmp_path):
    f = int(np.argmax(feature_index(sae, few, model).counts))
    fig = sae.visualize_feature(feature_idx=f, model=model, dataset=few,
                                html_path=tmp_path / "f.html")
    kinds = [type(t).__name__ for t in fig.data]
    assert kinds == ["Bar", "Bar", "Table"]
    promoted, suppressed = logit_effect(sae, model, f)
    assert list(fig.data[1].x) == [v for _, v in [*reversed(suppressed), *reversed(promoted)]]
    assert promoted[0][1] > 0 > suppressed[0][1]
    assert f"Feature {f}: fires on" in fig.layout.title.text
    assert (tmp_path / "f.html").stat().st_size > 1_000_000  # plotly.js inlined


def promoted_mass(model, sae, f: int, strength: float) -> float:
    with model.trace("The weather today"):
        sae.steer(model=model, layer=LAYER, feature_idx=f, strength=strength)
        output = model.output.save()
    d = sae.decoder_weight[f] / sae.input_scale * model.model.model.norm.weight
    top = np.argsort(-np.array(model.unembedding() @ d))[:10]
    return float(np.array(mx.softmax(output.value[0, -1]))[top].sum())


def test_steering_shifts_the_next_token_toward_promoted_tokens(model, sae, few):
    f = int(np.argmax(feature_index(sae, few, model).counts))
    masses = [promoted_mass(model, sae, f, s) for s in (0.0, 2.0, 8.0)]
    assert masses[0] < masses[1] < masses[2] and masses[2] > 3 * masses[0], masses
    plain = model.generate("The weather today", max_tokens=8)
    steered = model.generate("The weather today", max_tokens=8, steer=[(sae, f, 30.0)])
    assert steered != plain
    assert model.generate("The weather today", max_tokens=8) == plain  # nothing left behind
    promoted = {t for t, _ in logit_effect(sae, model, f, k=20)[0]}
    assert any(t in steered for t in promoted), (steered, promoted)


def test_errors_are_one_clear_line(model, sae, few):
    for bad in (-1, sae.d_hidden, 1.5, True):
        with pytest.raises(ValueError, match=rf"feature_idx={bad!r} is not valid; allowed: an "
                                             rf"integer in 0\.\.{sae.d_hidden - 1}"):
            sae.get_top_activating_texts(feature_idx=bad, dataset=few)
    with pytest.raises(ValueError, match=r"model='smollm2_135m', layer=10 does not match the "
                                         r"SAE; allowed: .*layer 29"):
        with model.trace("x"):
            sae.steer(model=model, layer=10, feature_idx=0, strength=1.0)
    with pytest.raises(ValueError, match=r"model='other-model', layer=29 does not match"):
        check_model(sae, "other-model")
    with pytest.raises(ValueError, match=r"dataset with 0 items \(0 strings\) is not valid"):
        sae.get_top_activating_texts(feature_idx=0, dataset=[])
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens long; allowed: at most the "
                                         r"model's context of 8192 tokens"):
        sae.analyze_text(model, prompt=" a" * 9000, top_k=5)
    with pytest.raises(RuntimeError, match=r"sae.steer\(...\) is only available inside `with"):
        sae.steer(model=model, layer=LAYER, feature_idx=0, strength=1.0)
    with pytest.raises(ValueError, match=r"top_k=40 is not valid; allowed: an integer in 1\.\.32"):
        sae.analyze_text(model, prompt="x", top_k=40)


def test_dashboard_in_headless_chromium(model, sae, few, tmp_path, require_system):
    board = sae.launch_dashboard(model=model, dataset=few, port=0, block=False)
    try:
        def get(path: str) -> str:
            with urllib.request.urlopen(board.url + path, timeout=60) as r:
                return r.read().decode()

        index = feature_index(sae, few, model)
        page = get("")
        assert f"{sae.d_hidden} features match" in page
        dead = int((index.counts == 0).sum())
        assert f"{dead} features match" in get("?filter=dead")
        assert f"{sae.d_hidden - dead} features match" in get("?filter=alive")
        assert "1 features match" in get("?q=7") and "href='/feature/7'" in get("?q=7")
        f = int(np.argmax(index.counts))
        token = index.contexts(f, 1, model.tokenizer)[0].token.strip()
        found = get(f"?q={urllib.parse.quote(token)}")
        assert f"href='/feature/{f}'" in found
        rows = re.findall(r"<td>([\d.e+-]+)%</td>", get("?sort=freq_desc"))
        assert [float(r) for r in rows] == sorted((float(r) for r in rows), reverse=True)

        require_system("Chromium", CHROMIUM is not None, "apt-get install chromium")
        flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                 "--enable-logging=stderr", "--v=0", "--window-size=1200,1600",
                 "--virtual-time-budget=15000", "--dump-dom"]
        for path, want in (("", "features match"), (f"feature/{f}", 'class="plot-container plotly"')):
            dom = subprocess.run([*flags, board.url + path], capture_output=True, text=True,
                                 timeout=180)
            assert dom.returncode == 0 and want in dom.stdout, dom.stderr[-2000:]
            console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
            assert not console, console
    finally:
        board.stop()


def trial_config() -> TrialConfig:
    return TrialConfig(layer=TRIAL_LAYER, data=DataConfig(max_tokens=3000, context_length=64),
                       sae=SAEConfig(expansion_factor=2, k=16, num_epochs=1, batch_size=256,
                                     downstream_sequences=2))


@pytest.fixture(scope="module")
def trial_sae(outputs):
    from saelab.trial import run_trial

    return run_trial(trial_config(), output_dir=outputs / "trial", progress=False)


def test_top_texts_on_the_training_corpus_read_its_activation_cache(model, trial_sae):
    sae = model.load_sae(trial_sae.sae_path)
    index = feature_index(sae, None, model)  # dataset=None: the trial's cached corpus
    assert index.n_tokens == sae.metadata["train_activations"] + sae.metadata["val_activations"]
    f = int(np.argmax(index.counts))
    top = sae.get_top_activating_texts(feature_idx=f, top_k=3)
    name = f"model.layers.{TRIAL_LAYER}.mlp"
    for t in top:  # the cached rows line up with the re-packed sequences' tokens
        seq = index.tokens[t.sequence:t.sequence + 1]
        act = model.trace(mx.array(seq), capture=[name]).activations[name][0, t.position]
        assert float(sae.encode(act)[f]) == pytest.approx(t.activation, rel=2e-2)


def test_saelab_eval_reproduces_the_trial_and_fails_clearly(trial_sae, outputs, capsys):
    out = outputs / "eval.json"
    assert cli(["eval", trial_sae.sae_path, "--out", str(out), "--sequences", "2"]) == 0
    table = capsys.readouterr().out
    assert "val/delta_lm_loss" in table and "val/nmse" in table
    record = json.loads(out.read_text())
    got, trained = record["metrics"], trial_sae.metrics
    for k in ("val/nmse", "val/nmse_p99", "val/l0", "val/dead_fraction", *DOWNSTREAM_METRICS):
        assert got[k] == pytest.approx(trained[k], rel=1e-4, abs=1e-6), k

    text = outputs / "notes.txt"
    text.write_text("\n\n".join(load_texts(DataConfig())[50:56]))
    assert cli(["eval", trial_sae.sae_path, "data=files", f"data.paths=[{text}]",
                "data.max_tokens=1500", "--split", "all", "--sequences", "2"]) == 0
    assert "notes.txt (all documents" in capsys.readouterr().out

    bad = outputs / "mismatch.mlx"
    shutil.copytree(trial_sae.sae_path, bad)
    meta = json.loads((bad / "sae.json").read_text())
    meta["metadata"]["model_identity"] = "another-model"
    (bad / "sae.json").write_text(json.dumps(meta))
    short = outputs / "short.txt"
    short.write_text("tiny\n\nalso tiny\n")
    for args, message in (
            ([str(outputs / "nowhere")], "is not a saved SAE"),
            ([str(bad)], "does not match the SAE"),
            ([trial_sae.sae_path, "data=files", f"data.paths=[{short}]"], "leaves no document"),
            ([trial_sae.sae_path, "layer=3"], "override 'layer=3' is not valid")):
        assert cli(["eval", *args]) == 2
        err = capsys.readouterr().err.strip()  # progress bars may come first
        ours = [ln for ln in err.splitlines() if ln.startswith("saelab eval:")]
        assert len(ours) == 1 and message in ours[0] and err.endswith(ours[0]), err
    assert cli(["features", str(outputs / "nowhere")]) == 2
    assert "is not a saved SAE" in capsys.readouterr().err


def test_example_runs_every_phase2_snippet(tmp_path):
    env = {**os.environ, "SAELAB_OUTPUTS": str(tmp_path / "outputs")}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "sae_phase2.py"),
                        "--out", str(tmp_path / "phase2"), "--texts", "20"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for line in ("feature 1234 fires most on", "dashboard on http://127.0.0.1:8050/: HTTP 200",
                 "steered logits: (1, ", "steered generation:", "val/delta_lm_loss"):
        assert line in p.stdout, p.stdout[-3000:]


def test_export_adds_an_evaluation_table(trial_sae, outputs):
    import optuna
    from dataclasses import asdict

    from saelab.configs import trial_from_dict
    from saelab.export import export_study

    metrics = trial_sae.metrics
    config = json.loads(json.dumps(asdict(trial_config())))
    trial_from_dict(config)
    study = optuna.create_study(study_name="evalexport", directions=["minimize"] * 2)
    study.set_user_attr("objectives", ["val/delta_lm_loss", "val/l0"])
    study.add_trial(optuna.trial.create_trial(
        values=[metrics["val/delta_lm_loss"], metrics["val/l0"]], params={"sae.k": 16},
        distributions={"sae.k": optuna.distributions.CategoricalDistribution([16, 32])},
        user_attrs={"config": config, "metrics": metrics, "sae_path": trial_sae.sae_path}))
    summary = export_study(study, outputs / "export", study.trials, eval_data="", report=False)
    got = summary["exported"][0]["eval"]
    assert got["val/ce_loss_spliced"] == pytest.approx(metrics["val/ce_loss_spliced"], rel=1e-4)
    md = (outputs / "export" / "summary.md").read_text()
    assert "## Evaluation on `the training corpus`" in md and "val/kl_div" in md
