"""Drop-in fastbert twins of the BERT-family encoder modules.

Every module here is built from a Hugging Face module with `.from_hf(module)` and holds the SAME
nn.Linear / nn.LayerNorm objects (hence the same Parameter objects) under the same attribute names, so
its state_dict keys equal the HF module's and an optimizer built on the HF model keeps working. This
file knows attribute paths (a `Layout`), never transformers itself: fastbert/hf owns the table that
maps each architecture to its layout.

Inside a layer (post-LayerNorm BERT layout):
    qkv  = h @ [Wq; Wk; Wv]^T + [bq; bk; bv]           one GEMM, output [.., 3, heads, head_dim]
    ctx  = attention(q, k, v)                           q/k/v are strided views of qkv: no copies
    a    = add_layer_norm(ctx @ Wo^T, x_bias=bo, residual=h, dropout_p=hidden dropout)
    f    = linear_gelu(a, Wi, bi)  (or F.linear + relu/silu/the HF activation)
    out  = add_layer_norm(f @ Wo2^T, x_bias=bo2, residual=a, dropout_p=hidden dropout)
The output-projection biases ride in the LayerNorm kernel (x_bias) instead of the GEMM, so
bias + dropout + residual + LayerNorm is one pass over the activations.

Two input forms: padded [B, S, hidden] with an optional 2D key mask [B, S] (1 = real token), or
packed [total_tokens, hidden] with cu_seqlens [B+1] int32 and max_seqlen (padding-free).

Every module is looked up by its path at each forward (a module replaced after the twin was built is
seen). Each Linear slot goes through a `resolve_linear` function that returns the nn.Linear whose
weights the fused ops read plus any low-rank updates to add to its output (`LowRank`: LoRA's
B(A(dropout(x))) * scale); the default accepts plain nn.Linear only, fastbert/hf passes one that also
understands PEFT's LoRA layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import backends, ops
from fastbert.nn import fsdp
from fastbert.ops import cpu_gemm

_LAYER_OPS = ("attention", "add_layer_norm", "linear_gelu", "bias_gelu")


def get_path(module: nn.Module, path: Optional[str]):
    """getattr along a dotted path ("attention.self.query"); None for a None path."""
    if path is None:
        return None
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class LowRank:
    """A low-rank update of a Linear's output, y += b(a(dropout(x))) * scale, applied the way PEFT's
    LoRA Linear applies it: x is cast to a's weight dtype first when `cast_input` (PEFT's default), and
    the sum of all updates is cast back to y's dtype at the end. The modules are called as modules."""

    a: nn.Module
    b: nn.Module
    dropout: Optional[nn.Module]
    scale: float
    cast_input: bool = True


class LinearParts(NamedTuple):
    """What a `resolve_linear` function returns for one Linear slot."""

    linear: nn.Linear                  # whose weight and bias the fused ops read
    low_rank: Tuple[LowRank, ...] = ()  # updates added to its output
    # part of the fused-QKV cache key: a wrapper that rewrites the weights through `.data`, which no
    # version counter sees (PEFT merging and unmerging adapters), changes it when it does so
    cache_token: Hashable = None


