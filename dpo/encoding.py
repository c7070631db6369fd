"""One way to turn (prompt, response) into tokens, shared by trainer, scorer, server and evaluator.

The rule. With a chat template:

    prompt_text = template(messages, add_generation_prompt=True)
    full_text   = template(messages + [assistant: response])
    prompt_ids   = tokenize(prompt_text)                   # no special tokens added
    response_ids = tokenize(full_text[len(prompt_text):])  # special tokens parsed, none added
    input_ids    = prompt_ids + response_ids

``response_ids`` are exactly the tokens a policy emits after the generation prompt,
closing tokens (``<|im_end|>``) included. Tokenizing ``full_text`` in one go is
*not* the same: BPE may merge the prompt's final newline with a response's leading
spaces. The template is the only source of BOS/EOS, as in transformers'
``apply_chat_template(tokenize=True)``, so BOS is never doubled.

Without a chat template (base models): the prompt must be a plain string;
``prompt_ids = tokenize(prompt)`` with the tokenizer's own special-token rules
(e.g. a BOS for Llama tokenizers, nothing for GPT-2), ``response_ids =
tokenize(response)`` with none added, then the EOS token appended so the end of
the response is scored.

Truncation never drops response tokens silently: when prompt + response exceeds
``max_length``, the prompt is cut from the left (keeping a leading BOS) and the
result is flagged ``truncated``; a response that does not fit next to one
prompt token raises :class:`ResponseTooLongError` unless ``allow_response_truncation``.
The responses of one prompt (a chosen/rejected pair, a ranking, best-of-N candidates) share
one cut, the shortest any of them needs, so that they are compared on the same context (as
TRL truncates a pair's prompt once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from dpo.errors import EncodingError, ResponseTooLongError

Message = dict[str, str]
Prompt = str | Sequence[Message]
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Encoded:
    """A tokenized (prompt, response): the sequence is ``prompt_ids + response_ids``."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]

    @property
    def response_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.response_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def as_messages(prompt: Prompt) -> list[Message]:
    """A plain string is one user message; a list of messages is used as given."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages:
        raise EncodingError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise EncodingError(f"message {i} must be a dict with a string 'role'")
        if message["role"] not in ROLES:
            raise EncodingError(f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise EncodingError(f"message {i} ('{message['role']}') must have string 'content'")
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _render_prompt(tokenizer, messages: list[Message]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _response_text(tokenizer, messages: list[Message], prompt_text: str, response: str) -> str:
    full_text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise EncodingError(
            "the chat template's rendering of prompt + response does not start with its rendering of "
            "the prompt with add_generation_prompt=True, so the response tokens cannot be isolated"
        )
    return full_text[len(prompt_text) :]


def render_chat(tokenizer, prompt: Prompt, response: str) -> tuple[str, str]:
    """``(prompt_text, response_text)`` with ``prompt_text + response_text`` the full rendering."""
    messages = as_messages(prompt)
    prompt_text = _render_prompt(tokenizer, messages)
    return prompt_text, _response_text(tokenizer, messages, prompt_text, response)


class _PromptTokens:
    """A prompt rendered and tokenized once; :meth:`response_ids` tokenizes each response after it."""

    def __init__(self, tokenizer, prompt: Prompt):
        self.tokenizer, self.chat = tokenizer, has_chat_template(tokenizer)
        if self.chat:
            self.messages = as_messages(prompt)
            self.text = _render_prompt(tokenizer, self.messages)
            self.ids = _tokenize(tokenizer, self.text, False)
        elif not isinstance(prompt, str):
            raise EncodingError("the tokenizer has no chat template: the prompt must be a plain string, not messages")
        else:
            self.ids = _tokenize(tokenizer, prompt, True)

    def response_ids(self, response: str) -> list[int]:
        if not isinstance(response, str):
            raise EncodingError(f"response must be a string, got {type(response).__name__}")
        if self.chat:
            return _tokenize(self.tokenizer, _response_text(self.tokenizer, self.messages, self.text, response), False)
        ids = _tokenize(self.tokenizer, response, False)
        return ids if self.tokenizer.eos_token_id is None else [*ids, self.tokenizer.eos_token_id]


def _cut_prompt(prompt_ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` prompt tokens, with a leading BOS kept in front when there was one."""
    if keep >= len(prompt_ids):
        return prompt_ids
    if bos_id is not None and keep >= 2 and prompt_ids[0] == bos_id:
        return [bos_id, *prompt_ids[len(prompt_ids) - keep + 1 :]]
    return prompt_ids[len(prompt_ids) - keep :]


