"""dporm: DPO policies as reward models — training, scoring, serving, evaluation."""

import warnings

__version__ = "0.1.0"

# PEFT (adapters, training, --delta-rank) calls a transformers API that v5 deprecates; the warning is for
# PEFT's developers and says nothing to a dporm user.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
