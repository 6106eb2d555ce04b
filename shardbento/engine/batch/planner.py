"""What one step prefills: the waiting prompts' tokens that fit the step's token budget beside the
running sequences' decode tokens, complete prompts packed together and at most one prompt in chunks
(its KV growing in the pool row after the running ones), as vLLM's chunked prefill schedules them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from shardbento.engine.batch.images import with_generated
from shardbento.engine.batch.kvslots import PREFIX_BLOCK
from shardbento.engine.batch.prefill import PrefillChunk
from shardbento.engine.batch.scoring import SCORED_STEP_TOKENS
from shardbento.engine.batch.sequence import Sequence

Planned = list[tuple[PrefillChunk, list[Sequence]]]
# (rows joining, the longest of them, cached blocks they read) -> whether the pool holds them beside
# the cached blocks the step reads already and these
Room = Callable[[int, int, list[int]], bool]
MIN_CHUNK = PREFIX_BLOCK  # a prompt starts in chunks only with at least this much of the budget left


def choose_chunks(
    candidates: list[Sequence],
    hit_of: Callable[[int], list[int]],
    budget: int,
    room: Room,
    keep: set[int],
    packs: bool,
    grown: int,
    images_free: int | None = None,
    least_budget: int | None = None,
) -> Planned:
    """This step's chunks, each with the sequences it serves (`hit_of(i)`: candidate i's cached blocks;
    `keep` collects the blocks read; `grown`: the running rows' longest after this step;
    `images_free`: image sequences the cross-attention state can still take, None without one). In
    order: the head's next chunk when it is being prefilled in chunks (alone unless it completes); a
    vision head alone (whole with its pixels, or its text past a cached prefix; it waits while the
    cross-attention state is full); else complete prompts packed together, then the next prompt's first
    chunk with what the budget has left. Prompts that ask for prompt
    logprobs keep logits at every token: at most SCORED_STEP_TOKENS of those a step. `least_budget`: the
    smallest budget a later step can give a chunked prompt (the room it holds while its chunks come is
    counted at that pace). Every room check counts the rows planned before it at their own length."""
    head = candidates[0]
    if head.num_prefilled:
        chunk = _chunk(head, head.num_prefilled, budget, ())
        if chunk.slot is None:
            return [(chunk, [head])]
        planned, first = [(chunk, [head])], 1
    elif head.inputs is not None:
        if images_free == 0:
            return []  # every cross-attention slot holds a running image sequence: it waits for one
        return _vision_head(head, hit_of(0), budget, room, keep, grown)
    else:
        planned, first = [], 0
    left = budget - sum(len(chunk.token_ids) for chunk, _ in planned)
    scored_left = SCORED_STEP_TOKENS - sum(_scored_tokens(chunk) for chunk, _ in planned)
    together, stopped = plan_together(
        candidates[first:],
        lambda i: hit_of(i + first),
        left,
        _beside(room, planned),
        keep,
        packs,
        rows_before=len(planned),
        scored_budget=scored_left,
    )
    planned += together
    left -= sum(len(chunk.token_ids) for chunk, _ in together)
    scored_left -= _kept_positions(together, packs)
    index = first + stopped
    if first == 0 and index < len(candidates) and left >= MIN_CHUNK:
        if candidates[index].scoring is not None:
            left = min(left, scored_left)
        if left >= MIN_CHUNK:
            later = budget if least_budget is None else min(budget, least_budget)
            planned += _first_chunk(
                candidates[index],
                hit_of(index),
                left,
                later,
                _beside(room, planned),
                keep,
                grown,
                len(planned),
            )
    return planned


def _beside(room: Room, planned: Planned) -> Room:
    """room() for rows joining after the planned ones: the pool holds them all at the longest's width."""
    longest = max((len(group[0].context()) for _, group in planned), default=0)
    return lambda rows, n, blocks: room(rows, max(n, longest), blocks)


def _scored_tokens(chunk: PrefillChunk) -> int:
    return len(chunk.token_ids) if chunk.scored is not None else 0


def _kept_positions(together: Planned, packs: bool) -> int:
    """Logits rows complete prompts prefilled together keep for prompt logprobs: packed, the scored
    prompts' tokens; left-padded, a scored row keeps every row's (the batch's width times its rows)."""
    if packs:
        return sum(_scored_tokens(chunk) for chunk, _ in together)
    if all(chunk.scored is None for chunk, _ in together):
        return 0
    return max(len(chunk.token_ids) for chunk, _ in together) * len(together)


