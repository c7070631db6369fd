"""Request and response schemas of the reward server (pydantic; OpenAPI at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

# Request bodies shown, ready to send, by /docs ("Try it out"); a test posts each one.
_REWARDS_EXAMPLE = {
    "items": [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
        {
            "messages": [
                {"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "7."},
                {"role": "user", "content": "A larger one?"},
            ],
            "response": "101 is prime.",
        },
    ],
    "normalize": "sum",
}
_PREFERENCE_EXAMPLE = {
    "pairs": [
        {
            "prompt": "What is the capital of France?",
            "response_a": "The capital of France is Paris.",
            "response_b": "The capital of France is Berlin.",
        }
    ]
}
_RERANK_EXAMPLE = {
    "query": "Give me a tip for better sleep.",
    "documents": ["Keep a regular bedtime, even on weekends.", "Drink coffee late at night.", "Sleep is overrated."],
    "top_n": 2,
    "return_documents": True,
}
_TEI_EXAMPLE = {
    "query": "Give me a tip for better sleep.",
    "texts": ["Keep a regular bedtime, even on weekends.", "Drink coffee late at night."],
    "raw_scores": True,
}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class _Prompted(BaseModel):
    """``prompt`` is one user message (chat template applied); ``messages`` is the conversation before the response."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self

    def conversation(self) -> str | list[dict[str, str]]:
        return self.prompt if self.prompt is not None else [m.model_dump() for m in self.messages]


class ScoringOptions(BaseModel):
    normalize: Literal["sum", "mean"] | None = Field(None, description="default: the artifact's")
    reference_free: StrictBool = Field(False, description="r = β·log π (no reference)")
    truncate: StrictBool = Field(False, description="cut over-long prompts from the left instead of answering 413")
    truncate_response: StrictBool = Field(
        False,
        description="also cut a response that alone exceeds max_length, from the right (implies truncate); "
        "the reward is then the cut text's, as in RewardBench's evaluation",
    )


class RewardItem(_Prompted):
    response: str


class RewardsRequest(ScoringOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_REWARDS_EXAMPLE]})
    items: list[RewardItem] = Field(min_length=1)
    return_token_rewards: StrictBool = False


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    cached_tokens: int


class RewardData(BaseModel):
    index: int
    reward: float
    logp_policy: float
    logp_ref: float | None
    response_tokens: int
    truncated: bool
    token_rewards: list[float] | None = None


class RewardsResponse(BaseModel):
    model: str
    data: list[RewardData]
    usage: Usage


class PreferencePair(_Prompted):
    response_a: str
    response_b: str


class PreferenceRequest(ScoringOptions):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_PREFERENCE_EXAMPLE]})
    pairs: list[PreferencePair] = Field(min_length=1)


class PreferenceData(BaseModel):
    index: int
    reward_a: float
    reward_b: float
    margin: float
    prob_a_over_b: float = Field(description="Bradley–Terry: σ(reward_a − reward_b)")
    rechecked: bool = Field(False, description="bf16-paired with --recheck: a close pair rescored in float32")


class PreferenceResponse(BaseModel):
    model: str
    data: list[PreferenceData]
    usage: Usage


class Document(BaseModel):
    text: str


class RerankRequest(ScoringOptions):
    """Cohere/Jina/vLLM rerank: the query is the prompt, documents are candidate responses.

    Unknown fields are a 422, as on every route (a typo such as ``top_k`` is not dropped in silence). Fields
    that peers' clients send and that change nothing here are accepted and ignored: ``model``; Cohere's
    ``max_chunks_per_doc`` (a document is scored whole) and ``rank_fields`` (documents are text).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_RERANK_EXAMPLE]})
    query: str | None = None
    messages: list[Message] | None = None
    documents: list[str | Document] = Field(min_length=1)
    top_n: StrictInt | None = Field(None, ge=0, description="the best top_n results; 0 or none: all (as vLLM)")
    return_documents: StrictBool = False
    model: str | None = None
    max_chunks_per_doc: int | None = Field(None, description="accepted and ignored: a document is scored whole")
    rank_fields: list[str] | None = Field(None, description="accepted and ignored: documents are text")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.query is None) == (self.messages is None):
            raise ValueError("give exactly one of 'query' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self

    def conversation(self) -> str | list[dict[str, str]]:
        return self.query if self.query is not None else [m.model_dump() for m in self.messages]

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Document | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class TEIRerankRequest(BaseModel):
    """Text-embeddings-inference's /rerank; ``raw_scores: false`` maps rewards through σ like TEI.
    ``truncation_direction`` is accepted and ignored: with ``truncate``, the prompt is always cut from the left."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_TEI_EXAMPLE]})
    query: str
    texts: list[str] = Field(min_length=1)
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool = False
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail
