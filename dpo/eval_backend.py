"""Scoring backends for ``dporm eval``: one prompt with its responses in, one score per response out.

The score of a response y to prompt x, by mode (``ScoreMode``):

    with reference   s = β · (Σ_t log π(y_t | x, y_<t) − Σ_t log π_ref(y_t | x, y_<t))   (the dporm reward)
    ref-free avg     s = (1/|y|) · Σ_t log π(y_t | …)        (RewardBench's default reference-free mode)
    ref-free sum     s = Σ_t log π(y_t | …)
    ref-free norm    s = −‖(log π(y_t | …))_t‖₂

Reference-free scores carry no β (as in RewardBench). A backend is anything with
``score_groups(groups) -> list[list[ResponseScore] | str]`` (:class:`Backend`; a string says why a group could
not be scored); the offline one lives here, the HTTP one in ``server/eval_backend.py`` (``dpo/`` knows nothing
of HTTP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dpo.encoding import Prompt
from dpo.errors import DpormError, EncodingError
from dpo.eval_compat import compat_encode

if TYPE_CHECKING:
    from dpo.scorer import RewardModel

REF_FREE_NORMS = ("avg", "sum", "norm")


@dataclass(frozen=True)
class ScoreMode:
    reference_free: bool = False
    norm: str = "avg"  # reference-free only: avg | sum | norm

    def describe(self) -> str:
        return f"reference-free {self.norm}" if self.reference_free else "β·(log π − log π_ref), summed"


@dataclass(frozen=True)
class Group:
    """One prompt and the responses to score against it (chosen first)."""

    prompt: Prompt
    responses: tuple[str, ...]


@dataclass(frozen=True)
class ResponseScore:
    score: float
    tokens: int
    truncated: bool
    rechecked: bool = False  # bf16-paired: a close group rescored by the float32 models


class Backend(Protocol):
    mode: ScoreMode

    def describe(self) -> dict: ...

    def score_groups(self, groups: Sequence[Group]) -> list[list[ResponseScore] | str]: ...


class Refused(str):
    """Why a backend will refuse a row every time (it cannot be encoded as given): the row is recorded as
    skipped and not retried, unlike a failure (a server error, a timeout), which a rerun scores again."""


def mode_score(
    mode: ScoreMode, reward: float, logp_policy: float, tokens: int, token_rewards: list[float] | None, beta: float
) -> float:
    """The mode's score from one scorer/server result (``reward`` summed; ``token_rewards`` = β·log π per token)."""
    if not mode.reference_free:
        return reward
    if mode.norm == "sum":
        return logp_policy
    if mode.norm == "avg":
        return logp_policy / max(tokens, 1)
    if token_rewards is None:
        raise ValueError("the norm mode needs per-token rewards")
    return -math.sqrt(sum((t / beta) ** 2 for t in token_rewards))


class OfflineBackend:
    """Scores with an in-process :class:`RewardModel`, dporm's encoding or RewardBench's (``compat``)."""

    def __init__(self, model: RewardModel, mode: ScoreMode, compat: bool = False, max_length: int | None = None,
                 recheck: float = 0.0):  # fmt: skip
        if mode.reference_free and mode.norm not in REF_FREE_NORMS:
            raise DpormError(f"--ref-free-norm must be one of {', '.join(REF_FREE_NORMS)}, got {mode.norm!r}")
        if not mode.reference_free and not model.has_reference:
            raise DpormError("the model has no reference: pass --reference-free")
        if mode.reference_free and mode.norm == "norm" and model.beta <= 0:
            raise DpormError("the norm mode needs β > 0")
        if compat and not getattr(model.tokenizer, "chat_template", None):
            raise DpormError("--rewardbench-compat needs a tokenizer with a chat template; this one has none")
        self.model, self.mode, self.compat, self.recheck = model, mode, compat, recheck
        if max_length is not None:
            context = model.context_length
            if context is not None and max_length > context:
                raise DpormError(f"--max-length {max_length} is past the models' context of {context} positions")
            self.model.max_length = max_length

    def describe(self) -> dict:
        info = {k: self.model.info.get(k) for k in ("policy", "reference", "policy_sha256", "reference_sha256")}
        recheck = self.recheck if self.model.paired is not None and not self.mode.reference_free else None
        return {**info, "name": self.model.name, "beta": self.model.beta, "max_length": self.model.max_length,
                "dtype": self.model.precision, "recheck": recheck}  # fmt: skip

    def encode(self, group: Group):
        if self.compat:
            return compat_encode(self.model.tokenizer, group.prompt, list(group.responses))
        # Over-long rows are cut (prompt from the left, then the response), as RewardBench does.
        return list(self.model.encode_responses(group.prompt, group.responses, allow_response_truncation=True))

    def score_groups(self, groups: Sequence[Group]) -> list[list[ResponseScore] | str]:
        encoded: list = []
        for g in groups:
            try:
                encoded.append(self.encode(g))
            except EncodingError as e:
                encoded.append(Refused(e))
        scored = self.model.score_groups(
            [e for e in encoded if not isinstance(e, str)], "sum", self.mode.reference_free,
            token_rewards=self.mode.reference_free and self.mode.norm == "norm", recheck=self.recheck,
        )  # fmt: skip
        out: list[list[ResponseScore] | str] = []
        for e in encoded:
            if isinstance(e, str):
                out.append(e)
                continue
            row = []
            for seq, r in zip(e, scored.pop(0), strict=True):
                value = mode_score(
                    self.mode, r.reward, r.logp_policy, r.response_tokens, r.token_rewards, self.model.beta
                )
                row.append(ResponseScore(value, r.response_tokens, seq.truncated, r.rechecked))
            out.append(row)
        return out