def encode(
    tokenizer,
    prompt: Prompt,
    response: str,
    max_length: int | None = None,
    allow_response_truncation: bool = False,
) -> Encoded:
    """Tokenize one (prompt, response) by the module's rule; see the module docstring."""
    return next(encode_responses(tokenizer, prompt, [response], max_length, allow_response_truncation))


def encode_responses(
    tokenizer,
    prompt: Prompt,
    responses: Iterable[str],
    max_length: int | None = None,
    allow_response_truncation: bool = False,
    max_response_tokens: int | None = None,
) -> Iterator[Encoded]:
    """The (prompt, response) sequences of one prompt's responses, the prompt rendered and tokenized once and
    cut once for all of them (the shortest cut any needs; a single response is :func:`encode`).

    ``max_response_tokens`` first keeps each response's first tokens only (a rerank API's per-document cap);
    a response so cut is flagged ``truncated``.

    An :class:`EncodingError` is raised when the failing item is reached (the prompt's: at the first).
    """
    from jinja2 import TemplateError

    def guarded(step, *args):
        try:
            return step(*args)
        except (TypeError, ValueError, TemplateError) as e:  # e.g. a lone surrogate, a template's raise_exception
            why = _lone_surrogate(args[-1]) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise EncodingError(f"cannot tokenize: {why}") from None

    responses = list(responses)
    if not responses:
        return
    try:
        shared = guarded(_PromptTokens, tokenizer, prompt)
    except EncodingError as e:
        failure, shared, tokenized, capped = (0, e), None, [], []
    else:
        failure, tokenized, capped = None, [], []
        for i, response in enumerate(responses):  # all tokenized first: the shared cut depends on every one
            try:
                ids = guarded(shared.response_ids, response)
            except EncodingError as e:
                failure = (i, e)
                break
            capped.append(max_response_tokens is not None and len(ids) > max_response_tokens)
            tokenized.append(ids[:max_response_tokens])
    fits: list[Encoded] = []
    for i, response_ids in enumerate(tokenized):
        try:
            fit = _fit(list(shared.ids), response_ids, tokenizer.bos_token_id, max_length, allow_response_truncation)
            fits.append(Encoded(fit.prompt_ids, fit.response_ids, True) if capped[i] and not fit.truncated else fit)
        except EncodingError as e:
            failure = (i, e) if failure is None or i < failure[0] else failure
            break
    keep = min((len(f.prompt_ids) for f in fits), default=0)
    for i, fit in enumerate(fits):
        if failure is not None and i == failure[0]:
            break
        if len(fit.prompt_ids) > keep:  # another response of this prompt needed a shorter prompt
            fit = Encoded(tuple(_cut_prompt(list(fit.prompt_ids), keep, tokenizer.bos_token_id)), fit.response_ids,
                          True)  # fmt: skip
        yield fit
    if failure is not None:
        raise failure[1]


def _lone_surrogate(value: object) -> str | None:
    """Why a text cannot be tokenized when it holds a lone UTF-16 surrogate (JSON's "\\ud800" decodes to one)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, (list, tuple)):  # chat messages
        texts = [m.get("content") for m in value if isinstance(m, dict)]
    else:
        return None
    for text in (t for t in texts if isinstance(t, str)):
        lone = next((ch for ch in text if "\ud800" <= ch <= "\udfff"), None)
        if lone is not None:
            return f"the text holds a lone surrogate U+{ord(lone):04X}, which is not a character"
    return None


def _fit(prompt_ids: list[int], response_ids: list[int], bos_id: int | None, max_length: int | None,
         allow_response_truncation: bool) -> Encoded:  # fmt: skip
    """The sequence within ``max_length``: the prompt cut from the left, the response only when allowed."""
    if not prompt_ids:
        raise EncodingError(
            "the prompt encodes to no tokens (empty prompt and no BOS), so the first response token has no context"
        )
    truncated = False
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        if max_length < 2:
            raise EncodingError(f"max_length must be at least 2, got {max_length}")
        if len(response_ids) > max_length - 1:
            if not allow_response_truncation:
                raise ResponseTooLongError(
                    f"the response has {len(response_ids)} tokens, more than max_length={max_length} "
                    "leaves beside one prompt token; raise max_length or allow response truncation"
                )
            response_ids = response_ids[: max_length - 1]
        prompt_ids = _cut_prompt(prompt_ids, max_length - len(response_ids), bos_id)
        truncated = True
    return Encoded(tuple(prompt_ids), tuple(response_ids), truncated)
