"""Parity flags for Razin et al. 2024 (likelihood displacement), each tested against a port of
the official function written from reading princeton-nlp/unintentional-unalignment:
``__quantile_slice`` (similarity_measures_experiment_runner.py) and the per-example CHES of
compute_preference_similarity_per_example.py (right truncation to 512 tokens, no EOS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preflens.data.schemas import PreferencePair
from preflens.errors import ConfigError, DataError
from preflens.probes.ches import ches_for_pairs, ches_scores, quantile_subset


# --------------------------------------------------------------------------- ports
def _official_quantile_slice(scores: torch.Tensor, quantile: float, num: int) -> list[int]:
    order = torch.argsort(scores)                       # default (unstable) argsort, CPU
    idx = int(np.round(quantile * (len(order) - 1)))    # numpy: round half to even
    start = max(0, idx - num // 2)
    end = start + num
    if end > len(order):
        end = len(order)
        start = max(0, end - num)
    return order[start:end].tolist()


def _official_ches(model, prompt_ids, resp_w, resp_l, max_len, ln=False):
    """Per-example script: text = prompt + response (no EOS), right-truncated to max_len;
    rows from the last prompt position to the end; sums (or means) then CHES."""
    def rows(resp):
        ids = torch.tensor([(list(prompt_ids) + list(resp))[:max_len]])
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        return h[len(prompt_ids) - 1:].double()
    hw, hl = rows(resp_w), rows(resp_l)
    sw, sl = (hw.mean(0), hl.mean(0)) if ln else (hw.sum(0), hl.sum(0))
    return float(sw @ sl - sw @ sw)


# --------------------------------------------------------------------------- quantile subset
@pytest.mark.parametrize("N,n", [(7, 3), (101, 10), (200, 17), (1001, 64)])
def test_quantile_subset_official_matches_port(N, n):
    g = torch.Generator().manual_seed(N)
    for dtype in (torch.float32, torch.float64):
        scores = torch.randint(0, 4, (N,), generator=g).to(dtype)  # many ties
        for q in (0.0, 0.25, 0.5, 0.75, 1.0):
            got = quantile_subset(scores, q, n, compat="official").tolist()
            assert got == _official_quantile_slice(scores, q, n)


def test_quantile_subset_flags_change_what_they_say():
    s = torch.arange(7, dtype=torch.float64)           # q = 0.25: q*(N-1) = 1.5
    assert quantile_subset(s, 0.25, 1).tolist() == [2]                          # half up
    assert quantile_subset(s, 0.25, 1, rounding="half_even").tolist() == [2]    # 1.5 -> 2 (even)
    s9 = torch.arange(11, dtype=torch.float64)         # q = 0.25: 2.5 -> 3 (up) vs 2 (even)
    assert quantile_subset(s9, 0.25, 1).tolist() == [3]
    assert quantile_subset(s9, 0.25, 1, compat="official").tolist() == [2]
    ties = torch.zeros(100)
    stable = quantile_subset(ties, 0.5, 5).tolist()
    assert stable == [48, 49, 50, 51, 52]              # stable: input order
    assert quantile_subset(ties, 0.5, 5, tie_order="torch_default").tolist() == \
        _official_quantile_slice(ties, 0.5, 5)
    with pytest.raises(ConfigError):
        quantile_subset(ties, 0.5, 5, compat="repo")
    with pytest.raises(ConfigError):
        quantile_subset(ties, 0.5, 5, rounding="banker")


# --------------------------------------------------------------------------- truncation
PAIRS = [
    PreferencePair("The capital of France is", " Paris, a city on the Seine.", " Rome."),
    PreferencePair("Q: What is the capital of Spain?\nA:", " Madrid", " Lisbon is the answer."),
    PreferencePair("Tell me a story about a dog and a cat who are friends", " Once upon a time",
                   " No."),
]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("max_len", [33, 36, 256])  # prompts 5/16/31 tokens
def test_truncate_right_matches_official_script(tiny, ln, max_len):
    tok, model = tiny.tokenizer, tiny.model.eval()
    got = ches_for_pairs(tiny, PAIRS, length_normalized=ln, truncate_right=max_len, batch_size=2)
    want = [_official_ches(model, _ids(tok, p.prompt), _ids(tok, p.chosen), _ids(tok, p.rejected),
                           max_len, ln) for p in PAIRS]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    if max_len == 256:  # nothing truncated: identical to the default (EOS-counted) rows
        torch.testing.assert_close(got, ches_for_pairs(tiny, PAIRS, length_normalized=ln),
                                   rtol=1e-6, atol=1e-6)


def test_truncate_right_errors(tiny):
    with pytest.raises(DataError, match="no response token left"):
        ches_for_pairs(tiny, PAIRS[2:], truncate_right=31)
    with pytest.raises(ConfigError):
        ches_for_pairs(tiny, PAIRS, truncate_right=1)


def test_single_token_response_ches_is_zero_only_without_eos(tiny):
    # issue 14.5: CHES is 0 for single-token responses only when EOS is not counted
    pair = [PreferencePair("The capital of France is", " Paris", " Rome")]
    from preflens.scoring import response_hidden_states
    assert len(_ids(tiny.tokenizer, " Paris")) == len(_ids(tiny.tokenizer, " Rome")) == 1
    with_eos = ches_for_pairs(tiny, pair)
    assert abs(float(with_eos)) > 1e-6
    hp = response_hidden_states(tiny, [pair[0].prompt], [pair[0].chosen], add_eos=False)
    hn = response_hidden_states(tiny, [pair[0].prompt], [pair[0].rejected], add_eos=False)
    assert float(ches_scores(hp, hn)) == 0.0
    doc = " ".join(ches_scores.__doc__.split())
    assert "one-token response with EOS appended has two rows" in doc
