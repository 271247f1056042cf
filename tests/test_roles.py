"""Head roles (headscope.heads.roles): each score against an independent computation, hand-built heads whose
role is known by construction, heads with no role, attribution patching against real ablation, the stage."""

import json
import math

import numpy as np
import pytest
import torch

from headscope.capture import HeadIntervention, capture
from headscope.errors import HeadscopeError
from headscope.heads import causal as C
from headscope.heads import ov
from headscope.heads.battery import attended_sources, text_stats
from headscope.heads.options import RolesOptions
from headscope.heads.scores import repeated_random_tokens
from headscope.registry import stage
from headscope.runs import RunDir, run_stage
from headscope.testing import tiny_model

def tiny_names() -> tuple[str, ...]:
    """Words the tiny tokenizer spells as one token with a leading space: the IOI task's "names" on tiny models
    (the tokenizer knows no real names)."""
    from headscope.sae.ioi import TEMPLATES
    from headscope.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    words = {tok.decode([i]) for i in range(tok.vocab_size)}
    used = " ".join(TEMPLATES).replace(",", " ").split()
    return tuple(sorted(w[1:] for w in words if w.startswith(" ") and w[1:].isalpha() and len(w) > 3
                        and w[1:] not in used))[:12]


def _with_tiny_names(mp: pytest.MonkeyPatch) -> None:
    import headscope.sae.ioi as ioi
    mp.setattr(ioi, "NAMES", tiny_names())


SMALL = dict(seq_len=32, text_seqs=8, rep_seqs=8, half_len=8, prefix_examples=8, prefix_len=2, prefix_seq_len=32,
             task_seqs=6, null_draws=16, batch_size=8, confirm_top=2)


def _eager_attn(m, ids):
    cur = m.hf.config._attn_implementation
    m.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.double().numpy() for a in m.hf(ids, output_attentions=True).attentions]
    finally:
        m.hf.set_attn_implementation(cur)


def _ids(m, n=6, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, m.d_vocab, (n, S), generator=g)
    ids[:, 0] = m.bos_id
    return ids


def _train_pattern(m, layer, head, target, steps=150, seed=0):
    """Hand-build a head: fit only its query/key weights (and the learned positions) so that its attention goes
    where ``target(t) -> s`` says, on random tokens. The role is known by construction."""
    attn = m.hf.transformer.h[layer].attn
    wpe = m.hf.transformer.wpe.weight
    d, Dh = m.d_model, m.d_head
    cols = torch.cat([torch.arange(head * Dh, (head + 1) * Dh), d + torch.arange(head * Dh, (head + 1) * Dh)])
    params = [attn.c_attn.weight, attn.c_attn.bias, wpe]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.05)
    keep_w, keep_b = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    mask_w = torch.zeros_like(keep_w, dtype=torch.bool)
    mask_w[:, cols] = True
    g = torch.Generator().manual_seed(seed)
    m.hf.set_attn_implementation("eager")
    for _ in range(steps):
        ids = torch.randint(1, m.d_vocab, (8, 32), generator=g)
        ids[:, 0] = m.bos_id
        att = m.hf(ids, output_attentions=True).attentions[layer][:, head]  # [B, S, S]
        t = torch.arange(1, 32)
        loss = -att[:, t, torch.tensor([target(int(x)) for x in t])].clamp_min(1e-9).log().mean()
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # only this head's q and k move (and the positions)
            attn.c_attn.weight.grad[~mask_w] = 0
            attn.c_attn.bias.grad[~mask_w[0]] = 0
        opt.step()
    m.hf.set_attn_implementation("sdpa")
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(attn.c_attn.weight[:, ~mask_w[0]], keep_w[:, ~mask_w[0]])
    return m


def _wire_ov(m, layer, head, sign):
    """Hand-build a copying (sign +1) or copy-suppression (sign −1) OV circuit: W_V^h = Q, W_O^h = sign·4·Qᵀ with
    Q the top right-singular directions of the (tied) embedding, norm gains set to 1 (layer's and final)."""
    d, Dh = m.d_model, m.d_head
    with torch.no_grad():
        blk = m.hf.transformer.h[layer]
        blk.ln_1.weight.fill_(1.0)
        m.hf.transformer.ln_f.weight.fill_(1.0)
        E = ov.normalised(m, ov.W_E(m))
        Q = torch.linalg.svd(E - E.mean(0), full_matrices=False).Vh[:Dh].T  # [d, Dh]
        blk.attn.c_attn.weight[:, 2 * d + head * Dh:2 * d + (head + 1) * Dh] = Q
        blk.attn.c_proj.weight[head * Dh:(head + 1) * Dh] = sign * 4.0 * Q.T
    return m


