"""Real MLX training on small synthetic activations: sparse codes over a random
dictionary plus an offset (so b_dec matters), stored as float16."""

import itertools

import numpy as np
import pytest

import saelab  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from saelab.config import SAEConfig
from saelab.host_step import make_step
from saelab.steps import StepConsts, StepMetrics, _apply_update, reference_step
from saelab.kernels import _kernels, host_available
from saelab.train import (RESAMPLE_ENCODER_SCALE, Callback, StopTraining, TrainingDiverged,
                          init_sae, lr_schedule, resample_dead, train_sae_on_arrays)
from saelab.validate import Validator, validators

D = 64
META = {"model_name": "synthetic", "layer": 3, "component": "mlp"}


def synthetic(n: int, seed: int, atoms: int = 256, active: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dictionary = np.random.default_rng(99).normal(size=(atoms, D))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((n, atoms))
    chosen = np.argsort(rng.random((n, atoms)), axis=1)[:, :active]
    np.put_along_axis(codes, chosen, rng.exponential(1.0, (n, active)), axis=1)
    return (codes @ dictionary * 4 + 2.0).astype(np.float16)


TRAIN, VAL = synthetic(6000, 0), synthetic(1000, 1)


def small_cfg(**kw) -> SAEConfig:
    base = dict(expansion_factor=8, k=8, batch_size=256, num_epochs=2, log_every=5,
                dead_tokens_threshold=2000, learning_rate=3e-3)
    return SAEConfig(**{**base, **kw})


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.logs, self.evals, self.started, self.ended, self.aborted = [], [], None, None, None
        self.stop_at = stop_at

    def on_start(self, config):
        self.started = config

    def on_log(self, step, metrics):
        self.logs.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))
        if self.stop_at is not None and step >= self.stop_at:
            raise StopTraining(f"pruned at {step}")

    def on_end(self, metrics):
        self.ended = metrics

    def on_abort(self, reason):
        self.aborted = reason


@pytest.fixture(scope="module")
def trained():
    rec = Recorder()
    sae, metrics = train_sae_on_arrays(TRAIN, VAL, small_cfg(), metadata=META, callbacks=[rec],
                                       progress=False)
    return sae, metrics, rec


def test_loss_falls_and_metrics_named(trained):
    sae, metrics, rec = trained
    first, last = rec.logs[0][1], rec.logs[-1][1]
    assert last["train/loss"] < 0.8 * first["train/loss"]
    assert set(first) == {"train/loss", "train/recon_loss", "train/auxk_loss", "train/l1_loss",
                          "train/l0", "train/dead_fraction", "train/learning_rate",
                          "train/tokens"}
    assert set(rec.evals[-1][1]) == {"val/loss", "val/mse", "val/nmse", "val/nmse_p99",
                                     "val/explained_variance", "val/l0", "val/dead_fraction"}
    assert 7 <= len(rec.evals) <= 9  # ~8 evaluations by default
    assert rec.evals[-1][0] == 47 == metrics["train/steps"]  # ceil(2 * 6000 / 256)
    assert metrics["val/nmse"] < 0.5
    assert metrics["val/explained_variance"] == pytest.approx(1 - metrics["val/nmse"])
    assert rec.ended == metrics and rec.aborted is None
    assert rec.started["d_hidden"] == 512 and rec.started["layer"] == 3
    assert sae.metadata["training_tokens"] == 47 * 256
    assert sae.metadata["metrics"]["val/nmse"] == metrics["val/nmse"]


def test_val_metrics_match_direct_computation(trained):
    sae, metrics, _ = trained
    x = mx.array(VAL.astype(np.float32))
    err = np.array(mx.sum(mx.square(sae(x) - x), axis=1), dtype=np.float64)
    xv = VAL.astype(np.float64)
    nmse = err.sum() / np.sum((xv - xv.mean(0)) ** 2)
    assert metrics["val/nmse"] == pytest.approx(nmse, rel=1e-3)
    assert metrics["val/mse"] == pytest.approx(err.mean() / D, rel=1e-3)


