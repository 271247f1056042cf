"""The Attention Lens options, declared once: the lens parameterization (:class:`LensConfig`), the trainer's
configuration (:class:`LensTrainConfig`) and every ``headscope lens`` step's options (CLI flags, the study's
``[lens.*]`` keys, checks). A leaf module: it imports nothing of headscope but :mod:`headscope.options` and
:mod:`headscope.errors`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Optional

from simple_parsing import field
from simple_parsing.helpers import flag

from ..options import check, options_dict


CALIB_TOKENS = 512
"""Positions used to fit the scale (a single number per lens)."""


OBJECTIVES = ("fkl", "rkl", "ce", "fkl_shortlist")


KINDS = ("affine", "lowrank", "full")


SHARING = ("none", "layer", "all")


@dataclass(frozen=True)
class LensConfig:
    """The parameterization of a bank of lenses."""

    kind: Literal["affine", "lowrank", "full"] = "affine"
    """``affine``, ``lowrank`` or ``full`` (see module docstring)."""
    norm: bool = False
    """Apply the model's (frozen) final norm before the unembedding."""
    rank: int = 64
    """Rank of A for ``lowrank``."""
    vocab_bias: bool = flag(default=True, negative_prefix="--no-")
    """Learn the vocabulary bias c (affine/lowrank): lets the lens carry token base rates."""
    shared: Literal["none", "layer", "all"] = "none"
    """``none`` (one lens per head), ``layer`` (one per layer, shared by its heads) or ``all`` (one lens
    for every head); ``True``/``False`` mean ``layer``/``none``."""

    def __post_init__(self):
        check(self.kind in KINDS, f"unknown lens kind '{self.kind}' (choose from {', '.join(KINDS)})")
        if self.shared is True or self.shared is False:
            object.__setattr__(self, "shared", "layer" if self.shared else "none")
        check(self.shared in SHARING, f"unknown sharing '{self.shared}' (choose from {', '.join(SHARING)})")
        check(self.kind != "lowrank" or self.rank >= 1, f"lens rank must be at least 1, got {self.rank}")


INITS = ("lstsq", "identity", "base")


OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class LensTrainConfig:
    """The lens trainer's configuration: the closed-form start and the KL refinement (the training half of
    ``headscope lens train``'s options, one docstring per field)."""

    tokens: int = 4096
    """Training tokens of KL refinement after the closed-form start (0: the start alone). The default
    (8192 + 4096 tokens, Adam 3e-4) is the best measured CPU budget in docs/lens.md."""
    init: Literal["lstsq", "base", "identity"] = "lstsq"
    """``lstsq`` (closed-form least squares + scale calibration, see closed_form.py), ``base``
    (vocabulary bias at the log base rates, A = 0) or ``identity`` (step 0 = unembedding baseline)."""
    init_tokens: int = 8192
    """Tokens for the closed-form statistics (one pass, no gradients; costs about one model forward
    per token, shared by every head of every layer)."""
    calib_tokens: int = CALIB_TOKENS
    """Positions (of the statistics pass) on which each lens' scale is fitted by Newton's method on
    forward KL; costs heads · positions · vocabulary per Newton step (~7 min for 270 heads at 512)."""
    objective: Literal["fkl", "rkl", "ce", "fkl_shortlist"] = "fkl"
    """``fkl``, ``rkl``, ``ce`` or ``fkl_shortlist`` (see objectives.py)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """``adam`` or ``sgd`` (SGD with Nesterov momentum 0.9, as tuned-lens)."""
    lr: float = 3e-4
    """Learning rate of the refinement."""
    warmup: int = 1
    """Linear learning-rate warm-up steps (then linear decay to 0 at the last step)."""
    weight_decay: float = 0.0
    """Weight decay of the refinement."""
    clip: float = 1.0
    """Per-lens gradient-norm clip (each head is clipped on its own)."""
    batch_size: int = 8
    """Sequences per step per rank."""
    seq_len: int = 128
    """Tokens per sequence."""
    corpus: str = "default"
    """'default', a text file, a folder or a JSONL file (see headscope.data)."""
    chunk_tokens: int = 256
    """Positions per lens-logit chunk (memory: K·chunk_tokens·V floats)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the big logit matmul: ``float32`` or ``bfloat16`` (parameters stay float32)."""
    checkpoint_every: int = 50
    """Refinement steps between checkpoints."""
    seed: int = 0
    """Data and initialisation seed."""
    shortlist_top_k: int = 32
    """fkl_shortlist: the model's top tokens kept per position."""
    shortlist_negatives: int = 2048
    """fkl_shortlist: random negative tokens per step."""

    def __post_init__(self):
        check(self.init in INITS, f"unknown init '{self.init}' (choose from {', '.join(INITS)})")
        check(self.objective in OBJECTIVES,
              f"unknown objective '{self.objective}' (choose from {', '.join(OBJECTIVES)})")
        check(self.optimizer in OPTIMIZERS,
              f"unknown optimizer '{self.optimizer}' (choose from {', '.join(OPTIMIZERS)})")
        check(self.compute_dtype in ("float32", "bfloat16"),
              f"compute dtype must be float32 or bfloat16, got '{self.compute_dtype}'")
        check(self.calib_tokens >= 1, "--calib-tokens must be at least 1")
        for name in ("tokens", "init_tokens", "warmup", "checkpoint_every"):
            check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must not be negative")
        check(self.batch_size >= 1 and self.chunk_tokens >= 1 and self.lr > 0 and math.isfinite(self.lr),
              "batch size, chunk tokens and learning rate must be positive (and finite)")
        check(0 <= self.weight_decay < math.inf and 0 <= self.clip < math.inf,
              "--weight-decay and --clip must be finite numbers, 0 or more")
        check(self.seq_len >= 2 and self.shortlist_top_k >= 1 and self.shortlist_negatives >= 0,
              "--seq-len must be at least 2, --shortlist-top-k at least 1, --shortlist-negatives 0 or more")

    def steps(self, world_size: int = 1) -> int:
        """Refinement steps with ``world_size`` processes (each reads ``batch_size`` sequences a step)."""
        return math.ceil(self.tokens / (self.batch_size * self.seq_len * world_size)) if self.tokens else 0