# -- scores against independent computations ------------------------------------------------------------------

def test_text_stats_match_numpy():
    m = tiny_model("gpt2", seed=1)
    _train_pattern(m, 0, 1, lambda t: t - 1, steps=60)  # some structure so that the checks can fail
    ids = _ids(m)
    got = text_stats(m, [(ids, None)], len(ids), seed=0, progress=False)
    att = _eager_attn(m, ids)
    S = ids.shape[1]
    for layer, a in enumerate(att):
        np.testing.assert_allclose(got["sink"][:, layer].numpy(), a[:, :, 1:, 0].mean(-1), atol=1e-5)
        for k in range(1, 9):
            ref = np.mean([a[:, :, t, t - k] for t in range(9, S)], axis=0)
            np.testing.assert_allclose(got["offset"][:, layer, :, k - 1].numpy(), ref, atol=1e-5)
        far = np.mean([a[:, :, t, 1:t - 8].sum(-1) for t in range(9, S)], axis=0)
        np.testing.assert_allclose(got["far"][:, layer].numpy(), far, atol=1e-5)


def test_direct_logit_to_attended_token_matches_numpy():
    m = tiny_model("gpt2", seed=2)
    _train_pattern(m, 2, 0, lambda t: max(1, t - 2), steps=60)
    ids = _ids(m, n=4)
    got = text_stats(m, [(ids, None)], len(ids), seed=0, progress=False)
    out = capture(m, ids, what=("z", "resid_post"), layers=[2])
    att = _eager_attn(m, ids)[2]  # [B, H, S, S]
    z = out["z"][2].double().numpy()  # [B, S, H, Dh]
    x = out["resid_post"][2].double().numpy()  # the residual stream entering ln_f
    WO = m.hf.transformer.h[2].attn.c_proj.weight.detach().double().numpy().reshape(m.n_heads, m.d_head, -1)
    WU = m.W_U.detach().double().numpy()
    gam = m.hf.transformer.ln_f.weight.detach().double().numpy()
    WUc = WU - WU.mean(0)
    xc = x - x.mean(-1, keepdims=True)
    sigma = np.sqrt((xc ** 2).mean(-1) + m.hf.transformer.ln_f.eps)  # [B, S]
    B_, S = ids.shape
    for h in range(m.n_heads):
        ref = np.zeros(B_)
        for b in range(B_):
            vals = []
            for t in range(2, S):
                s = 1 + int(np.argmax(att[b, h, t, 1:t + 1]))
                r = z[b, t, h] @ WO[h]
                vals.append(((r - r.mean()) * gam / sigma[b, t]) @ WUc[ids[b, s]])
            ref[b] = np.mean(vals)
        np.testing.assert_allclose(got["copy_att"][:, 2, h].numpy(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gemma2"])
def test_ov_copying_score_matches_brute_force_eigenvalues(family):
    m = tiny_model(family)
    got, null = ov.copying_scores(m, null_draws=4)
    assert null.shape == (m.n_layers, 4) and got.shape == (m.n_layers, m.n_heads)
    W_E = m.hf.get_input_embeddings().weight.detach().double().numpy()
    W_U = m.W_U.detach().double().numpy()
    gf = m.norm_gain(m.final_norm).detach().double().numpy()
    for layer in (0, m.n_layers - 1):
        gl = m.norm_gain(m.block_module(layer, m.arch.ln_attn)).detach().double().numpy()
        xh = W_E - W_E.mean(-1, keepdims=True) if m.arch.norm_kind == "layernorm" else W_E
        xh = xh / np.sqrt((xh ** 2).mean(-1, keepdims=True) + 1e-6)
        wv = ov.W_V(m, layer).detach().double().numpy()
        wo = m.W_O(layer).detach().double().numpy()
        if m.arch.post_attn_norm:
            wo = wo * m.norm_gain(m.block_module(layer, m.arch.post_attn_norm)).detach().double().numpy()
        P = np.eye(m.d_model) - (1.0 / m.d_model if m.arch.norm_kind == "layernorm" else 0.0)
        U = (W_U - W_U.mean(0)).T  # [d, V]
        for h in range(m.n_heads):
            M = (xh * gl) @ wv[h] @ wo[h] @ P @ (gf[:, None] * U)  # the full V×V circuit
            lam = np.linalg.eigvals(M)
            assert got[layer, h].item() == pytest.approx(lam.real.sum() / np.abs(lam).sum(), abs=2e-4)


def test_successor_hits_match_numpy():
    m = tiny_model("gpt2")
    tasks = ov.ordinal_tasks(m)
    hits, ctrl, names = ov.successor_hits(m)
    pairs = [(name, ids, i, j) for name, ids, cyc in tasks for i, j in ov.successor_pairs(ids, cyc)]
    assert len(names) == len(pairs) == hits.shape[0]
    with torch.no_grad():
        for row, (name, ids, i, j) in enumerate(pairs):
            keep = [t for t in ids if t is not None]
            e = m.hf.transformer.wte.weight[ids[i]]
            blk0 = m.hf.transformer.h[0]
            ee = e + blk0.mlp(blk0.ln_2(e))  # effective embedding: MLP0 on the token alone
            for layer in range(m.n_layers):
                blk = m.hf.transformer.h[layer]
                x = blk.ln_1(ee)
                v = x @ blk.attn.c_attn.weight[:, 2 * m.d_model:]  # [H·Dh]
                for h in range(m.n_heads):
                    r = v[h * m.d_head:(h + 1) * m.d_head] @ blk.attn.c_proj.weight[h * m.d_head:(h + 1) * m.d_head]
                    rn = (r - r.mean()) * m.hf.transformer.ln_f.weight
                    lg = torch.stack([rn @ (m.W_U[t] - m.W_U.mean(0)) for t in keep])
                    assert bool(hits[row, layer, h]) == (keep[int(lg.argmax())] == ids[j])


# -- hand-built heads get their role; heads with no role get none ----------------------------------------------

@pytest.fixture(scope="module")
def wired_run(tmp_path_factory):
    """A tiny GPT-2 with a previous-token head (0.1), a sink head (1.2), a copying head (2.2, attending two tokens
    back) and a copy-suppression head (2.3, three tokens back), run through the stage."""
    m = tiny_model("gpt2", seed=3)
    with torch.no_grad():  # token identity must dominate the residual stream for a head to copy it
        m.hf.transformer.wte.weight.mul_(20)
    _train_pattern(m, 0, 1, lambda t: t - 1)
    _train_pattern(m, 1, 2, lambda t: 0)
    _train_pattern(m, 2, 2, lambda t: max(1, t - 2))
    _train_pattern(m, 2, 3, lambda t: max(1, t - 3))
    _wire_ov(m, 2, 2, +1)
    _wire_ov(m, 2, 3, -1)
    run = RunDir(tmp_path_factory.mktemp("wired") / "run", m.identity())
    with pytest.MonkeyPatch.context() as mp:
        _with_tiny_names(mp)
        res, ran = run_stage(m, run, stage("heads.roles"), RolesOptions(**SMALL), progress=False)
    doc = json.loads((run.path / "heads" / "roles.json").read_text())
    return m, run, res, doc


def test_hand_built_heads_get_their_roles(wired_run):
    m, run, res, doc = wired_run
    roles = doc["roles"]
    assert roles["previous_token"]["passed"][0][1] and roles["local"]["passed"][0][1]
    assert roles["local"]["offset"][0][1] == 1 and doc["heads"]["0.1"]["offset"] == 1
    assert roles["sink"]["passed"][1][2] and roles["sink"]["score"][1][2] > 0.8
    assert roles["copying"]["passed"][2][2] and not roles["copy_suppression"]["passed"][2][2]
    assert roles["copy_suppression"]["passed"][2][3] and not roles["copying"]["passed"][2][3]
    w = roles["copying"]["weights"]
    assert w["score"][2][2] > 0.9 and w["score"][2][3] < -0.9 and w["q_value"][2][2] <= 0.05
    for key in ("0.1", "1.2", "2.2", "2.3"):
        assert doc["heads"][key]["shown"], key
    # the untouched heads (random, near-uniform attention, small outputs) show no role
    for key in ("0.0", "0.3", "1.0", "1.3", "2.0", "2.1"):
        assert doc["heads"][key]["shown"] == [], (key, doc["heads"][key])


def test_no_role_in_a_reinitialised_model(tmp_path, monkeypatch):
    _with_tiny_names(monkeypatch)  # the duplicate-token task runs too
    m = tiny_model("llama_gqa", seed=5)
    run = RunDir(tmp_path / "run", m.identity())
    res, _ = run_stage(m, run, stage("heads.roles"), RolesOptions(**SMALL), progress=False)
    doc = json.loads((tmp_path / "run" / "heads" / "roles.json").read_text())
    assert all(not h["shown"] and not h["confirmed"] for h in doc["heads"].values())
    assert doc["roles"]["duplicate_token"]["causal"] is not None and doc["roles"]["local"]["causal"] is not None
    assert res.heads_with_confirmed_role == 0 and all(c["shown"] == 0 for c in res.census.values())


def test_the_copying_head_is_confirmed_by_ablation(wired_run):
    m, run, res, doc = wired_run
    c = doc["roles"]["copying"]["causal"]
    assert c["effect"][2][2] is not None and c["effect"][2][2] < 0 and c["ci"][2][2][1] < 0
    s = doc["roles"]["copy_suppression"]["causal"]
    assert s["effect"][2][3] > 0 and s["ci"][2][3][0] > 0


# -- the contract of roles.json and the stage -----------------------------------------------------------------

def test_roles_json_contract(wired_run):
    m, run, res, doc = wired_run
    L, H = m.n_layers, m.n_heads
    assert doc["version"] == 1 and (doc["n_layers"], doc["n_heads"]) == (L, H) and doc["q"] == 0.05
    assert set(doc["data"]) >= {"documents", "sequences", "tokens"}
    assert set(doc["roles"]) >= {"induction", "previous_token", "duplicate_token", "prefix_induction", "sink",
                                 "local", "copying", "copy_suppression", "successor"}
    for name, e in doc["roles"].items():
        for k in ("title", "phrase", "definition", "source", "score_name", "score", "control", "control_name",
                  "ci", "p", "q_value", "passed", "causal", "confirmed"):
            assert k in e, (name, k)
        for k in ("score", "control", "ci", "p", "q_value", "passed", "confirmed"):
            assert len(e[k]) == L and all(len(r) == H for r in e[k]), (name, k)
        if e["causal"] is not None:
            for k in ("task", "metric", "ablation", "effect", "ci", "q_value", "expected_sign", "effect_phrase",
                      "screen", "passed"):
                assert k in e["causal"], (name, k)
            assert all(v is not None for row in e["causal"]["screen"] for v in row)
            e["causal"]["effect_phrase"].format(effect=0.1, lo=0.0, hi=0.2)
            for l in range(L):
                for h in range(H):
                    assert e["confirmed"][l][h] == (e["passed"][l][h] and e["causal"]["passed"][l][h])
        else:
            assert not any(v for row in e["confirmed"] for v in row)
    assert "NaN" not in (run.path / "heads" / "roles.json").read_text()
    assert set(doc["heads"]) == {f"{l}.{h}" for l in range(L) for h in range(H)}
    for key, v in doc["heads"].items():
        assert set(v) >= {"shown", "confirmed", "offset"} and set(v["confirmed"]) <= set(v["shown"])
    assert doc["screen"]["method"] == "attribution patching (AtP)" and "spearman" in doc["screen"]["agreement"]


def test_stage_reuse_returns_the_typed_result(wired_run):
    m, run, res, doc = wired_run
    again, ran = run_stage(m, run, stage("heads.roles"), RolesOptions(**SMALL), progress=False)
    assert not ran and type(again).__name__ == "RolesResult" and again == res
    assert res.census["sink"]["shown"] >= 1 and res.census["copying"]["confirmed"] >= 1


def test_bad_options_are_one_line_errors():
    with pytest.raises(HeadscopeError, match="--text-seqs"):
        RolesOptions(text_seqs=1)
    with pytest.raises(HeadscopeError, match="--q"):
        RolesOptions(q=1.5)
    with pytest.raises(HeadscopeError, match="--ioi-prompts"):
        RolesOptions(ioi_prompts=2)
    assert RolesOptions(ioi_prompts=0).ioi_prompts == 0  # 0: no duplicate-token task


def test_too_small_corpus_is_one_line_error(tmp_path):
    m = tiny_model("gpt2")
    (tmp_path / "c.txt").write_text("a few words only. " * 20)
    run = RunDir(tmp_path / "run", m.identity())
    with pytest.raises(HeadscopeError, match="too few|too small"):
        run_stage(m, run, stage("heads.roles"), RolesOptions(**SMALL | {"corpus": str(tmp_path / "c.txt")}),
                  progress=False)
    assert not (tmp_path / "run" / "heads" / "roles.json").exists()


# -- attribution patching against real ablation ---------------------------------------------------------------

def _repeat_task(m, n=6, half=8, seed=1):
    t = C.Task("repeat", repeated_random_tokens(m, n, half, seed), np.arange(n), half_len=half, readers=[(2, 0)])
    C.run_clean(m, t)
    return t


def test_atp_is_the_derivative_of_the_mixed_ablation():
    m = tiny_model("gpt2", seed=4)
    m.hf.double()  # finite differences need float64 end to end
    task = _repeat_task(m)

    def metric(o):
        return C.repeat_loss(torch.log_softmax(o.logits.double(), -1), task.ids, task.half_len)

    grad = C.atp(m, task, metric, what=("logits",))
    eps = 1e-4
    for layer, head in [(0, 1), (1, 3), (2, 2)]:
        kind, value = C.ablated_z(task, layer, "mean")
        vals = []
        for e in (eps, -eps):
            iv = HeadIntervention(layer, [head], kind, value, positions=slice(1, None), mix=e)
            out = capture(m, task.ids, what=("logits",), layers=[], interventions=[iv])
            vals.append(metric(out).mean().item())
        assert grad[layer, head].item() == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-3)


def test_resumed_ablation_equals_a_full_pass():
    m = tiny_model("gpt2", seed=4)
    task = _repeat_task(m)
    for layer, head in [(1, 2), (2, 0)]:
        eff = C.ablate(m, task, layer, head, "mean")
        kind, value = C.ablated_z(task, layer, "mean")
        iv = HeadIntervention(layer, [head], kind, value, positions=slice(1, None))
        full = capture(m, task.ids, what=("logprobs",), layers=[], interventions=[iv])
        ref = C.repeat_loss(full.logprobs, task.ids, task.half_len) - task.clean["loss"]
        np.testing.assert_allclose(eff["loss"].numpy(), ref.numpy(), atol=1e-5)


def test_atp_screen_agrees_with_real_ablation():
    m = tiny_model("gpt2", seed=3)
    _train_pattern(m, 0, 1, lambda t: t - 1)
    _train_pattern(m, 2, 1, lambda t: max(1, t - 2))
    task = _repeat_task(m, n=8)
    screen = C.atp(m, task, lambda o: C.repeat_loss(o.logprobs, task.ids, task.half_len))
    real = torch.zeros_like(screen)
    for layer in range(m.n_layers):
        for head in range(m.n_heads):
            real[layer, head] = C.ablate(m, task, layer, head)["loss"].mean()
    from scipy.stats import pearsonr
    assert pearsonr(screen.flatten().numpy(), real.flatten().numpy()).statistic > 0.9
    assert int(real.abs().argmax()) == int(screen.abs().argmax())


def test_attended_sources_skip_position_zero():
    p = torch.zeros(1, 1, 4, 4)
    p[0, 0, :, 0] = 0.9
    p[0, 0, 1, 1] = 0.1
    p[0, 0, 2, 1], p[0, 0, 2, 2] = 0.04, 0.06
    p[0, 0, 3, 2] = 0.1
    assert attended_sources(p)[0, 0].tolist() == [0, 1, 2, 2]


@pytest.mark.slow
def test_default_model_18_6_is_a_confirmed_induction_head(tmp_path):
    """The strongest induction head of the embedded SmolLM2-135M comes out "induction", confirmed by ablation;
    some duplicate-token head is confirmed on the IOI task."""
    from headscope.models import load_model
    m = load_model("default")
    opts = RolesOptions(seq_len=64, text_seqs=4, rep_seqs=8, half_len=20, prefix_examples=0, task_seqs=4,
                        max_ablations=3, confirm_top=0, null_draws=8)
    run = RunDir(tmp_path / "run", m.identity())
    run_stage(m, run, stage("heads.roles"), opts, progress=False)
    doc = json.loads((tmp_path / "run" / "heads" / "roles.json").read_text())
    ind = doc["roles"]["induction"]
    assert ind["passed"][18][6] and ind["score"][18][6] > 0.7 and ind["control"][18][6] < 0.1
    assert ind["causal"]["effect"][18][6] > 0 and ind["causal"]["ci"][18][6][0] > 0
    assert "induction" in doc["heads"]["18.6"]["confirmed"]
    assert math.isfinite(ind["causal"]["screen"][18][6]) and ind["causal"]["screen"][18][6] > 0
    # duplicate-token heads lower the IOI logit difference when ablated, more than on the ABC twins
    dup = doc["roles"]["duplicate_token"]
    conf = [(l, h) for l in range(30) for h in range(9) if dup["confirmed"][l][h]]
    assert conf and dup["causal"]["prompts"] == 16
    for l, h in conf:
        c = dup["causal"]
        assert c["effect"][l][h] < 0 and c["ci"][l][h][1] < 0 and c["contrast"][l][h] < 0, (l, h)


# -- the duplicate-token (IOI) and local (next-token loss) causal tasks ---------------------------------------

def test_ioi_task_prompts_and_their_abc_twins(monkeypatch):
    _with_tiny_names(monkeypatch)
    m = tiny_model("gpt2")
    task = C.ioi_task(m, 8, seed=1)
    n = 8
    tok = m.tokenizer
    name_id = {tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in tiny_names()}
    assert task.ids.shape[0] == 2 * n and task.control.tolist() == [False] * n + [True] * n
    for b in range(2 * n):
        end = int(task.ends[b])
        row = task.ids[b].tolist()
        real = row[:end + 1]
        assert real[0] == m.bos_id and all(t == row[end] for t in row[end:])  # right padding only
        io, s = task.answers[b].tolist()
        names = [t for t in real if t in name_id]
        # ABB: IO once, S twice (the second at the clause's subject); ABC twin: IO once, S once, a third name C
        assert real.count(io) == 1 and real.count(s) == (1 if task.control[b] else 2), tok.decode(real)
        if task.control[b]:
            assert len(names) == 3 and len(set(names)) == 3
            twin = task.ids[b - n].tolist()
            assert [t for t in twin if t not in name_id] == [t for t in row if t not in name_id][:len(twin) - 3]
            assert task.clusters[b] == task.clusters[b - n]
        # resampling takes another prompt of the same template and half
        p = int(task.partner[b])
        assert task.control[p] == task.control[b] and int(task.ends[p]) == end
    sub = task.metric_rows()
    assert sub.ids.shape[0] == n and torch.equal(sub.ids, task.ids[:n]) and sub.control is None


def test_logit_diff_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1, 40, generator=g)
    answers = torch.randint(0, 40, (5, 2), generator=g)
    ref = [float(logits[b, 0, answers[b, 0]] - logits[b, 0, answers[b, 1]]) for b in range(5)]
    np.testing.assert_allclose(C.logit_diff(logits, answers).numpy(), ref, rtol=1e-6)