def test_decoder_unit_norm_and_exact_l0(trained):
    sae, metrics, _ = trained
    norms = np.linalg.norm(np.array(sae.W_dec), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    values, _ = sae.encode_topk(mx.array(VAL.astype(np.float32)))
    assert (np.array(values > 0).sum(axis=1) == sae.k).all()
    assert metrics["val/l0"] == sae.k


def test_deterministic_for_fixed_seed():
    cfg = small_cfg(num_epochs=1, auxk=True, dead_tokens_threshold=256)
    a, _ = train_sae_on_arrays(TRAIN, VAL, cfg, metadata=META, progress=False)
    b, _ = train_sae_on_arrays(TRAIN, VAL, cfg, metadata=META, progress=False)
    c, _ = train_sae_on_arrays(TRAIN, VAL, small_cfg(num_epochs=1, seed=1), metadata=META,
                               progress=False)
    for (key, wa), (_, wb), (_, wc) in zip(*(tree_flatten(s.parameters()) for s in (a, b, c))):
        assert np.array_equal(np.array(wa), np.array(wb)), key
    assert not np.array_equal(np.array(a.W_enc), np.array(c.W_enc))


def _one_step_state(cfg, dead: int):
    sae = init_sae(TRAIN, cfg, META)
    params = dict(sae.trainable_parameters())
    tsf = np.zeros(sae.d_hidden, np.int32)
    tsf[np.random.default_rng(0).choice(sae.d_hidden, dead, replace=False)] = 10**6
    state = {"params": params, "m": {k: mx.zeros_like(p) for k, p in params.items()},
             "v": {k: mx.zeros_like(p) for k, p in params.items()}, "tsf": mx.array(tsf)}
    x = mx.array(TRAIN[:512].astype(np.float32)) * sae.input_scale
    return sae, state, x


@pytest.mark.parametrize("mode,dead,k_aux,tied,l1,k,tokens", [
    ("segment", 0, None, False, 0.0, 8, 512), ("segment", 5, None, False, 1e-3, 8, 512),
    ("segment", 40, None, False, 0.0, 8, 512), ("dense", 100, 96, False, 0.0, 8, 512),
    ("segment", 100, 96, True, 0.0, 8, 512), ("dense", 3, None, True, 1e-3, 8, 512),
    ("segment", 30, None, False, 0.0, 8, 301),  # odd batch: unequal token halves
    ("host", 0, None, False, 1e-3, 8, 512), ("host", 40, None, False, 0.0, 8, 301),
    ("host", 100, 96, False, 1e-3, 8, 512),  # more dead than k_aux: their top 96
    ("dense", 0, None, False, 0.0, 72, 256)])  # k * GATHER_RATIO > latents: dense decode
def test_fast_step_equals_reference(mode, dead, k_aux, tied, l1, k, tokens, require_system):
    if mode == "host":
        require_system("the C extension saelab._kernels", _kernels is not None,
                       "pip install -e . with a C compiler")
    cfg = small_cfg(k_aux=k_aux, tied_weights=tied, l1_coefficient=l1, gradient_clip=0.05, k=k)
    sae, state, x = _one_step_state(cfg, dead)
    x = x[:tokens]
    consts = StepConsts.from_config(cfg, D, sae.d_hidden, grad_mode=mode)
    lr, t = mx.array(1e-3), mx.array(1.0)
    ref_state, ref_out = reference_step(state, x, lr, t, dead, consts)
    fast_state, fast_out = make_step(consts)(state, x, lr, t, dead)
    ref_m, fast_m = StepMetrics.read(ref_out), StepMetrics.read(fast_out)
    assert np.allclose(fast_m, ref_m, rtol=1e-4, atol=1e-6), (fast_m, ref_m)
    assert ref_m.l0 == cfg.k
    if dead:
        assert ref_m.auxk > 0  # AuxK active
    for part in ("params", "m"):
        for key, ref in ref_state[part].items():
            ref, got = np.array(ref), np.array(fast_state[part][key])
            assert np.allclose(got, ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max()), (part, key)
    assert np.array_equal(np.array(ref_state["tsf"]), np.array(fast_state["tsf"]))


def _numpy_update(params, m, v, grads, lr, t, cfg):
    """The update the steps share, written plainly in float64: decoder-parallel
    gradient removed, global-norm clip, bias-corrected Adam, unit decoder rows."""
    (b1, b2), dec = cfg.adam_betas, "W_dec"
    g = {key: np.float64(a) for key, a in grads.items()}
    w = np.float64(params[dec])
    g[dec] = g[dec] - np.sum(g[dec] * w, axis=1, keepdims=True) * w
    norm = np.sqrt(sum(np.sum(a ** 2) for a in g.values()))
    g = {key: a * min(1.0, cfg.gradient_clip / (norm + 1e-6)) for key, a in g.items()}
    out = {}
    for key, a in g.items():
        m_new = b1 * np.float64(m[key]) + (1 - b1) * a
        v_new = b2 * np.float64(v[key]) + (1 - b2) * a ** 2
        step = lr * (m_new / (1 - b1 ** t)) / (np.sqrt(v_new / (1 - b2 ** t)) + 1e-8)
        out[key] = (np.float64(params[key]) - step, m_new, v_new)
    p_dec = out[dec][0]
    out[dec] = (p_dec / (np.linalg.norm(p_dec, axis=1, keepdims=True) + 1.1920929e-07),
                *out[dec][1:])
    return out


def test_update_is_projected_clipped_adam_with_unit_decoder():
    cfg = small_cfg(gradient_clip=0.5)
    sae, state, _ = _one_step_state(cfg, 0)
    consts = StepConsts.from_config(cfg, D, sae.d_hidden)
    rng = np.random.default_rng(0)
    for t in (1, 2, 3):  # bias correction changes with t; moments carry over
        grads = {key: mx.array(rng.normal(size=a.shape).astype(np.float32))
                 for key, a in state["params"].items()}
        want = _numpy_update(state["params"], state["m"], state["v"], grads, 1e-2, t, cfg)
        state = {**_apply_update(state, grads, mx.array(1e-2), mx.array(float(t)), consts),
                 "tsf": state["tsf"]}
        for key, (p, m, v) in want.items():
            for part, ref in (("params", p), ("m", m), ("v", v)):
                got = np.array(state[part][key])
                assert np.allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max()), \
                    (t, part, key)


