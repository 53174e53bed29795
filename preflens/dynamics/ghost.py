"""Parameter selection and ghost inner products of per-response gradients (HF causal LMs).

Internals of :mod:`preflens.dynamics.entanglement` (spec ``gradient_entanglement.md`` §5; Opacus
ghost clipping; Wang et al. 2024, In-Run Data Shapley, "ghost dot-product").

Each row b of a batch is one (prompt, response); its quantity is the SUMMED response log-prob
u_b (EOS counted; :mod:`preflens.scoring` conventions) and g_b = ∇θ u_b over the selected
parameters. One forward and ONE backward of Σ_b u_b give, for every row, the inputs A_b [S, d_in]
and output-gradients B_b [S, d_out] of each linear map (rows do not interact in eval mode, so the
gradient at row b's activations is ∂u_b/∂·). Then, never materializing a per-row gradient:

* Conv1D / Linear weight: ⟨G_i, G_j⟩_F = ⟨A_iA_jᵀ, B_iB_jᵀ⟩_F; bias: (Σ_t b_{i,t})·(Σ_s b_{j,s}).
* Token embedding E (c = gradient at the embedding output, x the token ids):
  ⟨G_E,i, G_E,j⟩ = Σ_{t,s} 1[x_{i,t} = x_{j,s}] c_{i,t}·c_{j,s}. Position embedding: Σ_t c_{i,t}·c_{j,t}
  (GPT-2 adds the two embeddings, so both see the same c).
* Unembedding (logits = h Wᵀ + b, h the lm_head input): G_U = Σ_s δ_s h_sᵀ with
  δ_s = e_{y_s} − π_s at response-predicting positions, 0 elsewhere:
  ⟨G_U,i, G_U,j⟩ = Σ_{s,s'} (h_{i,s}·h_{j,s'})(δ_{i,s}·δ_{j,s'}); bias: (Σδ_i)·(Σδ_j).
* TIED input/output embedding (GPT-2): the parameter's gradient is G_E + G_U, so its inner product
  adds the cross terms ⟨G_E,i, G_U,j⟩ + ⟨G_U,i, G_E,j⟩, ⟨G_E,i, G_U,j⟩ = Σ_{t,s} δ_{j,s}[x_{i,t}] (c_{i,t}·h_{j,s}).
* Norms -- LayerNorm y = γ⊙x̂ + β, RMSNorm y = γ⊙x/rms(x) (Llama, Qwen2, Mistral), Gemma's
  y = (1 + γ)⊙x/rms(x): y is affine in γ with coefficient x̂ in every form, so ∂y/∂γ = x̂ and
  x̂ = y(γ + 1) − y(γ) (the module run twice, no per-family formula). Per-row gradients are
  d-dimensional, so they are materialized: ∇γ = Σ_t g_t⊙x̂_t, ∇β = Σ_t g_t. OLMo's
  non-parametric LayerNorm has no parameters.
* The head: logits = head(z), z = h Wᵀ + b (:class:`preflens.scoring.LogitHead`: Gemma 2
  soft-capping c·tanh(z/c), logit scales). δ above is ∂ log π(y)/∂z = (e_y − π) ⊙ head'(z).

Linear maps (GPT-2 Conv1D, nn.Linear: fused or separate q/k/v with biases, GQA projections,
gated MLPs), embeddings (tied or not), norms and the head cover every parameter of GPT-2,
GPT-NeoX, Llama, Qwen2, Mistral, Gemma 2 and OLMo, so the sum equals the exact inner product.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preflens.errors import ConfigError, ModelError
from preflens.scoring import Batch, final_hidden, head_logits, logit_head, token_logprobs

__all__ = ["PRESETS", "select_parameters", "summed_token_logprobs", "GhostCapture"]

PRESETS = ("all", "unembed", "last_block", "embeddings", "attention", "mlp")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:h|layers|blocks|layer)\.(\d+)\.")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return ()
    return (Conv1D,)


def _is_norm(module: torch.nn.Module) -> bool:
    """A normalization layer of any family: ``nn.LayerNorm`` or a class named ``*Norm*``
    (``LlamaRMSNorm``, ``Gemma2RMSNorm``, ``OlmoLayerNorm``, ...)."""
    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _owners(model: torch.nn.Module) -> dict[int, tuple[str, torch.nn.Module, str]]:
    """id(parameter) -> (canonical name, owning module, attribute name)."""
    out: dict[int, tuple[str, torch.nn.Module, str]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in out:
                out[id(p)] = (f"{mod_name}.{attr}" if mod_name else attr, module, attr)
    return out


def select_parameters(
    model: torch.nn.Module, params=None, *, include_layernorm: bool = True
) -> dict[str, torch.nn.Parameter]:
    """Resolve a parameter selection to ``{canonical name: Parameter}`` (each tensor once).

    ``params``: ``None`` (all trainable parameters), a list of names (aliases of a tied tensor,
    e.g. GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``, resolve to the one tensor), a
    regex (``re.search`` on names) or a preset: ``"unembed"`` (output-embedding weight and bias; in
    a tied model this IS the token embedding, whose gradient is the sum of both uses),
    ``"all"`` (= ``None``), ``"last_block"`` (every parameter of the last transformer block, not
    the final norm), ``"embeddings"`` (token + position embeddings), ``"attention"``, ``"mlp"``.
    ``include_layernorm=False`` drops the weights and biases of norms of any kind (LayerNorm,
    RMSNorm, Gemma's (1 + w) RMSNorm) from any selection.

    Raises:
        ConfigError: unknown name, frozen parameter named, bad regex, or an empty selection.
    """
    owners = _owners(model)
    named = {owners[id(p)][0]: p for _, p in model.named_parameters()}
    alias = {n: owners[id(p)][0] for n, p in model.named_parameters(remove_duplicate=False)}
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if params is None or params == "all":
        chosen = dict(trainable)
    elif isinstance(params, str) and params in PRESETS:
        chosen = _preset(model, params, trainable, owners)
    elif isinstance(params, str):
        try:
            rx = re.compile(params)
        except re.error as exc:
            raise ConfigError("params", f"'{params}' is neither a preset nor a valid regex ({exc})",
                              allowed=PRESETS) from exc
        chosen = {n: p for n, p in trainable.items() if rx.search(n)}
    elif isinstance(params, Iterable):
        chosen = {}
        for name in params:
            if name not in alias:
                raise ConfigError("params", f"no parameter named '{name}' (a list of names, a "
                                  "regex or a preset)", allowed=PRESETS)
            canon = alias[name]
            if not named[canon].requires_grad:
                raise ConfigError("params", f"parameter '{name}' is frozen (requires_grad=False)")
            chosen[canon] = named[canon]
    else:
        raise ConfigError("params", f"expected None, a list of names, a regex or a preset, got "
                          f"{type(params).__name__}", allowed=PRESETS)
    if not include_layernorm:
        chosen = {n: p for n, p in chosen.items() if not _is_norm(owners[id(p)][1])}
    if not chosen:
        raise ConfigError("params", f"selection {params!r} matches no trainable parameter"
                          + ("" if include_layernorm else " (norms excluded)"), allowed=PRESETS)
    return chosen


def _preset(model, preset, trainable, owners) -> dict[str, torch.nn.Parameter]:
    def by_module(modules) -> dict[str, torch.nn.Parameter]:
        ids = {id(p) for m in modules if m is not None for p in m.parameters(recurse=False)}
        return {n: p for n, p in trainable.items() if id(p) in ids}

    if preset == "unembed":
        return by_module([model.get_output_embeddings()])
    if preset == "embeddings":
        return by_module([model.get_input_embeddings(), getattr(model.base_model, "wpe", None)])
    if preset == "last_block":
        idx = [int(m.group(1)) for n in trainable if (m := _BLOCK_RE.search(n))]
        if not idx:
            raise ConfigError("params", "preset 'last_block': no numbered transformer blocks found",
                              allowed=PRESETS)
        last = max(idx)
        return {n: p for n, p in trainable.items()
                if (m := _BLOCK_RE.search(n)) and int(m.group(1)) == last}
    pattern = {"attention": r"\.(attn|attention|self_attn)\.", "mlp": r"\.mlp\."}[preset]
    return {n: p for n, p in trainable.items() if re.search(pattern, n)}


def summed_token_logprobs(model, batch: Batch) -> torch.Tensor:
    """``[B, S]`` log π(token j+1 | ≤ j) at response-predicting positions, 0 elsewhere.

    :func:`preflens.scoring.token_logprobs` for fp32/bf16 models; for a float64 model the same
    quantity with a float64 log-softmax (scoring's chunked head computes in fp32), so float64
    checks are precise to ~1e-15. Same positions and conventions either way.
    """
    if next(model.parameters()).dtype != torch.float64:
        return token_logprobs(model, batch)
    hidden = final_hidden(model, batch)
    mask = batch.response_mask
    logits = head_logits(model, hidden[mask])
    lp = torch.log_softmax(logits, -1).gather(1, batch.targets[mask][:, None]).squeeze(1)
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)


@torch.no_grad()
def _embedding_scale(emb: torch.nn.Module) -> float:
    """s with ``emb(ids) == s · emb.weight[ids]`` (1 for nn.Embedding; √d_model for Gemma's
    scaled embedding). ModelError for a token embedding that is not a scaled row lookup."""
    ids = torch.arange(min(8, emb.weight.shape[0]), device=emb.weight.device)
    out, rows = emb(ids).double(), emb.weight[ids].double()
    scale = float((out * rows).sum() / (rows * rows).sum().clamp_min(1e-300))
    if not torch.allclose(out, scale * rows, rtol=1e-4, atol=1e-6 * float(out.abs().max())):
        raise ModelError(f"ghost inner products: the token embedding {type(emb).__name__} is not a "
                         "(scaled) row lookup; use method='exact'")
    return scale


@torch.no_grad()
def _norm_coefficient(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∂y/∂weight of a norm layer at input ``x``: y(w + 1) − y(w), exact for every norm that is
    affine in its weight (LayerNorm, RMSNorm, Gemma's (1 + w) RMSNorm; module docstring).
    Computed in fp32 (fp64 for an fp64 model), whatever the model's dtype."""
    from torch.func import functional_call

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    params = {n: p.detach().to(acc) for n, p in module.named_parameters(recurse=False)}
    base = functional_call(module, params, (x.to(acc),))
    shifted = functional_call(module, {**params, "weight": params["weight"] + 1}, (x.to(acc),))
    return shifted.to(acc) - base.to(acc)


@dataclass
class _Site:
    kind: str  # "linear" | "conv1d" | "norm"
    module: torch.nn.Module
    weight: bool
    bias: bool
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    vec_w: torch.Tensor | None = None  # norms: per-row weight gradient [B, d]
    vec_b: torch.Tensor | None = None  # per-row bias gradient [B, d_out]


class GhostCapture:
    """Hooks a HF causal LM, runs one forward + one backward of Σ_b u_b and returns ghost
    inner products ⟨g_a, g_b⟩ (float64) between rows (module docstring for the identities).

    Usage: ``cap = GhostCapture(model, selected); cap.run(batch); cap.dots(ia, ib)`` where ``ia``
    and ``ib`` are slices of rows of equal length (or one of length 1, broadcast).
    ``cap.u`` [B] holds the summed log-probs (float64).
    """

    def __init__(self, model, selected: dict[str, torch.nn.Parameter]):
        self.model = model
        owners = _owners(model)
        sel = {id(p) for p in selected.values()}
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        wpe = getattr(model.base_model, "wpe", None)
        self.tok = emb is not None and id(emb.weight) in sel
        self.pos = wpe is not None and id(wpe.weight) in sel
        self.unembed = head is not None and id(head.weight) in sel
        self.unembed_bias = head is not None and getattr(head, "bias", None) is not None \
            and id(head.bias) in sel
        self.tied = head is not None and emb is not None and head.weight is emb.weight
        self.head, self.emb = head, emb
        handled = {id(emb.weight)} if self.tok else set()
        handled |= {id(wpe.weight)} if self.pos else set()
        handled |= {id(head.weight)} if self.unembed else set()
        handled |= {id(head.bias)} if self.unembed_bias else set()
        self.sites: list[_Site] = []
        conv = _conv1d_type()
        for module in model.modules():
            if module is head:
                continue
            w, b = getattr(module, "weight", None), getattr(module, "bias", None)
            use_w = isinstance(w, torch.nn.Parameter) and id(w) in sel and id(w) not in handled
            use_b = isinstance(b, torch.nn.Parameter) and id(b) in sel and id(b) not in handled
            if not (use_w or use_b):
                continue
            if conv and isinstance(module, conv):
                kind = "conv1d"
            elif isinstance(module, torch.nn.Linear):
                kind = "linear"
            elif _is_norm(module):
                kind = "norm"
            else:
                continue
            self.sites.append(_Site(kind, module, use_w, use_b))
            handled |= {id(w)} if use_w else set()
            handled |= {id(b)} if use_b else set()
        missing = [owners[id(p)][0] for p in selected.values() if id(p) not in handled]
        if missing:
            raise ModelError(f"ghost inner products do not support parameter(s) {missing[:5]} "
                             "(Conv1D/Linear, LayerNorm/RMSNorm, embeddings and the unembedding "
                             "are supported); use method='exact'")
        self.logit_head = logit_head(model)
        self.emb_scale = _embedding_scale(emb) if (self.tok or self.pos or self.tied) else 1.0

    # -------------------------------------------------------------------------------- forward
    def run(self, batch: Batch) -> None:
        """One forward (eval mode expected) and one backward of Σ_b u_b; captures activations."""
        handles, store = [], {}
        for site in self.sites:
            def hook(mod, args, out, site=site):
                if site.out is not None:
                    raise ModelError(f"module {type(mod).__name__} ran twice in one forward; "
                                     "ghost inner products need each module used once")
                site.inp, site.out = args[0], out
            site.inp = site.out = site.grad = None
            handles.append(site.module.register_forward_hook(hook))
        if self.tok or self.pos or (self.unembed and self.tied):
            def emb_hook(mod, args, out):
                if not out.requires_grad:  # frozen token embedding: still need ∂u/∂(its output)
                    out = out.detach().requires_grad_()
                store["emb"] = out
                return out
            handles.append(self.emb.register_forward_hook(emb_hook))
        try:
            hidden = final_hidden(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        self.batch = batch
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_hidden = self._head(hidden, batch, cdt)
        targets = [s.out for s in self.sites] + ([store["emb"]] if "emb" in store else [])
        grads = torch.autograd.grad(hidden, targets, grad_outputs=grad_hidden,
                                    allow_unused=True) if targets else []
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        live = batch.attention_mask[..., None].to(cdt)
        for site, g in zip(self.sites, grads):
            g, x = g.detach().to(cdt) * live, site.inp.detach().to(cdt)
            site.out, site.vec_b = None, (g.sum(1) if site.bias else None)
            if site.kind == "norm":  # materialize the d-dim per-row gradients
                site.vec_w = (g * _norm_coefficient(site.module, site.inp).to(cdt)).sum(1) \
                    if site.weight else None
                site.inp = site.grad = None
            else:
                site.inp, site.grad = x, g
        # ∂u/∂E[x_t] = scale · c_t for a scaled lookup (Gemma: E[x]·√d inside the module)
        self.c = grads[-1].detach().to(cdt) * live * self.emb_scale if "emb" in store else None

    @torch.no_grad()
    def _head(self, hidden: torch.Tensor, batch: Batch, cdt: torch.dtype) -> torch.Tensor:
        """u, and ∂Σu/∂hidden = δ W analytically, δ = e_y − π (logits formed once, in ``cdt``).

        Keeps h and δ = ∂u/∂z (z = h Wᵀ + b, before the logit head), padded to [B, R, d] /
        [B, R, V] (R = longest response), when the unembedding is selected. Same log-softmax as
        :func:`preflens.scoring.target_logprobs`.
        """
        mask = batch.response_mask
        n_resp = mask.sum(1)
        valid = torch.arange(int(n_resp.max()), device=mask.device)[None, :] < n_resp[:, None]
        h = hidden.new_zeros(*valid.shape, hidden.shape[-1], dtype=cdt)
        h[valid] = hidden[mask].to(cdt)
        y = torch.zeros(valid.shape, dtype=torch.long, device=mask.device)
        y[valid] = batch.targets[mask]
        w = self.head.weight.detach().to(cdt)
        b = getattr(self.head, "bias", None)
        z = F.linear(h, w, None if b is None else b.detach().to(cdt))
        delta = torch.log_softmax(self.logit_head(z), -1)
        self.u = (delta.gather(2, y[..., None])[..., 0] * valid).double().sum(1)
        delta.exp_().neg_().scatter_add_(2, y[..., None], torch.ones_like(y[..., None], dtype=cdt))
        delta = self.logit_head.backward(z, delta)  # ∂/∂logits -> ∂/∂z (soft-cap, scale)
        del z
        delta.mul_(valid[..., None])
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[mask] = (delta @ w)[valid].to(hidden.dtype)
        keep = self.unembed or self.unembed_bias
        self.h, self.delta = (h, delta) if keep else (None, None)
        return grad_hidden

    # -------------------------------------------------------------------------------- dots
    @staticmethod
    def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, y.transpose(-1, -2))

    @staticmethod
    def _sum(t: torch.Tensor) -> torch.Tensor:
        return t.double().flatten(1).sum(1)

    def dots(self, ia: slice, ib: slice) -> torch.Tensor:
        """⟨g_a, g_b⟩ over the selected parameters for rows ``a`` in ``ia``, ``b`` in ``ib`` (float64)."""
        total = 0.0
        for s in self.sites:
            if s.kind == "norm" and s.weight:
                total = total + self._sum(s.vec_w[ia] * s.vec_w[ib])
            elif s.weight:
                total = total + self._sum(self._gram(s.inp[ia], s.inp[ib]) *
                                          self._gram(s.grad[ia], s.grad[ib]))
            if s.bias:
                total = total + self._sum(s.vec_b[ia] * s.vec_b[ib])
        if self.c is not None:
            ca, cb = self.c[ia], self.c[ib]
            ids = self.batch.input_ids
            if self.tok:
                same = ids[ia][:, :, None] == ids[ib][:, None, :]
                total = total + self._sum(self._gram(ca, cb) * same)
            if self.pos:
                total = total + self._sum(ca * cb)
        if self.delta is not None:
            ha, hb, da, db = self.h[ia], self.h[ib], self.delta[ia], self.delta[ib]
            dd = self._gram(da, db)
            if self.unembed:
                total = total + self._sum(self._gram(ha, hb) * dd)
                if self.tied and self.tok:
                    total = total + self._cross(ia, ib) + self._cross(ib, ia)
            if self.unembed_bias:
                total = total + self._sum(dd)
        if not isinstance(total, torch.Tensor):  # pragma: no cover - selection is never empty
            raise ModelError("ghost: nothing to compute for this selection")
        return total

    def _cross(self, ia: slice, ib: slice) -> torch.Tensor:
        """⟨G_E(a), G_U(b)⟩ = Σ_{t,s} δ_b[s, x_a[t]] (c_a[t]·h_b[s])  (tied embedding cross term)."""
        c, ids = self.c[ia], self.batch.input_ids[ia]
        h, d = self.h[ib], self.delta[ib]
        k = max(c.shape[0], d.shape[0])
        idx = ids[:, None, :].expand(k, d.shape[1], ids.shape[1])
        picked = torch.gather(d.expand(k, *d.shape[1:]), 2, idx)  # [K, R, S]
        return self._sum(self._gram(h, c) * picked)
