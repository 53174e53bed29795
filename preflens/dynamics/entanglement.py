"""Gradient entanglement: per-pair gradient inner products, first-order predictions, token maps.

Source: Yuan et al. 2024, "A Common Pitfall of Margin-based Language Model Alignment: Gradient
Entanglement" (arXiv 2410.13828; ICLR 2025), Eqs. 1–5, Condition 1, Table 1, Sec. 4 (token level).

Conventions:

* u_w = log π(y_w|x), u_l = log π(y_l|x): SUMMED response log-probs with EOS appended and counted
  (:mod:`preflens.scoring`); g = ∇θ u over the selected parameters, on the plain HF module
  (never a TransformerLens bridge), eval mode (no dropout).
* ip = ⟨g_w, g_l⟩, n_w² = ‖g_w‖², n_l² = ‖g_l‖², cos = ip/(n_w n_l), r_w = ip/n_w², r_l = ip/n_l².
  A tied weight (GPT-2 ``wte``/``lm_head``) is ONE parameter: its gradient is the sum of the
  embedding and unembedding parts (the official code's ``--full_parameters`` convention).
* Weights a_w = −∂ℓ/∂u_w, a_l = +∂ℓ/∂u_l (:func:`preflens.dynamics.losses.weights`).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from preflens.dynamics.ghost import GhostCapture, select_parameters, summed_token_logprobs
from preflens.errors import ConfigError
from preflens.scoring import (
    Encoded,
    collate,
    concatenated_logps,
    encode_pairs,
    eval_mode,
    final_hidden,
    length_buckets,
    logit_head,
)

__all__ = [
    "GradientStats",
    "TokenSimilarity",
    "CASES",
    "pair_gradient_stats",
    "encoded_gradient_stats",
    "pair_gradient_norms",
    "cross_pair_gram",
    "predict_first_order",
    "sgd_step_changes",
    "entanglement_case",
    "case_counts",
    "token_gradient_similarity",
    "last_layer_factorization",
    "LastLayerFactorization",
]

CASES = ("ideal", "both_down", "both_up", "chosen_down_rejected_up", "zero_weight")
_METHODS = ("ghost", "exact")
GHOST_CPU_MAX_TOKENS = 1024  # padded tokens per ghost forward on a CPU (see _ghost_pair_dots)


@dataclass(frozen=True)
class GradientStats:
    """Per-pair gradient statistics, each ``[n]`` float64 (``len_*`` int64, EOS counted).

    ``inner`` = ⟨g_w, g_l⟩, ``norm_w_sq`` = ‖g_w‖², ``norm_l_sq`` = ‖g_l‖², ``cos``,
    ``r_w`` = inner/‖g_w‖², ``r_l`` = inner/‖g_l‖² (Yuan et al. 2024 Table 1: DPO raises chosen iff
    r_w < 1 and lowers rejected iff r_l < 1); ``u_w``, ``u_l`` summed log-probs; ``params`` the
    canonical names of the selected parameters; ``method`` "ghost" or "exact".
    """

    inner: torch.Tensor
    norm_w_sq: torch.Tensor
    norm_l_sq: torch.Tensor
    cos: torch.Tensor
    r_w: torch.Tensor
    r_l: torch.Tensor
    u_w: torch.Tensor
    u_l: torch.Tensor
    len_w: torch.Tensor
    len_l: torch.Tensor
    params: tuple[str, ...] = ()
    method: str = "ghost"

    @classmethod
    def from_dots(cls, inner, nw2, nl2, u_w, u_l, len_w, len_l, params=(), method="ghost"):
        inner, nw2, nl2 = (torch.as_tensor(t, dtype=torch.float64) for t in (inner, nw2, nl2))
        cos = inner / (nw2 * nl2).sqrt()
        return cls(inner, nw2, nl2, cos, inner / nw2, inner / nl2,
                   torch.as_tensor(u_w, dtype=torch.float64), torch.as_tensor(u_l, dtype=torch.float64),
                   torch.as_tensor(len_w, dtype=torch.long), torch.as_tensor(len_l, dtype=torch.long),
                   tuple(params), method)

    # TRL-style names for the public boundary (the short field names are kept for callers)
    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.u_w

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.u_l

    @property
    def chosen_lengths(self) -> torch.Tensor:
        return self.len_w

    @property
    def rejected_lengths(self) -> torch.Tensor:
        return self.len_l

    @property
    def norm_w(self) -> torch.Tensor:
        return self.norm_w_sq.sqrt()

    @property
    def norm_l(self) -> torch.Tensor:
        return self.norm_l_sq.sqrt()

    @property
    def condition(self) -> torch.Tensor:
        """ip / min(‖g_w‖², ‖g_l‖²): < 1 iff DPO's case 1 (Table 1). Not the repo's buggy column."""
        return self.inner / torch.minimum(self.norm_w_sq, self.norm_l_sq)

    def logged_means(self, *, condition: str = "paper") -> dict[str, float]:
        """Means over pairs under the column names of the official analysis/grad_plot.py
        (Yuan et al. 2024 code): ``InnerProduct``, ``Correlation`` (cos), ``Grad_W_Norm`` (‖g_w‖,
        not squared), ``Grad_L_Norm``, ``Grad_Condition``.

        ``condition="paper"``: mean of ip / min(‖g_w‖², ‖g_l‖²) (Table 1's condition);
        ``condition="official"``: the official column, which passes ‖g_w‖² twice to the min and
        so stores mean(ip/‖g_w‖²) = mean(r_w) -- a bug, for parity with published logs only.
        """
        if condition not in ("paper", "official"):
            raise ConfigError("condition", f"unknown value {condition!r}", allowed=("paper", "official"))
        cond = self.r_w if condition == "official" else self.condition
        return {"InnerProduct": float(self.inner.mean()), "Correlation": float(self.cos.mean()),
                "Grad_W_Norm": float(self.norm_w.mean()), "Grad_L_Norm": float(self.norm_l.mean()),
                "Grad_Condition": float(cond.mean())}

    def __repr__(self) -> str:
        n = self.inner.numel()
        if n == 0:
            return f"GradientStats(n=0, method={self.method!r})"
        case1 = int((self.condition < 1).sum())
        return (f"GradientStats(n={n}, method={self.method!r}, params={len(self.params)}, "
                f"mean cos={float(self.cos.mean()):.4g}, mean inner={float(self.inner.mean()):.4g}, "
                f"mean |g_w|={float(self.norm_w.mean()):.4g}, mean |g_l|={float(self.norm_l.mean()):.4g}, "
                f"case-1 condition < 1: {case1}/{n})")


def _encode_pairs(lm, pairs, add_eos: bool) -> tuple[list[Encoded], list[Encoded]]:
    if len(pairs) == 0:
        raise ConfigError("pairs", "no preference pairs given")
    enc = encode_pairs(lm, pairs, add_eos=add_eos, split="")
    return list(enc.chosen), list(enc.rejected)


def _ghost_pair_dots(model, enc_w, enc_l, pad_id, selected, batch_size, cross=True, max_tokens="auto"):
    """(ip, n_w², n_l², u_w, u_l) float64 [n] via one forward + backward per batch of pairs.

    Pairs are length-bucketed into batches of ≤ ``batch_size`` pairs and, with ``max_tokens``,
    ≤ ``max_tokens`` padded tokens (both rows of a pair counted; "auto": :data:`GHOST_CPU_MAX_TOKENS`
    on a CPU, no cap on a GPU). The autograd graph of a batch is the memory that grows with it.
    """
    n = len(enc_w)
    out = torch.zeros(5, n, dtype=torch.float64)
    cap = GhostCapture(model, selected)
    device = next(model.parameters()).device
    if max_tokens == "auto":
        max_tokens = GHOST_CPU_MAX_TOKENS if device.type == "cpu" else None
    lengths = [max(len(a), len(b)) for a, b in zip(enc_w, enc_l)]
    budget = None if max_tokens is None else max(1, max_tokens // 2)
    for idx in length_buckets(lengths, batch_size, max_tokens=budget):
        k = len(idx)
        batch = collate([enc_w[i] for i in idx] + [enc_l[i] for i in idx], pad_id=pad_id, device=device)
        nw, nl, ip = cap.pair_dots(batch, k, cross=cross)
        ip = ip if ip is not None else torch.zeros_like(nw)
        out[:, idx] = torch.stack([ip, nw, nl, cap.u[:k], cap.u[k:]]).cpu()
    return tuple(out)


def _exact_pair_dots(model, enc_w, enc_l, pad_id, selected):
    """Two backwards per pair; per-parameter float64 dot products (== flattened-gradient dots)."""
    params = list(selected.values())
    device = next(model.parameters()).device
    rows = []
    for w, l in zip(enc_w, enc_l):
        lp = summed_token_logprobs(model, collate([w, l], pad_id=pad_id, device=device))
        u = lp.sum(1)
        gw = torch.autograd.grad(u[0], params, retain_graph=True, allow_unused=True)
        gl = torch.autograd.grad(u[1], params, allow_unused=True)
        ip = nw = nl = torch.zeros((), dtype=torch.float64, device=device)
        for a, b, p in zip(gw, gl, params):
            a = (torch.zeros_like(p) if a is None else a).detach().double().flatten()
            b = (torch.zeros_like(p) if b is None else b).detach().double().flatten()
            ip, nw, nl = ip + a @ b, nw + a @ a, nl + b @ b
        uu = lp.detach().double().sum(1)
        rows.append(torch.stack([ip, nw, nl, uu[0], uu[1]]).cpu())
    return tuple(torch.stack(rows).T)


def pair_gradient_stats(
    lm,
    pairs: Sequence,
    *,
    params=None,
    method: str = "ghost",
    batch_size: int = 8,
    include_layernorm: bool = True,
    dtype: torch.dtype | None = None,
    add_eos: bool = True,
) -> GradientStats:
    """Per-pair ⟨g_w, g_l⟩, ‖g_w‖², ‖g_l‖² (Yuan et al. 2024 Eqs. 3–5, Table 1).

    Args:
        lm: a :class:`preflens.models.LM`; its plain HF module is used in eval mode.
        pairs: objects with ``prompt``/``chosen``/``rejected`` (e.g. ``PreferencePair``).
        params: parameter selection (:func:`preflens.dynamics.ghost.select_parameters`): ``None``
            or ``"all"`` (all trainable), names, a regex, or ``"unembed"``, ``"last_block"``,
            ``"embeddings"``, ``"attention"``, ``"mlp"``.
        method: ``"ghost"`` -- one forward + ONE backward of Σ(u_w + u_l) per batch, chosen and
            rejected as separate rows, no per-example gradient materialized (LayerNorm's d-dim
            gradients excepted; :mod:`preflens.dynamics.ghost`); ``"exact"`` -- two backwards per
            pair, per-parameter float64 dot products.
        batch_size: pairs per ghost forward (2 × rows).
        include_layernorm: ``False`` drops norm parameters of any kind (LayerNorm, RMSNorm).
        dtype: run on a deep copy of the model in this dtype (e.g. ``torch.float64`` for tests).
        add_eos: append EOS to responses (default, the quantity the training loop uses).

    Returns:
        :class:`GradientStats` with ``[n]`` float64 tensors, in the order of ``pairs``.
    """
    model = lm.model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    enc_w, enc_l = _encode_pairs(lm, pairs, add_eos)
    return encoded_gradient_stats(model, enc_w, enc_l, pad_id=lm.pad_id, params=params,
                                  method=method, batch_size=batch_size,
                                  include_layernorm=include_layernorm)


def encoded_gradient_stats(
    model,
    encoded_chosen: Sequence[Encoded],
    encoded_rejected: Sequence[Encoded],
    *,
    pad_id: int,
    params=None,
    method: str = "ghost",
    batch_size: int = 8,
    include_layernorm: bool = True,
) -> GradientStats:
    """:func:`pair_gradient_stats` on already-encoded pairs (:func:`preflens.scoring.encode`) and
    a plain HF ``model`` (run in eval mode, mode restored). Same quantities and options."""
    if method not in _METHODS:
        raise ConfigError("method", f"unknown value {method!r}", allowed=_METHODS)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {batch_size!r}")
    if len(encoded_chosen) != len(encoded_rejected) or not encoded_chosen:
        raise ConfigError("encoded_chosen", "need equally many (≥ 1) chosen and rejected responses")
    enc_w, enc_l = list(encoded_chosen), list(encoded_rejected)
    selected = select_parameters(model, params, include_layernorm=include_layernorm)
    with eval_mode(model):
        if method == "ghost":
            ip, nw, nl, uw, ul = _ghost_pair_dots(model, enc_w, enc_l, pad_id, selected, batch_size)
        else:
            ip, nw, nl, uw, ul = _exact_pair_dots(model, enc_w, enc_l, pad_id, selected)
    len_w = torch.tensor([len(e.response_ids) for e in enc_w])
    len_l = torch.tensor([len(e.response_ids) for e in enc_l])
    return GradientStats.from_dots(ip, nw, nl, uw, ul, len_w, len_l, tuple(selected), method)


def pair_gradient_norms(
    model,
    encoded_chosen: Sequence[Encoded],
    encoded_rejected: Sequence[Encoded],
    *,
    pad_id: int,
    params=None,
    include_layernorm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖g_w‖, ‖g_l‖) per pair, ``[n]`` float64 on CPU, by ghost norms (one forward + backward).

    For the pairwise-normalized mitigation (Yuan et al. Sec. 5): the surrogate −a·(u_w/n_w − u_l/n_l) with
    these norms detached. Computed in eval mode (no dropout; the mode is restored) on the plain HF
    ``model``; parameter ``.grad`` fields are not touched. Summed log-probs, EOS as encoded.
    """
    if len(encoded_chosen) != len(encoded_rejected) or not encoded_chosen:
        raise ConfigError("encoded_chosen", "need equally many (≥ 1) chosen and rejected responses")
    selected = select_parameters(model, params, include_layernorm=include_layernorm)
    with eval_mode(model):
        _, nw, nl, _, _ = _ghost_pair_dots(model, list(encoded_chosen), list(encoded_rejected),
                                           pad_id, selected, len(encoded_chosen), cross=False)
    return nw.sqrt(), nl.sqrt()


def cross_pair_gram(lm, pairs: Sequence, *, params=None, include_layernorm: bool = True,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[2n, 2n]`` float64 Gram matrix of the gradients of u_{w,1..n}, u_{l,1..n} (that order).

    Batch-mean loss (Yuan et al. 2024 Eqs. 3–5 summed over a batch B): Δu_w^i ≈ (η/|B|) Σ_j
    (a_w^j G[w_i, w_j] − a_l^j G[w_i, l_j]) and likewise for u_l^i with rows l_i. Ghost, all pairs in ONE forward (meant for
    small evaluation sets; memory grows with n² S²).
    """
    model = lm.model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    enc_w, enc_l = _encode_pairs(lm, pairs, True)
    selected = select_parameters(model, params, include_layernorm=include_layernorm)
    cap = GhostCapture(model, selected)
    with eval_mode(model):
        cap.run(collate(enc_w + enc_l, pad_id=lm.pad_id, device=lm.device))
        n2 = 2 * len(enc_w)
        with torch.no_grad():
            rows = [cap.dots(slice(i, i + 1), slice(0, n2)).cpu() for i in range(n2)]
    return torch.stack(rows)


def predict_first_order(
    stats: GradientStats,
    loss: str,
    *,
    lr: float,
    loss_kwargs: dict | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    u_ref_w: torch.Tensor | None = None,
    u_ref_l: torch.Tensor | None = None,
    pairwise_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order change of (u_w, u_l) after one plain-SGD step of size ``lr`` on ONE pair's loss.

    Yuan et al. 2024 Eqs. 3–5 generalised to any margin loss: ∇ℓ = −(a_w g_w − a_l g_l), so
    Δu_w ≈ η(a_w n_w² − a_l ip), Δu_l ≈ η(a_w ip − a_l n_l²), with (a_w, a_l) from
    :func:`preflens.dynamics.losses.weights` at ``stats.u_w``, ``stats.u_l``, ``stats.len_*`` and
    the reference log-probs ``ref_chosen_logps``/``ref_rejected_logps`` (for losses that need
    them; ``u_ref_w``/``u_ref_l`` are deprecated aliases). Per pair (|B| = 1); for batch-mean steps
    use :func:`cross_pair_gram`. Returns two ``[n]`` float64 tensors.

    ``pairwise_normalized=True``: the step of the pairwise-normalized mitigation (Yuan et al.
    Sec. 5, as the training loop runs it: the surrogate −a_w·(u_w/n_w − u_l/n_l), norms detached),
    so Δu_w ≈ η a_w (n_w − ip/n_l) = η a_w n_w (1 − cos) and Δu_l ≈ η a_w (ip/n_w − n_l) =
    −η a_w n_l (1 − cos): chosen up and rejected down whenever a_w > 0 and cos < 1.
    """
    from preflens.dynamics.losses import weights

    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr == lr or abs(lr) == float("inf"):
        raise ConfigError("lr", f"must be a finite number, got {lr!r}")
    if u_ref_w is not None or u_ref_l is not None:  # deprecated names
        ref_chosen_logps = u_ref_w if ref_chosen_logps is None else ref_chosen_logps
        ref_rejected_logps = u_ref_l if ref_rejected_logps is None else ref_rejected_logps
    a_w, a_l = weights(loss, stats.u_w, stats.u_l, ref_chosen_logps, ref_rejected_logps,
                       stats.len_w.double(), stats.len_l.double(), **(loss_kwargs or {}))
    a_w, a_l = a_w.double(), a_l.double()
    if pairwise_normalized:
        return lr * a_w * (stats.norm_w - stats.inner / stats.norm_l), lr * a_w * (stats.inner / stats.norm_w - stats.norm_l)
    d_w = lr * (a_w * stats.norm_w_sq - a_l * stats.inner)
    d_l = lr * (a_w * stats.inner - a_l * stats.norm_l_sq)
    return d_w, d_l


def sgd_step_changes(
    lm,
    pairs: Sequence,
    runs: Mapping[str, tuple],
    lrs: Sequence[float],
    *,
    params=None,
    include_layernorm: bool = True,
    norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    add_eos: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Measured (Δu_w, Δu_l) after one plain-SGD step θ0 − η∇ℓ on each pair ALONE, for every η.

    The finite-difference side of Yuan et al. 2024 Eqs. 3–5 (what :func:`predict_first_order`
    predicts to first order in η): per pair, one forward at θ0 (policy = reference, so
    ``ref_*_logps`` = u(θ0) and M = 0) and, per run, ONE gradient of the loss from
    :func:`preflens.dynamics.losses.compute_loss` by autograd (not from the closed-form weights);
    each η is then one forward at θ0 − η·g. The selected parameters are restored bit for bit
    afterwards (also on error); the model is run in eval mode (mode restored).

    Args:
        lm: a :class:`preflens.models.LM`; its plain HF module is stepped (use an fp64 model to
            keep rounding far below the second-order remainder at small η).
        pairs: objects with ``prompt``/``chosen``/``rejected``.
        runs: name -> (registered loss, loss kwargs or None, pairwise_normalized). A
            pairwise-normalized run steps along the training loop's surrogate
            −a_w·(u_w/n_w − u_l/n_l), norms detached.
        lrs: step sizes η > 0.
        params, include_layernorm: the parameter selection stepped (as in
            :func:`pair_gradient_stats`; use the same for the predictions).
        norms: (‖g_w‖, ‖g_l‖) ``[n]`` for pairwise-normalized runs (e.g. ``stats.norm_w``,
            ``stats.norm_l``); computed by :func:`pair_gradient_norms` when None and needed.
        add_eos: append EOS to responses (the training loop's convention).

    Returns:
        name -> (Δu_w, Δu_l), each ``[len(lrs), n]`` float64 on CPU (SUMMED log-probs, EOS counted).
    """
    from preflens.dynamics.losses import compute_loss, weights

    lrs = list(lrs)
    if not lrs or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < float("inf")
                      for x in lrs):
        raise ConfigError("lrs", f"need one or more finite step sizes > 0, got {lrs!r}")
    if not runs or any(not isinstance(v, (tuple, list)) or len(v) != 3 for v in runs.values()):
        raise ConfigError("runs", "need name -> (loss, loss_kwargs, pairwise_normalized) for ≥ 1 run")
    model = lm.model
    enc_w, enc_l = _encode_pairs(lm, pairs, add_eos)
    selected = list(select_parameters(model, params, include_layernorm=include_layernorm).values())
    n, device = len(enc_w), next(model.parameters()).device
    if norms is None and any(v[2] for v in runs.values()):
        norms = pair_gradient_norms(model, enc_w, enc_l, pad_id=lm.pad_id, params=params,
                                    include_layernorm=include_layernorm)
    out = {name: torch.zeros(2, len(lrs), n, dtype=torch.float64) for name in runs}
    theta0 = [p.detach().clone() for p in selected]
    with eval_mode(model):
        try:
            for i in range(n):
                batch = collate([enc_w[i], enc_l[i]], pad_id=lm.pad_id, device=device)
                u = concatenated_logps(model, batch)
                before = torch.stack([u.chosen.detach(), u.rejected.detach()])
                args = (u.chosen, u.rejected, before[0], before[1], u.chosen_tokens, u.rejected_tokens)
                step_grads = {}  # every run's gradient before any weight moves (the graph saved θ0)
                for r, (name, (loss, kwargs, normalized)) in enumerate(runs.items()):
                    ell = compute_loss(loss, *args, **(kwargs or {}))
                    if normalized:
                        a_w, _ = weights(loss, *(x.detach() for x in args), **(kwargs or {}))
                        ell = -a_w * (u.chosen / float(norms[0][i]) - u.rejected / float(norms[1][i]))
                    step_grads[name] = torch.autograd.grad(ell.sum(), selected, retain_graph=r + 1 < len(runs),
                                                           allow_unused=True)
                del u, args
                for name, grads in step_grads.items():
                    with torch.no_grad():
                        for k, eta in enumerate(lrs):
                            for p, t0, g in zip(selected, theta0, grads):
                                if g is not None:
                                    p.copy_(t0).add_(g, alpha=-eta)
                            after = concatenated_logps(model, batch)
                            out[name][:, k, i] = (torch.stack([after.chosen, after.rejected]) - before)[:, 0].cpu()
                with torch.no_grad():  # θ0 back before the next pair's forward
                    for p, t0 in zip(selected, theta0):
                        p.copy_(t0)
        finally:  # and on error
            with torch.no_grad():
                for p, t0 in zip(selected, theta0):
                    p.copy_(t0)
    return {name: (d[0], d[1]) for name, d in out.items()}


def entanglement_case(delta_u_w, delta_u_l, *, a_w=None, a_l=None) -> list[str]:
    """Label each pair by the signs of its (predicted or measured) changes (Yuan et al. Table 1).

    ``"ideal"`` Δu_w > 0 and Δu_l < 0 (case 1); ``"both_down"`` (case 2); ``"both_up"`` (case 3);
    ``"chosen_down_rejected_up"`` (impossible at first order for a_w, a_l > 0; possible with a
    negative weight, e.g. IPO/SPPO past their target). A change of exactly 0 counts as the
    unfavourable direction (chosen "down", rejected "up"). ``"zero_weight"``: both weights are 0
    when ``a_w``/``a_l`` are given (inactive hinge), or both changes are exactly 0.
    """
    dw = torch.as_tensor(delta_u_w).reshape(-1)
    dl = torch.as_tensor(delta_u_l).reshape(-1)
    if dw.shape != dl.shape:
        raise ConfigError("delta_u_l", f"shape {tuple(dl.shape)} differs from {tuple(dw.shape)}")
    zero = (dw == 0) & (dl == 0)
    if a_w is not None and a_l is not None:
        zero = zero | ((torch.as_tensor(a_w).reshape(-1) == 0) & (torch.as_tensor(a_l).reshape(-1) == 0))
    out = []
    for z, up_w, up_l in zip(zero.tolist(), (dw > 0).tolist(), (dl >= 0).tolist()):
        if z:
            out.append("zero_weight")
        else:
            out.append({(True, False): "ideal", (False, False): "both_down",
                        (True, True): "both_up", (False, True): "chosen_down_rejected_up"}[(up_w, up_l)])
    return out


def case_counts(cases: Sequence[str]) -> dict[str, int]:
    """Counts of every label in :data:`CASES` (zeros included)."""
    counts = Counter(cases)
    bad = set(counts) - set(CASES)
    if bad:
        raise ConfigError("cases", f"unknown labels {sorted(bad)}", allowed=CASES)
    return {c: counts.get(c, 0) for c in CASES}


@dataclass(frozen=True)
class TokenSimilarity:
    """Token-level gradient similarity of one pair (Yuan et al. Sec. 4, Fig. 4b).

    ``inner`` [len_w, len_l] K[t,s] = ⟨g_{w,t}, g_{l,s}⟩ with g_{·,t} = ∇ log π(y_t | x, y_<t)
    (ΣK = ip); ``cos`` = K / outer(norm_w, norm_l); ``norm_w`` [len_w], ``norm_l`` [len_l];
    ``tokens_w``/``tokens_l`` the response ids (EOS included). Rows chosen, columns rejected.
    """

    cos: torch.Tensor
    inner: torch.Tensor
    norm_w: torch.Tensor
    norm_l: torch.Tensor
    tokens_w: tuple[int, ...]
    tokens_l: tuple[int, ...]

    def __repr__(self) -> str:
        return (f"TokenSimilarity(shape={tuple(self.cos.shape)}, mean cos={float(self.cos.mean()):.4g}, "
                f"inner sum={float(self.inner.sum()):.4g})")


def _flat_grad(out, params, retain=True) -> torch.Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).detach().double().flatten()
                      for g, p in zip(grads, params)])


def token_gradient_similarity(lm, pair, *, params=None, include_layernorm: bool = True
                              ) -> TokenSimilarity:
    """Per-token gradient inner products and cosines between a pair's two responses (Yuan et al. Fig. 4b).

    One backward per response token (the official ``grad_heatmap`` recipe). The rejected side's
    per-token gradients are held in float64: memory len_l × |selected| × 8 bytes, so restrict
    ``params`` (e.g. ``"last_block"``) on large models. Eval mode; EOS counted as a token.
    """
    model = lm.model
    enc_w, enc_l = _encode_pairs(lm, [pair], True)
    selected = list(select_parameters(model, params, include_layernorm=include_layernorm).values())
    with eval_mode(model):
        batch = collate(enc_w + enc_l, pad_id=lm.pad_id, device=lm.device)
        lp = summed_token_logprobs(model, batch)
        mask = batch.response_mask
        tok_w, tok_l = lp[0][mask[0]], lp[1][mask[1]]
        g_l = torch.stack([_flat_grad(tok_l[s], selected) for s in range(tok_l.shape[0])])
        rows, norm_w = [], []
        for t in range(tok_w.shape[0]):
            g = _flat_grad(tok_w[t], selected, retain=t + 1 < tok_w.shape[0])
            rows.append(g_l @ g)
            norm_w.append(g.norm())
        inner, norm_w, norm_l = torch.stack(rows).cpu(), torch.stack(norm_w).cpu(), g_l.norm(dim=1).cpu()
    cos = inner / (norm_w[:, None] * norm_l[None, :])
    return TokenSimilarity(cos, inner, norm_w, norm_l, enc_w[0].response_ids, enc_l[0].response_ids)


@dataclass(frozen=True)
class LastLayerFactorization:
    """``hidden_cos``, ``residual_cos``, ``cos`` (= their product), each ``[len_w, len_l]`` float64.
    Unpacks like the former tuple: ``hid, res, cos = last_layer_factorization(...)``."""

    hidden_cos: torch.Tensor
    residual_cos: torch.Tensor
    cos: torch.Tensor

    def __iter__(self):
        return iter((self.hidden_cos, self.residual_cos, self.cos))

    def __getitem__(self, i):
        return (self.hidden_cos, self.residual_cos, self.cos)[i]

    def __repr__(self) -> str:
        return (f"LastLayerFactorization(shape={tuple(self.cos.shape)}, "
                f"mean cos={float(self.cos.mean()):.4g})")


def last_layer_factorization(lm, pair) -> LastLayerFactorization:
    """(hidden_cos, residual_cos, cos), each ``[len_w, len_l]`` float64 (last layer, exact).

    For the unembedding USE only -- the gradient of log π(y_t) with respect to the matrix of the
    logits' linear map, logits = h Wᵀ (+ b) -- the per-token gradient is δ_t h_tᵀ with
    δ_t = e_{y_t} − π_t, so K_last[t,s] = ⟨h_{w,t}, h_{l,s}⟩·⟨δ_{w,t}, δ_{l,s}⟩ and
    cos = hidden_cos · residual_cos: hidden-state similarity × softmax-residual similarity.
    With an output bias b the (W, b) gradient is δ[h; 1]ᵀ, inner (⟨h,h'⟩ + 1)⟨δ,δ'⟩, and
    ``hidden_cos`` is the cosine of the augmented [h; 1]. For a TIED model (GPT-2) this is NOT the
    gradient of the ``wte`` parameter, which also carries the input-embedding part; it equals the
    per-token gradient of an untied copy's ``lm_head.weight``. With a logit head (Gemma 2
    soft-capping, :class:`preflens.scoring.LogitHead`) δ_t = (e_{y_t} − π_t) ⊙ head'(z_t), the
    gradient with respect to z = h Wᵀ + b. h = post-final-norm hidden state at
    the positions predicting each response token (EOS counted); computed in float64.
    """
    model = lm.model
    enc_w, enc_l = _encode_pairs(lm, [pair], True)
    head, lhead = model.get_output_embeddings(), logit_head(model)
    with eval_mode(model), torch.no_grad():
        batch = collate(enc_w + enc_l, pad_id=lm.pad_id, device=lm.device)
        hidden = final_hidden(model, batch).double()
        mask = batch.response_mask
        w = head.weight.double()
        b = getattr(head, "bias", None)
        hs, ds = [], []
        for row in range(2):
            h = hidden[row][mask[row]]
            z = h @ w.T + (0 if b is None else b.double())
            delta = -torch.softmax(lhead(z), -1)
            delta[torch.arange(h.shape[0]), batch.targets[row][mask[row]]] += 1.0
            delta = lhead.backward(z, delta)  # through soft-capping / logit scale
            if b is not None:
                h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
            hs.append(h)
            ds.append(delta)

    def cosm(x, y):
        return (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])

    hidden_cos, residual_cos = cosm(*hs).cpu(), cosm(*ds).cpu()
    return LastLayerFactorization(hidden_cos, residual_cos, hidden_cos * residual_cos)
