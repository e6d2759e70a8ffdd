"""TracedModel.trace on the real default model: names, shapes, identities, early stop."""

import saelab  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
import pytest

from saelab.trace import TracedModel
from saelab.names import ActivationNameError, activation_name

pytestmark = pytest.mark.slow  # loads the default model

TEXTS = ["The capital of France is", "Sparse autoencoders decompose activations into features."]


@pytest.fixture(scope="module")
def model():
    return TracedModel()


def close(a, b, tol=1e-4):
    scale = max(1.0, mx.abs(b).max().item())
    return mx.abs(a - b).max().item() <= tol * scale


def test_guide_usage_shapes_and_mask(model):
    assert (model.n_layers, model.d_model) == (30, 576)
    with model.trace(TEXTS) as trace:
        pass
    lengths = [len(model.tokenizer.encode(t)) for t in TEXTS]
    batch, seq = len(TEXTS), max(lengths)
    assert trace.tokens.shape == trace.mask.shape == (batch, seq)
    assert trace.mask.sum(axis=1).tolist() == lengths
    for comp in ("mlp", "attn", "output"):
        assert trace.activations[activation_name(10, comp)].shape == (batch, seq, 576)
    assert trace.logits.shape == (batch, seq, 49152) and trace.output is not None
    assert len(trace.activations) == 90
    # Next token after the prompt, from the traced logits.
    last = lengths[0] - 1
    assert model.tokenizer.decode([trace.logits[0, last].argmax().item()]).strip() == "Paris"


def test_names_and_aliases(model):
    trace = model.trace("Hello world")
    acts = trace.activations
    assert acts["model.layers.4.self_attn"] is acts["model.layers.4.attn"]
    assert acts["model.layers.4"] is acts["model.layers.4.output"] is acts["model.layers.4.resid"]
    assert activation_name(3, "residual") == "model.layers.3.output"
    assert "model.layers.29.mlp" in acts and "model.layers.30.mlp" not in acts


def test_residual_stream_identities(model):
    """output_N = output_{N-1} + attn_N + mlp_N, and layer N+1 applied to output_N is output_{N+1}."""
    trace = model.trace(TEXTS[1])
    acts = trace.activations
    embed = model.model.model.embed_tokens(trace.tokens)
    for n in (0, 7, 29):
        before = embed if n == 0 else acts[activation_name(n - 1, "output")]
        summed = before + acts[activation_name(n, "attn")] + acts[activation_name(n, "mlp")]
        assert close(summed, acts[activation_name(n, "output")])
    recomputed = model.model.layers[8](acts["model.layers.7.output"], mask="causal")
    assert close(recomputed, acts["model.layers.8.output"])
    assert not close(acts["model.layers.7.output"], acts["model.layers.8.output"])


def test_capture_list_stops_early_and_matches_full_pass(model):
    names = ["model.layers.2.attn", "model.layers.5.mlp", "model.layers.5.output"]
    trace = model.trace(TEXTS, capture=names)
    assert sorted(trace.activations) == sorted(names)
    with pytest.raises(RuntimeError, match="stopped after the captured"):
        trace.logits
    with pytest.raises(ValueError, match=r"'model.layers.6.mlp' was not captured"):
        trace.activations["model.layers.6.mlp"]
    full = model.trace(TEXTS).activations
    for name in names:
        assert mx.array_equal(trace.activations[name], full[name]).item()


def test_right_padding_leaves_real_tokens_unchanged(model):
    short, long = "Hi there", "A much longer sentence that forces padding of the short one."
    batched = model.trace([short, long], capture=["model.layers.12.output"])
    alone = model.trace(short, capture=["model.layers.12.output"])
    n = alone.tokens.shape[1]
    assert batched.mask[0].sum().item() == n and not batched.mask[0, n:].any().item()
    assert close(batched.activations["model.layers.12.output"][0, :n],
                 alone.activations["model.layers.12.output"][0])


def test_token_id_inputs(model):
    ids = np.array(model.tokenizer.encode(TEXTS[0]), dtype=np.int64)
    by_text = model.trace(TEXTS[0], capture=["model.layers.1.mlp"]).activations["model.layers.1.mlp"]
    for inputs in (ids, mx.array(ids[None])):
        trace = model.trace(inputs, capture=["model.layers.1.mlp"])
        assert trace.mask.all().item() and trace.tokens.shape == (1, len(ids))
        assert mx.array_equal(trace.activations["model.layers.1.mlp"], by_text).item()


