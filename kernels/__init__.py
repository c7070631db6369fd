"""Fused token log-prob ops. Knows nothing of models: tensors in, tensors out.

- :func:`token_logprobs`: ``log softmax(logits)[target]`` per token, no [N, V] log-softmax.
- :func:`linear_token_logprobs`: the same from hidden states and the LM head, no [N, V] logits.

Triton kernels on CUDA, a chunked torch path elsewhere; ``DPORM_KERNEL=triton|torch`` forces one.
"""

from kernels.linear_logprobs import linear_token_logprobs
from kernels.logprobs import token_logprobs

__all__ = ["linear_token_logprobs", "token_logprobs"]
