"""dporm: DPO policies as reward models — training, scoring, serving, evaluation."""

__version__ = "0.1.0"
