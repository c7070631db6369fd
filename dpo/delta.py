"""A policy stored as a low-rank delta over its reference, as a PEFT LoRA adapter.

For every linear layer inside the decoder layers, the truncated SVD of the weight delta

    Δ = W_policy − W_ref = U S Vᵀ,     Δ_K = U_K S_K V_Kᵀ = B A,
    B = U_K S_K^{1/2} (out × K),       A = S_K^{1/2} V_Kᵀ (K × in)

is the best rank-K approximation in Frobenius norm (Eckart–Young); PEFT adds ``scaling · B A`` with
``lora_alpha = r`` so scaling = 1. One copy of the reference weights then serves π (adapter on) and
π_ref (adapter off). The symmetric split keeps A and B of similar magnitude (kinder to bf16/fp16).

The input embeddings and the LM head get the same treatment when they differ (a fully fine-tuned
policy moves them): Δ_head [V, d] is a linear delta as above, and an embedding lookup adds row t of
(B A)ᵀ, so its factors come from the SVD of Δ_embᵀ. With tied embeddings the one delta is stored on
both modules (the base weights stay tied); merging such an adapter unties them first
(:func:`dpo.lora.load_merged_adapter`), or the shared matrix would get the delta twice.
:mod:`dpo.logprobs` folds a LoRA-wrapped LM head into one augmented linear map, so scoring still
never holds full logits.

``rank="auto"`` picks K per layer: the smallest K whose singular values keep a fraction ``energy`` of
‖Δ‖²_F (Σ_{i≤K} σ_i² ≥ energy · Σ_i σ_i², so the relative Frobenius error is at most √(1 − energy)),
capped at the break-even rank ⌊m·n / (m + n)⌋, past which the factors would hold more numbers than Δ.

Norm weights that differ are stored whole in the adapter (PEFT ``modules_to_save``, a few
kilobytes); differing linear biases are refused (LoRA carries no bias), and so are configs that
differ in anything the forward uses (rope, norm epsilons, ...): the adapter runs on the reference's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dpo.errors import DpormError

# Above this smallest dimension (and for K well below it) a full SVD costs O(m·n·min) per matrix:
# randomized SVD (Halko et al. 2011, with power iterations) gets the top K at O(m·n·K).
EXACT_SVD_MAX_DIM = 4096


# Config fields that leave an eval-mode forward unchanged: names, versions, dtypes, output switches, token ids, init.
BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "_experts_implementation", "id2label", "label2id",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "chunk_size_feed_forward", "gradient_checkpointing", "transformers.js_config",
    "tie_word_embeddings",  # the weights themselves are compared (a merged adapter policy is untied)
})  # fmt: skip


def forward_config(config: dict) -> dict:
    """The config fields that may change an eval-mode forward: no :data:`BOOKKEEPING_KEYS`, no dropout rates
    (``*dropout``, ``*pdrop``, inactive in eval mode)."""
    return {k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS and not k.endswith(("dropout", "pdrop"))}


def config_differences(policy: dict, reference: dict) -> list[str]:
    """``key policy-value vs reference-value`` for each :func:`forward_config` field that differs."""
    policy, reference = forward_config(policy), forward_config(reference)
    keys = sorted(set(policy) | set(reference))
    return [f"{k} {policy.get(k)!r} vs {reference.get(k)!r}" for k in keys if policy.get(k) != reference.get(k)]


def check_same_forward(policy: dict, reference: dict) -> None:
    """One-line error when the policy's config computes differently from the reference's: the adapter runs on the
    reference's config, so rope, norm epsilons, windows, ... of the policy would be lost."""
    differ = config_differences(policy, reference)
    if differ:
        raise DpormError("--delta-rank runs the policy on the reference's config, but their configs differ: "
                         f"{'; '.join(differ)}; extract without --delta-rank")  # fmt: skip


@dataclass
class DeltaReport:
    rank: int | str
    layer_errors: dict[str, float] = field(default_factory=dict)  # ‖Δ − BA‖_F / ‖Δ‖_F per layer
    layer_ranks: dict[str, int] = field(default_factory=dict)
    energy: float | None = None
    adapter_parameters: int = 0
    norms_saved: list[str] = field(default_factory=list)
    past_break_even: list[str] = field(default_factory=list)  # layers whose factors hold more numbers than Δ
    energy_capped: dict[str, float] = field(default_factory=dict)  # auto: layers held at break-even, energy kept
    policy_plus_reference_bytes: int = 0
    reference_plus_adapter_bytes: int = 0

    def to_dict(self) -> dict:
        errors = list(self.layer_errors.values())
        saved = self.policy_plus_reference_bytes - self.reference_plus_adapter_bytes
        ranks = list(self.layer_ranks.values())
        return {
            "rank": self.rank,
            "energy": self.energy,
            "layers": len(errors),
            "ranks": {
                "min": min(ranks, default=0),
                "max": max(ranks, default=0),
                "mean": sum(ranks) / max(len(ranks), 1),
                "per_layer": self.layer_ranks,
            },  # fmt: skip
            "relative_frobenius_error": {
                "mean": sum(errors) / max(len(errors), 1),
                "max": max(errors, default=0.0),
                "per_layer": self.layer_errors,
            },  # fmt: skip
            "energy_capped": self.energy_capped,
            "adapter_parameters": self.adapter_parameters,
            "norms_saved": self.norms_saved,
            "memory_bytes": {
                "policy_plus_reference": self.policy_plus_reference_bytes,
                "reference_plus_adapter": self.reference_plus_adapter_bytes,
                "saved": saved,
                "saved_fraction": saved / max(self.policy_plus_reference_bytes, 1),
            },
        }


