"""The resolved sampling parameters of one completion: the one form they take from the gateway to the sampler.

The gateway validates what a caller sent and resolves every default once (request.py); the decoder reads this form
from its request as it is. The defaults here are the neutral values (greedy, no filter, no penalty), which a field
the caller left unset resolves to, except where the gateway's API default differs (temperature 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int                       # tokens to generate at most (the context may end it sooner)
    temperature: float = 0.0              # 0: greedy
    top_p: float = 1.0                    # in (0, 1]
    top_k: int = 0                        # 0: no limit
    seed: int = 0                         # the sampler's noise is a function of (seed, output index, token)
    min_p: float = 0.0                    # in [0, 1]: tokens below min_p * p(best) are dropped
    repetition_penalty: float = 1.0       # transformers' semantics, over prompt and output tokens; > 0
    presence_penalty: float = 0.0         # OpenAI's semantics, over output tokens; in [-2, 2]
    frequency_penalty: float = 0.0        # OpenAI's semantics, over output tokens; in [-2, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit), ids ascending
    min_tokens: int = 0                   # end-of-sequence and stop token ids are masked out before this many
    stop_token_ids: tuple[int, ...] = ()  # generation stops after any of these (the token is returned)
    ignore_eos: bool = False              # the end-of-sequence token does not stop generation
    logprobs: bool = False                # report the log-probability of each sampled token
    top_logprobs: int = 0                 # and of the top alternatives, 0 to MAX_TOP_LOGPROBS

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    @property
    def has_controls(self) -> bool:
        """Anything beyond temperature and the filters: penalties, biases, a minimum length, logprobs."""
        return (self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.logprobs
                or self.top_logprobs > 0)

    @property
    def needs_filter(self) -> bool:
        """top-k, top-p or min-p remove tokens (only where the row samples)."""
        return not self.is_greedy and (self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0.0)