def plain_linear(module: nn.Module) -> LinearParts:
    """The default `resolve_linear`: an nn.Linear as it is, no updates."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"fastbert.nn: expected an nn.Linear, got {type(module).__name__} "
                        "(fastbert.patch serves PEFT LoRA layers; other wrappers run Hugging Face's code)")
    return LinearParts(module)


def _add_low_rank(y: torch.Tensor, x: torch.Tensor, terms: Tuple[LowRank, ...]) -> torch.Tensor:
    """y + sum of the updates of x, in PEFT's order and dtypes (see LowRank)."""
    out = y
    for t in terms:
        if t.cast_input and x.dtype != t.a.weight.dtype:
            x = x.to(t.a.weight.dtype)
        xi = t.dropout(x) if t.dropout is not None else x
        out = out + t.b(t.a(xi)) * t.scale
    return out.to(y.dtype)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the pieces of one post-LayerNorm encoder layer live, as dotted paths inside the HF layer
    module (or, for self-attention alone, inside the attention module: `q`, `k`, `v`, `heads`,
    `attn_dropout` are relative to `attention`)."""

    name: str
    attention: str                      # the HF self-attention module
    q: str
    k: str
    v: str
    heads: str                          # int attribute of the attention module: number of heads
    attn_dropout: Optional[str]         # nn.Dropout (or a float attribute) of the attention probs
    o: str                              # attention output projection (nn.Linear)
    ln1: str                            # LayerNorm after attention
    drop1: Optional[str]                # nn.Dropout on the attention output (None: no dropout there)
    ffn_in: str                         # intermediate nn.Linear
    act: str                            # the HF activation callable (used when no fused form exists)
    ffn_out: str                        # output nn.Linear of the FFN
    ln2: str                            # LayerNorm after the FFN
    drop2: Optional[str]                # nn.Dropout on the FFN output
    act_config: Tuple[str, ...] = ("hidden_act",)  # config fields naming the activation, first found wins


def _dropout_p(obj) -> float:
    if obj is None:
        return 0.0
    if isinstance(obj, nn.Dropout):
        return float(obj.p)
    return float(obj)


# The layouts detect_layout tries, and the function mapping a config to an activation kind: knowledge of
# Hugging Face's models, which fastbert/hf/layouts.py registers here when fastbert.hf is imported.
LAYOUTS: List[Layout] = []
_ACTIVATION_FROM_CONFIG: List[Callable] = []


def register_layouts(*layouts: Layout) -> None:
    """Add layouts for detect_layout to try (fastbert/hf/layouts.py registers the HF ones)."""
    LAYOUTS.extend(lay for lay in layouts if lay not in LAYOUTS)


def register_activation_resolver(fn: Callable) -> None:
    """fn(config, layout.act_config) -> an activation kind (see FastBertLayer) or None."""
    _ACTIVATION_FROM_CONFIG[:] = [fn]


def detect_layout(module: nn.Module, *, attention: bool = False) -> Layout:
    """The registered layout whose paths all resolve in `module` (an HF layer, or an attention module)."""
    for layout in LAYOUTS:
        try:
            if attention:
                for p in (layout.q, layout.k, layout.v, layout.heads):
                    get_path(module, p)
            else:
                for p in (layout.attention, layout.o, layout.ln1, layout.ffn_in, layout.ffn_out, layout.ln2):
                    get_path(module, p)
                att = get_path(module, layout.attention)
                for p in (layout.q, layout.k, layout.v, layout.heads):
                    get_path(att, p)
            return layout
        except AttributeError:
            continue
    known = ", ".join(lay.name for lay in LAYOUTS) or "none registered: import fastbert.hf, or pass layout="
    raise TypeError(f"fastbert.nn: {type(module).__name__} has none of the known layouts ({known})")


# ----------------------------------------------------------------------------------------------
# the fused QKV weight
# ----------------------------------------------------------------------------------------------
class FusedQKV:
    """[Wq; Wk; Wv] and [bq; bk; bv] for one GEMM, kept consistent with the three HF Parameters.

    `get(q, k, v)` takes the three nn.Linear modules of this call (looked up by the caller each
    forward, so a module swapped in later is seen). When autograd needs the weights (grad mode on and
    any of them requires grad) or under torch.compile, the fused tensors are rebuilt with torch.cat on
    every call: cat is differentiable, so gradients flow to the ORIGINAL Parameters (there is no
    second copy to train), and an optimizer step is seen by the next forward. Otherwise (inference
    under torch.no_grad / inference_mode, or frozen weights) the fused copy is cached, keyed on each
    Parameter's identity, `_version` (bumped by every in-place update: optimizer steps,
    load_state_dict, copy_ under no_grad), data_ptr, dtype and device (model.half() / .to() swap
    `.data`). A write through `.data` bypasses the version counter: call `invalidate()` (or
    `fastbert.nn.invalidate_caches(model)`) after one.
    """

    def __init__(self):
        self._key = None
        self._w = None
        self._b = None
        self.packed = cpu_gemm.PackedWeight()  # the CPU GEMM kernel's copy of the cached fused weight

    @property
    def key(self):
        """The key of the cached fused weight (valid right after a `get` that cached)."""
        return self._key

    def invalidate(self) -> None:
        self._key = self._w = self._b = None
        self.packed.invalidate()

    @staticmethod
    def _fuse(lins):
        w = torch.cat([lin.weight for lin in lins], 0)
        if all(lin.bias is None for lin in lins):
            return w, None
        b = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins], 0)
        return w, b

    def get(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, token: Hashable = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The fused weight and bias; `token` (LinearParts.cache_token of the three) joins the cache key."""
        lins = (q, k, v)
        params = [p for lin in lins for p in (lin.weight, lin.bias) if p is not None]
        compiling = torch.compiler.is_compiling()
        if (compiling or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
                or any(fsdp.managed(lin) for lin in lins)):  # FSDP re-gathers behind the key (fastbert/nn/fsdp.py)
            return self._fuse(lins)
        key = (token,) + tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if key != self._key:
            with torch.no_grad():
                self._w, self._b = self._fuse(lins)
            self._key = key
        return self._w, self._b