def test_divergence_raises_before_any_sae():
    rec = Recorder()
    with pytest.raises(TrainingDiverged, match="learning_rate"):
        train_sae_on_arrays(TRAIN, VAL, small_cfg(learning_rate=1e10), metadata=META,
                            callbacks=[rec], progress=False)
    assert rec.aborted and "loss became" in rec.aborted and rec.ended is None


def test_non_finite_data_rejected():
    bad = TRAIN.copy()
    bad[17, 3] = np.inf
    with pytest.raises(ValueError, match="train contains non-finite"):
        train_sae_on_arrays(bad, VAL, small_cfg(), metadata=META, progress=False)
    with pytest.raises(ValueError, match="val contains non-finite"):
        train_sae_on_arrays(TRAIN, bad[:1000] * np.float16(np.nan), small_cfg(), metadata=META,
                            progress=False)


def test_callback_can_stop_training():
    rec = Recorder(stop_at=10)
    with pytest.raises(StopTraining, match="pruned at"):
        train_sae_on_arrays(TRAIN, VAL, small_cfg(eval_every=5), metadata=META,
                            callbacks=[rec], progress=False)
    assert [s for s, _ in rec.evals] == [5, 10] and rec.aborted == "pruned at 10"


def test_train_tokens_budget_and_schedule():
    cfg = small_cfg(train_tokens=1000, batch_size=100, warmup_steps=2, lr_decay="linear",
                    min_lr_ratio=0.1, decay_fraction=1.0, learning_rate=1.0)
    lrs = lr_schedule(cfg, 10)
    assert np.allclose(lrs[:3], [0.5, 1.0, 1.0]) and lrs[-1] == pytest.approx(0.1 + 0.9 / 8)
    assert lr_schedule(small_cfg(lr_decay="constant", warmup_fraction=0.0), 5).tolist() == \
        [3e-3] * 5
    cos = lr_schedule(small_cfg(warmup_fraction=0.1, lr_decay="cosine", min_lr_ratio=0.1,
                                decay_fraction=1.0), 100)
    assert cos[9] == pytest.approx(3e-3) and cos.min() >= 3e-4 - 1e-12
    wsd = lr_schedule(small_cfg(warmup_steps=2, lr_decay="linear", min_lr_ratio=0.0,
                                decay_fraction=0.2, learning_rate=1.0), 20)
    assert np.allclose(wsd[1:16], 1.0) and np.allclose(wsd[16:], [1, 0.75, 0.5, 0.25])
    _, m = train_sae_on_arrays(TRAIN[:300], VAL, cfg, metadata=META, progress=False)
    assert m["train/steps"] == 10 and m["train/tokens"] == 1000  # cycles 300 rows


