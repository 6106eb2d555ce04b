"""What one step prefills: the waiting prompts' tokens that fit the step's token budget beside the
running sequences' decode tokens, complete prompts packed together and at most one prompt in chunks
(its KV growing in the pool row after the running ones), as vLLM's chunked prefill schedules them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from shardbento.engine.batch.images import with_generated
from shardbento.engine.batch.kvslots import PREFIX_BLOCK
from shardbento.engine.batch.prefill import PrefillChunk
from shardbento.engine.batch.sequence import Sequence

Planned = list[tuple[PrefillChunk, list[Sequence]]]
Room = Callable[[int, int], bool]  # (rows joining, the longest of them) -> whether the pool holds them
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
) -> Planned:
    """This step's chunks, each with the sequences it serves (`hit_of(i)`: candidate i's cached blocks;
    `keep` collects the blocks read; `grown`: the running rows' longest after this step;
    `images_free`: image sequences the cross-attention state can still take, None without one). In
    order: the head's next chunk when it is being prefilled in chunks (alone unless it completes); a
    vision head alone (whole with its pixels, or its text past a cached prefix; it waits while the
    cross-attention state is full); else complete prompts packed together, then the next prompt's first
    chunk with what the budget has left."""
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
    together, stopped = plan_together(
        candidates[first:], lambda i: hit_of(i + first), left, room, keep, packs, rows_before=len(planned)
    )
    planned += together
    left -= sum(len(chunk.token_ids) for chunk, _ in together)
    index = first + stopped
    if first == 0 and index < len(candidates) and left >= MIN_CHUNK:
        planned += _first_chunk(
            candidates[index], hit_of(index), left, budget, room, keep, grown, len(planned)
        )
    return planned


def _chunk(seq: Sequence, start: int, budget: int, prefix: tuple[int, ...]) -> PrefillChunk:
    """The next `budget` tokens of a prompt prefilled in its row; `slot` set (to be placed) when they
    complete it."""
    context = seq.context()
    take = context[start : start + budget]
    done = start + len(take) == len(context)
    return PrefillChunk(
        seq.seq_id, tuple(take), start, 0 if done else None, prefix=prefix, length=len(context)
    )


def _vision_head(
    seq: Sequence, hit: list[int], budget: int, room: Room, keep: set[int], grown: int
) -> Planned:
    """A vision prompt alone: whole, with its pixels in the same forward; or, with a cached prefix past
    its last image, its text remainder (in chunks when longer than the budget)."""
    context = seq.context()
    if not hit:
        if not room(1, len(context)):
            return []  # it waits for running sequences to finish (or be preempted)
        inputs = with_generated(seq.inputs, seq.generated)
        return [(PrefillChunk(seq.seq_id, tuple(context), 0, 0, inputs), [seq])]
    start = len(hit) * PREFIX_BLOCK
    if not room(1, max(len(context), grown + _steps(len(context) - start, budget) - 1)):
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
    steps = 1 + _steps(remainder - left, budget)
    if not room(rows + 1, max(len(context), grown + steps - 1)):
        return []
    keep.update(hit)
    seq.cached = start
    take = context[start : start + left]
    chunk = PrefillChunk(seq.seq_id, tuple(take), start, None, prefix=tuple(hit), length=len(context))
    return [(chunk, [seq])]


def _steps(tokens: int, budget: int) -> int:
    return -(-tokens // budget)


def is_twin(seq: Sequence) -> bool:
    """Whether the sequence may share another's prefill: a fresh text prompt."""
    return seq.inputs is None and not seq.num_prefilled and not seq.generated


def plan_together(
    candidates: list[Sequence],
    hit_of: Callable[[int], list[int]],
    budget: int,
    room: Room,
    keep: set[int],
    packs: bool,
    rows_before: int = 0,
) -> tuple[Planned, int]:
    """Complete prompts prefilled together in one forward, and the index of the first candidate not
    taken (`hit_of(i)`: candidate i's cached blocks, looked up only for the candidates considered).
    Packed, each computes its own remainder past its cached prefix and the budget counts their sum;
    left-padded, each row computes the same number of tokens (the batch's widest remainder): a row with a
    longer cached prefix takes only as much of it as leaves that many tokens to compute."""
    chosen: list[tuple[Sequence, list[int]]] = []
    width = longest = total = 0
    prompts = set()
    stopped = len(candidates)
    for index, seq in enumerate(candidates):
        context = seq.context()
        if tuple(context) in prompts and is_twin(seq):
            continue  # a twin: join_twins adds it
        prompts.add(tuple(context))
        if seq.inputs is not None or seq.num_prefilled:
            stopped = index  # a vision prompt goes alone, as the head
            break
        blocks = hit_of(index)
        remainder = len(context) - len(blocks) * PREFIX_BLOCK
        wider = max(width, remainder)
        cost = total + remainder if packs else wider * (len(chosen) + 1)
        if cost > budget or not room(rows_before + len(chosen) + 1, max(longest, len(context))):
            stopped = index
            break
        width, longest, total = wider, max(longest, len(context)), total + remainder
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
        planned.append((PrefillChunk(seq.seq_id, tuple(context[start:]), start, 0, prefix=prefix), [seq]))
    return planned, stopped


def join_twins(planned: Planned, candidates: list[Sequence], room: Room) -> None:
    """Add each waiting fresh text prompt equal to a prompt completed by a planned chunk to its group,
    while the KV pool holds one more row."""
    completing = {
        tuple(group[0].prompt_ids): group
        for chunk, group in planned
        if chunk.slot is not None and chunk.inputs is None and not group[0].generated
    }
    taken = {id(group[0]) for _, group in planned}
    rows = sum(len(group) for chunk, group in planned if chunk.slot is not None)
    longest = max((len(group[0].context()) for _, group in planned), default=0)
    for seq in candidates:
        if id(seq) in taken or not is_twin(seq):
            continue
        group = completing.get(tuple(seq.prompt_ids))
        if group is not None and room(rows + 1, longest):
            group.append(seq)
            rows += 1


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
