"""What peers' clients send: Cohere v2, vLLM and TEI rerank fields, vLLM's /rerank, an app under a path prefix."""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from dpo.encoding import Encoded, encode
from server.app import Limits, State, create_app
from server.pipeline import sigmoid
from tests.conftest import make_client

PROMPT = "Tell me one fact about the moon."
DOCS = ["The moon has craters.", "It is made of cheese, mostly.", "No, I would rather not say."]
LONG = "The moon " + "and its many craters " * 60  # ~300 tokens: over the artifact's max_length of 128


def rewards_of(reward_model, seqs: list[Encoded]) -> list[float]:
    return [r.reward for r in reward_model.score_encoded(seqs)]


def scores(results: list[dict]) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in results}


def test_cohere_v2_fields_are_understood(reward_model):
    whole = list(reward_model.encode_responses(PROMPT, DOCS))
    assert all(len(seq.response_ids) > 4 for seq in whole)
    cut = [Encoded(seq.prompt_ids, seq.response_ids[:4], True) for seq in whole]  # each document's first 4 tokens
    with make_client(reward_model) as c:
        body = {"model": "rerank-v3.5", "query": PROMPT, "documents": DOCS, "top_n": 3, "max_tokens_per_doc": None,
                "priority": 0}  # fmt: skip  # as LangChain's CohereRerank sends it
        plain = c.post("/v2/rerank", json=body)
        assert plain.status_code == 200, plain.text
        assert scores(plain.json()["results"]) == pytest.approx(dict(enumerate(rewards_of(reward_model, whole))))
        capped = c.post("/v2/rerank", json={**body, "max_tokens_per_doc": 4})
        assert capped.status_code == 200, capped.text
        assert scores(capped.json()["results"]) == pytest.approx(dict(enumerate(rewards_of(reward_model, cut))))
        assert capped.json()["usage"]["total_tokens"] == len(whole[0].prompt_ids) + 3 * 4
        long = c.post("/v2/rerank", json={**body, "documents": [LONG], "max_tokens_per_doc": 8})
        assert long.status_code == 200  # cut to fit: no 413, as Cohere truncates rather than refuses
        default = c.post("/v2/rerank", json={**body, "documents": [LONG], "max_tokens_per_doc": 4096})  # Cohere's
        assert default.status_code == 200 and default.json()["usage"]["total_tokens"] == reward_model.max_length
        assert c.post("/v2/rerank", json={**body, "max_tokens_per_doc": 0}).status_code == 422


def test_vllm_fields_are_understood(reward_model):
    with make_client(reward_model) as c:
        body = {"query": PROMPT, "documents": [DOCS[0]], "priority": 1}
        raw = c.post("/v1/rerank", json=body).json()["results"][0]["relevance_score"]
        activated = c.post("/v1/rerank", json={**body, "use_activation": True}).json()["results"][0]
        assert activated["relevance_score"] == pytest.approx(sigmoid(raw))
        k = 12  # shorter than the sequence: the prompt is cut from the left
        want = encode(reward_model.tokenizer, PROMPT, DOCS[0], max_length=k, allow_response_truncation=True)
        assert want.truncated and len(want) == k
        cut = c.post("/v1/rerank", json={**body, "truncate_prompt_tokens": k}).json()
        assert cut["results"][0]["relevance_score"] == pytest.approx(rewards_of(reward_model, [want])[0])
        assert cut["usage"]["total_tokens"] == k
        assert c.post("/v1/rerank", json={**body, "documents": [LONG]}).status_code == 413
        assert c.post("/v1/rerank", json={**body, "documents": [LONG], "truncate_prompt_tokens": -1}).status_code == 200
        for k in (0, 1, -2):
            refused = c.post("/v1/rerank", json={**body, "truncate_prompt_tokens": k}).json()["error"]
            assert refused["code"] == 422 and f"must be -1 or at least 2, got {k}" in refused["message"]
        huge = c.post("/v1/rerank", json={**body, "documents": [LONG], "truncate_prompt_tokens": 10**6}).json()
        assert huge["usage"]["total_tokens"] == reward_model.max_length  # the model's own limit still holds
        bare = c.post("/v1/rerank", json={**body, "return_documents": None}).json()["results"][0]
        assert "document" not in bare  # null: the default, false