def lowrank_factors(delta: torch.Tensor, k: int, method: str = "auto", svd: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, A) with B @ A the rank-k truncated SVD of ``delta`` (float32), k ≤ min(delta.shape); ``svd``, the
    full ``(U, S, Vh)`` of ``delta`` when already computed."""
    delta = delta.float()
    small = min(delta.shape)
    if method == "auto":
        method = "exact" if small <= EXACT_SVD_MAX_DIM or 4 * k >= small else "lowrank"
    if method == "exact":
        u, s, vh = svd if svd is not None else torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    elif method == "lowrank":
        u, s, v = torch.svd_lowrank(delta, q=min(k + 10, small), niter=4)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    else:
        raise DpormError(f"unknown SVD method {method!r}; choose auto, exact or lowrank")
    root = s.sqrt()
    return u * root, root[:, None] * vh


def break_even_rank(m: int, n: int) -> int:
    """⌊m·n / (m + n)⌋: rank-K factors of an m×n matrix hold K·(m + n) numbers, more than m·n past this K."""
    return m * n // (m + n)


def energy_rank(delta: torch.Tensor, energy: float, singular_values: torch.Tensor | None = None) -> int:
    """Smallest K with Σ_{i≤K} σ_i² ≥ energy · ‖Δ‖²_F, at most the break-even rank ⌊m·n / (m + n)⌋."""
    return _energy_rank(delta, energy, singular_values)[0]


def _energy_rank(delta: torch.Tensor, energy: float, singular_values: torch.Tensor | None = None
                 ) -> tuple[int, float]:  # fmt: skip
    """(:func:`energy_rank`, the fraction of ‖Δ‖²_F it keeps: below ``energy`` where break-even capped it)."""
    m, n = delta.shape
    s = singular_values if singular_values is not None else torch.linalg.svdvals(delta.float())
    power = s.double().square()
    if power.sum() == 0:
        return 1, 1.0
    kept = power.cumsum(0) / power.sum()
    k = int(torch.searchsorted(kept, torch.tensor([energy], dtype=kept.dtype) - 1e-12)[0]) + 1
    k = max(1, min(k, break_even_rank(m, n), len(power)))
    return k, float(kept[k - 1])


def _decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder layers, by its full module name."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DpormError(f"{type(model).__name__}: no decoder layers found (model.get_decoder().layers)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return {f"{prefix}.{name}": m for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)}


def parameter_bytes(model) -> int:
    """Bytes of a model's distinct parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _policy_bytes(policy, reference) -> int:
    """The policy's parameter bytes as a checkpoint of its own would hold them: where the reference ties its
    embeddings and the policy's two vocabulary matrices are still equal (a merged adapter unties them), once."""
    total = parameter_bytes(policy)
    emb, head = policy.get_input_embeddings(), policy.get_output_embeddings()
    ref_emb, ref_head = reference.get_input_embeddings(), reference.get_output_embeddings()
    if emb is None or head is None or ref_emb is None or ref_head is None or emb.weight is head.weight:
        return total
    if ref_emb.weight is ref_head.weight and torch.equal(emb.weight, head.weight):
        total -= head.weight.numel() * head.weight.element_size()
    return total


