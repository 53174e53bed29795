"""Word-level tokenizer of the toyworld, trained with the ``tokenizers`` library, saved in HF format.

Decision: **word-level over GPT-2's byte-level pre-tokenisation**. Text is split exactly as
GPT-2 splits it (the byte-level regex: a word keeps its leading space, punctuation and newlines
are separate pieces), and each piece is one vocabulary entry (``WordLevel`` model); decoding is
GPT-2's byte-level decoder, so ``decode(encode(text)) == text`` for in-vocabulary text. Why not
byte-level BPE:

* every country and city word is a single token, so " Paris" (leading space, as the factual-
  recall targets are written) is one id — the first-token DLA of Yu et al. 2023 (Sec. 5)
  then sees the whole city, and similar-token preference pairs (" No" vs " Never") are single
  tokens by construction;
* the closed world has ~2 k distinct pieces, so the vocabulary stays small (embeddings are a
  small share of a ~1 M-parameter model) and every piece is seen many times;
* leading-space handling is GPT-2's own (``"Paris"`` and ``" Paris"`` are different tokens), so
  code written for GPT-2 (targets ``" " + city``, no BOS) runs unchanged.

The cost: unseen words map to ``<|endoftext|>`` (the unk token), so the tokenizer must be trained
on the corpus plus :func:`~preflens.data.toyworld.corpus.vocabulary_lines`. Multi-word names
("Kuala Lumpur") are several tokens, as with BPE.

Convention (GPT-2): the single special token ``<|endoftext|>`` is bos, eos, pad and unk.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["EOS", "train_tokenizer", "save_tokenizer", "load_tokenizer"]

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Train the word-level tokenizer on ``texts`` (every piece seen at least once is kept;
    id 0 is ``<|endoftext|>``). Returns a raw ``tokenizers.Tokenizer``."""
    tok = Tokenizer(models.WordLevel(unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=[EOS], min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int = 128):
    """Wrap ``tok`` as a ``PreTrainedTokenizerFast`` (bos = eos = pad = unk = ``<|endoftext|>``)
    and ``save_pretrained`` it into ``out_dir``; returns the HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(out_dir: str | Path):
    """Reload with ``AutoTokenizer.from_pretrained(out_dir)`` (local directory, offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out_dir))