def _ln(mod, x):
    """A GPT-2 LayerNorm in numpy."""
    g, b = (t.detach().double().numpy() for t in (mod.weight, mod.bias))
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + mod.eps) * g + b


def _last_block_out(m, x_mid):
    """The last GPT-2 block's MLP in numpy: the stream entering ln_f from the stream after attention."""
    blk = m.hf.transformer.h[-1]
    w1, b1, w2, b2 = (t.detach().double().numpy() for t in (blk.mlp.c_fc.weight, blk.mlp.c_fc.bias,
                                                             blk.mlp.c_proj.weight, blk.mlp.c_proj.bias))
    u = _ln(blk.ln_2, x_mid) @ w1 + b1
    u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # gelu_new
    return x_mid + u @ w2 + b2


def _ln_f(m, x):
    return _ln(m.hf.transformer.ln_f, x)


def test_last_layer_ablation_effects_match_numpy(monkeypatch):
    """A head of the last layer wired to suppress the token three back (known by construction): the effect of its
    mean-ablation on the IOI logit difference and on the next-token loss, computed in numpy from the clean run
    (its z, the mean z over the task's positions, W_O, the last MLP, the final LayerNorm and W_U) against
    causal.ablate."""
    _with_tiny_names(monkeypatch)
    m = tiny_model("gpt2", seed=3)
    with torch.no_grad():
        m.hf.transformer.wte.weight.mul_(20)
    _train_pattern(m, 2, 3, lambda t: max(1, t - 3), steps=60)
    _wire_ov(m, 2, 3, -1)
    m.hf.double()  # the token embeddings ×20 give logits in the hundreds: compare in float64
    layer, head, Dh = 2, 3, m.d_head
    WO = m.hf.transformer.h[layer].attn.c_proj.weight.detach().double().numpy()[head * Dh:(head + 1) * Dh]
    WU = m.W_U.detach().double().numpy()

    def direct(task):
        out = capture(m, task.ids, what=("z", "resid_pre", "attn_out"), layers=[layer])
        z = out["z"][layer][:, :, head].double().numpy()  # [n, S, Dh]
        x = (out["resid_pre"][layer] + out["attn_out"][layer]).double().numpy()  # [n, S, d] after attention
        ok = task.valid().numpy().copy()
        ok[:, 0] = False
        if task.control is not None:
            ok[task.control] = False
        mean = z[ok].mean(0)
        dx = (mean - z) @ WO
        dx[:, 0] = 0
        return _last_block_out(m, x), _last_block_out(m, x + dx)  # the stream entering ln_f, clean and ablated

    task = C.ioi_task(m, 12, seed=0)
    C.run_clean(m, task)
    x, xa = direct(task)
    end = task.ends.numpy()
    io, s = task.answers[:, 0].numpy(), task.answers[:, 1].numpy()

    def ld(v):
        lg = _ln_f(m, v[np.arange(len(end)), end]) @ WU.T
        return lg[np.arange(len(end)), io] - lg[np.arange(len(end)), s]

    ref = ld(xa) - ld(x)
    got = C.ablate(m, task, layer, head)
    np.testing.assert_allclose(got["logit_diff"].numpy(), ref[~task.control], atol=1e-6)
    np.testing.assert_allclose(got["logit_diff_control"].numpy(), ref[task.control], atol=1e-6)
    assert np.abs(ref).max() > 1e-2  # the wired head matters: the check can fail

    text = C.Task("text", _ids(m, n=4, S=24), np.arange(4))
    C.run_clean(m, text)
    x, xa = direct(text)
    ids = text.ids.numpy()

    def loss(v):
        lg = _ln_f(m, v) @ WU.T
        lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        t = np.arange(1, ids.shape[1] - 1)
        return -np.take_along_axis(lp[:, t], ids[:, t + 1, None], -1)[..., 0].mean(-1)

    np.testing.assert_allclose(C.ablate(m, text, layer, head)["loss"].numpy(), loss(xa) - loss(x), atol=1e-6)


