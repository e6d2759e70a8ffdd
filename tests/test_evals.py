"""Downstream metrics on the real default model: against a direct computation (the model
run by hand with the component replaced, numpy cross-entropy and KL), known cases (an
exact identity SAE, a zero reconstruction), the cached baseline and the trial's metrics."""

from __future__ import annotations

import json

import saelab  # noqa: F401  (before mlx)
import mlx.core as mx
import numpy as np
import pytest

from saelab.config import DataConfig, SAEConfig
from saelab.data import load_texts
from saelab.evals import (DOWNSTREAM_METRICS, Baseline, EvalSet, cached_baseline,
                          compute_baseline, downstream_metrics, eval_set)
from saelab.sae import SAE

pytestmark = pytest.mark.slow  # loads the default model

D = 576


@pytest.fixture(scope="module")
def model():
    from saelab import InterpretableModel

    return InterpretableModel("smollm2_135m")


@pytest.fixture(scope="module")
def es(model):
    # two documents: a short one (BOS, then padding) and a long one cut into full sequences
    texts = ["A short document that ends well before the context is full of tokens.",
             load_texts(DataConfig())[3]]
    s = eval_set(model.tokenizer, texts, 24, 3)
    assert (~s.mask).sum() > len(s.tokens)  # BOS and padding are both present
    return s


def identity_sae() -> SAE:
    """An exact identity: codes relu(x), relu(-x) (k = d_hidden keeps both), decoded by
    +I and -I; every sum has one nonzero term, so decode(encode(x)) == x bit for bit."""
    sae = SAE(D, 2 * D, 2 * D, normalize_input=False)
    sae.W_enc = mx.concatenate([mx.eye(D), -mx.eye(D)])
    sae.W_dec = sae.W_enc
    return sae


def random_sae(model, layer: int, component: str) -> SAE:
    sae = SAE(D, 4 * D, 16, seed=1)
    act = model.trace("Calibrate the input scale on a sentence.").activations[
        f"model.layers.{layer}.{component}"]
    sae.input_scale = mx.array(float(np.sqrt(D / mx.mean(mx.sum(act ** 2, axis=-1)).item())))
    return sae


def direct(model, s: EvalSet, layer: int, component: str, recon) -> np.ndarray:
    """float64 log-probabilities [n, T, V], the model run block by block by hand."""
    x = model.model.model.embed_tokens(mx.array(s.tokens))
    m = mx.array(s.mask)[..., None]
    swap = (lambda a: a) if recon is None else (lambda a: mx.where(m, recon(a), a))
    for i, block in enumerate(model.model.layers):
        if i != layer:
            x = block(x, mask="causal")
            continue
        a = block.self_attn(block.input_layernorm(x), mask="causal")
        h = x + (swap(a) if component == "attn" else a)
        r = block.mlp(block.post_attention_layernorm(h))
        x = h + (swap(r) if component == "mlp" else r)
        x = swap(x) if component == "output" else x
    z = np.asarray(model.final_norm(x) @ model.unembedding().T, dtype=np.float64)
    return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        z.max(-1, keepdims=True)


def ce(logp: np.ndarray, s: EvalSet) -> float:
    t = s.targets
    nxt = s.tokens[:, 1:][t]
    return float(-logp[:, :-1][t][np.arange(t.sum()), nxt].mean())


@pytest.mark.parametrize("layer,component", [(3, "mlp"), (0, "attn")])
def test_metrics_match_a_direct_computation(model, es, layer, component):
    sae = random_sae(model, layer, component)
    got = downstream_metrics(model, sae, layer, component,
                             compute_baseline(model, layer, component, es))
    clean = direct(model, es, layer, component, None)
    spliced = direct(model, es, layer, component, sae)
    ablated = direct(model, es, layer, component, mx.zeros_like)
    t = es.targets
    p = np.exp(clean[:, :-1][t])
    kl = float((p * (clean[:, :-1][t] - spliced[:, :-1][t])).sum(-1).mean())
    want = {"val/ce_loss_clean": ce(clean, es), "val/ce_loss_spliced": ce(spliced, es),
            "val/ce_loss_ablated": ce(ablated, es)}
    want["val/delta_lm_loss"] = want["val/ce_loss_spliced"] - want["val/ce_loss_clean"]
    want["val/ce_loss_score"] = ((want["val/ce_loss_ablated"] - want["val/ce_loss_spliced"]) /
                                 (want["val/ce_loss_ablated"] - want["val/ce_loss_clean"]))
    want["val/kl_div"] = kl
    assert set(got) == set(DOWNSTREAM_METRICS)
    for k in DOWNSTREAM_METRICS:
        assert got[k] == pytest.approx(want[k], rel=1e-3, abs=2e-4), k
    assert got["val/kl_div"] > 1e-3 and got["val/delta_lm_loss"] != 0  # the splice did something


def test_identity_and_zero_reconstructions(model, es):
    base = compute_baseline(model, 5, "output", es)
    ident = downstream_metrics(model, identity_sae(), 5, "output", base)
    assert ident["val/delta_lm_loss"] == 0.0 and ident["val/ce_loss_score"] == 1.0
    assert abs(ident["val/kl_div"]) < 1e-5
    zero = downstream_metrics(model, mx.zeros_like, 5, "output", base)
    assert zero["val/ce_loss_spliced"] == base.ablated_ce and zero["val/ce_loss_score"] == 0.0
    assert base.ablated_ce > base.clean_ce + 1.0  # removing the residual stream hurts a lot
    # a non-linear head would take the clean pass again: same numbers
    other = Baseline(**{**base.__dict__, "expected_unembed": np.zeros((0, D), np.float32)})
    assert not other.linear_head
    again = downstream_metrics(model, random_sae(model, 5, "output"), 5, "output", other)
    first = downstream_metrics(model, random_sae(model, 5, "output"), 5, "output", base)
    assert again == pytest.approx(first, rel=1e-4, abs=1e-5)


