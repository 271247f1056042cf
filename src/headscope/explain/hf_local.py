"""A local Hugging Face chat model as explainer and scorer, in-process (no server).

Explanations: greedy decoding (no sampling) of up to ``max_new_tokens`` tokens from the model's chat
template. Scoring: one forward pass of the scoring prompt up to the start of the assistant's answer,
and P(Yes) / (P(Yes) + P(No)) from the next-token distribution, summing the first tokens of the spellings of
"Yes" (" Yes", "yes", …) and of "No"; an example counts as active when that ratio is ≥ 0.5.
Default model: the embedded SmolLM2-135M-Instruct — small, so expect a low score; give any larger
local model (``--explainer-model PATH``) for useful explanations.
"""

from __future__ import annotations

import torch

from ..models.load import Model, load_model
from .prompts import ClassifyRequest, ExplainRequest, classify_messages, explain_messages

YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


class LocalHFExplainer:
    """See the module docstring. ``model``: a loaded :class:`Model` or a spec for :func:`load_model`."""

    name = "local"

    def __init__(self, model: Model | str = "default", device: str = "cpu", max_new_tokens: int = 120,
                 dtype: str | None = None):
        self.model = model if isinstance(model, Model) else load_model(model, device=device, dtype=dtype)
        self.max_new_tokens = max_new_tokens
        tok = self.model.tokenizer
        first = lambda words: {tok(w, add_special_tokens=False)["input_ids"][0] for w in words}
        yes, no = first(YES), first(NO)  # the first token of each spelling (the whole word in real vocabularies)
        self.yes_ids, self.no_ids = sorted(yes - no), sorted(no - yes)

    def config(self) -> dict:
        return {"backend": "local", "model": self.model.name, "max_new_tokens": self.max_new_tokens}

    def _ids(self, messages: list[dict]) -> torch.Tensor:
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:  # no chat template (tiny test models): a plain transcript
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            ids = [self.model.bos_id] + tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[-(self.model.n_ctx - self.max_new_tokens - 1):]
        return torch.tensor([ids], device=self.model.device)

    @torch.no_grad()
    def explain_many(self, reqs: list[ExplainRequest]) -> list[str]:
        out = []
        tok = self.model.tokenizer
        for r in reqs:
            ids = self._ids(explain_messages(r))
            gen = self.model.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def p_yes(self, messages: list[dict]) -> float:
        """P(Yes) / (P(Yes) + P(No)) at the start of the answer (one forward pass)."""
        logits = self.model.hf(input_ids=self._ids(messages), use_cache=False).logits[0, -1].float()
        p = torch.softmax(logits, -1)
        y, n = float(p[self.yes_ids].sum()), float(p[self.no_ids].sum())
        return y / (y + n) if y + n > 0 else 0.5

    def classify_many(self, reqs: list[ClassifyRequest]) -> list[float | None]:
        return [self.p_yes(classify_messages(r)) for r in reqs]
