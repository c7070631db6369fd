"""``dporm extract``: a reward-model artifact from an existing DPO policy and its reference.

    r(x, y) = β · (log π(y | x) − log π_ref(y | x))

The artifact is ``dporm.json`` naming the two models (by path or hub id), or the policy copied in as
safetensors (``--copy``), or the policy as a rank-K LoRA delta over the reference (``--delta-rank``,
see :mod:`dpo.delta`), with the reward fidelity of that delta measured on held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from dpo import __version__
from dpo.delta import check_same_forward
from dpo.errors import DpormError, require_at_least, require_writable
from dpo.extract_options import DEFAULT_ENERGY, DEFAULT_MAX_LENGTH
from dpo.file_modes import match_umask
from dpo.lora import is_adapter_dir, load_merged_adapter
from dpo.manifest import Manifest, is_positive_number
from dpo.models import (
    check_same_architecture,
    context_length,
    has_tokenizer,
    load_model,
    load_tokenizer,
    resolve_device,
    weights_hash,
)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_configs(policy: str, reference: str, trust_remote_code: bool) -> tuple:
    """The two model configs; a one-line error unless they describe the same architecture."""
    from transformers import AutoConfig

    configs = []
    for path in (policy, reference):
        try:
            configs.append(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
        except (OSError, ValueError) as e:
            raise DpormError(f"cannot load the config of {path}: {str(e).splitlines()[0]}") from None
    check_same_architecture(*configs)
    return configs[0], configs[1]


def resolve_max_length(max_length: int | None, configs) -> int:
    """``--max-length``, or the default capped at the models' context; a length past that context is an error."""
    contexts = [n for n in (context_length(c) for c in configs) if n is not None]
    context = min(contexts, default=None)
    if max_length is None:
        return DEFAULT_MAX_LENGTH if context is None else min(DEFAULT_MAX_LENGTH, context)
    if context is not None and max_length > context:
        raise DpormError(f"--max-length {max_length} exceeds the models' context of {context} positions "
                         f"(max_position_embeddings): give at most {context}, or leave it out")  # fmt: skip
    return max_length


