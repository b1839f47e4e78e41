"""Per-request seeded sampling for `transformers` generation: one `torch.Generator` per request.

`model.generate(do_sample=True)` draws every token of every row from the one process-wide torch
RNG, so a row's sample depends on which rows share its batch, the batch size and everything
sampled before it: a killed-and-resumed stage, another batch size or another rank count samples
something else. `SeededSampler` makes each row's sample a function of its own seed only: it applies
temperature and top-p, draws the row's next token from the row's own generator, and returns
scores where that token is the only finite one, so `generate` runs greedy (`do_sample=False`) and
picks exactly the drawn token. Used by the `hf` adapter when every request carries a `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def seeded_sampler(seeds: Sequence[int], temperature: float, top_p: float) -> Any:
    """A `LogitsProcessor` sampling row i from `torch.Generator().manual_seed(seeds[i])`."""
    import torch
    from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    class SeededSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.seeds = [int(s) for s in seeds]
            self.generators: list[Any] = []
            self.warpers: list[Any] = []
            if temperature and temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(temperature)))
            if top_p is not None and top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(float(top_p)))

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if len(self.seeds) != scores.shape[0]:
                raise ValueError(f"{len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
            if not self.generators:
                self.generators = [torch.Generator(scores.device).manual_seed(s) for s in self.seeds]
            warped = scores.float()
            for warper in self.warpers:
                warped = warper(input_ids, warped)
            probs = torch.softmax(warped, dim=-1)
            picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, torch.stack(picks), 0.0)
            return out

    return SeededSampler()