def test_bad_inputs_rejected_early():
    with pytest.raises(ValueError, match="k=1000"):
        train_sae_on_arrays(TRAIN, VAL, small_cfg(k=1000, expansion_factor=1), metadata=META)
    with pytest.raises(ValueError, match="train has shape"):
        train_sae_on_arrays(TRAIN[0], VAL, small_cfg(), metadata=META)


def test_intermediate_evaluations_use_a_fixed_subset_and_the_final_one_all_rows(trained):
    sae, _, _ = trained
    scale, params = float(sae.input_scale.item()), dict(sae.trainable_parameters())
    part, final = validators(VAL, scale, 100)
    assert (part.n, final.n) == (100, len(VAL))
    rows = np.linspace(0, len(VAL) - 1, 100).round().astype(int)
    assert part(params, sae.k, 0.0) == Validator(VAL[rows], scale)(params, sae.k, 0.0)
    same = validators(VAL, scale, len(VAL))
    assert same[0] is same[1]  # a validation set no larger than eval_tokens: all rows every time
    rec, cfg = Recorder(), small_cfg(eval_every=5, eval_tokens=50)
    out, metrics = train_sae_on_arrays(TRAIN, VAL, cfg, metadata=META, callbacks=[rec],
                                       progress=False)
    seen = [m for _, m in rec.evals]
    whole = Validator(VAL, float(out.input_scale.item()))(dict(out.trainable_parameters()),
                                                          cfg.k, cfg.l1_coefficient)
    assert seen[-1] == whole and len(seen) >= 2
    for key in ("val/nmse", "val/l0", "val/dead_fraction"):
        assert metrics[key] == pytest.approx(whole[key], rel=1e-6)


def test_validator_chunks_padding_and_p99_match_numpy(trained):
    sae, _, _ = trained
    val = VAL[:999]  # chunks of 96 rows: the last one padded
    scale = float(sae.input_scale.item())
    params = dict(sae.trainable_parameters())
    small, whole = Validator(val, scale, max_chunk=96), Validator(val, scale)
    assert len(small.chunks) == 11 and small.chunks[0][0].shape == (96, D)
    got = small(params, sae.k, 1e-3)
    assert got == small(params, sae.k, 1e-3)  # buffers reused, nothing consumed
    if host_available():  # the C kernels' sums (used here) equal MLX's
        (err, err99), l0, l1, dead = small._mlx_sums(params, sae.k)
        (h_err, h_err99), h_l0, h_l1, h_dead = small._host_sums(params, sae.k)
        assert (h_l0, h_dead) == (l0, dead) and h_l1 == pytest.approx(l1, rel=1e-5)
        assert (h_err, h_err99) == pytest.approx((err, err99), rel=1e-5)
    for key, value in whole(params, sae.k, 1e-3).items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    x = mx.array(val.astype(np.float32))
    codes = np.array(sae.encode(x))
    err = np.array(mx.sum(mx.square(sae(x) - x), axis=1), dtype=np.float64)
    xv = val.astype(np.float64)
    norms = np.linalg.norm(xv, axis=1)
    low = norms <= np.quantile(norms, 0.99)
    tv = np.sum((xv - xv.mean(0)) ** 2)
    assert got["val/nmse"] == pytest.approx(err.sum() / tv, rel=1e-4)
    assert got["val/nmse_p99"] == pytest.approx(
        err[low].sum() / np.sum((xv[low] - xv[low].mean(0)) ** 2), rel=1e-4)
    assert got["val/mse"] == pytest.approx(err.mean() / D, rel=1e-4)
    assert got["val/l0"] == (codes > 0).sum() / len(val)
    assert got["val/dead_fraction"] == np.mean((codes > 0).sum(axis=0) == 0)
    assert got["val/loss"] == pytest.approx(
        got["val/nmse"] + 1e-3 * codes.sum() / len(val), rel=1e-4)