def test_bad_names_and_inputs_are_clear(model):
    trace = model.trace("x", capture=["model.layers.0.mlp"])
    with pytest.raises(ValueError, match=r"layer 30 is out of range; valid layers: 0\.\.29"):
        model.trace("x", capture=["model.layers.30.mlp"])
    with pytest.raises(ValueError, match=r"'model.layers.3.ffn' is not valid; valid names: .*mlp"):
        trace.activations["model.layers.3.ffn"]
    with pytest.raises(KeyError):  # Mapping semantics: .get() and `in` work
        trace.activations["layers.3"]
    assert trace.activations.get("nonsense") is None
    with pytest.raises(ValueError, match="component='ffn' is not valid; allowed: mlp, attn"):
        activation_name(3, "ffn")
    with pytest.raises(ValueError, match="capture=\\[\\] is empty"):
        model.trace("x", capture=[])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\)"):
        model.trace(np.array([[1, 49152]]))
    with pytest.raises(ValueError, match="integer array"):
        model.trace(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="encode to no tokens"):
        model.trace(["fine", ""])
    assert issubclass(ActivationNameError, ValueError)


def test_model_still_works_outside_a_trace(model):
    import mlx_lm

    # The recording subclasses keep parameter names and call straight through.
    names = {k for k, _ in tree_flatten(model.model.parameters())}
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "Paris" in mlx_lm.generate(model.model, model.tokenizer, "The capital of France is",
                                      max_tokens=6)


def test_trace_is_deferred_and_interventions_replace_outputs(model):
    name = "model.layers.6.mlp"
    with model.trace(TEXTS[0]) as trace:
        assert not trace.ran  # nothing runs inside the block...
        trace.intervene(name, lambda a: a * 0)
        output = model.output.save()
    assert trace.ran  # ...until it exits
    assert not trace.activations[name].any().item()  # the replacement is what was recorded
    clean = model.trace(TEXTS[0])
    assert not mx.array_equal(clean.logits, trace.logits).item()
    assert mx.array_equal(output.value, trace.logits).item()
    assert np.asarray(output).shape == output.shape == tuple(trace.logits.shape)
    assert mx.array_equal(output[0, -1], trace.logits[0, -1]).item()
    # layers before the intervention are untouched, the ones after see the replacement
    assert mx.array_equal(trace.activations["model.layers.5.output"],
                          clean.activations["model.layers.5.output"]).item()
    before = clean.activations["model.layers.6.output"] - clean.activations[name]
    assert close(trace.activations["model.layers.6.output"], before)
    with pytest.raises(RuntimeError, match="already run"):
        trace.intervene(name, lambda a: a)


def test_output_save_needs_an_open_trace(model):
    with pytest.raises(RuntimeError, match=r"model.output is only available inside `with model"):
        model.output
    with model.trace("x") as outer:
        with model.trace(TEXTS[0]) as inner:
            saved = model.output.save()
        assert inner.ran and not outer.ran
        with pytest.raises(RuntimeError, match="has not run yet"):
            model.output.save().value
    assert saved.shape[1] == inner.tokens.shape[1]
    # an exception inside the block leaves the trace unrun and the model usable
    with pytest.raises(KeyError):
        with model.trace("x") as failed:
            raise KeyError("boom")
    assert not failed.ran and not model._open


def test_intervening_applies_to_plain_forward_passes(model):
    ids = model.tokenize(TEXTS[0])[0]
    plain = model.model(ids)
    with model.intervening({"model.layers.3.output": [lambda a: a + 1.0]}):
        shifted = model.model(ids)
    assert not mx.allclose(plain, shifted).item()
    assert mx.array_equal(model.model(ids), plain).item()  # off again after the block


def test_prompt_longer_than_the_context_is_clear(model):
    limit = model.context_length
    assert limit == 8192
    with pytest.raises(ValueError, match=r"inputs is 8193 tokens long; allowed: at most the "
                                         r"model's context of 8192 tokens"):
        model.trace(np.ones((1, limit + 1), dtype=np.int32))