def test_rerank_without_v1_serves_both_dialects_by_body(reward_model):
    with make_client(reward_model) as c:
        cohere = c.post("/rerank", json={"model": "m", "query": PROMPT, "documents": DOCS})  # vLLM serves it here too
        assert cohere.status_code == 200 and set(cohere.json()) == {"id", "model", "results", "usage"}
        tei = c.post("/rerank", json={"query": PROMPT, "texts": DOCS, "raw_scores": True})
        assert tei.status_code == 200
        assert {r["index"]: r["score"] for r in tei.json()} == pytest.approx(scores(cohere.json()["results"]))
        missing = c.post("/rerank", json={"query": PROMPT}).json()["error"]
        assert missing["code"] == 422 and missing["message"].startswith("texts: ")  # no union tag in the place
        typo = c.post("/rerank", json={"query": PROMPT, "documents": DOCS, "top_k": 1}).json()["error"]
        assert typo["code"] == 422 and typo["message"].startswith("top_k: ")
        named_like_a_tag = c.post("/v1/rerank", json={"query": PROMPT, "documents": DOCS, "tei": 1}).json()["error"]
        assert named_like_a_tag["message"].startswith("tei: ")  # only /rerank's union tag leaves the location


def test_tei_dialect_ignores_unknown_fields_and_truncates_like_tei(reward_model):
    with make_client(reward_model) as c:
        body = {"query": PROMPT, "texts": DOCS[:2], "raw_scores": False, "truncate": None,
                "truncation_direction": "Right", "top_n": 1}  # fmt: skip  # as LiteLLM's TEI provider sends it
        answer = c.post("/rerank", json=body)
        assert answer.status_code == 200 and len(answer.json()) == 2  # TEI has no top_n: ignored, as TEI does
        assert c.post("/rerank", json={**body, "texts": [LONG]}).status_code == 413
        cut = c.post("/rerank", json={**body, "texts": [LONG], "truncate": True, "raw_scores": True})
        assert cut.status_code == 200  # the query cut from the left, then the text from the right
        want = encode(reward_model.tokenizer, PROMPT, LONG, reward_model.max_length, allow_response_truncation=True)
        assert cut.json()[0]["score"] == pytest.approx(rewards_of(reward_model, [want])[0])


@pytest.mark.parametrize("how", ["root_path", "mount"])
def test_the_api_key_holds_under_a_path_prefix(reward_model, how):
    state = State(Limits(), "s3cret")
    state.attach(reward_model)
    app = create_app(state)
    if how == "mount":
        outer = FastAPI()
        outer.mount("/api", app)
        client = TestClient(outer)
    else:
        client = TestClient(app, root_path="/api")
    key = {"Authorization": "Bearer s3cret"}
    with client as c:
        body = {"query": PROMPT, "documents": DOCS}
        assert c.post("/api/v1/rerank", json=body).status_code == 401
        assert c.get("/api/info").status_code == 401
        assert c.post("/api/v1/rerank", json=body, headers=key).status_code == 200
        assert c.get("/api/health").status_code == 200  # probes stay open, and the API's documentation
        assert c.get("/api/docs").status_code == c.get("/api/openapi.json").status_code == 200
        assert c.get("/api/nowhere").status_code == 401  # every path but the open ones needs the key
        assert c.get("/api/nowhere", headers=key).status_code == 404
        metrics = c.get("/api/metrics").text
    for code in (200, 401):  # counted under the route's own name, not as "other"
        assert f'dporm_requests_total{{code="{code}",endpoint="/v1/rerank"}} 1.0' in metrics
