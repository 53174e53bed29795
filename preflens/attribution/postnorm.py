"""Exact direct logit attribution for post-norm blocks (Gemma 2/3, OLMo 2), on the HF module.

Source: direct logit attribution as in Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits" (the residual stream is a sum of component outputs), with every norm's
scale frozen at its cached value as TransformerLens does for ``ln_final``; used by
:mod:`preflens.attribution.heads` (Yu, Merullo, Pavlick, EMNLP 2023, Sec. 5) for families whose
blocks normalize the attention and MLP outputs before the residual add::

    resid += post_attention_layernorm(o_proj(z))       resid += post_feedforward_layernorm(mlp(.))

Convention. An RMSNorm ``y = x * rsqrt(mean(x^2) + eps) * g`` (``g = 1 + w`` for Gemma,
``g = w`` otherwise; computed here in fp64) is linear in x once its scale ``s = rsqrt(...)`` is
frozen at the value of this forward pass. Since ``o_proj(z) = sum_h z_h W_O^h (+ b_O)``, head
h of layer l contributes ``g_l * s_l * (z_h W_O^h)`` to the residual stream, an attention output
bias ``g_l * s_l * b_O`` (summed over layers into the ``bias`` component; Gemma has none), each
MLP its post-norm output, and ``embed`` the input of the first block (Gemma's sqrt(d_model)
embedding scale included). These sum exactly to the final residual stream; the frozen final
norm and the unembedding carry them to the **pre-soft-cap** logits (before
``final_logit_softcapping``). Heads are *query* heads (under GQA each query head has its own
slice of the ``o_proj`` input). BOS, when the tokenizer adds one, is part of the scored ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preflens.errors import ModelError

__all__ = ["post_norm_model", "PostNormDecomposition", "decompose"]


def _layers(model):
    return getattr(getattr(model, "base_model", None), "layers", None)


def post_norm_model(lm):
    """The plain HF module of ``lm`` (an :class:`~preflens.models.LM`) when its decoder blocks
    have post-norms (``post_attention_layernorm`` applied to the attention output and
    ``post_feedforward_layernorm``), else ``None``."""
    from preflens.models import LM

    if not isinstance(lm, LM):
        return None
    model = lm.model
    layers = _layers(model)
    if not layers or not all(hasattr(b, "post_feedforward_layernorm")
                             and hasattr(b, "post_attention_layernorm") for b in layers):
        return None
    return model


@dataclass(frozen=True)
class PostNormDecomposition:
    """Components at the requested positions.

    Attributes:
        stack: ``[C, B, *P, d_model]`` fp64, each component after the frozen final norm.
        labels: ``C`` names: ``L{l}H{h}`` (query heads), ``{l}_mlp_out``, ``embed``, ``bias``.
        precap: ``[B, *P, V]`` fp64 pre-soft-cap logits of the same forward pass.
        W_U: ``[V, d_model]`` fp64 unembedding; ``b_U``: ``[V]`` (zeros when there is none).
    """

    stack: torch.Tensor
    labels: list[str]
    precap: torch.Tensor
    W_U: torch.Tensor
    b_U: torch.Tensor

    def logit_attrs(self, tokens: torch.Tensor, foils: torch.Tensor) -> torch.Tensor:
        """``[C, B]`` each component's contribution to ``precap[t] - precap[f]`` (one position)."""
        direction = self.W_U[tokens] - self.W_U[foils]                # [B, d_model]
        return torch.einsum("cbd,bd->cb", self.stack, direction)


