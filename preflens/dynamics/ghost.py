"""Parameter selection and ghost inner products of per-response gradients (HF causal LMs).

Internals of :mod:`preflens.dynamics.entanglement` (Yuan et al. 2024, arXiv 2410.13828, per-pair
gradient inner products; the identities are those of ghost clipping, Li et al. 2022, "Large
Language Models Can Be Strong Differentially Private Learners", and of Wang et al. 2024, In-Run
Data Shapley, "ghost dot-product").

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

Streaming form (:meth:`GhostCapture.pair_dots`, what :mod:`preflens.dynamics.entanglement` uses):
for a fixed set of row pairings (a_i, b_i) -- (w, w), (l, l), (w, l) for pairs -- each layer's
contribution is computed inside the backward, in a hook on its output gradient, and its A and B are
dropped at once; the vocabulary side of the unembedding is streamed in chunks (log-normalizers
first, then δ chunk by chunk), so neither a ``[rows, R, V]`` δ nor any layer's activations outlive
their use. Per layer the cheaper of two exact forms is taken (the mixed ghost norm of Bu et al.
2022, "Scalable and Efficient Training of Large Convolutional Neural Networks with Differential
Privacy", §3, which picks per layer between the Gram form and instantiating per-example gradients):
the Gram form costs P·S²·(d_in + d_out) multiply-adds for P pairings of S-token rows, the
per-row gradients G_b = A_bᵀB_b cost rows·S·d_in·d_out + P·d_in·d_out; the Gram form is used when
it is the cheaper (Bu et al.'s criterion 2S² < d_in·d_out compares the memory of the two forms).

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

PRESETS = ("all", "unembed", "last_block", "embeddings", "attention", "mlp", "lora")
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
    the final norm), ``"embeddings"`` (token + position embeddings), ``"attention"``, ``"mlp"``,
    ``"lora"`` (the A and B matrices of LoRA adapters, :mod:`preflens.dynamics.lora`).
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
    if preset == "lora":  # LoRA adapters' A and B (peft names: ...lora_A.<adapter>.weight)
        return {n: p for n, p in trainable.items() if ".lora_A." in n or ".lora_B." in n}
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


HEAD_CHUNK_ELEMS = 1 << 22  # logits per vocabulary chunk of the streamed head ([rows, R, chunk])


def _rowsum(t: torch.Tensor) -> torch.Tensor:
    """Per-row (dim 0) sums, accumulated in float64 without a float64 copy."""
    return t.flatten(1).sum(1, dtype=torch.float64)


def _embedding_capture(store: dict):
    """Forward hook on the token embedding that keeps its output in ``store["emb"]``; a frozen
    embedding's output is made a leaf that requires grad, so ∂u/∂(its output) still exists."""
    def hook(mod, args, out):
        if not out.requires_grad:
            out = out.detach().requires_grad_()
        store["emb"] = out
        return out

    return hook


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
            handles.append(self.emb.register_forward_hook(_embedding_capture(store)))
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

    # -------------------------------------------------------------------------------- streaming
    def pair_dots(self, batch: Batch, k: int, cross: bool = True):
        """``(‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩ or None)``, each ``[k]`` float64, for chosen rows ``[0, k)``
        and rejected rows ``[k, 2k)`` of ``batch`` (one forward, one backward; streaming form of
        the module docstring). Sets ``u`` [2k]; leaves parameters' ``.grad`` untouched."""
        device = batch.input_ids.device
        w_rows, l_rows = torch.arange(k, device=device), torch.arange(k, 2 * k, device=device)
        left = torch.cat([w_rows, l_rows] + ([w_rows] if cross else []))  # pairing i: rows
        right = torch.cat([w_rows, l_rows] + ([l_rows] if cross else []))  # left[i], right[i]
        acc = torch.zeros(len(left), dtype=torch.float64, device=device)
        live, seq = batch.attention_mask[..., None], batch.input_ids.shape[1]
        handles, store, seen = [], {}, set()
        for site in self.sites:
            def hook(mod, args, out, site=site):
                if id(site) in seen:
                    raise ModelError(f"module {type(mod).__name__} ran twice in one forward; "
                                     "ghost inner products need each module used once")
                seen.add(id(site))
                held = [args[0]]  # released by the backward hook below
                if out.requires_grad:
                    out.register_hook(lambda g: self._site_dots(site, held.pop(), g, left, right, acc,
                                                                live, seq))
            handles.append(site.module.register_forward_hook(hook))

        # the backward's target: upstream of every site
        handles.append(self.emb.register_forward_hook(_embedding_capture(store)))
        try:
            hidden = final_hidden(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_hidden = self._head_stream(hidden, batch, cdt, left, right, acc)
        (c,) = torch.autograd.grad(hidden, [store["emb"]], grad_outputs=grad_hidden, allow_unused=True)
        with torch.no_grad():
            c = torch.zeros_like(store["emb"], dtype=cdt) if c is None else c.detach().to(cdt)
            c = c * live.to(cdt) * self.emb_scale
            ids = batch.input_ids
            if self.tok:
                same = ids[left][:, :, None] == ids[right][:, None, :]
                acc += _rowsum(self._gram(c[left], c[right]) * same)
            if self.pos:
                acc += _rowsum(c[left] * c[right])
            if self.unembed and self.tied and self.tok:
                acc += self._cross_stream(c, ids, left, right) + self._cross_stream(c, ids, right, left)
        self._stream = None
        acc = acc.view(-1, k)
        return acc[0], acc[1], (acc[2] if cross else None)

    @torch.no_grad()
    def _site_dots(self, site: _Site, x, g, left, right, acc, live, seq) -> None:
        """Add one site's ⟨G_left, G_right⟩ to ``acc`` (a backward hook; returns None)."""
        cdt = torch.float64 if g.dtype == torch.float64 else torch.float32
        g = g.detach().to(cdt) * live.to(cdt)
        if site.kind == "norm":
            if site.weight:
                vec = (g * _norm_coefficient(site.module, x.detach()).to(cdt)).sum(1)
                acc += _rowsum(vec[left] * vec[right])
        elif site.weight:
            x = x.detach().to(cdt)
            d_in, d_out, pairings, rows = x.shape[-1], g.shape[-1], len(left), x.shape[0]
            if pairings * seq * seq * (d_in + d_out) < rows * seq * d_in * d_out + pairings * d_in * d_out:
                acc += _rowsum(self._gram(x[left], x[right]) * self._gram(g[left], g[right]))
            else:  # per-row gradients [rows, d_in, d_out], then plain dot products
                per_row = torch.matmul(x.transpose(1, 2), g)
                acc += torch.stack([(per_row[a] * per_row[b]).sum(dtype=torch.float64)
                                    for a, b in zip(left.tolist(), right.tolist())])
        if site.bias:
            vb = g.sum(1)
            acc += _rowsum(vb[left] * vb[right])

    @torch.no_grad()
    def _head_stream(self, hidden, batch, cdt, left, right, acc) -> torch.Tensor:
        """``u``, ∂Σu/∂hidden = δ W and the unembedding terms, the vocabulary in chunks.

        Pass 1 accumulates the log-normalizer lse = log Σ_v exp(logit_v) (one pass only when the
        vocabulary fits in one chunk); pass 2 forms δ = (e_y − exp(logit − lse)) ⊙ head'(z) per
        chunk and adds δ_c W_c to the hidden gradient and δ_c,a δ_c,bᵀ to the [R, R] Gram of each
        pairing. Same log-softmax as :func:`preflens.scoring.target_logprobs` up to summation order.
        """
        mask = batch.response_mask
        n_resp = mask.sum(1)
        valid = torch.arange(int(n_resp.max()), device=mask.device)[None, :] < n_resp[:, None]
        rows, R = valid.shape
        h = hidden.new_zeros(rows, R, hidden.shape[-1], dtype=cdt)
        h[valid] = hidden[mask].to(cdt)
        y = torch.zeros(valid.shape, dtype=torch.long, device=mask.device)
        y[valid] = batch.targets[mask]
        w = self.head.weight.detach().to(cdt)
        b = getattr(self.head, "bias", None)
        b = None if b is None else b.detach().to(cdt)
        V, head = w.shape[0], self.logit_head
        chunk = max(256, HEAD_CHUNK_ELEMS // max(1, rows * R))

        def z_of(c0):
            z = torch.matmul(h, w[c0:c0 + chunk].T)
            return z if b is None else z.add_(b[c0:c0 + chunk])

        lse, whole = torch.full((rows, R), -torch.inf, dtype=cdt, device=h.device), None
        for c0 in range(0, V, chunk):
            z = z_of(c0)
            lse = torch.logaddexp(lse, torch.logsumexp(head(z), -1))
            whole = z if chunk >= V else None
        z_y = (h * w[y]).sum(-1) + (b[y] if b is not None else 0)
        self.u = ((head(z_y) - lse) * valid).double().sum(1)
        vf = valid.to(cdt)
        grad_h = torch.zeros_like(h)
        dd = torch.zeros(len(left), R, R, dtype=cdt, device=h.device) if self.unembed else None
        for c0 in range(0, V, chunk):
            z = whole if whole is not None else z_of(c0)
            width = z.shape[-1]
            d = torch.exp_(head(z).sub_(lse[..., None])).neg_()
            inside = (y >= c0) & (y < c0 + width)
            d.scatter_add_(2, (y - c0).clamp(0, width - 1)[..., None], inside[..., None].to(cdt))
            d = head.backward(z, d).mul_(vf[..., None])  # ∂/∂logits -> ∂/∂z
            grad_h += torch.matmul(d, w[c0:c0 + width])
            if self.unembed:
                dd += self._gram(d[left], d[right])
            if self.unembed_bias:
                ds = d.sum(1)
                acc += _rowsum(ds[left] * ds[right])
        if self.unembed:
            acc += _rowsum(self._gram(h[left], h[right]) * dd)
        self._stream = (h, lse, y, vf)
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[mask] = grad_h[valid].to(hidden.dtype)
        return grad_hidden

    @torch.no_grad()
    def _cross_stream(self, c, ids, ia, ib) -> torch.Tensor:
        """Tied cross term ⟨G_E(a), G_U(b)⟩ = Σ_{t,s} δ_b[s, x_a[t]] (c_a[t]·h_b[s]) per pairing,
        with δ_b at the needed columns only: (1[y_b,s = v] − exp(logit_b,s[v] − lse_b,s))·head'(z)."""
        h, lse, y, vf = self._stream
        cdt = c.dtype
        w = self.head.weight.detach().to(cdt)
        b = getattr(self.head, "bias", None)
        xa, hb = ids[ia], h[ib]
        z = torch.matmul(hb, w[xa].transpose(1, 2))  # [pairings, R, S]
        if b is not None:
            z += b.detach().to(cdt)[xa][:, None, :]
        picked = (y[ib][:, :, None] == xa[:, None, :]).to(cdt) - torch.exp(
            self.logit_head(z) - lse[ib][..., None])
        picked = self.logit_head.backward(z, picked).mul_(vf[ib][..., None])
        return _rowsum(self._gram(hb, c[ia]) * picked)

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
