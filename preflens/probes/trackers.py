"""Training-loop callbacks that evaluate ranking accuracy on a fixed pair set (Chen et al. 2024 §4.1).

A callback is any object with ``on_step(state)`` / ``on_end(state)`` (see
:class:`preflens.dynamics.train.TrainState`); this module needs only ``state.step`` and
``state.policy`` and so does not import the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from preflens.probes.ranking import ranking_correct
from preflens.scoring import response_logprobs

__all__ = ["RankingTracker"]


@dataclass
class RankingTracker:
    """Record per-pair ranking correctness of the policy every ``every`` steps.

    Ranking accuracy R = mean 1[log π(y_w|x) ≥ log π(y_l|x)] on *summed* log-probs (EOS
    included) and R̃ on per-token means (Chen et al. 2024, Def. 2.3 and Remark 2.4; ≥, not >).
    ``history`` holds ``{"step", "ranking_accuracy", "ranking_accuracy_mean"}`` per record and
    ``correct[step]`` the per-pair bool tensor (summed version) for flip analyses.
    """

    lm: object
    pairs: Sequence
    every: int = 10
    batch_size: int = 64
    history: list = field(default_factory=list)
    correct: dict = field(default_factory=dict)
    logps: dict = field(default_factory=dict)

    def record(self, model, step: int) -> dict:
        lm = self.lm if model is self.lm.model else dataclasses.replace(self.lm, model=model)
        prompts = [p.prompt for p in self.pairs]
        s_w = response_logprobs(lm, prompts, [p.chosen for p in self.pairs], batch_size=self.batch_size)
        s_l = response_logprobs(lm, prompts, [p.rejected for p in self.pairs], batch_size=self.batch_size)
        ok = ranking_correct(s_w.logp, s_l.logp)
        ok_mean = ranking_correct(s_w.mean_logp, s_l.mean_logp)
        entry = {
            "step": int(step),
            "ranking_accuracy": float(ok.double().mean()),
            "ranking_accuracy_mean": float(ok_mean.double().mean()),
        }
        self.history.append(entry)
        self.correct[int(step)] = ok.clone()
        self.logps[int(step)] = (s_w.logp.clone(), s_l.logp.clone())
        return entry

    def on_step(self, state) -> None:
        if state.step % self.every == 0 and state.step not in self.correct:
            entry = self.record(state.policy, state.step)
            state.metrics["tracked/ranking_accuracy"] = entry["ranking_accuracy"]

    def on_end(self, state) -> None:
        if state.step not in self.correct:
            self.record(state.policy, state.step)

    def last_correct(self) -> torch.Tensor:
        return self.correct[max(self.correct)]
