"""The DPO implicit reward of (prompt, response) pairs, as trained:

    r(x, y) = β · (Σ_t log π(y_t | x, y_<t) − Σ_t log π_ref(y_t | x, y_<t))      normalize="sum"
    r(x, y) = the same divided by the number of response tokens                  normalize="mean"

Reference-free scoring sets log π_ref = 0 (r = β·log π, ranked like RewardBench's reference-free
modes). Sequences come from :func:`dpo.encoding.encode` and log-probs from
:func:`dpo.logprobs.sequence_logprobs`: the code the trainer optimised. Reference log-probs are
kept in an LRU cache keyed by token ids (a reference never changes while served).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo.encoding import Encoded, Prompt, encode, encode_responses
from dpo.errors import DpormError
from dpo.logprobs import pads_batches, sequence_logprobs
from dpo.manifest import NORMALIZATIONS, Manifest, is_positive_number
from dpo.pair_checks import check_recorded_hashes, check_tokenizer_files


@dataclass
class RewardResult:
    reward: float
    logp_policy: float
    logp_ref: float | None
    prompt_tokens: int
    response_tokens: int
    truncated: bool
    cached_ref: bool
    token_rewards: list[float] | None = None
    rechecked: bool = False  # bf16-paired: a close decision, scored again by the float32 models (score_groups)


class ReferenceCache:
    """LRU map from token ids to the reference's per-token log-probs (thread-safe)."""

    def __init__(self, capacity: int):
        self.capacity, self.hits, self.misses = capacity, 0, 0
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, seq: Encoded) -> torch.Tensor | None:
        key = (seq.prompt_ids, seq.response_ids)
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, seq: Encoded, token_logps: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[(seq.prompt_ids, seq.response_ids)] = token_logps
            self._items.move_to_end((seq.prompt_ids, seq.response_ids))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class RewardModel:
    """A policy and its reference (or none), with the β and tokenization settings they were trained with.

    ``reference`` is a model, ``"adapter"`` (the policy is a PEFT model whose disabled adapter is the
    reference: one copy of the base weights) or ``None`` (reference-free). ``max_length`` is the
    effective limit on prompt+response tokens: the one given, at most the models' context (the
    smaller ``max_position_embeddings`` of the two), and that context when none is given.
    """

    def __init__(
        self,
        policy,
        reference,
        tokenizer,
        beta: float,
        normalize: str = "sum",
        max_length: int | None = None,
        allow_response_truncation: bool = False,
        name: str = "dporm",
        ref_cache_size: int = 4096,
        info: dict | None = None,
        paired: bool = False,
    ):
        if normalize not in NORMALIZATIONS:
            raise DpormError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.beta, self.normalize, self.name = beta, normalize, name
        self.context_length = models_context_length(policy, reference)
        if self.context_length is not None and (max_length is None or max_length > self.context_length):
            max_length = self.context_length  # past the context, learned positions fail and rotary ones extrapolate
        self.max_length, self.allow_response_truncation = max_length, allow_response_truncation
        self.ref_cache = ReferenceCache(ref_cache_size)
        # One forward at a time: in adapter mode the reference pass switches the shared model's adapter off,
        # which a policy pass in another thread would see. (Each forward already uses every core.)
        self._forward_lock = threading.Lock()
        self.info = info or {}
        self.paired = None
        if paired:  # bf16 matmuls, the policy as the reference plus a difference stream: dpo.paired
            from dpo.models import PAIRED
            from dpo.paired import PairedModel

            if reference == "adapter":  # π_ref is the base, π its adapter's factors: no merged copy
                base = policy.get_base_model()
                self.paired = PairedModel(base, base)
            elif isinstance(reference, torch.nn.Module):
                self.paired = PairedModel(policy, reference)
            else:
                raise DpormError(f"{PAIRED} needs a reference model (this one is reference-free)")
            self.ref_cache = ReferenceCache(0)  # the paired pass computes the reference anyway: nothing to cache

    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def forward_pads(self, float32: bool = False) -> bool:
        """Whether a forward (``score_encoded(..., float32)``) pads its sequences to the longest, as on
        accelerators, so costs rows × longest positions; bf16-paired's own pass packs them."""
        return (self.paired is None or float32) and pads_batches(self.policy)

    @property
    def precision(self) -> str:
        """``"bf16-mixed"`` (:func:`dpo.models.mix_precision`), else the policy's weight dtype, e.g. ``"float32"``."""
        from dpo.models import AUTOCAST_ATTRIBUTE, MIXED, PAIRED

        if self.paired is not None:
            return PAIRED
        if getattr(self.policy, AUTOCAST_ATTRIBUTE, None) is not None:
            return MIXED
        return str(next(self.policy.parameters()).dtype).removeprefix("torch.")

    def warm_up(self) -> None:
        """Compile ``bf16-paired``'s fused steps now (~50 s on a 2-core CPU, ~7 s cached), not at the first request.

        Other precisions need no warm-up. A server calls this while ``/ready`` still answers 503.
        """
        if self.paired is not None:  # two sizes: the second compiles the row count as dynamic
            self.paired.logprobs([Encoded((1, 2, 3, 4), (5, 6, 7)), Encoded((1, 2, 3, 4), (8, 9))])
            self.paired.logprobs([Encoded((1, 2, 3, 4, 5, 6), (5, 6, 7, 8, 9)), Encoded((1, 2), (8, 9, 10))])

    def encode(self, prompt: Prompt, response: str, allow_response_truncation: bool | None = None) -> Encoded:
        allow = self.allow_response_truncation if allow_response_truncation is None else allow_response_truncation
        return encode(self.tokenizer, prompt, response, self.max_length, allow)

    def encode_responses(
        self,
        prompt: Prompt,
        responses: Sequence[str],
        allow_response_truncation: bool | None = None,
        max_length: int | None = None,
        max_response_tokens: int | None = None,
    ) -> Iterator[Encoded]:
        """:meth:`encode` of each response to one prompt, lazily; the prompt is tokenized once.

        ``max_length`` lowers the model's own limit for these sequences; ``max_response_tokens`` keeps each
        response's first tokens only (see :func:`dpo.encoding.encode_responses`).
        """
        allow = self.allow_response_truncation if allow_response_truncation is None else allow_response_truncation
        return encode_responses(self.tokenizer, prompt, responses, self.length_limit(max_length), allow,
                                max_response_tokens)  # fmt: skip

    def length_limit(self, max_length: int | None = None) -> int | None:
        """The model's ``max_length``, or ``max_length`` where that is lower."""
        limits = [n for n in (self.max_length, max_length) if n is not None]
        return min(limits) if limits else None

    def _reference_token_logps(self, seqs: Sequence[Encoded]) -> tuple[list[torch.Tensor], list[bool]]:
        cached = [self.ref_cache.get(s) for s in seqs]
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            todo = [seqs[i] for i in missing]
            if self.reference == "adapter":
                with self.policy.disable_adapter():
                    out = sequence_logprobs(self.policy, todo)
            else:
                out = sequence_logprobs(self.reference, todo)
            for j, i in enumerate(missing):
                # A copy: the row is a view of the whole batch's log-prob matrix, which a cache entry would keep alive.
                cached[i] = out.per_token(j).cpu().clone()
                self.ref_cache.put(seqs[i], cached[i])
        hits = [i not in set(missing) for i in range(len(seqs))]
        return cached, hits

    @torch.inference_mode()
    def score_encoded(
        self,
        seqs: Sequence[Encoded],
        normalize: str | None = None,
        reference_free: bool = False,
        token_rewards: bool = False,
        float32: bool = False,
    ) -> list[RewardResult]:
        """Rewards of already-encoded sequences; sequences sharing a prompt compute it once.

        ``float32`` runs a ``bf16-paired`` model's float32 policy and reference (which it keeps) instead.
        """
        normalize = normalize or self.normalize
        if normalize not in NORMALIZATIONS:
            raise DpormError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        if not seqs:
            return []
        use_ref = self.has_reference and not reference_free
        with self._forward_lock:
            if self.paired is not None and not float32:  # both models in one pass; a reference cache saves nothing
                policy, both = self.paired.logprobs(seqs)
                ref = [both.per_token(i).cpu() for i in range(len(seqs))] if use_ref else None
                hits = [False] * len(seqs)
            else:
                policy = sequence_logprobs(self.policy, seqs)
                ref, hits = self._reference_token_logps(seqs) if use_ref else (None, [False] * len(seqs))
        results = []
        for i, seq in enumerate(seqs):
            pol_tokens = policy.per_token(i).cpu()
            ref_tokens = ref[i] if ref is not None else torch.zeros_like(pol_tokens)
            per_token = self.beta * (pol_tokens - ref_tokens)
            n = len(seq.response_ids)
            # The trainer's formula in the trainer's precision: β·(Σ log π − Σ log π_ref) on float32 sums.
            pol_sum, ref_sum = pol_tokens.sum(), ref_tokens.sum()
            total = float(self.beta * (pol_sum - ref_sum))
            results.append(
                RewardResult(
                    reward=total / max(n, 1) if normalize == "mean" else total,
                    logp_policy=float(pol_sum),
                    logp_ref=float(ref_sum) if ref is not None else None,
                    prompt_tokens=len(seq.prompt_ids),
                    response_tokens=n,
                    truncated=seq.truncated,
                    cached_ref=hits[i],
                    token_rewards=per_token.tolist() if token_rewards else None,
                    rechecked=float32 and self.paired is not None,
                )
            )
        return results

    def score_groups(
        self,
        groups: Sequence[Sequence[Encoded]],
        normalize: str | None = None,
        reference_free: bool = False,
        token_rewards: bool = False,
        recheck: float = 0.0,
    ) -> list[list[RewardResult]]:
        """Rewards of responses compared within each group (a chosen/rejected pair, best-of-N candidates).

        A ``bf16-paired`` model scores every group in one pass, then scores again with its float32
        models each group whose decision is close (:func:`close_call`, ``recheck`` nats of log-ratio
        per reward): where the rounding error could flip the order, the decision is float32's.
        """
        flat = self.score_encoded([s for g in groups for s in g], normalize, reference_free, token_rewards)
        out, i = [], 0
        for g in groups:
            out.append(flat[i : i + len(g)])
            i += len(g)
        if self.paired is None or recheck <= 0 or reference_free:
            return out
        mean = (normalize or self.normalize) == "mean"
        close = [j for j, results in enumerate(out) if close_call(results, self.beta * recheck, mean)]
        if close:
            again = self.score_encoded([s for j in close for s in groups[j]], normalize, False, token_rewards, True)
            for j in close:
                out[j], again = again[: len(out[j])], again[len(out[j]) :]
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], **options) -> list[RewardResult]:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.score_encoded(seqs, **options)