def _frozen_rms(norm, x: torch.Tensor, y: torch.Tensor, what: str) -> torch.Tensor:
    """``[..., d_model]`` fp64 factor ``s * g`` with ``norm(x) == factor * x`` (checked)."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    w = getattr(norm, "weight", None)
    if eps is None or getattr(norm, "bias", None) is not None or isinstance(norm, torch.nn.LayerNorm):
        raise ModelError(f"direct logit attribution: {what} is a {type(norm).__name__}, not an "
                         "RMSNorm; its frozen linearization is not implemented")
    xd = x.double()
    g = torch.ones(x.shape[-1], dtype=torch.float64, device=x.device) if w is None else w.double()
    if w is not None and type(norm).__name__.startswith("Gemma"):
        g = 1.0 + g
    factor = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + float(eps)) * g
    err = float((factor * xd - y.double()).abs().max())
    tol = 1e-5 if y.dtype in (torch.float32, torch.float64) else 2e-2  # Gemma: fp32 inside
    if not err <= tol * max(1.0, float(y.abs().max())):
        raise ModelError(f"direct logit attribution: {what} ({type(norm).__name__}) is not "
                         f"x * rsqrt(mean x^2 + eps) * g (off by {err:.3g})")
    return factor


@torch.no_grad()
def decompose(model, ids: torch.Tensor, pos) -> PostNormDecomposition:
    """Exact component decomposition of the pre-cap logits of ``model(ids)`` at ``pos`` (an int
    or a LongTensor of positions), module docstring. One forward pass with plain hooks.

    Raises:
        ModelError: a norm is not an RMSNorm, or the components do not sum to the final
            residual stream (an architecture this decomposition does not describe).
    """
    layers, base = _layers(model), model.base_model
    n_heads = int(model.config.num_attention_heads)
    got: dict = {}
    handles = []

    def keep(key):
        def hook(mod, args, kwargs, out=None):
            x = args[0] if args else kwargs["hidden_states"]
            got[key] = (x[:, pos].detach(), None if out is None else out[:, pos].detach())
        return hook

    try:
        handles.append(layers[0].register_forward_pre_hook(keep("embed"), with_kwargs=True))
        for l, b in enumerate(layers):
            handles.append(b.self_attn.o_proj.register_forward_pre_hook(keep(("z", l)),
                                                                        with_kwargs=True))
            for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
                handles.append(getattr(b, name).register_forward_hook(keep((name, l)),
                                                                      with_kwargs=True))
        handles.append(base.norm.register_forward_hook(keep("final"), with_kwargs=True))
        training = model.training  # e.g. a tracker measuring the model being trained
        model.eval()
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            model.train(training)
    finally:
        for h in handles:
            h.remove()

    comps, labels, bias = [], [], 0.0
    for l, b in enumerate(layers):
        o = b.self_attn.o_proj
        z = got[("z", l)][0].double()
        d_head = z.shape[-1] // n_heads
        z = z.reshape(*z.shape[:-1], n_heads, d_head)
        W_O = o.weight.double().reshape(o.weight.shape[0], n_heads, d_head)  # [d_model, H, d_head]
        x, y = got[("post_attention_layernorm", l)]
        f = _frozen_rms(b.post_attention_layernorm, x, y, f"layer {l} post_attention_layernorm")
        heads = torch.einsum("...hk,dhk->h...d", z, W_O) * f               # [H, B, *P, d_model]
        comps.append(heads)
        labels += [f"L{l}H{h}" for h in range(n_heads)]
        if getattr(o, "bias", None) is not None:
            bias = bias + f * o.bias.double()
    mlps = []
    for l, b in enumerate(layers):
        x, y = got[("post_feedforward_layernorm", l)]
        mlps.append((_frozen_rms(b.post_feedforward_layernorm, x, y,
                                 f"layer {l} post_feedforward_layernorm") * x.double())[None])
        labels.append(f"{l}_mlp_out")
    embed = got["embed"][0].double()
    stack = torch.cat(comps + mlps + [embed[None], (torch.zeros_like(embed) + bias)[None]])
    labels += ["embed", "bias"]
    r, y_final = got["final"]
    err = float((stack.sum(0) - r.double()).abs().max())
    if not err <= 1e-4 * max(1.0, float(r.abs().max())):
        raise ModelError(f"direct logit attribution: the components of {type(model).__name__} "
                         f"miss the final residual stream by {err:.3g}")
    stack = stack * _frozen_rms(base.norm, r, y_final, "the final norm")
    head = model.get_output_embeddings()
    W_U = head.weight.double()
    b_U = (head.bias.double() if getattr(head, "bias", None) is not None
           else torch.zeros(W_U.shape[0], dtype=torch.float64, device=W_U.device))
    precap = y_final.double() @ W_U.T + b_U
    return PostNormDecomposition(stack, labels, precap, W_U, b_U)
