"""Pretrain the toyworld GPT-2 from scratch on its generated corpus (one file, top to bottom).

Recipe (issue 3, item 5; nanoGPT-style loop): draw the world (``make_world(seed)``), generate
documents, train the word-level tokenizer, pack documents into blocks of ``n_ctx`` tokens
(each block starts at a document start, documents end with ``<|endoftext|>``, the unused tail
of a block is ``<|endoftext|>`` padding excluded from the loss), then train a plain
``GPT2LMHeadModel`` with next-token cross-entropy, AdamW and a warm-up + cosine schedule for a
fixed number of steps, on CPU with 2 threads. The same seed gives the same corpus, tokenizer and
weights. Only documents packed into the blocks actually trained on enter the fact counts
(``frequencies.json``).

Output directory (loadable with ``GPT2LMHeadModel.from_pretrained`` and
``AutoTokenizer.from_pretrained``): ``model.safetensors``, ``config.json``,
``generation_config.json``, tokenizer files, ``world.json``, ``frequencies.json``,
``train.json`` (settings, losses, timing).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from preflens.data.toyworld.corpus import DEFAULT_COPY_MIX, DEFAULT_MIX, count_facts, generate_documents, vocabulary_lines
from preflens.data.toyworld.tokenizer import EOS, save_tokenizer, train_tokenizer
from preflens.data.toyworld.world import make_world, save_world
from preflens.dynamics.config import lr_at
from preflens.errors import ConfigError, TrainingError

__all__ = ["TrainConfig", "train_toyworld"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every knob of a toyworld run (defaults = the shipped checkpoint)."""

    seed: int = 0
    steps: int = 2400
    batch_size: int = 32
    n_ctx: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    zipf_s: float = 1.3
    n_fictional: int = 300
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))
    copy_mix: dict = field(default_factory=lambda: dict(DEFAULT_COPY_MIX))
    copy_real_temper: float = 0.5
    threads: int = 2
    countries: list | None = None      # [(country, capital)] to override capitals.csv (tests)


def _pack(docs_ids: list[list[int]], n_ctx: int, eos: int, n_blocks: int):
    """Greedy packing; returns (inputs [B, n_ctx], labels [B, n_ctx], number of docs used)."""
    blocks, labels, cur, lab = [], [], [], []
    used = 0
    for ids in docs_ids:
        ids = ids[: n_ctx - 1] + [eos]
        if len(cur) + len(ids) > n_ctx:
            pad = n_ctx - len(cur)
            blocks.append(cur + [eos] * pad)
            labels.append(lab + [-100] * pad)
            cur, lab = [], []
            if len(blocks) == n_blocks:
                break
        cur += ids
        lab += ids
        used += 1
    if len(blocks) < n_blocks:
        raise TrainingError(f"corpus too small: {len(blocks)} blocks < {n_blocks}")
    return torch.tensor(blocks), torch.tensor(labels), used


def _lr(step: int, cfg: TrainConfig) -> float:
    """nanoGPT's schedule: warm-up from lr/warmup, cosine to ``min_lr_frac``·lr (:func:`lr_at`)."""
    return lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup, total_steps=cfg.steps, schedule="cosine",
                 min_lr_frac=cfg.min_lr_frac, warmup_offset=1)


def train_toyworld(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
    device: str = "cpu",
    config: TrainConfig | None = None,
) -> dict:
    """Train a toyworld model into ``out_dir`` and return the run summary (also ``train.json``).

    ``steps`` overrides ``config.steps``. ``minutes`` is a wall-clock cap: the run stops early
    (with a warning, and no longer deterministic) if it is hit. Loss: mean next-token
    cross-entropy over non-padding target positions. Deterministic for a seed on one device
    and thread count (``torch.use_deterministic_algorithms``).
    """
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    cfg = config or TrainConfig()
    cfg = TrainConfig(**{**asdict(cfg), "seed": seed, **({"steps": steps} if steps else {})})
    if cfg.steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {cfg.steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    world = make_world(cfg.seed, zipf_s=cfg.zipf_s, n_fictional=cfg.n_fictional,
                       countries=[tuple(c) for c in cfg.countries] if cfg.countries else None)
    n_blocks = cfg.steps * cfg.batch_size
    n_docs = int(n_blocks * cfg.n_ctx / 22) + 1000      # ~25 tokens/doc incl. EOS: ample
    docs = generate_documents(world, n_docs, seed=cfg.seed + 1, mix=cfg.mix, copy_mix=cfg.copy_mix,
                              copy_real_temper=cfg.copy_real_temper)
    texts = [d.text for d in docs]
    tok = train_tokenizer(texts + vocabulary_lines(world))
    hf_tok = save_tokenizer(tok, out, model_max_length=cfg.n_ctx)
    eos = hf_tok.convert_tokens_to_ids(EOS)
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    inputs, labels, used = _pack(ids, cfg.n_ctx, eos, n_blocks)
    freqs = count_facts(world, docs[:used])
    t_data = time.time() - t0

    mcfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = GPT2LMHeadModel(mcfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_blocks, generator=g)
    model.train()
    losses: list[float] = []
    stopped_early = False
    bar = tqdm(range(cfg.steps), disable=not progress, desc="toyworld", unit="step")
    for step in bar:
        sel = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x, y = inputs[sel].to(device), labels[sel].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                 y[:, 1:].reshape(-1), ignore_index=-100)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if minutes is not None and time.time() - t0 > 60 * minutes:
            log.warning("toyworld: time cap of %.1f min hit at step %d; run is not deterministic", minutes, step)
            stopped_early = True
            break
    bar.close()
    model.eval()
    model = model.to("cpu")
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(str(out), safe_serialization=True)
    save_world(world, out / "world.json")
    _write_json(out / "frequencies.json", {"kind": "fact occurrences per country in the trained blocks",
                                           "n_docs": used, "counts": freqs})
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "countries"},
        "steps_done": len(losses), "stopped_early": stopped_early,
        "tokens_seen": len(losses) * cfg.batch_size * cfg.n_ctx,
        "n_params": sum(p.numel() for p in model.parameters()), "vocab_size": tok.get_vocab_size(),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]), "loss_every_50": losses[::50],
        "device": device, "torch": torch.__version__,
        "data_seconds": round(t_data, 1), "total_seconds": round(time.time() - t0, 1),
    }
    _write_json(out / "train.json", summary)
    return summary


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
