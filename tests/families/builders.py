"""Tiny random models of each supported family, saved in Hugging Face format (offline).

Each builder writes ``config.json`` + safetensors weights + a byte-level BPE tokenizer into a
directory, so that tests load it by directory through :func:`preflens.models.load_model`, the
path a user takes. Norm weights (and LayerNorm biases) are randomized so that a lens that
forgot a norm parameter gives visibly different numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral", "gemma2", "olmo")
BOS_FAMILIES = ("llama", "mistral", "gemma2")  # their tokenizers add BOS to plain text

_SPECIALS = ["<|endoftext|>", "<bos>", "<eos>", "<pad>"]
_TEXT = """\
The capital of France is Paris. The capital of Poland is Warsaw. The capital of Japan is Tokyo.
Q: What is the capital of Italy? A: Rome. Yes. No. Never. Sure. Maybe. Hello, world!
A preference pair has a prompt, a chosen response and a rejected response. The model assigns
each response a log-probability; direct preference optimization raises the margin between them.
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, knead, rest, and bake.
"""


def save_tokenizer(out_dir: Path, *, add_bos: bool, vocab_size: int = 320):
    """Byte-level BPE; ``add_bos`` makes ``tokenizer(text)`` prepend ``<bos>`` (as Llama/Gemma)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
        specials = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    else:  # GPT-2 style: one token is bos = eos = pad
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>",
                                   model_max_length=128, **specials)
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def _config(family: str, vocab: int, ids: dict):
    import transformers as tf

    common = dict(vocab_size=vocab, **ids)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128, **common)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True,
                                tie_word_embeddings=False, **small)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **small)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **small)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, tie_word_embeddings=False,
                                sliding_window=None, **small)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                               sliding_window=64, tie_word_embeddings=True, **small)
    if family == "olmo":
        return tf.OlmoConfig(num_key_value_heads=4, tie_word_embeddings=False, **small)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and not isinstance(
                    module, torch.nn.LayerNorm):
                continue
            w, b = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(w, torch.nn.Parameter):
                if type(module).__name__.startswith("Gemma"):  # scales by (1 + w), w init 0
                    w.copy_(0.5 * torch.randn(w.shape, generator=gen))
                else:
                    w.copy_(0.5 + torch.rand(w.shape, generator=gen))
            if isinstance(b, torch.nn.Parameter):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))


def build_family(family: str, out_dir: str | Path, *, seed: int = 0,
                 logit_scale: float = 1.0) -> Path:
    """Write a tiny random ``family`` model + tokenizer into ``out_dir``; returns the path.

    ``logit_scale`` multiplies the output embedding (and, when tied, the input embedding) so
    that logits are large (for soft-capping checks).
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(out, add_bos=family in BOS_FAMILIES)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    config = _config(family, len(tok), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    model.save_pretrained(str(out))
    return out