@dataclass(frozen=True)
class TrainOptions(LensTrainConfig, LensConfig):
    """Trains a lens for every head asked for: a closed-form start (least squares on the model's own logits,
    per-head scale) refined by KL; resumable; torchrun-ready. The options are the lens parameterization
    (LensConfig) and the trainer's configuration (LensTrainConfig), declared once there, plus which heads."""

    layers: str = "all"
    """'all', '18', '1,4', '10-13', '-4'"""
    heads: str = "all"
    """head indices for every layer ('all', '0,3') or sites '20.3,21.*'"""

    def __post_init__(self):
        LensConfig.__post_init__(self)       # both parents' checks, before anything runs
        LensTrainConfig.__post_init__(self)

    def configs(self) -> tuple[LensConfig, LensTrainConfig]:
        """The (LensConfig, LensTrainConfig) pair the trainer takes."""
        d = options_dict(self)
        return (LensConfig(**{f.name: d[f.name] for f in fields(LensConfig)}),
                LensTrainConfig(**{f.name: d[f.name] for f in fields(LensTrainConfig)}))


@dataclass(frozen=True)
class EvalOptions:
    """Held-out KL of every lens against the unembedding baseline, the null lens and a control lens;
    information gain with SEs clustered by document; informative = one-sided test, BH q = 0.05."""

    tokens: int = 8192
    """held-out tokens, sampled across the held-out documents (position 0 left out)"""
    transfer_tokens: int = 0
    """tokens for the cross-head transfer matrix (0: skip)"""
    batch_size: int = 8
    """sequences per forward pass"""
    stride: int = 1
    """evaluate every stride-th position of each window: --tokens positions from tokens·stride window
    tokens, so as many documents for the SE at 1/stride of the lenses' cost"""
    baselines: bool = flag(default=True, negative_prefix="--no-")
    """also measure the unembedding baselines W_U·N(r_h) and W_U·r_h (d·V multiply-adds per head and
    position each, ~10× a lens that reads z): --no-baselines leaves kl_unembed/improvement empty"""

    def __post_init__(self):
        check(self.tokens >= 1, "--tokens must be at least 1")
        check(self.transfer_tokens >= 0, "--transfer-tokens must be 0 or more")
        check(self.batch_size >= 1, "--batch-size must be at least 1")
        check(self.stride >= 1, "--stride must be at least 1")


@dataclass(frozen=True)
class ShowOptions:
    """Per position, the top-k tokens of each head's lens next to the unembedding's."""

    prompt: str = field(positional=True)
    """the prompt"""
    heads: Optional[str] = None
    """sites '20.3,21.*' (default: every trained head)"""
    k: int = field(default=5, alias=["-k"])
    """tokens per position"""
    by: Literal["kl", "prob", "lift"] = "kl"
    """rank by the token's term q·log(q/q_null) of KL(lens ‖ null), by lens probability, or by lift"""
    show_uninformative: bool = False
    """also print heads that are not informative (BH q = 0.05)"""
    json: bool = False
    """print JSON"""

    def __post_init__(self):
        check(1 <= self.k <= 1000, f"-k {self.k}: use 1..1000")


