"""``dporm eval --server URL``: the evaluation backend over running ``dporm serve`` instances.

Each chunk of rows is split into contiguous shards, one per server, scored concurrently through
:class:`server.client.RewardClient` (which retries 429, 502-504 and connection errors). The servers must serve
the same weights (checked on ``/info``). Scores follow :func:`dpo.eval_backend.mode_score`: the norm mode
asks ``/v1/rewards`` for ``token_rewards`` (β·log π per token when reference-free) and divides β back out.
Encoding is the server's (dporm's rule; over-long rows cut as offline: prompt from the left, then the response,
with ``truncate_response``); RewardBench-compat tokenization is offline only. A row the server refuses as
given (a 413 or 422 about the item's text) is skipped for good; other errors fail the row, and a rerun
retries it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from dpo.errors import DpormError
from dpo.eval_backend import Group, Refused, ResponseScore, ScoreMode, mode_score
from server.client import RewardClient, RewardServerError


def _loaded_info(client: RewardClient, timeout: float) -> dict:
    """The server's ``/info`` once its model has loaded (a server started just before answers while loading)."""
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            info = client.info()
        except (httpx.HTTPError, RewardServerError) as e:
            raise DpormError(f"{client.base_url}: cannot get /info ({e})") from None
        if "model" in info:
            return info
        if info.get("load_error"):
            raise DpormError(f"{client.base_url}: the server could not load its model: {info['load_error']}")
        if time.monotonic() >= deadline:
            raise DpormError(f"{client.base_url}: the model is still loading after {timeout:g} s (--timeout)")
        if not said:
            print(f"waiting for {client.base_url} to load its model ...", file=sys.stderr)
            said = True
        client.sleep(1.0)


def _apart(groups: Sequence[Group]) -> list[list[Group]]:
    """``groups`` in runs where no two adjacent groups share a prompt."""
    parts: list[list[Group]] = []
    for g in groups:
        if not parts or parts[-1][-1].prompt == g.prompt:
            parts.append([g])
        else:
            parts[-1].append(g)
    return parts


class ServerBackend:
    def __init__(self, urls: Sequence[str], mode: ScoreMode, api_key: str | None = None, batch_size: int = 32,
                 max_retries: int = 5, timeout: float = 300.0):  # fmt: skip
        self.mode = mode
        try:
            self.clients = [RewardClient(u, api_key, timeout, max_retries, batch_size=batch_size) for u in urls]
        except httpx.InvalidURL as e:
            raise DpormError(f"--server: {e}") from None
        self.infos = []
        for client in self.clients:
            self.infos.append(_loaded_info(client, timeout))
            # A shard (--batch-size rows) goes in one request when the server's --max-items allows.
            client.batch_size = self.infos[-1].get("limits", {}).get("max_items", batch_size)
        keys = {(i.get("beta"), str(i.get("models", {}).get("policy_sha256")),
                 str(i.get("models", {}).get("reference_sha256"))) for i in self.infos}  # fmt: skip
        if len(keys) > 1:
            raise DpormError("the --server URLs serve different models (β or weight hashes differ)")
        self.beta = self.infos[0].get("beta")
        if not mode.reference_free and self.infos[0].get("reference_free"):
            raise DpormError(f"{urls[0]} serves a reference-free model: pass --reference-free")
        if mode.reference_free and mode.norm == "norm" and not self.beta:
            raise DpormError("the norm mode needs β > 0")

    def describe(self) -> dict:
        info = self.infos[0]
        models = info.get("models", {})
        keys = ("policy", "reference", "policy_sha256", "reference_sha256")
        servers = [c.base_url for c in self.clients]
        return {**{k: models.get(k) for k in keys}, "name": info.get("model"), "beta": self.beta,
                "max_length": info.get("max_length"), "dtype": info.get("dtype"), "servers": servers}  # fmt: skip

    def _rewards(self, client: RewardClient, groups: Sequence[Group]) -> list[list[ResponseScore]]:
        norm = self.mode.reference_free and self.mode.norm == "norm"
        # Over-long rows are cut as the offline evaluator cuts them: one prompt cut per row. The server cuts
        # consecutive items with one prompt once, so two adjacent rows with the same prompt go in separate requests.
        rewards: list = []
        for part in _apart(groups):
            items = [(g.prompt, r) for g in part for r in g.responses]
            rewards += client.rewards(items, "sum", self.mode.reference_free, norm, truncate_response=True)
        rewards = iter(rewards)
        out = []
        for g in groups:
            row = []
            for _ in g.responses:
                r = next(rewards)
                value = mode_score(self.mode, r.reward, r.logp_policy, r.response_tokens, r.token_rewards, self.beta)
                row.append(ResponseScore(value, r.response_tokens, r.truncated))
            out.append(row)
        return out

    def _shard(self, client: RewardClient, groups: Sequence[Group]) -> list[list[ResponseScore] | str]:
        try:
            return list(self._rewards(client, groups))
        except RewardServerError as e:
            if e.status >= 500 or e.status in (401, 403):
                raise DpormError(f"{client.base_url}: {e}") from None
            if len(groups) == 1:
                # "item N: ..." is the server's verdict on the row's own text (cannot be encoded, too long);
                # a schema or limit error says nothing about the row: a failure, retried by a rerun.
                row_fault = e.status in (413, 422) and e.message.startswith("item ")
                return [Refused(e.message) if row_fault else e.message]
            return [x for g in groups for x in self._shard(client, [g])]  # find the rows the server refuses
        except (httpx.HTTPError, ValueError) as e:  # ValueError: a row's responses cut apart over requests
            raise DpormError(f"{client.base_url}: {e}") from None

    def score_groups(self, groups: Sequence[Group]) -> list[list[ResponseScore] | str]:
        n = len(self.clients)
        size = -(-len(groups) // n)
        shards = [groups[i * size : (i + 1) * size] for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            parts = list(pool.map(self._shard, self.clients, shards))
        return [x for part in parts for x in part]

    def close(self) -> None:
        for client in self.clients:
            client.close()
