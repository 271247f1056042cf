"""The explanation and scoring prompts (Neo et al.), and how examples are shown.

An example is a mined prompt's text (BOS dropped, newlines turned into spaces) with the neuron's token
appended, as the paper does. The explainer sees two classes of train examples — prompts where the head
was active and prompts where it was not — and is asked, in two to three sentences, when the attention
head is active. The scorer sees only the explanation and one held-out example and answers Yes or No.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = ("You are a careful interpretability researcher. You study one attention head of a language model "
          "and describe, from examples, the inputs on which it is active.")

EXPLAIN_TEMPLATE = """Below are text examples from a language model's input. Each example ends with the token the model predicts next ({token!r}).
An attention head helps predict that token on the ACTIVE examples and not on the INACTIVE ones.

ACTIVE examples:
{active}

INACTIVE examples:
{inactive}

In two to three sentences, suggest when the attention head is active."""

SCORE_TEMPLATE = """An attention head of a language model is described as follows:
{explanation}

Example: {example}

Is the given example an active example? (Yes/No)"""


@dataclass
class ExplainRequest:
    """What an explainer sees for one (neuron, head) pair."""

    active: list[str]
    inactive: list[str]
    token: str


@dataclass
class ClassifyRequest:
    """What the scorer sees for one held-out example."""

    explanation: str
    example: str
    token: str = ""
    """the token appended to ``example`` (its neuron's), when known"""


def example_text(tokens: list[str], token: str, drop_first: bool = True) -> str:
    """One example: the prompt's token strings joined (BOS dropped), newlines as spaces, plus the token."""
    text = "".join(tokens[1:] if drop_first else tokens) + token
    return " ".join(text.replace("\r", " ").replace("\n", " ").split(" ")).strip()


def explain_messages(req: ExplainRequest) -> list[dict]:
    def block(xs):
        return "\n".join(f"{i + 1}. {x}" for i, x in enumerate(xs)) or "(none)"
    user = EXPLAIN_TEMPLATE.format(token=req.token, active=block(req.active), inactive=block(req.inactive))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def classify_messages(req: ClassifyRequest) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": SCORE_TEMPLATE.format(explanation=req.explanation.strip(), example=req.example)}]


def parse_yes_no(text: str) -> float | None:
    """1.0 for an answer starting with yes, 0.0 for no, None otherwise."""
    t = text.strip().strip("\"'*.:").lower()
    if t.startswith("yes"):
        return 1.0
    if t.startswith("no"):
        return 0.0
    return None


def estimate_tokens(messages: list[dict]) -> int:
    """Rough token count of a chat request (≈ 4 characters per token, + 4 per message)."""
    return sum(len(m["content"]) // 4 + 4 for m in messages)