def _vocabulary_modules(model) -> dict[str, torch.nn.Module]:
    """The input embedding and the output head (when they are an nn.Embedding and an nn.Linear), by name."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {name: m for name, m in model.named_modules() if any(m is w for w in wanted)
            and isinstance(m, (torch.nn.Embedding, torch.nn.Linear))}  # fmt: skip


def _classify_differences(policy, reference, linears: dict) -> tuple[list[str], list[str]]:
    """(modules whose weight differs: decoder linears, embeddings, head; norm modules that differ).

    Refuses anything else that differs. Tied embeddings: a change of the shared matrix marks both
    the embedding and the head, so both carry the delta.
    """
    pol, ref = policy.state_dict(), reference.state_dict()
    if pol.keys() != ref.keys():
        raise DpormError("policy and reference have different parameter names: not the same architecture")
    modules = dict(reference.named_modules())
    vocab = _vocabulary_modules(reference)
    linears = {**linears, **vocab}
    changed_linears, changed_norms, refused = [], set(), []
    for name in pol:
        if pol[name].shape != ref[name].shape:
            raise DpormError(f"{name}: shape {tuple(pol[name].shape)} in the policy, {tuple(ref[name].shape)} "
                             "in the reference")  # fmt: skip
        if torch.equal(pol[name], ref[name]):
            continue
        owner, _, leaf = name.rpartition(".")
        if owner in linears and leaf == "weight":
            changed_linears.append(owner)
        elif "norm" in type(modules.get(owner)).__name__.lower():
            changed_norms.add(owner)
        else:
            refused.append(name)
    if refused:
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise DpormError(f"--delta-rank stores linear and embedding weights and norms only, but "
                         f"{', '.join(refused[:3])}{more} differ between policy and reference; "
                         "extract without --delta-rank")  # fmt: skip
    tied = [n for n in vocab if n not in changed_linears and any(vocab[n].weight is vocab[c].weight
            for c in changed_linears if c in vocab)]  # fmt: skip
    return list(dict.fromkeys(changed_linears + tied)), sorted(changed_norms)


@torch.no_grad()
def build_delta_adapter(
    policy, reference, rank: int | str, svd: str = "auto", show_progress: bool = True, energy: float = 0.95
):
    """Wrap ``reference`` (in place) in a LoRA adapter whose weights are the rank-K SVD of the delta.

    ``rank`` is K, or ``"auto"`` for a per-layer K keeping ``energy`` of each delta's squared
    Frobenius norm. Returns the PEFT model and a :class:`DeltaReport`. Layers whose rank differs
    from the adapter's r get their own (PEFT ``rank_pattern``, ``alpha_pattern`` keeping scaling = 1).
    """
    from peft import LoraConfig, get_peft_model

    if rank != "auto" and (not isinstance(rank, int) or rank < 1):
        raise DpormError(f"--delta-rank must be a positive integer or 'auto', got {rank!r}")
    if not 0 < energy <= 1:
        raise DpormError(f"--delta-energy must be in (0, 1], got {energy}")
    check_same_forward(policy.config.to_dict(), reference.config.to_dict())
    linears = {**_decoder_linears(reference), **_vocabulary_modules(reference)}
    changed, norms = _classify_differences(policy, reference, linears)
    if not changed and not norms:
        raise DpormError("policy and reference weights are identical: there is no delta to store")
    policy_modules = dict(policy.named_modules())
    report = DeltaReport(rank=rank, norms_saved=norms, energy=energy if rank == "auto" else None)
    report.policy_plus_reference_bytes = _policy_bytes(policy, reference) + parameter_bytes(reference)
    factors, ranks = {}, {}
    for name in tqdm(changed, desc="svd", unit="layer", disable=not show_progress):
        w_ref = linears[name].weight
        delta = policy_modules[name].weight.float() - w_ref.float()
        if isinstance(linears[name], torch.nn.Embedding):
            delta = delta.T  # PEFT adds row t of (B A)ᵀ to an embedding lookup
        full = None
        if rank == "auto":  # the spectrum picks K; a matrix small enough for an exact SVD is decomposed once
            if svd != "lowrank" and min(delta.shape) <= EXACT_SVD_MAX_DIM:
                full = torch.linalg.svd(delta, full_matrices=False)
            k, kept = _energy_rank(delta, energy, full[1] if full is not None else None)
            if kept < energy - 1e-9:
                report.energy_capped[name] = kept
        else:
            k = min(rank, *delta.shape)
        if k > break_even_rank(*delta.shape):
            report.past_break_even.append(name)
        b, a = lowrank_factors(delta, k, svd, full)
        norm = torch.linalg.matrix_norm(delta)
        report.layer_errors[name] = float(torch.linalg.matrix_norm(delta - b @ a) / norm) if norm > 0 else 0.0
        factors[name], ranks[name] = (b.to(w_ref.dtype), a.to(w_ref.dtype)), k
    report.layer_ranks = dict(ranks)
    if rank == "auto":
        rank = max(ranks.values(), default=1)
    pattern = {name: k for name, k in ranks.items() if k != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=changed or None, modules_to_save=norms or None,
                        rank_pattern=pattern, alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")  # fmt: skip
    if not changed:
        # PEFT wants at least one LoRA target; a norm-only delta is stored with rank-K zeros on one layer.
        first = next(iter(linears))
        config.target_modules = [first]
        w = linears[first].weight
        factors[first] = (w.new_zeros(w.shape[0], rank), w.new_zeros(rank, w.shape[1]))
    with warnings.catch_warnings():  # tied embeddings: both modules get the same explicit delta, by design
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        model = get_peft_model(reference, config)
    modules = dict(model.base_model.model.named_modules())
    for name, (b, a) in factors.items():
        if hasattr(modules[name], "lora_embedding_A") and "default" in modules[name].lora_embedding_A:
            modules[name].lora_embedding_B["default"].copy_(b)
            modules[name].lora_embedding_A["default"].copy_(a)
        else:
            modules[name].lora_B["default"].weight.copy_(b)
            modules[name].lora_A["default"].weight.copy_(a)
    for name in norms:
        modules[name].modules_to_save["default"].load_state_dict(policy_modules[name].state_dict())
    model.eval()
    trainable = [p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n]
    report.adapter_parameters = sum(p.numel() for p in trainable)
    with model.disable_adapter():
        base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if "lora_" not in n and "modules_to_save" not in n)  # fmt: skip
    report.reference_plus_adapter_bytes = base_bytes + sum(p.numel() * p.element_size() for p in trainable)
    return model, report
