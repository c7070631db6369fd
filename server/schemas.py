"""Request and response schemas of the reward server (pydantic; OpenAPI at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag, model_validator

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

    def length_cap(self) -> int | None:
        """This request's own, lower, max_length (vLLM's ``truncate_prompt_tokens``); None: the model's."""
        return None

    def response_cap(self) -> int | None:
        """At most this many tokens of each response (Cohere's ``max_tokens_per_doc``); None: no cap."""
        return None


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
    that peers' clients send are understood: Cohere v2's ``max_tokens_per_doc`` and vLLM's
    ``truncate_prompt_tokens`` and ``use_activation``. Those that change nothing here are accepted and
    ignored: ``model``, ``priority``; Cohere's ``max_chunks_per_doc`` (a document is scored whole) and
    ``rank_fields`` (documents are text).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_RERANK_EXAMPLE]})
    query: str | None = None
    messages: list[Message] | None = None
    documents: list[str | Document] = Field(min_length=1)
    top_n: StrictInt | None = Field(None, ge=0, description="the best top_n results; 0 or none: all (as vLLM)")
    return_documents: StrictBool | None = Field(None, description="each result's document too; none: false")
    model: str | None = None
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="Cohere v2: each document cut to its first N tokens (implies truncate_response)"
    )
    truncate_prompt_tokens: StrictInt | None = Field(
        None, description="vLLM: sequences cut to at most N tokens (N >= 2), -1: to max_length (implies "
        "truncate_response); the query is cut from the left first, once for all documents, then a document "
        "from the right",
    )  # fmt: skip
    use_activation: StrictBool | None = Field(None, description="vLLM: true gives σ(reward) as relevance_score")
    priority: StrictInt | None = Field(None, description="accepted and ignored: one queue, first come first served")
    max_chunks_per_doc: int | None = Field(None, description="accepted and ignored: a document is scored whole")
    rank_fields: list[str] | None = Field(None, description="accepted and ignored: documents are text")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.query is None) == (self.messages is None):
            raise ValueError("give exactly one of 'query' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if self.truncate_prompt_tokens not in (None, -1) and self.truncate_prompt_tokens < 2:  # a prompt and a response
            raise ValueError(f"truncate_prompt_tokens must be -1 or at least 2, got {self.truncate_prompt_tokens}")
        cap = self.truncate_prompt_tokens is not None or self.max_tokens_per_doc is not None
        self.truncate_response = self.truncate_response or cap  # the client accepts cut documents: no 413
        return self

    def length_cap(self) -> int | None:
        return self.truncate_prompt_tokens if self.truncate_prompt_tokens not in (None, -1) else None

    def response_cap(self) -> int | None:
        return self.max_tokens_per_doc

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

    As TEI, unknown fields are ignored, and ``truncate`` fits every (query, text) into max_length: the query
    is cut from the left, then the text from the right. ``truncation_direction`` is accepted and ignored."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [_TEI_EXAMPLE]})
    query: str
    texts: list[str] = Field(min_length=1)
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(None, description="none: false (no truncation)")
    truncation_direction: Literal["Left", "Right", "left", "right"] | None = None


RERANK_DIALECTS = ("tei", "cohere")  # tags of /rerank's union: not field names, left out of error locations


def _rerank_dialect(body: Any) -> str:
    return "cohere" if isinstance(body, dict) and "documents" in body else "tei"


AnyRerankRequest = Annotated[
    Annotated[TEIRerankRequest, Tag("tei")] | Annotated[RerankRequest, Tag("cohere")], Discriminator(_rerank_dialect)
]


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
