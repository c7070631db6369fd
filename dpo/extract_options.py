"""``dporm extract``'s options, apart from the command so that ``dporm extract --help`` imports no torch."""

from __future__ import annotations

import argparse

from dpo.manifest import NORMALIZATIONS

DEFAULT_MAX_LENGTH = 2048
DEFAULT_ENERGY = 0.95


def _rank(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="DPO policy: model directory, hub id or 'default'")
    p.add_argument("--reference", required=True, help="its reference (SFT) model: directory, hub id or 'default'")
    p.add_argument("--beta", type=float, required=True, help="β of r = β·(log π − log π_ref)")
    p.add_argument("--output", required=True, help="artifact directory to create")
    p.add_argument("--normalize", choices=NORMALIZATIONS, default="sum",
                   help="default reward over response tokens: sum or mean (default sum)")  # fmt: skip
    p.add_argument("--max-length", type=int, help=f"max prompt+response tokens (default {DEFAULT_MAX_LENGTH}, or the "
                   "models' max_position_embeddings when smaller; more than that is an error)")  # fmt: skip
    p.add_argument("--copy", action="store_true", help="copy the policy into the artifact as safetensors")
    p.add_argument(
        "--delta-rank",
        type=_rank,
        metavar="K|auto",
        help="store the policy as a rank-K LoRA delta over the reference (truncated SVD per layer); 'auto' picks "
        "K per layer by --delta-energy",
    )
    p.add_argument("--delta-energy", type=float, default=DEFAULT_ENERGY, metavar="E",
                   help=f"with --delta-rank auto: keep this fraction of each delta's squared Frobenius norm "
                   f"(default {DEFAULT_ENERGY}), up to the rank where factors outgrow the matrix")  # fmt: skip
    p.add_argument("--svd", choices=("auto", "exact", "lowrank"), default="auto",
                   help="SVD: exact (torch.linalg.svd), lowrank (randomized) or auto (exact unless a matrix's "
                   "smaller side exceeds 4096 and K is under a quarter of it)")  # fmt: skip
    p.add_argument(
        "--fidelity-data",
        metavar="FILE",
        help="held-out preference pairs: compare the delta's rewards with the exact policy's",
    )
    p.add_argument("--fidelity-limit", type=int, default=64, help="pairs scored for fidelity (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward batch for fidelity (default 8)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (SVD and fidelity scoring)")
    p.add_argument("--cache-dir", help="dporm cache root for 'default' (default $DPORM_CACHE_DIR or ~/.cache/dporm)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights; unsafe")
