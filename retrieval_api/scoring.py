"""What the batcher scores: retrieval queries against the served model/index pair.

`PairScorer` is the batcher's scoring function. It reads `ServingState.current()` once per batch, so
every query in it sees the same model and index, and runs `hsnn.serving.retrieve` for all of them in one
pass. A query was checked against the schema current when it arrived (`Query.checked_against`); it is
checked again only if the model was swapped for one with another schema while it waited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hsnn.config import FeatureSchema
from hsnn.serving import Retrieved, retrieve
from retrieval_api.state import ServingPair, ServingState
from streaming.contracts import UserFeatures
from streaming.tensors import users_to_batch
from streaming.validation import WIRE_LIMITS, Problem, UserLimits, user_problems


class NotReady(Exception):
    """No model/index pair is loaded yet."""


class InvalidRequest(Exception):
    """The request does not fit the served model; `problems` say where and why (the API answers 422)."""

    def __init__(self, problems: Sequence[Problem]):
        super().__init__("; ".join(str(problem) for problem in problems))
        self.problems = list(problems)


class ConfigurationError(Exception):
    """The service settings do not fit the served model (e.g. one beam width per level)."""


@dataclass(frozen=True)
class Query:
    """One user's request: the top `k` ads, none of `exclude`."""

    user: UserFeatures
    k: int
    exclude: Sequence[int] = ()
    checked_against: FeatureSchema | None = field(default=None, repr=False)  # None: not checked yet


@dataclass(frozen=True)
class Answer:
    """One query's result and the pair that produced it."""

    result: Retrieved
    pair: ServingPair


class PairScorer:
    """Scores a batch of queries against the pair current when the batch starts."""

    def __init__(self, state: ServingState, beams: Sequence[int], limits: UserLimits = WIRE_LIMITS):
        self.state = state
        self.beams = list(beams)
        self.limits = limits

    def __call__(self, queries: Sequence[Query]) -> list[Answer | Exception]:
        pair = self.state.current()  # once per batch: every query in it sees the same model and index
        if pair is None:
            return [NotReady("no model/index pair is loaded yet") for _ in queries]
        if len(self.beams) != pair.model.num_levels:
            error = ConfigurationError(
                f"beams {self.beams} give {len(self.beams)} widths; the served model has {pair.model.num_levels} levels"
            )
            return [error for _ in queries]
        outcomes: list[Answer | Exception | None] = [self._misfit(query, pair.schema) for query in queries]
        fitting = [query for query, outcome in zip(queries, outcomes, strict=True) if outcome is None]
        results = iter(self._retrieve(pair, fitting) if fitting else [])
        return [outcome if outcome is not None else Answer(next(results), pair) for outcome in outcomes]

    def _misfit(self, query: Query, schema: FeatureSchema) -> InvalidRequest | None:
        """The query's problems with `schema`, unless it was already checked against this schema."""
        if query.checked_against is schema or query.checked_against == schema:
            return None
        problems = user_problems(query.user, schema, self.limits)  # the model was swapped for another schema
        return InvalidRequest(problems) if problems else None

    def _retrieve(self, pair: ServingPair, queries: list[Query]) -> list[Retrieved]:
        device = pair.index.device  # cpu, or cuda with HSNN_API_DEVICE=cuda: requests go there, answers come back
        users = users_to_batch([query.user for query in queries], pair.schema, checked=True).to(device)
        exclude = [
            torch.tensor(query.exclude, dtype=torch.long, device=device) if query.exclude else None for query in queries
        ]
        k = max(query.k for query in queries)
        results = retrieve(pair.model, pair.index, users, k=k, beams=self.beams, exclude=exclude)
        return [
            Retrieved(
                item_ids=result.item_ids[: query.k].cpu(),
                scores=result.scores[: query.k].cpu(),
                rows=result.rows[: query.k].cpu(),
                cost=result.cost,
            )
            for query, result in zip(queries, results, strict=True)
        ]
