"""Per-head direct logit attribution (DLA) of the in-context vs memorized answer.

Source: Yu, Merullo, Pavlick, "Characterizing Mechanisms for Factual Recall in Language Models",
EMNLP 2023 (arXiv 2310.15910), Sec. 5 / Fig. 4; direct logit attribution as in Elhage et al.
2021, "A Mathematical Framework for Transformer Circuits" (the residual stream is a sum of
component outputs, so the logits are too, up to the final norm's scale).

Definition. For prompt n, position T (default the last prompt token, the ":" of "A:"),
head (l, h) and the first sub-tokens ``t_ic``, ``t_mem`` of ``" " + city``:

    r = z[l, h, T] @ W_O[l, h]                       (no b_O)
    r~ = (r - mean_d r) / sigma_T                    (sigma_T: cached ln_final scale, LN frozen)
    DLA[l, h](n) = r~ . (W_U[:, t_ic] - W_U[:, t_mem])

with W_U LN-folded and centred (a **compatibility-mode** bridge: raw-mode ``logit_attrs`` ignores
the ln_final weight and bias and is silently wrong). Positive = promotes the in-context answer.
Each prompt is dotted with **its own** direction (the official code summed the batch's
directions). Invariant: the attributions of all components (embeddings, heads, biases, MLPs)
plus ``b_U[t_ic] - b_U[t_mem]`` equal the **pre-cap** logit difference at T.

What a head's DLA contains. ``z`` is computed from value vectors *without* their bias: in
compatibility mode TransformerLens folds the value bias b_V, and the part of the ln1 bias that
W_V carries (b_ln · W_V), into b_O (``fold_value_biases``; the attention pattern sums to 1, so
they contribute b_V · W_O whatever the pattern). Both therefore appear in the ``bias`` component,
not in any head, exactly as TransformerLens' own decomposition.

Families. Gemma 2/3 (and OLMo 2) normalize each block's attention and MLP output before the
residual add (post-norms), which TransformerLens' decomposition does not model: for them, given
an :class:`~preflens.models.LM`, DLA runs on the HF module with every norm's scale frozen
(:mod:`preflens.attribution.postnorm`: head h contributes ``g s (z_h W_O^h)`` through the frozen
post-attention norm, then the frozen final norm; exact, same result types); given only a bridge
it raises ModelError (checked on the first batch, not assumed). Under grouped-query attention (Llama, Mistral, Qwen2, Gemma 2) ``hook_z`` has one
slot per *query* head (a KV head's values are shared, but each query head mixes them with its
own pattern), so heads are ``n_heads`` query heads per layer. With final-logit soft-capping
(logits = c·tanh(z/c)) the decomposition is linear only before the cap: DLA and
``LogitDecomposition.logit_diff`` are **pre-cap** logit differences (the order of tokens, and so
the memorized token picked, is the same before and after the cap).

When a country has several memorized capitals (Bolivia), ``t_mem`` is the memorized first token
with the highest logit at T in the same forward pass (as in
:func:`~preflens.attribution.recall.answer_logit_diff`).

Batching: prompts are grouped by token length, so batches need no padding and position T is a
real token of every row. BOS is prepended exactly when the model's tokenizer adds it
(:func:`preflens.scoring.bos_prefix`); ``position`` counts prompt tokens (a BOS is not one).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preflens.attribution.postnorm import decompose, post_norm_model
from preflens.attribution.recall import bridge_bos
from preflens.data.recall_prompts import CounterfactualPrompt
from preflens.errors import ConfigError, DataError, ModelError

__all__ = [
    "ANSWERS",
    "HeadAttribution",
    "head_attribution",
    "LogitDecomposition",
    "resolve_bridge",
    "compat_bridge",
    "logit_decomposition",
    "head_logit_attribution",
    "select_heads",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogitDecomposition:
    """Direct contributions to the pre-cap ``logit[t_ic] - logit[t_mem]`` at one position.

    Attributes:
        components: ``[C, n]`` float32, one row per component named in ``labels``
            (``L{l}H{h}`` query heads, ``{l}_mlp_out``, ``embed``, ``pos_embed``, ``bias`` = summed
            attention/MLP output biases incl. the folded value biases), after the frozen ln_final.
        labels: ``C`` component names (TransformerLens ``get_full_resid_decomposition`` order).
        unembed_bias: ``[n]`` ``b_U[t_ic] - b_U[t_mem]``.
        logit_diff: ``[n]`` the model's pre-cap logit difference from the same forward (equal to
            the logit difference for a model without soft-capping).
        ic_ids, mem_ids: ``[n]`` the token ids used.
    """

    components: torch.Tensor
    labels: list[str]
    unembed_bias: torch.Tensor
    logit_diff: torch.Tensor
    ic_ids: torch.Tensor
    mem_ids: torch.Tensor

    def total(self) -> torch.Tensor:
        """``[n]`` sum of all components plus the unembedding-bias term."""
        return self.components.sum(0) + self.unembed_bias

    def __repr__(self) -> str:
        err = float((self.total() - self.logit_diff).abs().max()) if self.logit_diff.numel() else 0.0
        return (f"LogitDecomposition(components={tuple(self.components.shape)}, "
                f"n_prompts={self.logit_diff.numel()}, max |total - logit_diff|={err:.2g})")


def resolve_bridge(lm=None, *, bridge=None, require_compat: bool = True):
    """The bridge a head lens runs on -- the one compatibility check of this package.

    ``bridge`` when given, else ``lm.bridge(compat=True)``. For the older call form a bridge
    passed in place of ``lm`` is accepted.

    Raises:
        ModelError: ``require_compat`` and the bridge is not in compatibility mode (DLA would
            ignore the ln_final weight and bias), or its BOS setting differs from ``lm``'s
            tokenizer (it would score other token sequences than preflens).
        ConfigError: neither an LM nor a bridge given.
    """
    from preflens.models import LM
    from preflens.scoring import bos_prefix

    if bridge is None and lm is not None and not isinstance(lm, LM):
        lm, bridge = None, lm  # older call form: the bridge first
    if bridge is None:
        if lm is None:
            raise ConfigError("lm", "give an LM (or a compatibility-mode bridge as bridge=)")
        return lm.bridge(compat=True)
    if require_compat and not (getattr(bridge, "compatibility_mode", False)
                               and getattr(bridge, "_weights_processed", True)):
        raise ModelError(
            "direct logit attribution needs a compatibility-mode bridge "
            "(lm.bridge(compat=True)); a raw bridge ignores the ln_final weight and bias")
    if lm is not None:
        want = bool(bos_prefix(lm.tokenizer))
        if bool(getattr(bridge.cfg, "default_prepend_bos", True)) != want:
            raise ModelError(
                f"the bridge {'prepends' if not want else 'does not prepend'} BOS but the model's "
                f"tokenizer {'does not add' if not want else 'adds'} one; build it with lm.bridge()")
    return bridge


def _check_linear(bridge, ids: torch.Tensor, pos: int) -> None:
    """Refuse families whose direct decomposition is not exact (once per bridge).

    Gemma 2/3 normalize each block's attention and MLP output (post-norms) before adding it to
    the residual stream; TransformerLens' component decomposition does not include that norm, so
    the components do not sum to the logits. Checked, not assumed: the sum of all components at
    ``pos`` of one prompt must equal the pre-cap logits up to a per-position constant."""
    if getattr(bridge, "_preflens_dla_linear", False):
        return
    _, cache = bridge.run_with_cache(ids[:1])
    stack = cache.get_full_resid_decomposition(layer=-1, expand_neurons=False, apply_ln=False,
                                               pos_slice=pos)  # [C, 1, d_model]
    approx = cache.apply_ln_to_stack(stack.sum(0, keepdim=True), layer=-1, pos_slice=pos)[0, 0]
    pre = (cache["ln_final.hook_out"][0, pos] @ bridge.W_U).double()
    got = (approx @ bridge.W_U).double()
    err = float(((got - got.mean()) - (pre - pre.mean())).abs().max())
    if not err <= 1e-3 * max(1.0, float(pre.abs().max())):
        arch = getattr(bridge.cfg, "architecture", None) or type(bridge.original_model).__name__
        raise ModelError(
            f"direct logit attribution is not exact for {arch}: its blocks normalize the "
            f"attention/MLP outputs before adding them to the residual stream (post-norms), which "
            f"TransformerLens' decomposition leaves out (components miss the logits by {err:.3g}); "
            "pass the LM (not only a bridge) for the exact post-norm decomposition")
    bridge._preflens_dla_linear = True


def compat_bridge(lm_or_bridge):
    """A compatibility-mode bridge: built from an :class:`~preflens.models.LM`, or checked
    (:func:`resolve_bridge`)."""
    return resolve_bridge(lm_or_bridge)


ANSWERS = ("first-token", "full")


def _text_ids(tok, text: str, what: str, i: int) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"item {i}: tokenizes to no tokens", field=what)
    return list(ids)


def _as_triples(prompts, targets, foils):
    """``(texts, targets, foil candidate lists, keep)``. The capitals form (``targets`` and
    ``foils`` None) maps each :class:`CounterfactualPrompt` to (text, " " + in-context city,
    " " + every memorized capital) with ``keep`` = not degenerate."""
    if targets is None and foils is None:
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, CounterfactualPrompt)]
        if bad:
            raise ConfigError("targets", f"prompt {bad[0]} is a string: give targets and foils "
                              "(or pass CounterfactualPrompt objects)")
        return ([p.text for p in prompts], [" " + p.in_context for p in prompts],  # first_token_ids
                [[" " + m for m in p.memorized] for p in prompts], [not p.degenerate for p in prompts])
    if targets is None or foils is None or not len(prompts) == len(targets) == len(foils):
        raise ConfigError("targets", "give one target and one foil (or a list of foils) per prompt")
    fls = [[f] if isinstance(f, str) else list(f) for f in foils]
    for i, f in enumerate(fls):
        if not f:
            raise DataError(f"item {i}: no foil", field="foils")
    return [str(p) for p in prompts], list(targets), fls, [True] * len(prompts)


def _first_ids(bridge, targets, foils) -> tuple[list[int], list[list[int]]]:
    tok = bridge.tokenizer
    return ([_text_ids(tok, t, "targets", i)[0] for i, t in enumerate(targets)],
            [[_text_ids(tok, f, "foils", i)[0] for f in fs] for i, fs in enumerate(foils)])


def _groups(bridge, texts, tgt_ids, foil_ids, batch_size: int, position: int):
    """Yield ``(indices, ids[B, S], target[B], foil candidate lists, pos)`` for equal-length
    prompt batches; ids start with the bridge's BOS (if any) and ``pos`` is ``position`` shifted
    past it."""
    tok = bridge.tokenizer
    bos = bridge_bos(bridge)
    by_len: dict[int, list[int]] = defaultdict(list)
    enc = []
    for i, t in enumerate(texts):
        ids = _text_ids(tok, t, "text", i)
        if not -len(ids) <= position < len(ids):
            raise ConfigError("position", f"{position} is outside prompt {i} ({len(ids)} tokens)")
        enc.append(bos + list(ids))
        by_len[len(ids)].append(i)
    pos = position + len(bos) if position >= 0 else position
    dev = bridge.cfg.device
    for length in sorted(by_len):
        idx_all = by_len[length]
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s: s + batch_size]
            ids = torch.tensor([enc[i] for i in idx], device=dev)
            yield (idx, ids, torch.tensor([tgt_ids[i] for i in idx], device=dev),
                   [foil_ids[i] for i in idx], pos)


def _pick_mem(logits_T: torch.Tensor, mems: list[list[int]]) -> torch.Tensor:
    """Per row, the memorized first token with the highest logit."""
    out = []
    for b, m in enumerate(mems):
        m_t = torch.tensor(m, device=logits_T.device)
        out.append(m_t[logits_T[b, m_t].argmax()])
    return torch.stack(out)


@torch.no_grad()
def logit_decomposition(
    lm=None,
    prompts: Sequence[CounterfactualPrompt] = (),
    *,
    bridge=None,
    position: int = -1,
    batch_size: int = 16,
) -> LogitDecomposition:
    """Full direct decomposition of the pre-cap ``logit[t_ic] - logit[t_mem]`` at ``position``
    (module docstring): every component of ``cache.get_full_resid_decomposition(layer=-1,
    expand_neurons=False)`` through ``cache.logit_attrs`` (frozen ln_final scale).
    ``components.sum(0) + unembed_bias == logit_diff`` up to float rounding. Caches every hook:
    meant for checks and small prompt sets; use :func:`head_logit_attribution` at scale.

    Args:
        lm: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built), or ``None``
            with ``bridge=`` a compatibility-mode bridge (:func:`resolve_bridge`).
    """
    bridge = resolve_bridge(lm, bridge=bridge)
    hf = post_norm_model(lm)
    n = len(prompts)
    comps = ub = ld = ics = mms = None
    labels: list[str] = []
    texts, targets, foils, _ = _as_triples(prompts, None, None)
    for idx, ids, ic, mems, pos in _groups(bridge, texts, *_first_ids(bridge, targets, foils),
                                           batch_size, position):
        if hf is not None:  # post-norm blocks: exact decomposition on the HF module
            d = decompose(hf, ids, pos)
            mem = _pick_mem(d.precap, mems)
            lt, b_U, labels, attr = d.precap, d.b_U, d.labels, d.logit_attrs(ic, mem)
        else:
            _check_linear(bridge, ids, pos)
            logits, cache = bridge.run_with_cache(ids)
            mem = _pick_mem(logits[:, pos], mems)
            # the linear (pre-cap) logits: ln_final output times the (folded) unembedding
            lt, b_U = cache["ln_final.hook_out"][:, pos] @ bridge.W_U + bridge.b_U, bridge.b_U
            stack, labels = cache.get_full_resid_decomposition(
                layer=-1, expand_neurons=False, apply_ln=False, pos_slice=pos, return_labels=True)
            attr = cache.logit_attrs(stack, tokens=ic, incorrect_tokens=mem, pos_slice=pos)
        if comps is None:
            comps = torch.zeros(attr.shape[0], n)
            ub, ld = torch.zeros(n), torch.zeros(n)
            ics, mms = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        rows = torch.tensor(idx)
        comps[:, rows] = attr.float().cpu()
        ub[rows] = (b_U[ic] - b_U[mem]).float().cpu()
        ar = torch.arange(len(idx), device=lt.device)
        ld[rows] = (lt[ar, ic] - lt[ar, mem]).float().cpu()
        ics[rows], mms[rows] = ic.cpu(), mem.cpu()
    if comps is None:
        raise DataError("no prompts given", field="prompts")
    return LogitDecomposition(comps, list(labels), ub, ld, ics, mms)


@dataclass(frozen=True)
class HeadAttribution:
    """Per-head direct attribution of target vs foil, per item (:func:`head_attribution`).

    Attributes:
        per_head: ``[n_layers, n_heads, n]`` float32 (query heads).
        difference: ``[n]`` the model's own target-minus-foil score from the same forward passes
            (pre-cap first-token logit difference, or summed full-answer log-prob difference).
        valid: ``[n]`` False for a degenerate capitals prompt or a zero direction (target and foil
            share their first token).
    """

    per_head: torch.Tensor
    difference: torch.Tensor
    valid: torch.Tensor


def _first_token(bridge, texts, targets, foils, position, batch_size, hf=None):
    t_ids, f_ids = _first_ids(bridge, targets, foils)
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    names = ({f"blocks.{l}.attn.hook_z" for l in range(L)}
             | {"ln_final.hook_scale", "ln_final.hook_out"})
    out, diff = torch.zeros(L * H, len(texts)), torch.zeros(len(texts))
    nonzero = torch.ones(len(texts), dtype=torch.bool)
    for idx, ids, tgt, fls, pos in _groups(bridge, texts, t_ids, f_ids, batch_size, position):
        if hf is not None:  # post-norm blocks (module docstring)
            d = decompose(hf, ids, pos)
            foil = _pick_mem(d.precap, fls)
            pre, attr = d.precap, d.logit_attrs(tgt, foil)[: L * H]
        else:
            _check_linear(bridge, ids, pos)
            logits, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
            foil = _pick_mem(logits[:, pos], fls)
            pre = cache["ln_final.hook_out"][:, pos] @ bridge.W_U + bridge.b_U  # pre-cap logits
            stack = cache.stack_head_results(layer=-1, pos_slice=pos)  # [L*H, B, d_model]
            attr = cache.logit_attrs(stack, tokens=tgt, incorrect_tokens=foil, pos_slice=pos)
        rows, ar = torch.tensor(idx), torch.arange(len(idx), device=pre.device)
        out[:, rows] = attr.float().cpu()
        diff[rows] = (pre[ar, tgt] - pre[ar, foil]).float().cpu()
        nonzero[rows] = (tgt != foil).cpu()
    return out, diff, nonzero


def _full_answer(bridge, text: str, answer: str, i: int, names, hf=None):
    """``([L*H] first-order direct attribution, summed log-prob)`` of ``answer`` after ``text``."""
    tok = bridge.tokenizer
    bos = bridge_bos(bridge)
    p_ids, a_ids = bos + _text_ids(tok, text, "text", i), _text_ids(tok, answer, "targets", i)
    ids = torch.tensor([p_ids + a_ids], device=bridge.cfg.device)
    if hf is not None:  # post-norm blocks (module docstring)
        return _full_answer_postnorm(hf, ids, len(p_ids), a_ids)
    _check_linear(bridge, ids, -1)
    logits, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
    pos = torch.arange(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1, device=ids.device)
    y = torch.tensor(a_ids, device=ids.device)
    logp = torch.log_softmax(logits[0, pos].double(), dim=-1)              # [R, V], post-cap
    W_U = bridge.W_U.double()                                              # [d_model, V]
    grad = -logp.exp()                                                     # d log p(y) / d logits
    grad[torch.arange(len(a_ids)), y] += 1.0
    cap = float(getattr(bridge.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    if cap > 0:  # logits = cap * tanh(z / cap): chain through the cap
        z = cache["ln_final.hook_out"][0, pos].double() @ W_U + bridge.b_U.double()
        grad = grad * (1 - torch.tanh(z / cap) ** 2)
    stack = cache.apply_ln_to_stack(cache.stack_head_results(layer=-1), layer=-1)
    stack = stack[:, 0, pos].double()                                      # [L*H, R, d_model]
    attr = torch.einsum("crd,rd->c", stack, grad @ W_U.T)
    return attr.float().cpu(), float(logp[torch.arange(len(a_ids)), y].sum())


def _full_answer_postnorm(hf, ids, n_prompt: int, a_ids):
    """:func:`_full_answer` on the HF module (frozen norm scales, :mod:`.postnorm`)."""
    pos = torch.arange(n_prompt - 1, n_prompt + len(a_ids) - 1, device=ids.device)
    d = decompose(hf, ids, pos)
    z = d.precap[0]                                                        # [R, V] pre-cap
    cap = float(getattr(hf.config, "final_logit_softcapping", None) or 0.0)
    logp = torch.log_softmax(cap * torch.tanh(z / cap) if cap > 0 else z, dim=-1)
    ar = torch.arange(len(a_ids), device=ids.device)
    grad = -logp.exp()
    grad[ar, torch.tensor(a_ids, device=ids.device)] += 1.0
    if cap > 0:
        grad = grad * (1 - torch.tanh(z / cap) ** 2)
    L, H = len(hf.base_model.layers), int(hf.config.num_attention_heads)
    attr = torch.einsum("crd,rd->c", d.stack[: L * H, 0], grad @ d.W_U)
    return attr.float().cpu(), float(logp[ar, torch.tensor(a_ids, device=ids.device)].sum())


def _full(bridge, texts, targets, foils, hf=None):
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    names = ({f"blocks.{l}.attn.hook_z" for l in range(L)}
             | {"ln_final.hook_scale", "ln_final.hook_out"})
    out, diff = torch.zeros(L * H, len(texts)), torch.zeros(len(texts))
    for i, (t, y, fs) in enumerate(zip(texts, targets, foils)):
        a_t, lp_t = _full_answer(bridge, t, y, i, names, hf)
        a_f, lp_f = max((_full_answer(bridge, t, f, i, names, hf) for f in fs), key=lambda r: r[1])
        out[:, i], diff[i] = a_t - a_f, lp_t - lp_f
    return out, diff, torch.ones(len(texts), dtype=torch.bool)


@torch.no_grad()
def head_attribution(
    lm=None,
    prompts: Sequence = (),
    targets: Sequence[str] | None = None,
    foils: Sequence | None = None,
    *,
    bridge=None,
    answer: str = "first-token",
    position: int = -1,
    batch_size: int = 32,
) -> HeadAttribution:
    """Per-head direct attribution of ``target`` vs ``foil`` after any prompt (module docstring).

    ``prompts`` are strings with ``targets`` (continuations as they follow the prompt, usually
    with a leading space) and ``foils`` (a string or a list of alternatives per prompt; the
    alternative the model scores highest is used), or :class:`CounterfactualPrompt` s with
    ``targets`` and ``foils`` None (target " " + in-context city, foils " " + each memorized
    capital). Prompt and answers are tokenized separately; BOS as :func:`_groups`.

    * ``answer="first-token"`` (default; Yu et al. 2023 Sec. 5): each head's direct contribution
      to the pre-cap ``logit[t] - logit[f]`` at ``position`` (default the last prompt token), t
      and f the first tokens of target and foil, through the frozen ln_final on a
      compatibility-mode bridge. Heads, the other components and ``b_U[t] - b_U[f]`` sum exactly
      to ``difference``.
    * ``answer="full"``: each head's first-order direct contribution to the summed full-answer
      log-prob difference Σ_k log π(y_k | x, y_<k) (target minus foil): at every answer position
      the head's output (ln_final frozen) dotted with the gradient of log π(y_k) with respect to
      the final residual, W_U (e_{y_k} − π) (times the soft-cap's derivative where there is one).
      A linearization of the log-softmax, so the components do not sum exactly to
      ``difference``; equal to the first-token attribution when both answers are single tokens
      (no cap). One forward pass per answer (no batching).

    Args:
        lm: an :class:`~preflens.models.LM`, or ``None`` with ``bridge=`` a compatibility-mode
            bridge (:func:`resolve_bridge`).

    Returns:
        :class:`HeadAttribution` (``per_head [n_layers, n_heads, n]``, ``difference [n]``,
        ``valid [n]``).
    """
    if answer not in ANSWERS:
        raise ConfigError("answer", f"unknown value {answer!r}", allowed=ANSWERS)
    texts, tgts, fls, keep = _as_triples(prompts, targets, foils)
    if not texts:
        raise DataError("no prompts given", field="prompts")
    if answer == "full" and position != -1:
        raise ConfigError("position", "full-answer attribution reads every answer position; "
                          "leave position at -1")
    bridge = resolve_bridge(lm, bridge=bridge)
    if answer == "first-token":
        out, diff, nonzero = _first_token(bridge, texts, tgts, fls, position, batch_size,
                                          post_norm_model(lm))
    else:
        out, diff, nonzero = _full(bridge, texts, tgts, fls, post_norm_model(lm))
    L, H = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
    return HeadAttribution(out.reshape(L, H, len(texts)), diff,
                           nonzero & torch.tensor(keep, dtype=torch.bool))


def head_logit_attribution(
    lm=None,
    prompts: Sequence = (),
    targets: Sequence[str] | None = None,
    foils: Sequence | None = None,
    *,
    bridge=None,
    answer: str = "first-token",
    position: int = -1,
    batch_size: int = 32,
    per_prompt: bool = False,
    skip_degenerate: bool = True,
) -> torch.Tensor:
    """``[n_layers, n_heads]`` float32: mean over prompts of each query head's DLA (module
    docstring; Yu et al. 2023 Sec. 5, Fig. 4), on pre-cap logits.

    A thin layer over :func:`head_attribution` (same prompt/target/foil forms and ``answer``):
    one ``run_with_cache`` per equal-length batch caching only ``attn.hook_z`` and ln_final;
    ``cache.stack_head_results(-1, pos_slice=position)`` rebuilds ``z @ W_O`` (no b_O, no b_V)
    and ``cache.logit_attrs(..., tokens=t[B], incorrect_tokens=f[B])`` dots each prompt with its
    own direction.

    Args:
        lm: an :class:`~preflens.models.LM` (a compatibility-mode bridge is built), or ``None``
            with ``bridge=`` a compatibility-mode bridge (ModelError otherwise).
        position: prompt-token index (negative counts from the end; a BOS is not counted).
        per_prompt: return ``[n_layers, n_heads, n]`` (every prompt, none skipped) instead.
        skip_degenerate: leave out of the mean the prompts flagged ``degenerate`` and those whose
            target and foil first tokens coincide (zero direction).
    """
    res = head_attribution(lm, prompts, targets, foils, bridge=bridge, answer=answer,
                           position=position, batch_size=batch_size)
    if per_prompt:
        return res.per_head
    keep = res.valid if skip_degenerate else torch.ones_like(res.valid)
    if int((~keep).sum()):
        log.info("head_logit_attribution: %d prompts skipped (degenerate or zero direction)",
                 int((~keep).sum()))
    if not bool(keep.any()):
        raise DataError("no prompt with a non-degenerate direction", field="prompts")
    return res.per_head[:, :, keep].double().mean(-1).float()


def select_heads(attribution: torch.Tensor, k: int = 3) -> dict[str, list[tuple[int, int, float]]]:
    """Top-k heads of a ``[n_layers, n_heads]`` attribution (Yu et al. 2023 Sec. 5; official
    code: k = 3): ``"memory"`` = the k most negative (promote the memorized answer), ``"in_context"``
    = the k most positive, each as ``(layer, head, score)`` sorted by |score| descending; ties
    broken by (layer, head) order."""
    if attribution.ndim != 2:
        raise ConfigError("attribution", f"must be [n_layers, n_heads], got {tuple(attribution.shape)}")
    L, H = attribution.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= L * H:
        raise ConfigError("k", f"must be an int in [1, {L * H}], got {k!r}")
    flat = [(float(attribution[l, h]), l, h) for l in range(L) for h in range(H)]
    lo = sorted(flat, key=lambda x: (x[0], x[1], x[2]))[:k]
    hi = sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:k]
    return {"memory": [(l, h, s) for s, l, h in lo], "in_context": [(l, h, s) for s, l, h in hi]}
