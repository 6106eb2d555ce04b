"""Prefix caching's bookkeeping: which blocks of token ids have their KV cached, least recently used first.

The KV itself lives in the runner's pool (SlotKVCache keeps cached blocks at its tail); this index lives
with the scheduler, which decides (on tensor-parallel rank 0) and tells the runner what to copy, so the
ranks mirror it. Blocks are matched as vLLM's automatic prefix caching matches them: full blocks of token
ids, each block's key covering every token before it (a chain), so a hit is always a prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from shardbento.engine.batch.kvslots import PREFIX_BLOCK


class PrefixIndex:
    """Cached blocks 0..n-1 (kept contiguous: an evicted block's place is taken by the last one)."""

    def __init__(self, block: int = PREFIX_BLOCK) -> None:
        self.block = block
        self._lru: OrderedDict[int, int] = OrderedDict()  # key -> cache block, least recent first
        self._entry: dict[int, tuple[int, tuple[int, ...]]] = {}  # key -> (parent key, tokens): no false hits
        self._key_at: list[int] = []  # cache block -> key

    def __len__(self) -> int:
        return len(self._key_at)

    def match(self, tokens: Sequence[int], salt: int = 0) -> list[int]:
        """The cache blocks holding the longest cached prefix of `tokens`, leaving at least one token to
        compute (its logits pick the next token); they become the most recently used. `salt` roots the
        chain (a vision prompt's images), so only prompts with the same images share blocks."""
        found = []
        for key, parent, chunk in self._chain(tokens, (len(tokens) - 1) // self.block, salt):
            if self._entry.get(key) != (parent, chunk):
                break
            found.append(key)
        self._touch(found)
        return [self._lru[key] for key in found]

    def add(self, tokens: Sequence[int], room: Callable[[int], bool], salt: int = 0) -> list[tuple[int, int]]:
        """Cache the full blocks of `tokens` not cached yet while `room(blocks after)` holds: the
        (block index in the tokens, cache block) pairs the runner copies."""
        pairs: list[tuple[int, int]] = []
        chain = []
        for index, (key, parent, chunk) in enumerate(self._chain(tokens, len(tokens) // self.block, salt)):
            entry = self._entry.get(key)
            if entry is not None and entry != (parent, chunk):
                break  # another chain's block under the same hash: this one stays uncached
            if entry is None:
                if not room(len(self._key_at) + 1):
                    break
                self._entry[key] = (parent, chunk)
                self._lru[key] = len(self._key_at)
                self._key_at.append(key)
                pairs.append((index, self._lru[key]))
            chain.append(key)
        self._touch(chain)
        return pairs

    def cached(self, tokens: Sequence[int], salt: int = 0) -> tuple[list[int], int]:
        """(cache blocks of the full blocks of `tokens` cached now, how many more blocks it has)."""
        links = self._chain(tokens, len(tokens) // self.block, salt)
        held = [self._lru[key] for key, parent, chunk in links if self._entry.get(key) == (parent, chunk)]
        return held, len(links) - len(held)

    def evict(self, count: int, keep: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
        """Forget up to `count` least recently used blocks (never those in `keep`); the last block fills
        each gap, so the rest stay contiguous. Returns the copies that make it so, as (from, to) pairs
        made at once (a block that fills a gap and then another is copied once, to where it ends)."""
        source: dict[int, int] = {}  # gap -> the block (its place before eviction) that ends there
        victims = [key for key, block in self._lru.items() if block not in keep][:count]
        for key in victims:
            gap = self._lru.pop(key)
            del self._entry[key]
            last = len(self._key_at) - 1
            moved = self._key_at.pop()
            if gap != last:
                self._key_at[gap] = moved
                self._lru[moved] = gap
                source[gap] = source.pop(last, last)
        return sorted((block, gap) for gap, block in source.items() if gap < len(self._key_at))

    def _chain(
        self, tokens: Sequence[int], num_blocks: int, salt: int = 0
    ) -> list[tuple[int, int, tuple[int, ...]]]:
        links = []
        parent = salt
        for index in range(num_blocks):
            chunk = tuple(tokens[index * self.block : (index + 1) * self.block])
            key = hash((parent, chunk))
            links.append((key, parent, chunk))
            parent = key
        return links

    def _touch(self, chain: list[int]) -> None:
        """Most recent last; a chain's earlier blocks after its later ones, so leaves go first."""
        for key in reversed(chain):
            self._lru.move_to_end(key)


class PrefixCache:
    """The scheduler's side of prefix caching over a runner (a MirrorRunner on tensor-parallel rank 0):
    it finds hits, stores a row's full blocks, and evicts blocks when the running rows need the room."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.index = PrefixIndex()
        self._pending: list[tuple[int, int, int]] = []  # copies indexed, not yet made (one gather)

    def flush(self) -> None:
        """Make the pending block copies (before any eviction moves blocks around, and per step)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._runner.store_prefix(pending)

    def hit(self, tokens: Sequence[int], salt: int = 0) -> list[int]:
        return self.index.match(tokens, salt)

    def make_room(
        self, rows: int, longest: int, keep: frozenset[int] = frozenset(), strict: bool = False
    ) -> list[tuple[int, int]]:
        """Evict least recently used blocks (not `keep`) until `rows` rows of `longest` fit; nothing
        when they fit already, or would not fit even with no block but `keep` (preemption's case; with
        `strict`, for a step that adds rows, it is a planning error: the rows would overwrite cached
        blocks, and the step is refused).
        Kept blocks stay cached but may move to keep the cache contiguous: the (from, to) copies made,
        for follow_moves()."""
        kv = self._runner.kv
        if kv.holds(rows, longest):
            return []
        if not kv.holds(rows, longest, prefix_blocks=len(keep)):
            if strict:
                raise RuntimeError(
                    f"planned {rows} rows of up to {longest} tokens do not fit the KV pool beside the "
                    f"{len(keep)} cached blocks they read"
                )
            return []
        width = kv.width_for(longest)
        allowed = (kv.pool_tokens - kv.rows_taken(rows) * width) // PREFIX_BLOCK
        self.flush()
        moves = self.index.evict(len(self.index) - allowed, keep)
        self._runner.drop_prefix(moves, len(self.index))
        return moves

    def remember(self, slot: int, tokens: Sequence[int], rows: int, longest: int, salt: int = 0) -> None:
        """Index the full blocks of row `slot` (holding `tokens`) beside `rows` rows of `longest`,
        evicting the least recently used blocks of other prefixes to make room; the copies wait for
        flush() (one gather for the step)."""
        kv = self._runner.kv
        held, missing = self.index.cached(tokens, salt)
        width = max(kv.width, kv.width_for(longest))  # the rows as laid out now: blocks may not reach them
        capacity = (kv.pool_tokens - kv.rows_taken(rows) * width) // PREFIX_BLOCK
        excess = len(self.index) + missing - max(capacity, len(held))
        if missing and excess > 0:
            self.flush()
            moves = self.index.evict(excess, frozenset(held))
            self._runner.drop_prefix(moves, len(self.index))
        pairs = self.index.add(tokens, lambda blocks: blocks <= capacity, salt)
        self._pending += [(slot, j, b) for j, b in pairs]

    def start_of(self, seq: Any) -> list[int]:
        """The cached blocks a fresh prompt (or a preempted one's context) starts with: none for a
        prompt scored for prompt logprobs (it computes every token); for a vision prompt only a hit
        past its last image token (its remainder is then text, prefilled without the pixels), under
        its images' digest."""
        if seq.num_prefilled or seq.scoring is not None:
            return []
        if seq.inputs is not None and not seq.prefix_salt:
            return []
        blocks = self.hit(seq.context(), seq.prefix_salt)
        if seq.inputs is not None and len(blocks) * PREFIX_BLOCK < seq.image_end:
            return []
        return blocks

    def remember_rows(self, running: list[Any], rows: list[int]) -> None:
        """Cache the full blocks these running rows' KV holds (text, and images this model caches)."""
        if not rows:
            return
        kv = self._runner.kv
        longest = max(kv.lengths[: len(running)]) + 1
        for row in rows:
            seq = running[row]
            if seq.inputs is None or seq.prefix_salt:
                tokens = seq.context()[: kv.lengths[row]]
                self.remember(row, tokens, len(running), longest, seq.prefix_salt)
        self.flush()


def follow_moves(planned: list[tuple[Any, Any]], moves: list[tuple[int, int]]) -> list[tuple[Any, Any]]:
    """The planned (chunk, group) pairs with each chunk's cached prefix where eviction's (from, to)
    copies put it."""
    if not moves:
        return planned
    where = dict(moves)
    return [
        (replace(chunk, prefix=tuple(where.get(b, b) for b in chunk.prefix)), group)
        for chunk, group in planned
    ]
