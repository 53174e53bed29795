"""Randomly initialized Llama configurations for the scale benchmarks (no download).

Importing this module registers them as offline models (:func:`preflens.models.register_offline`),
so ``load_model("llama-1b-random")`` works in any benchmark process that imported it. Shapes follow
the published configs (vocabulary 128256, grouped-query attention with 8 KV heads):

* ``llama-0.5b-random``: 24 layers, d 1024, MLP 4096, 16 heads, tied embeddings (~0.44 B)
* ``llama-1b-random``: Llama-3.2-1B (16 layers, d 2048, MLP 8192, 32 heads, tied; ~1.24 B)
* ``llama-3b-random``: Llama-3.2-3B (28 layers, d 3072, MLP 8192, 24 heads, tied; ~3.2 B)
* ``llama-8b-random``: Llama-3-8B (32 layers, d 4096, MLP 14336, 32 heads, untied; ~8.0 B)
* ``llama-tiny-random``: 2 layers, d 64, the offline tokenizer's vocabulary (dry runs on a CPU)

The token ids come from preflens' offline GPT-2 tokenizer (ids < 50257, valid in every config).
``PREFLENS_BENCH_BUILD_DEVICE=cuda`` builds the weights directly on the GPU (an 8 B fp32 model
initialized on a CPU takes minutes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preflens.models import OFFLINE_TOKENIZER_DIR, _load_offline_tokenizer, register_offline  # noqa: E402

_BIG = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0)
CONFIGS = {
    "llama-tiny-random": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
    "llama-0.5b-random": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              tie_word_embeddings=True, **_BIG),
    "llama-1b-random": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            tie_word_embeddings=True, **_BIG),
    "llama-3b-random": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                            tie_word_embeddings=True, **_BIG),
    "llama-8b-random": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            tie_word_embeddings=False, **_BIG),
}


def _builder(name: str):
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = _load_offline_tokenizer()
        kw = dict(CONFIGS[name])
        kw.setdefault("vocab_size", len(tok))
        ids = tok.eos_token_id
        config = LlamaConfig(**kw, bos_token_id=ids, eos_token_id=ids, pad_token_id=ids)
        device = os.environ.get("PREFLENS_BENCH_BUILD_DEVICE", "cpu")
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        return model, OFFLINE_TOKENIZER_DIR

    return build


for _name in CONFIGS:
    register_offline(_name, _builder(_name), f"random Llama ({_name}), benchmarks only")