def test_resample_dead_reinitializes_rows_and_moments():
    cfg = small_cfg(auxk=False)
    sae, state, x = _one_step_state(cfg, 0)
    step = make_step(StepConsts.from_config(cfg, D, sae.d_hidden))
    for t in (1.0, 2.0):  # non-zero Adam moments everywhere
        state, _ = step(state, x, mx.array(1e-3), mx.array(t), 0)
    dead = np.sort(np.random.default_rng(3).choice(sae.d_hidden, 40, replace=False))
    tsf = np.full(sae.d_hidden, 7, np.int32)
    tsf[dead] = cfg.dead_tokens_threshold + 1
    state = {**state, "tsf": mx.array(tsf)}
    x = x.at[7].multiply(30.0)  # one token the SAE reconstructs far worse than the rest
    new, reborn = resample_dead(state, x, cfg.k, cfg.dead_tokens_threshold,
                                np.random.default_rng(0))
    assert np.array_equal(reborn, dead)
    alive = np.setdiff1d(np.arange(sae.d_hidden), dead)
    old_p = {key: np.array(a) for key, a in state["params"].items()}
    p = {key: np.array(a) for key, a in new["params"].items()}
    assert np.allclose(np.linalg.norm(p["W_dec"][dead], axis=1), 1.0, atol=1e-6)
    enc_norm = RESAMPLE_ENCODER_SCALE * np.linalg.norm(old_p["W_enc"][alive], axis=1).mean()
    assert np.allclose(p["W_enc"][dead], enc_norm * p["W_dec"][dead], rtol=1e-5, atol=1e-7)
    assert (p["b_enc"][dead] == 0).all()
    xc = np.array(x - state["params"]["b_dec"])
    xc /= np.linalg.norm(xc, axis=1, keepdims=True)
    cos = p["W_dec"][dead] @ xc.T  # each new decoder row is one sampled token's direction
    assert np.allclose(cos.max(axis=1), 1.0, atol=1e-5)
    assert np.isclose(cos[:, 7], 1.0, atol=1e-5).any()  # the high-loss token was drawn
    for part in ("m", "v"):
        for key in ("W_enc", "W_dec", "b_enc"):
            before, after = np.array(state[part][key]), np.array(new[part][key])
            assert (after[dead] == 0).all() and (before[dead] != 0).any(), (part, key)
            assert np.array_equal(after[alive], before[alive]), (part, key)
        assert np.array_equal(np.array(new[part]["b_dec"]), np.array(state[part]["b_dec"]))
    for key in old_p:
        rows = alive if old_p[key].shape[0] == sae.d_hidden else slice(None)
        assert np.array_equal(p[key][rows], old_p[key][rows]), key
    assert (np.array(new["tsf"])[dead] == 0).all()
    assert np.array_equal(np.array(new["tsf"])[alive], tsf[alive])
    same, none = resample_dead(new, x, cfg.k, cfg.dead_tokens_threshold, np.random.default_rng(0))
    assert same is new and len(none) == 0


