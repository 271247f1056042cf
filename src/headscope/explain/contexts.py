"""Token contexts with highlighted tokens, the prompts that show them, and the back-end adapter.

A :class:`Context` is a window of token strings with the unit's activation on each; the tokens where it
is positive are the *activating* ones and are shown between ``<<`` and ``>>`` (delphi's convention).
The explainer sees highlighted max-activating contexts and random held-out contexts; a judge sees an
explanation and one context and answers Yes or No:

* ``detection``: the context without highlights — does the unit fire somewhere in it?
* ``fuzzing``: the context with some tokens highlighted — are those the tokens the explanation describes?
  (the real activating tokens, or as many random non-activating tokens of the same context).

Back-ends are adapted by :func:`feature_backend`: an object that already has ``explain_contexts`` and
``judge`` (the offline :class:`~headscope.explain.token_stats.TokenStatExplainer`) is used as it is; an
LLM back-end (``complete_many`` / ``p_yes_many`` of the OpenAI explainer, or the local HF model's greedy
generation and Yes/No logits) is wrapped by :class:`LLMContextBackend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SYSTEM = ("You are a careful interpretability researcher. You study one unit (a sparse-autoencoder feature "
          "or a neuron) of a language model and describe, from examples, the tokens on which it fires.")

EXPLAIN_TEMPLATE = """Below are text excerpts from a language model's input. Tokens on which the unit fires are marked like <<this>>.

Excerpts where it fires most strongly:
{active}

Random excerpts (marked tokens, if any, are where it fires):
{random}

In one or two sentences, describe the tokens on which the unit fires and the context they appear in. Answer with the description only."""

DETECTION_TEMPLATE = """A unit of a language model is described as follows:
{explanation}

Text: {text}

Does the unit fire on some token of this text? (Yes/No)"""

FUZZING_TEMPLATE = """A unit of a language model is described as follows:
{explanation}

Text, with some tokens marked like <<this>>: {text}

Are the marked tokens the ones the description says the unit fires on? (Yes/No)"""


@dataclass
class Context:
    """A window of tokens [W] with the unit's activation on each [W]; ``highlight``: positions to mark
    (None: those with activation > 0)."""

    tokens: list[str]
    acts: list[float]
    highlight: list[int] | None = field(default=None)

    def marked(self) -> list[int]:
        return [i for i, a in enumerate(self.acts) if a > 0] if self.highlight is None else list(self.highlight)

    def text(self, mark: bool = True) -> str:
        m = set(self.marked()) if mark else set()
        out = "".join(f"<<{t}>>" if i in m else t for i, t in enumerate(self.tokens))
        return " ".join(out.replace("\r", " ").replace("\n", " ").split(" ")).strip()

    def to_json(self) -> dict:
        d = {"tokens": self.tokens, "acts": [round(float(a), 4) for a in self.acts]}
        if self.highlight is not None:
            d["highlight"] = self.highlight
        return d

    @staticmethod
    def from_json(d: dict) -> "Context":
        return Context(list(d["tokens"]), list(d["acts"]), d.get("highlight"))


@dataclass
class ExplainContextsRequest:
    """What an explainer sees for one unit: highlighted max-activating and random held-out contexts."""

    active: list[Context]
    random: list[Context]
    dfa: list[dict] | None = None
    """per active context, where the unit reads from (attention-SAE features: :mod:`.dfa_rules`)"""


@dataclass
class JudgeRequest:
    """One judgement: ``kind`` is ``detection`` (context shown without marks) or ``fuzzing`` (with them)."""

    kind: str
    explanation: str
    context: Context


def explain_messages(req: ExplainContextsRequest) -> list[dict]:
    def block(cs):
        return "\n".join(f"{i + 1}. {c.text()}" for i, c in enumerate(cs)) or "(none)"
    user = EXPLAIN_TEMPLATE.format(active=block(req.active), random=block(req.random))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def judge_messages(req: JudgeRequest) -> list[dict]:
    if req.kind == "detection":
        user = DETECTION_TEMPLATE.format(explanation=req.explanation.strip(), text=req.context.text(mark=False))
    elif req.kind == "fuzzing":
        user = FUZZING_TEMPLATE.format(explanation=req.explanation.strip(), text=req.context.text(mark=True))
    else:
        raise ValueError(f"unknown judgement kind {req.kind!r}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class LLMContextBackend:
    """Explains and judges contexts through an LLM back-end (see the module docstring)."""

    def __init__(self, backend, max_new_tokens: int = 120):
        self.backend, self.name = backend, backend.name
        self.max_new_tokens = max_new_tokens

    def config(self) -> dict:
        return self.backend.config()

    @property
    def probabilities(self) -> str:
        """How judgements are read: ``logits`` (local model), ``logprobs`` or ``text (...)`` (endpoint)."""
        return getattr(self.backend, "probabilities", "logits")

    def complete_many(self, messages: list[list[dict]]) -> list[str]:
        if hasattr(self.backend, "complete_many"):
            return self.backend.complete_many(messages)
        return [self._generate(m) for m in messages]

    @torch.no_grad()
    def _generate(self, messages: list[dict]) -> str:
        """Greedy decoding with the local HF model (as its ``explain_many`` does)."""
        b = self.backend
        tok = b.model.tokenizer
        ids = b._ids(messages)
        gen = b.model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=b.max_new_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def explain_contexts(self, reqs: list[ExplainContextsRequest]) -> list[str]:
        return self.complete_many([explain_messages(r) for r in reqs])

    def judge(self, reqs: list[JudgeRequest]) -> list[float | None]:
        msgs = [judge_messages(r) for r in reqs]
        if hasattr(self.backend, "p_yes_many"):
            return self.backend.p_yes_many(msgs)
        return [self.backend.p_yes(m) for m in msgs]  # local model: P(Yes)/(P(Yes)+P(No)) from the logits


def feature_backend(backend):
    """The context explainer/judge for a back-end object (see the module docstring)."""
    if hasattr(backend, "explain_contexts") and hasattr(backend, "judge"):
        return backend
    return LLMContextBackend(backend)
