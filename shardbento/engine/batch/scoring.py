"""Prompt logprobs: each prompt token's log-probability under the distribution the model computed at the
position before it, read off the prefill's own logits (kept at every position only for the requests
that ask; every other prefill keeps one position per prompt)."""

from __future__ import annotations

import torch

# Prompt positions whose logits one step keeps for prompt logprobs: a bound on the step's extra memory
# (positions x vocabulary logits; 1024 x 152k in bfloat16 is 0.3 GiB). The planner holds to it.
SCORED_STEP_TOKENS = 1024
PIECE_ROWS = 128  # rows normalised at a time: a float32 copy of this many rows of the vocabulary

# (token id, logprob, rank, the best ids, their logprobs); logprob None: the prompt's first token
Score = tuple[int, float | None, int, tuple[int, ...], tuple[float, ...]]


def score_chunk(
    logits: torch.Tensor, token_ids: tuple[int, ...], previous: torch.Tensor | None, top: int
) -> list[Score]:
    """Scores of a chunk of a prompt from its logits (one row per token, at the tokens' positions):
    token i is scored by row i-1, the chunk's first token by `previous` (the row before the chunk),
    or, with None, it is the prompt's first and has no logprob. Ranks count the tokens more likely
    than it, plus one (ties share the better rank, as vLLM's)."""
    if previous is None:
        first: list[Score] = [(token_ids[0], None, 0, (), ())]
        return first + _score(logits[:-1], token_ids[1:], top)
    return _score(previous[None], token_ids[:1], top) + _score(logits[:-1], token_ids[1:], top)


def _score(rows: torch.Tensor, targets: tuple[int, ...], top: int) -> list[Score]:
    scores: list[Score] = []
    for at in range(0, len(targets), PIECE_ROWS):
        piece = rows[at : at + PIECE_ROWS].float().log_softmax(dim=-1)
        ids = torch.tensor(targets[at : at + PIECE_ROWS], device=piece.device)
        chosen = piece.gather(1, ids[:, None])[:, 0]
        ranks = (piece > chosen[:, None]).sum(dim=-1) + 1
        best = piece.topk(top, dim=-1) if top else None
        rows_out = zip(
            ids.tolist(),
            chosen.tolist(),
            ranks.tolist(),
            best.indices.tolist() if best is not None else [[]] * len(ids),
            best.values.tolist() if best is not None else [[]] * len(ids),
            strict=True,
        )
        scores.extend((i, lp, rank, tuple(b), tuple(v)) for i, lp, rank, b, v in rows_out)
    return scores