def close_call(results: Sequence[RewardResult], tolerance: float, mean: bool) -> bool:
    """Whether two rewards of a group lie within their tolerances of each other (``tolerance`` per summed
    reward; a mean reward's is divided by its token count), so that rounding errors of that size could reorder them."""
    bounds = sorted((r.reward, tolerance / max(r.response_tokens, 1) if mean else tolerance) for r in results)
    return any(b[0] - a[0] < a[1] + b[1] for a, b in itertools.pairwise(bounds))


def models_context_length(*models) -> int | None:
    """The smallest context (``max_position_embeddings``) among ``models`` (non-models skipped), or None."""
    from dpo.models import context_length

    found = [context_length(getattr(m, "config", None)) for m in models if isinstance(m, torch.nn.Module)]
    return min((n for n in found if n is not None), default=None)


def load_reward_model(
    artifact: str | None = None,
    policy: str | None = None,
    reference: str | None = None,
    beta: float | None = None,
    dtype: str = "float32",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    ref_cache_size: int = 4096,
    normalize: str | None = None,
) -> RewardModel:
    """From an artifact directory (``dporm.json``), or from ``policy`` + ``reference`` + ``beta``."""
    from dpo.logprobs_command import resolve_model_path
    from dpo.lora import is_adapter_dir, load_adapter, load_merged_adapter
    from dpo.models import PAIRED, check_same_architecture, has_tokenizer, load_model, load_tokenizer, weights_hash

    paired = dtype == PAIRED
    if artifact:
        if policy or reference or beta is not None:
            raise DpormError("give an artifact directory or --policy/--reference/--beta, not both")
        manifest = Manifest.load(artifact)
        policy_path = manifest.resolve(artifact, manifest.policy)
        reference_path = manifest.resolve(artifact, manifest.reference)
        beta_value, adapter = manifest.beta, manifest.adapter
        tokenization, name = manifest.tokenization, Path(artifact).resolve().name
    else:
        if not policy or beta is None:
            raise DpormError(
                "give an artifact directory, or --policy and --beta (and --reference unless reference-free)"
            )
        if not is_positive_number(beta):
            raise DpormError(f"--beta must be a positive finite number, got {beta:g}")
        policy_path = resolve_model_path(policy, None)
        reference_path = resolve_model_path(reference, None) if reference else None
        manifest, beta_value, adapter = None, beta, is_adapter_dir(policy_path)
        if adapter and not reference_path:
            raise DpormError(f"{policy_path} is a PEFT adapter: give the model it adapts as --reference")
        tokenization, name = {}, Path(policy_path).name
    if paired and not reference_path:
        raise DpormError(f"--dtype {PAIRED} needs a reference model (this one is reference-free)")
    load = dict(
        dtype="float32" if paired else dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    tokenizer = load_tokenizer(reference_path if adapter else policy_path, trust_remote_code)
    template = tokenization.get("chat_template")
    if template is not None and getattr(tokenizer, "chat_template", None) != template:
        raise DpormError(f"{policy_path}: its chat template is not the one recorded in dporm.json")
    if adapter:
        if manifest is None and has_tokenizer(policy_path):
            check_tokenizer_files(policy_path, reference_path, trust_remote_code)
        base = load_model(reference_path, **load)
        ref_hash = weights_hash(base)
        policy_model, ref_model = load_adapter(base, policy_path, allow_pickle), "adapter"
        from dpo.paired import paired_support

        if paired and paired_support(policy_model.get_base_model()) is not None:
            # DoRA, adapted embeddings or head: the paired pass needs the policy's own weights, merged into a copy
            ref_model = load_model(reference_path, **load)
            policy_model = load_merged_adapter(load_model(reference_path, **load), policy_path, allow_pickle)
    else:
        if reference_path:
            check_tokenizer_files(policy_path, reference_path, trust_remote_code)
        policy_model = load_model(policy_path, **load)
        ref_model = load_model(reference_path, **load) if reference_path else None
        if ref_model is not None:
            check_same_architecture(policy_model.config, ref_model.config)
        ref_hash = weights_hash(ref_model) if ref_model is not None else None
    info = {
        "policy": policy_path,
        "reference": reference_path,
        "adapter": adapter,
        "reference_sha256": ref_hash,
        "policy_sha256": weights_hash(policy_model),
        "loss": manifest.loss if manifest else None,
    }
    if manifest is not None and load["dtype"] in ("float32", "fp32"):
        check_recorded_hashes(manifest, info)
    return RewardModel(
        policy_model,
        ref_model,
        tokenizer,
        beta_value,
        normalize or (manifest.normalize if manifest else "sum"),
        tokenization.get("max_length"),
        bool(tokenization.get("allow_response_truncation", False)),
        name,
        ref_cache_size,
        info,
        paired,
    )


def reward_model_from_args(args, **options) -> RewardModel:
    """The reward model named by the shared command-line options (:func:`dpo.manifest.add_reward_model_options`);
    ``options`` are further :func:`load_reward_model` keywords (``beta`` overrides ``args.beta``)."""
    options.setdefault("beta", args.beta)
    return load_reward_model(args.artifact, args.policy, args.reference, dtype=args.dtype, device=args.device,
                             trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                             **options)  # fmt: skip
