"""Do lenses transfer to a fine-tuned checkpoint? (Attention Lens' open question), measured in one run.

There is no second SmolLM2-135M checkpoint offline, so this script makes one: it fine-tunes the model
(all weights, AdamW, next-token cross-entropy) on sequences of the corpus' train split that lens
training never reads, saves it as a local HF directory, and then compares per head, on the same
held-out tokens of the fine-tuned model:

* ``source``      the gain of the lenses on the model they were trained on (``RUN/lens/eval.json``);
* ``transferred`` the same lenses applied to the fine-tuned model (its own null lens):
                  ``headscope.lens.evaluate.run_checkpoint_transfer``;
* ``native``      lenses trained the same way (same sites, same options) on the fine-tuned model.

It also prints how far the checkpoint moved: KL(p_base ‖ p_finetuned) of the final distributions and
the relative change of W_U on held-out tokens. Nothing is asserted.

Usage: ``python bench/lens_finetune_transfer.py --lenses RUN [--steps 40] [--lr 5e-5] [--tokens 2048]``
(RUN holds lenses trained by ``headscope lens train`` and evaluated by ``headscope lens eval``).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch


def finetune(model, corpus, steps: int, lr: float, batch_size: int, first_seq: int) -> list[float]:
    """Fine-tune ``model.hf`` in place; returns the training loss (nats/token) per step."""
    hf = model.hf
    hf.train()
    for p in hf.parameters():  # headscope loads models frozen
        p.requires_grad_(True)
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    n = corpus.n_sequences("train")
    for step in range(steps):
        idx = [(first_seq + step * batch_size + i) % n for i in range(batch_size)]
        ids = torch.stack([corpus.sequence("train", i) for i in idx]).to(model.device)
        out = hf(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.detach().item())
        print(f"  fine-tune step {step + 1}/{steps}: loss {losses[-1]:.3f} nats/token", flush=True)
    hf.eval()
    return losses


@torch.no_grad()
def drift(base, tuned, corpus, tokens: int) -> float:
    """Mean KL(p_base ‖ p_tuned) of the final distributions over held-out tokens, bits/token."""
    total, n = 0.0, 0
    for ids in corpus.batches("heldout", 8, max_tokens=tokens):
        lp = torch.log_softmax(base.hf(input_ids=ids).logits.float(), -1)
        lq = torch.log_softmax(tuned.hf(input_ids=ids).logits.float(), -1)
        total += float((lp.exp() * (lp - lq)).sum(-1).sum())
        n += ids.numel()
    return total / n / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lenses", required=True, help="run directory with trained and evaluated lenses")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens for the comparisons")
    ap.add_argument("--out-model", default=None, help="where to save the fine-tuned checkpoint (default: a cache dir)")
    args = ap.parse_args()

    from headscope.data import TokenCorpus
    from headscope.lens.evaluate import run_checkpoint_transfer, run_eval
    from headscope.lens.options import EvalOptions
    from headscope.lens.lenses import LensConfig
    from headscope.lens.options import LensTrainConfig
    from headscope.lens.train import run_train
    from headscope.models.load import cache_dir, load_model
    from headscope.runs import RunDir, read_json

    run = RunDir(args.lenses)
    info = read_json(Path(args.lenses) / "lens" / "lenses.json")
    source_eval = read_json(Path(args.lenses) / "lens" / "eval.json")
    sites = [tuple(s) for s in info["sites"]]
    tcfg = LensTrainConfig(**info["train"])

    base = load_model(args.model, dtype="float32")
    out_model = Path(args.out_model or cache_dir() / f"finetuned-{Path(args.model).name}-{args.steps}steps-lr{args.lr:g}")
    if not (out_model / "config.json").exists():
        tuned = load_model(args.model, dtype="float32")
        corpus = TokenCorpus(tuned, tcfg.corpus, seq_len=tcfg.seq_len)
        first = corpus.n_sequences("train") // 2  # lens training reads the first sequences of the split
        t0 = time.time()
        losses = finetune(tuned, corpus, args.steps, args.lr, args.batch_size, first)
        print(f"fine-tuned {args.steps} steps in {time.time() - t0:.0f} s: loss {losses[0]:.3f} → {losses[-1]:.3f}")
        tmp = Path(tempfile.mkdtemp(dir=out_model.parent, prefix=".tmp-"))
        tuned.hf.save_pretrained(tmp)
        tuned.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_model)
    tuned = load_model(str(out_model), dtype="float32")
    corpus = TokenCorpus(base, tcfg.corpus, seq_len=tcfg.seq_len)
    dW = float((tuned.W_U.float() - base.W_U.float()).norm() / base.W_U.float().norm())
    kl = drift(base, tuned, corpus, args.tokens)
    print(f"checkpoint {out_model}: ‖ΔW_U‖/‖W_U‖ = {dW:.4f}; KL(p_base ‖ p_tuned) = {kl:.3f} bits/token on held-out")

    transferred = run_checkpoint_transfer(tuned, run, EvalOptions(tokens=args.tokens), progress=False)["per_head"]
    with tempfile.TemporaryDirectory() as d:
        native_run = RunDir(Path(d) / "native", tuned.identity())
        run_train(tuned, native_run, sites, LensConfig(**info["lens"]), tcfg, progress=False)
        native = run_eval(tuned, native_run, EvalOptions(tokens=args.tokens), progress=False)["per_head"]

    print(f"\n{'head':>6} {'source':>8} {'transferred':>12} {'native':>8}   (gain over the null lens, bits/token)")
    rows = []
    for l, h in sites:
        k = f"{l}.{h}"
        row = (source_eval["per_head"][k]["gain"], transferred[k]["gain"], native[k]["gain"])
        rows.append(row)
        print(f"{k:>6} {row[0]:+8.3f} {row[1]:+12.3f} {row[2]:+8.3f}")
    src, tr, nat = (torch.tensor(c) for c in zip(*rows))
    print(f"{'median':>6} {src.median():+8.3f} {tr.median():+12.3f} {nat.median():+8.3f}")
    print(f"heads with gain > 0: source {int((src > 0).sum())}/{len(rows)}, transferred {int((tr > 0).sum())}/{len(rows)}, "
          f"native {int((nat > 0).sum())}/{len(rows)}; transferred/native median gain "
          f"{float(tr.median() / nat.median()):.2f}")


if __name__ == "__main__":
    main()