def test_baseline_is_computed_once(model, es, tmp_path):
    calls = []

    def make():
        calls.append(1)
        return es

    path = tmp_path / "downstream" / "key"
    first = cached_baseline(path, make, model, 2, "mlp", {"what": "test"})
    second = cached_baseline(path, make, model, 2, "mlp", {"what": "test"})
    assert len(calls) == 1
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["what"] == "test" and info["clean_ce"] == first.clean_ce == second.clean_ce
    for k in ("tokens", "mask", "prefix", "neg_entropy", "expected_unembed"):
        assert np.array_equal(getattr(first, k), getattr(second, k)), k
    assert second.prefix.shape == (*es.tokens.shape, D)


class Ends:
    def __init__(self):
        self.final = None

    def on_start(self, config): ...
    def on_log(self, step, metrics): ...
    def on_eval(self, step, metrics): ...

    def on_end(self, metrics):
        self.final = dict(metrics)


def test_trial_metrics_and_shared_baseline(model, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_OUTPUTS", str(tmp_path / "outputs"))
    texts = load_texts(DataConfig())[:40]
    cfg = SAEConfig(expansion_factor=2, k=8, num_epochs=1, batch_size=256, downstream_sequences=2)
    ends = Ends()
    sae = model.train_sae(layer=1, dataset=texts, config=cfg, max_tokens=3000, context_length=64,
                          callbacks=[ends])
    metrics = sae.metadata["metrics"]
    assert ends.final == metrics  # the callbacks' on_end saw the downstream metrics
    for k in DOWNSTREAM_METRICS:
        assert np.isfinite(metrics[k]), k
    assert metrics["val/delta_lm_loss"] == pytest.approx(
        metrics["val/ce_loss_spliced"] - metrics["val/ce_loss_clean"])
    assert metrics["time/downstream_s"] > 0
    files = list((tmp_path / "outputs" / "cache" / ".downstream").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["n_sequences"] == 2
    stamp = files[0].stat().st_mtime_ns
    other = model.train_sae(layer=1, dataset=texts, config=SAEConfig(
        expansion_factor=2, k=4, num_epochs=1, batch_size=256, downstream_sequences=2),
        max_tokens=3000, context_length=64)
    assert files[0].stat().st_mtime_ns == stamp  # the second trial reused the baseline
    assert other.metadata["metrics"]["val/ce_loss_clean"] == metrics["val/ce_loss_clean"]
    off = model.train_sae(layer=1, dataset=texts, config=SAEConfig(
        expansion_factor=2, k=4, num_epochs=1, batch_size=256, downstream_eval="off"),
        max_tokens=3000, context_length=64)
    assert not set(DOWNSTREAM_METRICS) & set(off.metadata["metrics"])


def test_downstream_sweep_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.config import StudyConfig
    from saelab.configs import register_configs, trial_from_dict
    from saelab.configs import conf_dir
    from saelab.search_space import parse_search_space, validate_search_space

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=downstream"])
    task = OmegaConf.to_container(cfg, resolve=True)
    study = StudyConfig(**task["study"])
    assert study.objectives == ["val/delta_lm_loss", "val/l0"]
    assert trial_from_dict(task).sae.downstream_eval == "end"
    space = parse_search_space(study.params, [])
    assert validate_search_space(task, space, groups=["model", "sae"]) >= 2


class Evals(Ends):
    def __init__(self):
        super().__init__()
        self.evals = []

    def on_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))


def test_downstream_at_every_evaluation(model, tmp_path, monkeypatch):
    from wandb_offline import read_run

    monkeypatch.setenv("SAELAB_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    texts = load_texts(DataConfig())[:40]
    cfg = SAEConfig(expansion_factor=2, k=8, num_epochs=1, batch_size=256, eval_every=4,
                    downstream_sequences=1, downstream_eval="every", use_wandb=True)
    rec = Evals()
    sae = model.train_sae(layer=1, dataset=texts, config=cfg, max_tokens=3000, context_length=64,
                          callbacks=[rec])
    steps = [s for s, _ in rec.evals]
    assert len(steps) >= 3 and steps[-1] == sae.metadata["training_steps"]
    for _, m in rec.evals:  # each evaluation has its own downstream metrics
        assert set(DOWNSTREAM_METRICS) <= set(m)
        assert m["val/delta_lm_loss"] == pytest.approx(m["val/ce_loss_spliced"]
                                                       - m["val/ce_loss_clean"])
    assert len({m["val/ce_loss_spliced"] for _, m in rec.evals}) == len(steps)  # weights moved
    assert len({m["val/ce_loss_clean"] for _, m in rec.evals}) == 1
    final = sae.metadata["metrics"]
    assert rec.final == final
    for k in DOWNSTREAM_METRICS:  # the final values are the last evaluation's, not recomputed
        assert final[k] == rec.evals[-1][1][k], k
    assert final["time/downstream_s"] > 0
    run = read_run(next((tmp_path / "outputs" / "wandb").glob("offline-run-*")))
    logged = {h["_step"]: h["val/ce_loss_score"] for h in run["history"]
              if "val/ce_loss_score" in h}
    assert logged == pytest.approx({s: m["val/ce_loss_score"] for s, m in rec.evals})