def test_ioi_screen_is_the_derivative_of_the_mixed_ablation(monkeypatch):
    _with_tiny_names(monkeypatch)
    m = tiny_model("gpt2", seed=4)
    m.hf.double()
    task = C.ioi_task(m, 8, seed=2)
    C.run_clean(m, task)
    sub = task.metric_rows()

    def metric(o):
        return C.logit_diff(o.logits.double(), sub.answers)

    grad = C.atp(m, sub, metric, what=("logits",), logit_positions=sub.ends)
    eps = 1e-4
    for layer, head in [(0, 2), (1, 0), (2, 3)]:
        kind, value = C.ablated_z(task, layer, "mean")
        vals = []
        for e in (eps, -eps):
            iv = HeadIntervention(layer, [head], kind, value, positions=slice(1, None), mix=e)
            out = capture(m, sub.ids, what=("logits",), layers=[], interventions=[iv], logit_positions=sub.ends)
            vals.append(metric(out).mean().item())
        assert grad[layer, head].item() == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-3, abs=1e-9)


def test_duplicate_token_and_local_causal_blocks(wired_run):
    """The stage runs both new tasks: every ablated head's effect is the real ablation's mean over prompts
    (IOI) or documents (text), with its control twins beside it; confirmed = shown and causal test passed."""
    m, run, res, doc = wired_run
    dup, loc = doc["roles"]["duplicate_token"], doc["roles"]["local"]
    c = dup["causal"]
    assert c["prompts"] == 16 and c["expected_sign"] == -1 and c["clusters"] == "name pair {IO, S}"
    assert "{effect" in c["control_phrase"] and c["control_task"]
    ablated = [(l, h) for l in range(m.n_layers) for h in range(m.n_heads) if c["effect"][l][h] is not None]
    assert len(ablated) >= 1 and res.census["duplicate_token"]["causal"]
    for l, h in ablated:
        assert c["control_effect"][l][h] is not None and c["contrast"][l][h] == pytest.approx(
            c["effect"][l][h] - c["control_effect"][l][h], abs=1e-5)
    lc = loc["causal"]
    assert lc["expected_sign"] == 1 and "next-token loss" in lc["metric"]
    # the hand-built local heads (0.1 offset 1, 2.2 offset 2, 2.3 offset 3) are shown and were all ablated
    for l, h in ((0, 1), (2, 2), (2, 3)):
        assert loc["passed"][l][h] and lc["effect"][l][h] is not None
        ok = lc["passed"][l][h]
        assert ok == (lc["ci"][l][h][0] > 0 and lc["q_value"][l][h] <= doc["q"])
        assert loc["confirmed"][l][h] == ok
    # the effect recorded is the real ablation's per-document mean on the stage's text task
    assert doc["screen"]["agreement"]["by_metric"]["text:loss"]["n"] >= 3