def _chunk(seq: Sequence, start: int, budget: int, prefix: tuple[int, ...]) -> PrefillChunk:
    """The next `budget` tokens of a prompt prefilled in its row (a scored one's within the step's
    scored tokens); `slot` set (to be placed) when they complete it."""
    context = seq.context()
    if seq.scoring is not None:
        budget = min(budget, SCORED_STEP_TOKENS)
    take = context[start : start + budget]
    done = start + len(take) == len(context)
    return PrefillChunk(
        seq.seq_id,
        tuple(take),
        start,
        0 if done else None,
        prefix=prefix,
        length=len(context),
        scored=seq.scoring,
        lora_slot=seq.lora_slot,
    )


def _vision_head(
    seq: Sequence, hit: list[int], budget: int, room: Room, keep: set[int], grown: int
) -> Planned:
    """A vision prompt alone: whole, with its pixels in the same forward; or, with a cached prefix past
    its last image, its text remainder (in chunks when longer than the budget)."""
    context = seq.context()
    if not hit:
        if not room(1, len(context), []):
            return []  # it waits for running sequences to finish (or be preempted)
        inputs = with_generated(seq.inputs, seq.generated)
        chunk = PrefillChunk(
            seq.seq_id, tuple(context), 0, 0, inputs, scored=seq.scoring, lora_slot=seq.lora_slot
        )
        return [(chunk, [seq])]
    start = len(hit) * PREFIX_BLOCK
    if not room(1, max(len(context), grown + _steps(len(context) - start, budget) - 1), hit):
        return []
    keep.update(hit)
    seq.cached = start
    return [(_chunk(seq, start, budget, tuple(hit)), [seq])]


def _first_chunk(
    seq: Sequence, hit: list[int], left: int, budget: int, room: Room, keep: set[int], grown: int, rows: int
) -> Planned:
    """The first chunk of the next text prompt, when it is longer than what the budget has left and its
    row can hold the whole prompt beside the running rows' growth while its chunks come."""
    if seq.inputs is not None or seq.num_prefilled:
        return []
    context = seq.context()
    start = len(hit) * PREFIX_BLOCK
    remainder = len(context) - start
    if remainder <= left:
        return []  # it fits whole: only the pool's room kept it out
    # A prompt prefilled in chunks holds its row for as many steps as it has chunks, while the running
    # sequences grow a token a step: it starts only if it can finish beside them.
    per_chunk = budget if seq.scoring is None else min(budget, SCORED_STEP_TOKENS)  # as _chunk takes them
    steps = 1 + _steps(remainder - left, per_chunk)
    if not room(rows + 1, max(len(context), grown + steps - 1), hit):
        return []
    keep.update(hit)
    seq.cached = start
    take = context[start : start + left]
    chunk = PrefillChunk(
        seq.seq_id,
        tuple(take),
        start,
        None,
        prefix=tuple(hit),
        length=len(context),
        lora_slot=seq.lora_slot,
        scored=seq.scoring,
    )
    return [(chunk, [seq])]


