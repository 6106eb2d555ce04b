"""What one step prefills: FIFO within the step's token budget, complete prompts together, at most one
prompt in chunks (it continues alone until its last chunk), vision prompts alone."""

from __future__ import annotations

import torch

from shardbento.engine.batch.planner import MIN_CHUNK, choose_chunks
from shardbento.engine.batch.sequence import Sequence


def waiting(*lengths: int) -> list[Sequence]:
    return [
        Sequence(f"r{i}", list(range(100 * i, 100 * i + n)), None, None, i) for i, n in enumerate(lengths)
    ]


def plan(
    candidates: list[Sequence], budget: int, room=lambda rows, longest, blocks: True, packs: bool = True
):
    return choose_chunks(candidates, lambda i: [], budget, room, set(), packs, grown=1)


def summary(planned) -> list[tuple[int, int, int, bool]]:
    """(sequence index, start, tokens, completes) of each chunk."""
    return [
        (int(group[0].request_id[1:]), c.start, len(c.token_ids), c.slot is not None) for c, group in planned
    ]


def test_planner_complete_prompts_first_then_the_next_ones_first_chunk() -> None:
    assert summary(plan(waiting(30, 50, 100), budget=96)) == [
        (0, 0, 30, True),
        (1, 0, 50, True),
        (2, 0, 16, False),
    ]
    chunk = plan(waiting(30, 50, 100), budget=96)[-1][0]
    assert chunk.in_row and chunk.length == 100


def test_planner_starts_no_chunk_on_a_scrap_of_budget() -> None:
    assert summary(plan(waiting(30, 50, 100), budget=80 + MIN_CHUNK - 1)) == [
        (0, 0, 30, True),
        (1, 0, 50, True),
    ]


def test_planner_a_prompt_in_chunks_goes_on_alone_until_its_last_chunk() -> None:
    seqs = waiting(300, 20)
    seqs[0].num_prefilled = 64
    assert summary(plan(seqs, budget=64)) == [(0, 64, 64, False)]
    seqs[0].num_prefilled = 256
    assert summary(plan(seqs, budget=64)) == [(0, 256, 44, True), (1, 0, 20, True)]


def test_planner_long_head_starts_with_the_whole_budget_and_room_is_asked() -> None:
    assert summary(plan(waiting(500), budget=128)) == [(0, 0, 128, False)]
    assert plan(waiting(500), budget=128, room=lambda rows, longest, blocks: longest < 500) == []


def test_planner_vision_prompt_goes_alone_with_its_pixels() -> None:
    seqs = waiting(40, 10)
    seqs[0].inputs = {
        "input_ids": torch.tensor([seqs[0].prompt_ids]),
        "pixel_values": torch.zeros(1, 3, 4, 4),
    }
    [(chunk, group)] = plan(seqs, budget=256)
    assert group == [seqs[0]] and chunk.inputs is not None and len(chunk.token_ids) == 40