@dataclass(frozen=True)
class ScanOptions:
    """How often each head's lens puts listed tokens in its top-k, against a frequency-matched control list
    (BH over heads); with --contrast, a prompt-set classifier scored by held-out AUROC against baselines."""

    token_list: str
    """file with one word per line (or builtin:injection_words)"""
    prompts: str
    """file with one prompt per line; '# source: NAME' lines group prompts for cross-validation (or
    builtin:injection)"""
    contrast: Optional[str] = None
    """second prompt file (or builtin:ordinary): a classifier separating the two sets, held-out AUROC with a
    CI next to bag-of-words, unembedding and random-head baselines"""
    k: int = field(default=10, alias=["-k"])
    """top-k"""
    multi_token: Literal["first", "skip"] = "first"
    """words that are not one token: use their first token, or skip them"""

    def __post_init__(self):
        check(1 <= self.k <= 1000, f"-k {self.k}: use 1..1000")


@dataclass(frozen=True)
class SteerOptions:
    """Adds a token direction to a head, or scales/ablates heads; generations before and after."""

    prompt: str = field(positional=True)
    """the prompt"""
    add: list[str] = field(default_factory=list)
    """L.H:TOKEN[:ALPHA] …: add TOKEN's direction (×ALPHA × the head's mean output norm, default 4) to head L.H"""
    scale: list[str] = field(default_factory=list)
    """L.H:ALPHA …: multiply head L.H's output"""
    ablate: list[str] = field(default_factory=list)
    """L.H …: zero head L.H"""
    from_lens: bool = False
    """use the lens' direction for the token instead of W_U's row (needs lenses in --out)"""
    new_tokens: int = 20
    """tokens to generate"""

    def __post_init__(self):
        check(1 <= self.new_tokens <= 4096, "--new-tokens must be in 1..4096")


@dataclass(frozen=True)
class SteerEvalOptions:
    """Steering through single heads, measured: target tokens × held-out prompts × heads × strengths, four
    directions (the token's unembedding row, the lens direction, a random direction of the same norm, and
    the unembedding row added to the residual stream at the residual stream's scale); success (Δ log₂ p of
    the target at the next position, its rate in the next tokens) against cost (KL on unrelated prompts,
    perplexity of the continuation under the clean model), CIs over tokens, BH over heads."""

    tokens: Optional[str] = None
    """file with one target word per line (default: the built-in list of concrete nouns)"""
    n_tokens: int = 16
    """target tokens drawn (seeded) from the single-token words of the list"""
    prompts: Optional[str] = None
    """file with one prompt per line (default: held-out windows of the lenses' corpus, one per document)"""
    n_prompts: int = 4
    """prompts the success is measured on"""
    n_cost_prompts: int = 2
    """unrelated prompts (other documents) the KL cost is measured on"""
    prompt_len: int = 16
    """tokens per held-out window prompt (after BOS)"""
    heads: Optional[str] = None
    """sites '18.6,17.4' (default: the informative heads of lens eval with the largest gain)"""
    max_heads: int = 3
    """heads taken from lens eval when --heads is not given"""
    strengths: list[float] = field(default_factory=lambda: [2.0, 8.0])
    """head edits: the vector's norm in units of the head's mean output norm on the prompts"""
    resid_strengths: list[float] = field(default_factory=lambda: [0.25, 1.0])
    """residual-stream reference: the vector's norm in units of the residual stream's mean norm there"""
    new_tokens: int = 4
    """greedy tokens generated per prompt (target rate, continuation perplexity)"""
    seed: int = 0
    """draw of tokens, prompts and random directions"""

    def __post_init__(self):
        check(2 <= self.n_tokens <= 10000, "--n-tokens must be in 2..10000 (the CI is over tokens)")
        check(1 <= self.n_prompts <= 10000, "--n-prompts must be in 1..10000")
        check(1 <= self.n_cost_prompts <= 10000, "--n-cost-prompts must be in 1..10000")
        check(2 <= self.prompt_len <= 4096, "--prompt-len must be in 2..4096")
        check(1 <= self.max_heads <= 100000, "--max-heads must be at least 1")
        check(len(self.strengths) >= 1 and all(s > 0 for s in self.strengths), "--strengths: give positive values")
        check(len(self.resid_strengths) >= 1 and all(s > 0 for s in self.resid_strengths),
              "--resid-strengths: give positive values")
        check(1 <= self.new_tokens <= 256, "--new-tokens must be in 1..256")
