"""Checks that a policy and a reference can be scored together, and are the models an artifact names.

The DPO reward compares two models' log-probs of the same token ids, so both tokenizers must
turn text into the same ids; an artifact's rewards are those of the weights it recorded.
"""

from __future__ import annotations

from dpo.encoding import has_chat_template
from dpo.errors import DpormError
from dpo.manifest import Manifest

TOKENIZER_PROBE = "Hello, World! It's 1234.5 ünïcödé  spaces\n\ttabs <end> 日本語"


def check_tokenizers_match(a, b, a_name: str, b_name: str) -> None:
    """One-line error unless two tokenizers encode alike: vocabulary, special tokens, chat template, and
    the ids of a probe text (normalizer, merges), and with special tokens too (BOS/EOS settings) where there is no
    chat template (with one, the template places them).

    The pad token is not compared: it never enters a scored sequence (sequences are packed, or padded
    and masked), and DPO trainers often set one on the policy's tokenizer.
    """
    if a.get_vocab() != b.get_vocab():
        va, vb = a.get_vocab(), b.get_vocab()
        detail = f"{len(va)} vs {len(vb)} tokens" if len(va) != len(vb) else "same size, different tokens"
        raise DpormError(f"tokenizers differ: {a_name} and {b_name} do not share a vocabulary ({detail})")
    sa, sb = ({k: v for k, v in getattr(t, "special_tokens_map", {}).items() if k != "pad_token"} for t in (a, b))
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        shown = ", ".join(f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys)
        raise DpormError(f"special tokens differ between {a_name} and {b_name}: {shown}")
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        raise DpormError(f"chat templates differ between {a_name} and {b_name}")
    # With a chat template the template alone places BOS/EOS (dpo.encoding): compare plain text only.
    for special in (False,) if has_chat_template(a) else (False, True):
        try:
            ids_a, ids_b = (list(t(TOKENIZER_PROBE, add_special_tokens=special)["input_ids"]) for t in (a, b))
        except Exception as e:  # noqa: BLE001 - a tokenizer that cannot encode plain text cannot score either
            why = str(e).splitlines()[0] if str(e) else ""
            raise DpormError(f"cannot compare tokenizers {a_name} and {b_name}: {type(e).__name__} {why}") from None
        if ids_a != ids_b:
            shared = min(len(ids_a), len(ids_b))
            i = next((j for j in range(shared) if ids_a[j] != ids_b[j]), shared)
            raise DpormError(
                f"tokenizers differ between {a_name} and {b_name}: the same text encodes differently "
                f"({'with' if special else 'without'} special tokens, from token {i}: {ids_a[i : i + 3]} vs "
                f"{ids_b[i : i + 3]}; BOS/EOS settings, normalizer or merges)"
            )


def check_tokenizer_files(policy_dir: str, reference_dir: str, trust_remote_code: bool) -> None:
    from dpo.models import load_tokenizer

    a, b = load_tokenizer(policy_dir, trust_remote_code), load_tokenizer(reference_dir, trust_remote_code)
    check_tokenizers_match(a, b, policy_dir, reference_dir)


def check_recorded_hashes(manifest: Manifest, info: dict) -> None:
    """The models an artifact names must still be the ones it was made from: a reference directory retrained in
    place, or a hub id moved to a new revision, would give other rewards under the artifact's name.

    ``dporm extract`` records both models' float32 hashes; ``dporm train`` the reference's, in its ``--dtype``.
    Compared only for models loaded in float32 (hashes cover dtypes), and for the policy only when it is not
    an adapter (an adapter is hashed merged when recorded, as base plus adapter when served).
    """
    p = manifest.provenance
    trained_in = (p.get("config") or {}).get("dtype", "float32")
    recorded = {"reference": p.get("reference_sha256")}
    if recorded["reference"] is None and trained_in in ("float32", "fp32"):
        recorded["reference"] = p.get("reference_weights_hash")
    if not manifest.adapter:
        recorded["policy"] = p.get("policy_sha256")
    for role, want in recorded.items():
        got = info[f"{role}_sha256"]
        if want and got and want != got:
            raise DpormError(
                f"{info[role]}: the {role}'s weights are not the ones this artifact was made from (sha256 "
                f"{want[:12]} recorded, {got[:12]} now); make the artifact again, or score the models directly "
                "with --policy/--reference/--beta"
            )