# ----------------------------------------------------------------------------------------------
# functional pieces
# ----------------------------------------------------------------------------------------------
def _qkv_three_gemms(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], hidden: int) -> torch.Tensor:
    """F.linear(h, w, b) computed as three GEMMs of N = hidden, each writing its column slice of the one
    [.., 3 * hidden] output in place (BLAS leading dimension 3 * hidden: no copies, same layout): faster
    than one GEMM of N = 3 * hidden with MKL's sgemm (docs/perf-notes.md)."""
    h2 = h.reshape(-1, h.shape[-1])
    out = torch.empty(h2.shape[0], 3 * hidden, dtype=h.dtype, device=h.device)
    for i in range(3):
        cols = slice(i * hidden, (i + 1) * hidden)
        if b is None:
            torch.mm(h2, w[cols].t(), out=out[:, cols])
        else:
            torch.addmm(b[cols], h2, w[cols].t(), out=out[:, cols])
    return out.view(*h.shape[:-1], 3 * hidden)


def _self_attention(h: torch.Tensor, parts: Tuple[LinearParts, LinearParts, LinearParts], cache: FusedQKV, heads: int,
                    scale: Optional[float], dropout_p: float, attention_mask: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int]) -> torch.Tensor:
    w, b = cache.get(*(p.linear for p in parts), token=tuple(p.cache_token for p in parts))
    hidden = w.shape[0] // 3
    d = hidden // heads
    if cpu_gemm.eligible(h, w, b) and not fsdp.managed(parts[0].linear):
        # CPU inference (not GPUs, where one GEMM wins): the faster of fastbert's CPU GEMM and ATen's
        # path, three GEMMs into the output (out= is not differentiable and has no autocast rule:
        # F.linear under autocast)
        aten = ((lambda: F.linear(h, w, b)) if torch.is_autocast_enabled("cpu")
                else (lambda: _qkv_three_gemms(h, w, b, hidden)))
        x = cpu_gemm.linear(h, w, b, "none", cache=cache.packed, key=cache.key, aten=aten)
    else:
        x = F.linear(h, w, b)  # [..., 3 * hidden]: [q heads | k heads | v heads]
    if any(p.low_rank for p in parts):  # low-rank updates of q / k / v: added to their slices of the one GEMM
        cols = list(x.split(hidden, -1))
        x = torch.cat([_add_low_rank(c, h, p.low_rank) if p.low_rank else c for c, p in zip(cols, parts)], -1)
    x = x.view(*h.shape[:-1], 3, heads, d)
    q, k, v = x.unbind(-3)  # strided views into the one GEMM output
    if cu_seqlens is not None:
        out = ops.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p)
    else:
        out = ops.attention(q, k, v, attention_mask=attention_mask, scale=scale, dropout_p=dropout_p)
    return out.reshape(*h.shape[:-1], hidden)