def test_resampling_in_training_revives_latents_that_then_fire(monkeypatch):
    """Many latents die here (1,024 latents for 256 atoms, k 4, no AuxK). With resampling
    the loop re-initializes them (the real resample_dead, watched: reborn rows' moments
    and tokens-since-fired zeroed, decoder rows unit input directions), also in the run's
    second half, and the final SAE fires most of the latents it re-initialized."""
    import saelab.train as train_mod

    reborn, real = [], train_mod.resample_dead

    def watched(state, x, k, threshold, rng):
        new, dead = real(state, x, k, threshold, rng)
        for part in ("m", "v"):
            assert (np.array(new[part]["W_enc"])[dead] == 0).all()
        assert (np.array(new["tsf"])[dead] == 0).all()
        assert np.allclose(np.linalg.norm(np.array(new["params"]["W_dec"])[dead], axis=1), 1.0,
                           atol=1e-5)
        reborn.append(dead)
        return new, dead

    monkeypatch.setattr(train_mod, "resample_dead", watched)

    def run(**kw):
        rec = Recorder()
        cfg = small_cfg(expansion_factor=16, k=4, num_epochs=4, dead_tokens_threshold=1000,
                        auxk=False, lr_decay="constant", **kw)
        return (*train_sae_on_arrays(TRAIN[:3000], VAL, cfg, metadata=META, callbacks=[rec],
                                     progress=False), rec)
    _, neither, _ = run()
    assert not reborn and neither["val/dead_fraction"] > 0.15
    sae, resampled, rec = run(resample_every=5)
    total = rec.started["total_steps"]
    logged = {step: m["train/resampled"] for step, m in rec.logs}
    assert sum(logged.values()) == sum(map(len, reborn)) > 0
    assert any(n for step, n in logged.items() if step > total // 2)  # second half too
    assert len(reborn) == len(range(5, total - 5 + 1, 5))  # at every check with 5 steps left
    v, idx = (np.array(a) for a in sae.encode_topk(mx.array(TRAIN[:3000].astype(np.float32))))
    fires = np.unique(idx[v > 0])
    ever = np.unique(np.concatenate(reborn))
    assert np.isin(ever, fires).mean() > 0.5  # training used the re-initialized latents
    # fewer dead (0.165 vs 0.207 measured: at a constant 3e-3 many reborn latents die
    # again) and a far better reconstruction (nmse 0.34 vs 0.47)
    assert resampled["val/dead_fraction"] < 0.9 * neither["val/dead_fraction"]
    assert resampled["val/nmse"] < 0.85 * neither["val/nmse"]


def test_resample_dead_tied_weights_unit_rows():
    cfg = small_cfg(auxk=False, tied_weights=True)
    sae, state, x = _one_step_state(cfg, 30)
    state, _ = make_step(StepConsts.from_config(cfg, D, sae.d_hidden))(
        state, x, mx.array(1e-3), mx.array(1.0), 30)
    state["tsf"] = _one_step_state(cfg, 30)[1]["tsf"]  # 30 dead latents
    new, reborn = resample_dead(state, x, cfg.k, cfg.dead_tokens_threshold,
                                np.random.default_rng(0))
    assert len(reborn) == 30 and "W_dec" not in new["params"]
    assert np.allclose(np.linalg.norm(np.array(new["params"]["W_enc"])[reborn], axis=1), 1.0,
                       atol=1e-6)
    assert (np.array(new["m"]["W_enc"])[reborn] == 0).all()
    assert (np.array(new["v"]["b_enc"])[reborn] == 0).all()


def test_dead_latents_sweep_composes():
    """sweeps/dead_latents.yaml: the reference recipe, a 2 x 2 grid over AuxK and
    resampling, each point composed from the overrides a trial of the study gets."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.config import StudyConfig
    from saelab.configs import conf_dir, register_configs, trial_from_dict
    from saelab.search_space import (grid_of, parse_search_space, trial_overrides,
                                     validate_search_space)

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        task = OmegaConf.to_container(compose(config_name="config",
                                              overrides=["sweep=dead_latents"]), resolve=True)
        study = StudyConfig(**task["study"])
        space = parse_search_space(study.params, [])
        assert grid_of(space) == {"sae": ["topk", "resample"], "sae.auxk": [True, False]}
        assert validate_search_space(task, space, groups=["model", "sae"]) == 2
        got = {}
        for preset, auxk in itertools.product(["topk", "resample"], [True, False]):
            point = {"sae": preset, "sae.auxk": auxk}
            got[preset, auxk] = trial_from_dict(OmegaConf.to_container(compose(
                config_name="config", overrides=["sweep=dead_latents",
                                                 *trial_overrides(space, point)]), resolve=True))
    for (preset, auxk), cfg in got.items():
        assert cfg.sae.auxk == auxk and cfg.sae.train_tokens == 1_000_000
        assert cfg.sae.resample_every == (100 if preset == "resample" else None)
        assert (cfg.sae.expansion_factor, cfg.sae.k, cfg.sae.lr_decay) == (16, 32, "constant")
    base = trial_from_dict(task)
    assert (base.layer, base.component, base.data.max_tokens) == (10, "mlp", 400_000)
    assert (base.sae.expansion_factor, base.sae.k, base.sae.batch_size,
            base.sae.train_tokens, base.sae.lr_decay) == (16, 32, 1024, 1_000_000, "constant")
    assert study.sampler == "grid" and study.n_trials == 4