def _steps(tokens: int, budget: int) -> int:
    return -(-tokens // budget)


def is_twin(seq: Sequence) -> bool:
    """Whether the sequence may share another's prefill: a fresh text prompt."""
    return seq.inputs is None and not seq.num_prefilled and not seq.generated


def twin_key(seq: Sequence) -> tuple[int, tuple[int, ...]]:
    """What equal prompts share to share a prefill: their tokens under the same salt (LoRA adapter)."""
    return seq.prefix_salt, tuple(seq.context())


def plan_together(
    candidates: list[Sequence],
    hit_of: Callable[[int], list[int]],
    budget: int,
    room: Room,
    keep: set[int],
    packs: bool,
    rows_before: int = 0,
    scored_budget: int = SCORED_STEP_TOKENS,
) -> tuple[Planned, int]:
    """Complete prompts prefilled together in one forward, and the index of the first candidate not
    taken (`hit_of(i)`: candidate i's cached blocks, looked up only for the candidates considered).
    Packed, each computes its own remainder past its cached prefix and the budget counts their sum;
    left-padded, each row computes the same number of tokens (the batch's widest remainder): a row with a
    longer cached prefix takes only as much of it as leaves that many tokens to compute. The positions
    kept for prompt logprobs stay within `scored_budget`: packed, the scored prompts' tokens; left-padded,
    every row's (a scored row there keeps the whole batch's logits)."""
    chosen: list[tuple[Sequence, list[int]]] = []
    width = longest = total = scored = 0
    any_scored = False
    prompts = set()
    stopped = len(candidates)
    for index, seq in enumerate(candidates):
        context = seq.context()
        if twin_key(seq) in prompts and is_twin(seq):
            continue  # a twin: join_twins adds it
        prompts.add(twin_key(seq))
        if seq.inputs is not None or seq.num_prefilled:
            stopped = index  # a vision prompt goes alone, as the head
            break
        blocks = hit_of(index)
        remainder = len(context) - len(blocks) * PREFIX_BLOCK
        wider = max(width, remainder)
        cost = total + remainder if packs else wider * (len(chosen) + 1)
        scores = any_scored or seq.scoring is not None
        kept = (scored + remainder * (seq.scoring is not None)) if packs else cost * scores
        if (
            cost > budget
            or kept > scored_budget
            or not room(rows_before + len(chosen) + 1, max(longest, len(context)), blocks)
        ):
            stopped = index
            break
        width, longest, total = wider, max(longest, len(context)), total + remainder
        scored, any_scored = kept, scores
        keep.update(blocks)
        chosen.append((seq, blocks))
    planned = []
    for seq, blocks in chosen:
        context = seq.context()
        start = len(blocks) * PREFIX_BLOCK
        if not packs:
            start = min(start, max(0, len(context) - width))
        prefix = tuple(blocks[: -(-start // PREFIX_BLOCK)]) if start else ()
        seq.cached = start
        chunk = PrefillChunk(
            seq.seq_id,
            tuple(context[start:]),
            start,
            0,
            prefix=prefix,
            scored=seq.scoring,
            lora_slot=seq.lora_slot,
        )
        planned.append((chunk, [seq]))
    return planned, stopped


def join_twins(planned: Planned, candidates: list[Sequence], room: Room) -> None:
    """Add each waiting fresh text prompt equal to a prompt completed by a planned chunk to its group,
    while the KV pool holds one more row; none while a prompt starts in chunks beside them (its row's
    room was counted for the rows planned without twins, growing while its chunks come)."""
    if any(chunk.slot is None and not group[0].num_prefilled for chunk, group in planned):
        return
    completing = {
        twin_key(group[0]): group
        for chunk, group in planned
        if chunk.slot is not None and chunk.inputs is None and not group[0].generated
    }
    taken = {id(group[0]) for _, group in planned}
    rows = planned_rows(planned)
    beside = _beside(room, planned)  # a twin's row is as wide as the longest planned
    for seq in candidates:
        if id(seq) in taken or not is_twin(seq):
            continue
        group = completing.get(twin_key(seq))
        if group is not None and _scores_enough(group[0], seq) and beside(rows + 1, 0, []):
            group.append(seq)
            rows += 1


def prompt_budget(step_tokens: int, running: int, mixes: bool) -> int:
    """Prompt tokens a step may compute: the step's budget less the running sequences' decode tokens
    when they share its forward (at least MIN_CHUNK, so a newcomer always progresses)."""
    return max(step_tokens - running, MIN_CHUNK) if running and mixes else step_tokens


def step_budgets(step_tokens: int, running: int, waiting: int, mixes: bool) -> tuple[int, int]:
    """This step's prompt budget, and the least a later step can give (with every waiting candidate
    running): a prompt started in chunks is counted at that pace."""
    return prompt_budget(step_tokens, running, mixes), prompt_budget(step_tokens, running + waiting, mixes)


def planned_rows(planned: Planned) -> int:
    """Rows the planned chunks take: a completing chunk's group one each, a chunk of a prompt still
    being prefilled its own row (after the running ones) while its chunks come."""
    return sum(len(group) if chunk.slot is not None else 1 for chunk, group in planned)


def _scores_enough(first: Sequence, twin: Sequence) -> bool:
    """Whether the twin's prompt logprobs (if it asks) come with the first's prefill."""
    return twin.scoring is None or (first.scoring is not None and first.scoring >= twin.scoring)


def place(planned: Planned, first_slot: int) -> list[PrefillChunk]:
    """Give every completing chunk its slots, in the order the scheduler appends the sequences."""
    chunks = []
    slot = first_slot
    for chunk, group in planned:
        if chunk.slot is None:
            chunks.append(chunk)
            continue
        chunks.append(replace(chunk, slot=slot, copies=tuple(range(slot + 1, slot + len(group)))))
        slot += len(group)
    return chunks


def mixable(chunk: PrefillChunk) -> bool:
    """A text chunk (a complete prompt, or a chunk of one growing in its row): what a mixed step packs
    beside the decode tokens; a vision prompt's pixels need a forward of their own."""
    return chunk.inputs is None