def _add_ln(x: torch.Tensor, x_bias: Optional[torch.Tensor], residual: torch.Tensor, ln: nn.LayerNorm,
            dropout_p: float) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) with ln's parameters. Under autocast the GEMM output x
    is half precision while the residual stream stays fp32; HF's `dense(x) + residual` promotes to fp32
    there, so do the same."""
    if x.dtype != residual.dtype:
        dt = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dt), residual.to(dt)
    return ops.add_layer_norm(x, ln.weight, ln.bias, residual=residual, x_bias=x_bias, eps=ln.eps, dropout_p=dropout_p)


def _linear(x: torch.Tensor, parts: LinearParts, bias: Optional[torch.Tensor], packed: cpu_gemm.PackedWeight,
            epilogue: str = "none", aten: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """epilogue(x @ W^T + bias) of one Linear slot (no low-rank terms): on CPU fp32 inference through
    fastbert/ops/cpu_gemm.py (its packed copy of W in `packed`), else `aten()` (default F.linear)."""
    w = parts.linear.weight
    if aten is None:
        aten = lambda: F.linear(x, w, bias)  # noqa: E731
    if not cpu_gemm.eligible(x, w, bias) or fsdp.managed(parts.linear):  # no packed copy of a re-gathered weight
        return aten()
    key = cpu_gemm.param_key(w) + (parts.cache_token,)
    return cpu_gemm.linear(x, w, bias, epilogue, cache=packed, key=key, aten=aten)


def _projection(x: torch.Tensor, parts: LinearParts, packed: cpu_gemm.PackedWeight
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(x @ W^T plus the low-rank updates, the bias left for the add_layer_norm epilogue)."""
    lin, terms = parts.linear, parts.low_rank
    y = _linear(x, parts, None, packed)
    return (_add_low_rank(y, x, terms) if terms else y), lin.bias