def _location(name: str) -> str:
    """An existing local path made absolute (the artifact may move); a hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _has_pickle_only(path: str) -> bool:
    local = Path(path)
    return local.is_dir() and not any(local.glob("*.safetensors")) and any(local.glob("*.bin"))


def _fidelity_pairs(source: str, limit: int) -> list:
    from dpo.preference_data import load_preferences

    data = load_preferences(source, report=_say)
    pairs = [(ex.prompt, ex.responses[ex.pairs[0][0]], ex.responses[ex.pairs[0][1]]) for ex in data.examples]
    if not pairs:
        raise DpormError(f"{source}: no usable preference pair")
    return pairs[:limit]


def _check_options(args: argparse.Namespace, output: Path) -> None:
    if not is_positive_number(args.beta):
        raise DpormError(f"--beta must be a positive finite number, got {args.beta}")
    require_at_least(args, ("fidelity_limit", "batch_size"))
    require_writable(output, parents=True, directory=True)
    require_at_least(args, ("max_length",), 2)  # one prompt token and one response token
    if args.delta_rank is not None and args.delta_rank != "auto" and args.delta_rank < 1:
        raise DpormError(f"--delta-rank must be at least 1 or 'auto', got {args.delta_rank}")
    if not 0 < args.delta_energy <= 1:
        raise DpormError(f"--delta-energy must be in (0, 1], got {args.delta_energy}")
    if args.delta_energy != DEFAULT_ENERGY and args.delta_rank != "auto":
        raise DpormError("--delta-energy needs --delta-rank auto")
    if args.copy and args.delta_rank:
        raise DpormError("--copy conflicts with --delta-rank: the delta artifact stores its own adapter")
    if args.fidelity_data and not args.delta_rank:
        raise DpormError("--fidelity-data needs --delta-rank: an exact artifact reproduces the policy exactly")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DpormError(f"{output} already exists and is not an empty directory; choose a new --output")
    if output.exists() and output.resolve() == Path.cwd().resolve():
        raise DpormError("--output is the current directory; name a new directory for the artifact")
    resolve_device(args.device)  # a bad --device fails now, not after loading the models


def run_extract(args: argparse.Namespace) -> Path:
    from dpo.logprobs_command import resolve_model_path
    from dpo.pair_checks import check_tokenizers_match

    started = time.time()
    output = Path(args.output).expanduser()
    _check_options(args, output)
    policy_path = resolve_model_path(args.policy, args.cache_dir)
    reference_path = resolve_model_path(args.reference, args.cache_dir)
    adapter = is_adapter_dir(policy_path)  # a PEFT adapter over the reference: it runs on the reference's config
    reference_tokenizer = load_tokenizer(reference_path, args.trust_remote_code)
    tokenizer = reference_tokenizer
    if not adapter or has_tokenizer(policy_path):
        tokenizer = load_tokenizer(policy_path, args.trust_remote_code)
        check_tokenizers_match(tokenizer, reference_tokenizer, policy_path, reference_path)
    configs = check_configs(reference_path if adapter else policy_path, reference_path, args.trust_remote_code)
    args.max_length = resolve_max_length(args.max_length, configs)
    if args.delta_rank:
        check_same_forward(*(c.to_dict() for c in configs))
    pairs = _fidelity_pairs(args.fidelity_data, args.fidelity_limit) if args.fidelity_data else None

    load = dict(dtype="float32", device=args.device, trust_remote_code=args.trust_remote_code,
                allow_pickle=args.allow_pickle)  # fmt: skip
    # Built in a sibling staging directory and renamed at the end: a failure leaves no half artifact.
    output = output.resolve()
    staging = output.parent / f".{output.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _build(args, output, staging, tokenizer, policy_path, reference_path, adapter, pairs, load, started)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(output)
    return output


def _build(args, output: Path, staging: Path, tokenizer, policy_path: str, reference_path: str, adapter: bool, pairs,
           load: dict, started: float) -> None:  # fmt: skip
    """Load, hash, store and measure, then move ``staging`` to ``output``. Only ``--delta-rank`` holds both models
    at once (for the SVD); otherwise one model is in memory at a time."""
    if adapter:  # the policy's own weights, for the hashes, --copy, the delta and the fidelity reference
        policy = load_merged_adapter(load_model(reference_path, **load), policy_path, args.allow_pickle)
    else:
        policy = load_model(policy_path, **load)
    policy_hash = weights_hash(policy)
    if args.copy:
        policy.save_pretrained(staging / "policy", safe_serialization=True)
        tokenizer.save_pretrained(staging / "policy")
    models = [policy] if args.delta_rank else []
    del policy
    reference = load_model(reference_path, **load)
    reference_hash = weights_hash(reference)
    models += [reference] if args.delta_rank else []
    del reference
    if policy_hash == reference_hash:
        _say(f"warning: policy and reference weights are identical (sha256 {policy_hash[:12]}): the reward is 0 "
             "everywhere")  # fmt: skip
    tokenization = {"chat_template": getattr(tokenizer, "chat_template", None), "max_length": args.max_length,
                    "allow_response_truncation": False}  # fmt: skip
    provenance = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dporm_version": __version__,
                  "command": shlex.join(sys.argv), "source_policy": args.policy, "source_reference": args.reference,
                  "policy_sha256": policy_hash, "reference_sha256": reference_hash}  # fmt: skip
    manifest = Manifest(policy=_location(policy_path), reference=_location(reference_path), beta=args.beta,
                        normalize=args.normalize, tokenization=tokenization, provenance=provenance,
                        adapter=adapter)  # fmt: skip
    # The artifact loads the reference from where it is, and the policy too unless --copy or --delta-rank stores it.
    stored = args.copy or args.delta_rank
    pickled = [name for name, path in (("policy", policy_path), ("reference", reference_path))
               if _has_pickle_only(path) and not (name == "policy" and stored)]  # fmt: skip
    if pickled:
        hint = " (--copy stores the policy as safetensors)" if "policy" in pickled else ""
        _say(f"warning: the {' and the '.join(pickled)} {'have' if len(pickled) > 1 else 'has'} pickle weights only; "
             f"scoring the artifact needs --allow-pickle{hint}")  # fmt: skip
    if args.copy:
        manifest.policy, manifest.adapter = "policy", False  # an adapter policy is stored merged
    if args.delta_rank:
        _extract_delta(args, manifest, tokenizer, models, staging, pairs, lambda: load_model(reference_path, **load))
    manifest.provenance["wall_seconds"] = round(time.time() - started, 1)
    manifest.save(staging)
    match_umask(staging)  # weights written through temporary files come out 0600: others could not serve them
    if output.exists():
        output.rmdir()
    staging.rename(output)


def _extract_delta(args, manifest: Manifest, tokenizer, models: list, output: Path, pairs, load_reference) -> None:
    """Write the LoRA delta into ``output/policy``; measure its reward fidelity against the exact pair.

    ``models`` is ``[policy, reference]``, emptied here so that the reference, which the adapter is built on in
    place, is freed once saved; the exact reward loads the reference again.
    """
    from dpo.delta import build_delta_adapter
    from dpo.fidelity import reward_fidelity
    from dpo.scorer import RewardModel, load_reward_model

    policy, reference = models
    models.clear()
    peft_model, report = build_delta_adapter(policy, reference, args.delta_rank, args.svd, energy=args.delta_energy)
    # The reference supplies the base embeddings: only the low-rank factors are saved, not a vocabulary matrix.
    peft_model.save_pretrained(output / "policy", safe_serialization=True, save_embedding_layers=False)
    del peft_model, reference
    manifest.policy, manifest.adapter = "policy", True
    manifest.metrics["delta"] = delta = report.to_dict()
    errors, memory = delta["relative_frobenius_error"], delta["memory_bytes"]
    ranks = delta["ranks"]
    if not delta["layers"]:  # only norms differ: nothing to factor
        chosen = f"{report.rank} (no linear layer differs)"
    elif report.rank == "auto":
        chosen = f"auto (energy {report.energy}, ranks {ranks['min']}–{ranks['max']}, mean {ranks['mean']:.1f})"
    elif ranks["min"] != report.rank or ranks["max"] != report.rank:  # capped at min(m, n) per layer
        chosen = f"{report.rank} (per layer at most its smaller side: ranks {ranks['min']}–{ranks['max']})"
    else:
        chosen = str(report.rank)
    if report.past_break_even:
        _say(f"warning: --delta-rank {report.rank} is past the break-even rank of {len(report.past_break_even)} of "
             f"{delta['layers']} layers (e.g. {report.past_break_even[0]}): their factors hold more numbers than the "
             "delta itself; a smaller rank or --delta-rank auto saves more memory")  # fmt: skip
    _say(f"delta rank {chosen}: {delta['layers']} linear layers, "
         "relative Frobenius error mean "
         f"{errors['mean']:.4f} max {errors['max']:.4f}; {report.adapter_parameters:,} adapter parameters"
         + (f", {len(report.norms_saved)} norm(s) stored whole" if report.norms_saved else ""))  # fmt: skip
    _say(f"memory: policy+reference {memory['policy_plus_reference'] / 2**20:.1f} MiB, reference+adapter "
         f"{memory['reference_plus_adapter'] / 2**20:.1f} MiB, saved {memory['saved'] / 2**20:.1f} MiB "
         f"({memory['saved_fraction']:.1%})")  # fmt: skip
    if report.energy_capped:
        name, kept = min(report.energy_capped.items(), key=lambda item: item[1])
        _say(f"warning: --delta-energy {report.energy} is out of reach in {len(report.energy_capped)} layer(s) at "
             f"their break-even rank (e.g. {name} keeps {kept:.3f}): their relative error exceeds "
             f"√(1 − E) = {(1 - report.energy) ** 0.5:.3f}")  # fmt: skip
    if memory["saved"] < 0:
        _say("warning: reference+adapter needs more memory than policy+reference (tied embeddings carry the delta "
             "twice); a smaller --delta-rank or --delta-energy saves memory")  # fmt: skip
    if pairs is None:
        return
    manifest.save(output)  # the delta reward model loads from the artifact, as serve and score will
    settings = manifest.tokenization
    exact = RewardModel(policy, load_reference(), tokenizer, manifest.beta, manifest.normalize, settings["max_length"],
                        ref_cache_size=2 * len(pairs))  # fmt: skip
    approx = load_reward_model(str(output), device=args.device, trust_remote_code=args.trust_remote_code,
                               allow_pickle=args.allow_pickle)  # fmt: skip
    if approx.info["reference_sha256"] == manifest.provenance["reference_sha256"]:
        approx.ref_cache = exact.ref_cache  # the same reference weights: compute its log-probs once
    result = reward_fidelity(exact, approx, pairs, args.batch_size)
    if not result["pairs"]:
        raise DpormError(f"{args.fidelity_data}: no pair could be encoded within --max-length {args.max_length}")
    result["data"], result["limit"] = args.fidelity_data, args.fidelity_limit
    manifest.metrics["fidelity"] = result
    (output / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    _say(f"fidelity on {result['pairs']} pairs: agreement {result['agreement']:.4f}, Spearman "
         f"{result['spearman']:.4f}, max |reward error| {result['reward_abs_error_max']:.4g}")  # fmt: skip