def test_no_ioi_task_without_single_token_names():
    """The tiny tokenizer spells no name of the IOI list as one token: no task (the stage then notes why and
    the duplicate-token role stays shown only)."""
    assert C.ioi_task(tiny_model("gpt2"), 8) is None


def test_a_local_head_that_predicts_the_text_is_confirmed(wired_run, tmp_path):
    """Head 2.2 attends two tokens back and copies (by construction). On text whose every document repeats three
    words ("w1 w2 w3 w1 w2 w3 …"), the token two back is the next token: the head lowers the next-token loss, so
    ablating it must raise it — the local role is confirmed. (On the default corpus the same head is shown but
    not confirmed: copying the token two back does not predict natural text.)"""
    m, _, _, doc0 = wired_run
    g = np.random.default_rng(0)
    words = list(tiny_names())  # single tokens with a leading space: the period is 3 tokens
    with open(tmp_path / "period3.jsonl", "w") as f:
        for _ in range(120):
            trio = " ".join(g.choice(words, 3, replace=False))
            f.write(json.dumps({"text": " ".join([trio] * 40)}) + "\n")
    run = RunDir(tmp_path / "run", m.identity())
    opts = RolesOptions(**SMALL | {"corpus": str(tmp_path / "period3.jsonl"), "ioi_prompts": 0, "task_seqs": 10})
    run_stage(m, run, stage("heads.roles"), opts, progress=False)
    doc = json.loads((tmp_path / "run" / "heads" / "roles.json").read_text())
    loc = doc["roles"]["local"]
    assert loc["passed"][2][2] and loc["offset"][2][2] == 2
    assert loc["causal"]["effect"][2][2] > 0 and loc["causal"]["ci"][2][2][0] > 0 and loc["confirmed"][2][2]
    assert "local" in doc["heads"]["2.2"]["confirmed"]
    assert not doc0["roles"]["local"]["confirmed"][2][2]
    dup = doc["roles"]["duplicate_token"]
    assert dup["causal"] is None and "ioi-prompts" in dup["note"]  # --ioi-prompts 0: shown only, and why


def test_screen_of_a_metric_no_head_can_reach_is_zero():
    """Every reader head in layer 0: no head's z reaches its attention pattern, the screen is 0 (not an error)."""
    m = tiny_model("qwen2", seed=1)
    t = C.Task("repeat", repeated_random_tokens(m, 4, 8, 1), np.arange(4), half_len=8, readers=[(0, 1), (0, 2)])
    C.run_clean(m, t)
    for ab in ("mean", "resample"):
        s = C.atp(m, t, lambda o: C.induction_attention(o["pattern"], t.readers, 8), ab, what=("pattern",),
                  layers=[0], stop_after=0)
        assert s.shape == (m.n_layers, m.n_heads) and not s.any()