def _autocast(dev: str, *tensors):
    """A custom op is not autocast by torch: cast as autocast would cast F.linear's inputs."""
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None else None for t in tensors)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class FastBertSelfAttention(nn.Module):
    """Self-attention with Q, K, V as one GEMM and fastbert.ops.attention reading its output in place.

    Holds the HF module's query/key/value nn.Linear objects under the HF names (BERT: query, key,
    value; DistilBERT: q_lin, k_lin, v_lin). forward(hidden_states [B, S, hidden], attention_mask
    [B, S] (1 = real) or None) or forward(packed [total, hidden], cu_seqlens=..., max_seqlen=...)
    returns the attention context (before the output projection), in the input's layout.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, num_heads: int, *, dropout=0.0,
                 scale: Optional[float] = None, names: Tuple[str, str, str] = ("query", "key", "value"),
                 resolve_linear: Callable[[nn.Module], LinearParts] = plain_linear):
        super().__init__()
        lq, lk, lv = (resolve_linear(m)[0] for m in (q, k, v))
        if lq.in_features != lk.in_features or lq.in_features != lv.in_features:
            raise ValueError("FastBertSelfAttention: query/key/value must read the same hidden size")
        if lq.out_features != lk.out_features or lq.out_features != lv.out_features:
            raise ValueError("FastBertSelfAttention: query/key/value must have the same out_features")
        if not isinstance(num_heads, int) or num_heads <= 0 or lq.out_features % num_heads:
            raise ValueError(f"FastBertSelfAttention: num_heads={num_heads!r} must divide {lq.out_features}")
        for n, lin in zip(names, (q, k, v)):
            self.add_module(n, lin)
        self._names = names
        self.num_heads = num_heads
        self.head_dim = lq.out_features // num_heads
        self.scale = scale
        # the probability is read at every call, so changing the HF module's dropout.p is honoured; a
        # float is kept in a tuple so that nn.Module does not try to register it
        self._dropout = (dropout,)
        self._resolve = resolve_linear
        self.qkv = FusedQKV()

    @classmethod
    def from_hf(cls, module: nn.Module, *, resolve_linear: Callable[[nn.Module], LinearParts] = plain_linear
                ) -> "FastBertSelfAttention":
        layout = detect_layout(module, attention=True)
        twin = cls(get_path(module, layout.q), get_path(module, layout.k), get_path(module, layout.v),
                   int(get_path(module, layout.heads)), dropout=get_path(module, layout.attn_dropout) or 0.0,
                   scale=getattr(module, "scaling", None), names=(layout.q, layout.k, layout.v),
                   resolve_linear=resolve_linear)
        return twin.train(module.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        p = _dropout_p(self._dropout[0]) if self.training else 0.0
        parts = tuple(self._resolve(getattr(self, n)) for n in self._names)
        return _self_attention(hidden_states, parts, self.qkv, self.num_heads, self.scale, p, attention_mask,
                               cu_seqlens, max_seqlen)


class FastBertLayer(nn.Module):
    """One post-LayerNorm encoder layer (BERT/RoBERTa/ELECTRA/DistilBERT layouts) on fused ops.

    Registers the HF layer's own children under their own names, so `state_dict()` keys, Parameter
    objects and storages are exactly the HF layer's; the fused path looks the pieces up through a
    `Layout` at every call (in this module first: a child replaced here after patching is seen). Each
    Linear goes through `resolve_linear` (see the module doc). Dropout follows the HF modules' `p` in
    training mode: attention probs through the attention op, hidden dropout through add_layer_norm.
    Gradient checkpointing: set `gradient_checkpointing = True` (transformers'
    activation_checkpointing_enable, formerly gradient_checkpointing_enable, does) and, in training
    mode, the layer is recomputed in backward (torch.utils.checkpoint, non-reentrant; the RNG state is
    restored, so the recomputed dropout masks are the same). A subclass whose caller checkpoints it
    (fastbert/hf's, a transformers GradientCheckpointingLayer) sets `_outer_checkpointing = True`.

    activation: how the FFN activation is computed: ("gelu", "none") exact erf GELU or ("gelu",
    "tanh") through linear_gelu (never substituted for each other), ("relu", None) / ("silu", None)
    after F.linear, or None: the HF module's own activation callable after F.linear. By default it is
    derived from `config` by the resolver fastbert/hf registers (None without one).
    """

    gradient_checkpointing = False
    _outer_checkpointing = False
    last_backends: Dict[str, Any] = {}  # op -> backends.Decision of this layer's last forward

    def __init__(self, hf_layer: nn.Module, layout: Optional[Layout] = None, config=None,
                 resolve_linear: Callable[[nn.Module], LinearParts] = plain_linear, activation=None):
        super().__init__()
        layout = layout or detect_layout(hf_layer)
        self.layout = layout
        for name, child in hf_layer.named_children():
            self.add_module(name, child)
        # paths that are not modules of this twin (an XLM view's float dropout probability) resolve in
        # the HF layer; a tuple so that it is not registered a second time
        self._hf = (hf_layer,)
        att = get_path(hf_layer, layout.attention)
        if config is None:
            config = getattr(att, "config", None)
        self.config = config
        self.training = hf_layer.training
        self._resolve = resolve_linear
        if activation is None and config is not None and _ACTIVATION_FROM_CONFIG:
            activation = _ACTIVATION_FROM_CONFIG[0](config, layout.act_config)
        self._act_kind = activation
        self.qkv = FusedQKV()
        # the CPU GEMM kernel's packed copies of the other three weights (fastbert/ops/cpu_gemm.py)
        self.packed = {slot: cpu_gemm.PackedWeight() for slot in ("o", "ffn_in", "ffn_out")}
        self.num_heads = int(get_path(att, layout.heads))

    @classmethod
    def from_hf(cls, module: nn.Module, layout: Optional[Layout] = None, config=None,
                resolve_linear: Callable[[nn.Module], LinearParts] = plain_linear, activation=None
                ) -> "FastBertLayer":
        return cls(module, layout, config, resolve_linear, activation)

    def at(self, path: Optional[str]):
        """The object at `path` (a Layout path), looked up now: in this module, else in the HF layer."""
        try:
            return get_path(self, path)
        except AttributeError:
            return get_path(self._hf[0], path)

    def linear(self, path: str) -> LinearParts:
        return self._resolve(self.at(path))

    def extra_repr(self) -> str:
        kind = self._act_kind
        act = kind[0] + (f"({kind[1]})" if kind[1] else "") if kind else f"hf:{type(self.at(self.layout.act)).__name__}"
        return f"layout={self.layout.name}, heads={self.num_heads}, activation={act}"

    def _ffn(self, a: torch.Tensor) -> torch.Tensor:
        parts = self.linear(self.layout.ffn_in)
        lin, terms = parts.linear, parts.low_rank
        kind = self._act_kind
        if kind is not None and kind[0] == "gelu":
            a, w, b = _autocast(a.device.type, a, lin.weight, lin.bias)
            if not terms:
                epilogue = "gelu_tanh" if kind[1] == "tanh" else "gelu"
                return _linear(a, parts, b, self.packed["ffn_in"], epilogue,
                               aten=lambda: ops.linear_gelu(a, w, b, approximate=kind[1]))
            y = _add_low_rank(F.linear(a, w), a, terms)  # GELU(a W^T + update + b): bias in the epilogue
            return ops.bias_gelu(y, b.to(y.dtype) if b is not None else None, approximate=kind[1])
        y = _linear(a, parts, lin.bias, self.packed["ffn_in"]) if not terms else F.linear(a, lin.weight, lin.bias)
        if terms:
            y = _add_low_rank(y, a, terms)
        if kind is not None and kind[0] == "relu":
            return F.relu(y)
        if kind is not None and kind[0] == "silu":
            return F.silu(y)
        return self.at(self.layout.act)(y)

    def _forward(self, h: torch.Tensor, attention_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 max_seqlen: Optional[int]) -> torch.Tensor:
        L = self.layout
        att = self.at(L.attention)
        # the HF attention module is a shared child: its flag follows model.train()/eval() even while
        # the HF layer (not this twin) sits in the module tree
        train = att.training
        parts = tuple(self._resolve(get_path(att, p)) for p in (L.q, L.k, L.v))
        p_att = _dropout_p(get_path(att, L.attn_dropout)) if train else 0.0
        ctx = _self_attention(h, parts, self.qkv, int(get_path(att, L.heads)), getattr(att, "scaling", None), p_att,
                              attention_mask, cu_seqlens, max_seqlen)
        y, bias = _projection(ctx, self.linear(L.o), self.packed["o"])
        a = _add_ln(y, bias, h, self.at(L.ln1), _dropout_p(self.at(L.drop1)) if train else 0.0)
        f = self._ffn(a)
        y, bias = _projection(f, self.linear(L.ffn_out), self.packed["ffn_out"])
        return _add_ln(y, bias, a, self.at(L.ln2), _dropout_p(self.at(L.drop2)) if train else 0.0)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        """hidden_states [B, S, hidden] with attention_mask [B, S] (1 = real token) or None, or packed
        [total, hidden] with cu_seqlens [B+1] (int32) and max_seqlen. Returns the same layout."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"FastBertLayer: hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if cu_seqlens is not None:
            if hidden_states.dim() != 2:
                raise ValueError(f"FastBertLayer: hidden_states must be [total, hidden] with cu_seqlens, got "
                                 f"shape {tuple(hidden_states.shape)}")
            if attention_mask is not None:
                raise ValueError("FastBertLayer: attention_mask must be None with cu_seqlens (packed input)")
        elif hidden_states.dim() != 3:
            raise ValueError(f"FastBertLayer: hidden_states must be [batch, seq, hidden], got shape "
                             f"{tuple(hidden_states.shape)}")
        elif attention_mask is not None and (attention_mask.dim() != 2
                                             or tuple(attention_mask.shape) != tuple(hidden_states.shape[:2])):
            raise ValueError(f"FastBertLayer: attention_mask must be [batch, seq] = {tuple(hidden_states.shape[:2])}, "
                             f"got shape {tuple(attention_mask.shape)}")
        if (self.gradient_checkpointing and not self._outer_checkpointing and self.at(self.layout.attention).training
                and torch.is_grad_enabled()):
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(self._forward, hidden_states, attention_mask, cu_seqlens, max_seqlen, use_reentrant=False)
        else:
            out = self._forward(hidden_states, attention_mask, cu_seqlens, max_seqlen)
        if not torch.compiler.is_compiling():
            # which backend each op of this layer ran on (for fastbert.explain(model))
            decisions = backends.last_decisions()
            self.last_backends = {op: decisions[op] for op in _LAYER_OPS if op in decisions}
        return out


def invalidate_caches(model: nn.Module) -> None:
    """Drop every cached fused QKV weight and packed CPU GEMM weight under `model` (needed only after
    writes through `.data`)."""
    for m in model.modules():
        if isinstance(m, (FastBertSelfAttention, FastBertLayer)):
            m.qkv.invalidate()
        if isinstance(m, FastBertLayer):
            for p in m.packed.values():
                p.invalidate()
