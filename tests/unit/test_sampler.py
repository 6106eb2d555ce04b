"""Batched token selection: the batch's picks equal each row's own, seeds reproduce inside any batch,
sampled rows follow their distribution, tiny temperatures stay greedy."""

from __future__ import annotations

import pytest
import torch

from shardbento.engine.base import SamplingParams
from shardbento.engine.batch import sampling
from shardbento.engine.batch.sampler import RequestSampler, select_tokens

PROMPT = (1, 2)


def samplers(eos: set[int], favourite: int = 0) -> list[RequestSampler]:
    params = [
        SamplingParams(max_tokens=4),
        SamplingParams(max_tokens=4, min_tokens=2),
        SamplingParams(max_tokens=4, temperature=0.8, seed=3),
        SamplingParams(max_tokens=4, logprobs=2),
        SamplingParams(max_tokens=4, repetition_penalty=1.3),
        SamplingParams(max_tokens=4, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(max_tokens=4, logit_bias=((3, 4.0), (7, -100.0))),
    ]
    prompts = [PROMPT + (favourite,) if p.repetition_penalty != 1.0 else () for p in params]
    return [
        RequestSampler(p, eos_ids=eos, decode=str, prompt_ids=ids)
        for p, ids in zip(params, prompts, strict=True)
    ]


def test_sampler_select_tokens_equals_selecting_row_by_row() -> None:
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    favourite = int(logits[1].argmax())
    eos = {favourite, 49}  # row 1's favourite token is an EOS it must not pick yet (min_tokens=2)
    repeated = int(logits[4].argmax())  # row 4's favourite is in its prompt: the penalty moves it
    batched = select_tokens(samplers(eos, repeated), logits)
    one_by_one = [s.select(logits[i]) for i, s in enumerate(samplers(eos, repeated))]
    assert batched == one_by_one
    assert batched[1] != favourite and int(logits[1].argmax()) == favourite  # logits left untouched
    assert batched[4] != repeated


def test_sampler_tiny_temperature_is_greedy_not_overflow() -> None:
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1)) * 30
    tiny = [
        RequestSampler(SamplingParams(max_tokens=2, temperature=t), eos_ids=set(), decode=str)
        for t in (2.2e-308, 1e-6)
    ]
    assert select_tokens(tiny, logits) == logits.argmax(-1).tolist()


def _greedy(params: SamplingParams, rows: list[torch.Tensor]) -> list[int]:
    sampler = RequestSampler(params, eos_ids=set(), decode=str)
    return [sampler.select(row) for row in rows]


def test_sampler_presence_and_frequency_penalties_follow_openais_formula() -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1))
    presence, frequency = 0.7, 0.4
    picked = _greedy(
        SamplingParams(max_tokens=8, presence_penalty=presence, frequency_penalty=frequency), [logits] * 8
    )
    counts: dict[int, int] = {}
    for token in picked:  # each pick is the argmax after subtracting f * count + p * (count > 0)
        penalised = logits.clone()
        for seen, times in counts.items():
            penalised[seen] -= frequency * times + presence
        assert token == int(penalised.argmax())
        counts[token] = counts.get(token, 0) + 1
    assert len(set(picked)) > 1  # the same logits every step: only the penalties move the pick


def test_sampler_logit_bias_is_added_to_the_raw_logits() -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2))
    top, runner_up = torch.topk(logits, 2).indices.tolist()
    assert _greedy(SamplingParams(max_tokens=1, logit_bias=((top, -100.0),)), [logits]) == [runner_up]
    weakest = int(logits.argmin())
    assert _greedy(SamplingParams(max_tokens=1, logit_bias=((weakest, 100.0),)), [logits]) == [weakest]


def test_sampler_min_p_keeps_only_tokens_near_the_most_likely() -> None:
    logits = torch.full((40,), -5.0)
    logits[[4, 9]] = torch.tensor(
        [3.0, 2.9]
    )  # at temperature 1, 9 is ~0.9x as likely as 4; the rest far less
    seen = set()
    for seed in range(30):
        params = SamplingParams(max_tokens=1, temperature=1.0, seed=seed, min_p=0.5)
        seen.update(_greedy(params, [logits]))
    assert seen == {4, 9}


def test_sampler_stop_token_ids_end_the_output_even_when_eos_is_ignored() -> None:
    from shardbento.engine.output import OutputStream

    class Chars:
        all_special_ids: list[int] = []

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

        def convert_ids_to_tokens(self, token_id: int) -> str:
            return chr(97 + token_id % 26)

    params = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(3,), min_tokens=2)
    output = OutputStream(Chars(), (), params, eos_ids={1})
    finishes = [output.push(token).finish_reason for token in (1, 3, 2, 3)]
    assert finishes == [None, None, None, "stop"]  # EOS 1 ignored; 3 held back by min_tokens, then stops
    sampler = RequestSampler(params, eos_ids={1}, decode=str)
    assert sampler.blocks_eos and 3 in sampler.eos_ids  # masked until min_tokens like an EOS id


@pytest.mark.parametrize("vocab", [50, 3000, 5000], ids=["small", "narrow", "wide"])
@pytest.mark.parametrize(
    "seeded",
    [{"top_p": 0.95}, {"top_k": 5}, {"top_k": 5, "top_p": 0.8}, {"min_p": 0.1}, {}, {"top_k": 700}],
    ids=["top-p", "top-k", "top-k-and-top-p", "min-p", "temperature-only", "top-k-past-the-candidates"],
)
def test_sampler_seeded_row_draws_the_same_alone_and_inside_any_batch(seeded: dict, vocab: int) -> None:
    """Whatever way its batch's other rows take (their own top-k, top-p, both or neither), a seeded
    row's draws are its own, in narrow and wide vocabularies (wider than CANDIDATE_VOCAB), with logits
    rounded to bfloat16 so that many of them tie."""
    logits = (torch.randn(7, vocab, generator=torch.Generator().manual_seed(4)) * 1.5).bfloat16().float()
    params = SamplingParams(max_tokens=8, temperature=0.9, seed=11, **seeded)
    others = [{}, {"top_k": 3}, {"top_p": 0.5}, {"top_k": 200}, {"min_p": 0.2}, {"top_k": 40, "top_p": 0.9}]

    def run(rows: int) -> list[int]:
        mine = RequestSampler(params, eos_ids=set(), decode=str)
        batch = [
            RequestSampler(SamplingParams(max_tokens=8, temperature=1.0, **others[i]), set(), str)
            for i in range(rows)
        ]
        return [select_tokens([mine, *batch], logits[: rows + 1])[0] for _ in range(8)]

    alone = run(0)
    assert alone == run(2) == run(4) == run(6)
    assert len(set(alone)) > 1  # it samples: the same token eight times would prove nothing


def test_sampler_ties_at_the_nucleus_edge_go_to_the_smaller_id_on_every_way(monkeypatch) -> None:
    """Four equally likely tokens and top_p 0.5: the sorted order puts equal logits by token id, so the
    nucleus is the first two ids, whichever way the row is drawn (candidates, drawn and checked, sorted)."""
    inf = float("inf")
    logits = torch.tensor([[-inf, 1.0, -inf, 1.0, 1.0, -inf, 1.0, -inf]])  # a quarter each
    for vocab, candidates, draws in ((0, 6, 4), (10**9, 512, 4), (10**9, 512, 0)):
        monkeypatch.setattr(sampling, "CANDIDATE_VOCAB", vocab)
        monkeypatch.setattr(sampling, "CANDIDATES", candidates)
        monkeypatch.setattr(sampling, "NUCLEUS_DRAWS", draws)
        params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=i) for i in range(400)]
        picks = select_tokens([RequestSampler(p, set(), str) for p in params], logits.expand(400, -1))
        assert set(picks) == {1, 3}, (vocab, candidates, draws)


def expected_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """The distribution a sampler must follow, computed directly: softmax at the temperature, what min_p
    keeps, the top_k most likely of it, then the smallest set reaching top_p of what is left (the token
    that crosses it kept), renormalised."""
    probs = (logits / temperature).softmax(-1)
    probs = probs * (probs >= min_p * probs.max())
    order = probs.argsort(descending=True)
    kept = probs * (order.argsort() < top_k) if top_k else probs  # rank below top_k
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for token in order.tolist():
        if mass >= top_p * float(kept.sum()) or not kept[token]:
            break
        keep[token] = True
        mass += float(kept[token])
    kept = probs * keep
    return kept / kept.sum()


WIDE, NARROW = 0, 10**9  # CANDIDATE_VOCAB: this 8-token vocabulary counts as wide or as narrow


@pytest.mark.parametrize(
    ("vocab", "candidates", "draws", "top_k", "top_p", "min_p"),
    [
        pytest.param(WIDE, 7, 4, 6, 0.9, 0.0, id="top-k-among-candidates"),
        pytest.param(WIDE, 7, 4, 0, 0.9, 0.0, id="top-p-among-candidates"),
        pytest.param(WIDE, 7, 4, 0, 0.8, 0.2, id="top-p-after-min-p-among-candidates"),
        pytest.param(WIDE, 3, 4, 6, 0.9, 0.0, id="fallback"),
        pytest.param(NARROW, 512, 4, 6, 0.9, 0.0, id="top-k-among-its-own-k"),
        pytest.param(NARROW, 5, 4, 6, 0.9, 0.0, id="sorted"),
        pytest.param(NARROW, 512, 4, 0, 0.9, 0.0, id="drawn-in-nucleus"),
        pytest.param(WIDE, 2, 4, 0, 0.9, 0.0, id="candidates-then-drawn"),
        pytest.param(NARROW, 512, 4, 0, 0.7, 0.05, id="drawn-in-nucleus-after-min-p"),
        pytest.param(NARROW, 512, 4, 0, 0.8, 0.2, id="drawn-in-nucleus-after-a-stronger-min-p"),
        pytest.param(NARROW, 512, 1, 0, 0.5, 0.0, id="drawn-then-sorted"),
        pytest.param(NARROW, 512, 4, 0, 1.0, 0.0, id="temperature-only"),
    ],
)
def test_sampler_sampled_rows_follow_their_distribution(
    monkeypatch, vocab: int, candidates: int, draws: int, top_k: int, top_p: float, min_p: float
) -> None:
    """20,000 rows sampled in one batch (each its own seeded request) against the distribution computed
    directly: a chi-square test at a fixed seed, so the verdict is the same every run; tokens outside the
    nucleus never appear. Every way a CPU row can take: among its best candidates (wide vocabularies),
    with too few candidates (those rows fall back to sorting), among its own k best (a narrow
    vocabulary's top-k), drawn from the whole distribution and kept when the nucleus holds it (no top-k;
    with one draw, the rows it misses sort), and sorting (a top-k wider than the candidates; every row on
    a GPU)."""
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    monkeypatch.setattr(sampling, "CANDIDATE_VOCAB", vocab)
    monkeypatch.setattr(sampling, "NUCLEUS_DRAWS", draws)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0])
    temperature = 0.8
    expected = expected_distribution(logits, temperature, top_k, top_p, min_p)
    params = [
        SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=i)
        for i in range(20000)
    ]
    picks = select_tokens([RequestSampler(p, set(), str) for p in params], logits.expand(len(params), -1))
    observed = torch.bincount(torch.tensor(picks), minlength=len(logits)).double()
    assert observed[expected == 0].sum() == 0
    support = expected > 0
    want = expected[support].double() * len(params)
    chi2 = float(((observed[support] - want) ** 2 / want).sum())
    quantile = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}[int(support.sum()) - 1]
    assert chi2 < quantile, (chi2, observed.tolist(), want.tolist())  # 99.9 % quantiles


def test_sampler_prompt_ids_past_the_logits_never_index_them() -> None:
    """A vision prompt's image id may lie past the output width (Mllama's <|image|> = the vocabulary
    size): the repetition penalty skips it instead of failing the request."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(5))
    top = int(logits.argmax())
    params = SamplingParams(max_tokens=1, repetition_penalty=50.0)
    sampler = RequestSampler(params, set(), str, prompt_ids=(top, 50, 128256))
    assert select_tokens([sampler], logits) != [top]


def test_sampler_seeded_rows_never_draw_what_their_filters_removed(monkeypatch) -> None:
    """Sorted-vocabulary rows of different nucleus sizes in one batch (each row's draw by its own
    cumulative weight, the removed tokens' weight 0): every pick lies inside its own row's nucleus."""
    monkeypatch.setattr(sampling, "CANDIDATES", 2)  # every row falls back to the sorted vocabulary
    monkeypatch.setattr(sampling, "CANDIDATE_VOCAB", 0)
    logits = torch.tensor([[4.0, 3.9, 3.8, -9.0, -9.0, -9.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    for seed in range(200):
        narrow = RequestSampler(
            SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=seed), set(), str
        )
        wide = RequestSampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.99), set(), str)
        picked = select_tokens([narrow, wide], logits)
        assert picked[0] in (0, 1, 2), (seed, picked)


def test_select_tokens_touches_no_matcher_before_the_grammar_threads_masks_are_done(text_model) -> None:
    """The grammar thread fills masks from the matchers during the forward; llguidance refuses a matcher
    used from two threads at once ("Already borrowed"), so selection waits for those masks before it
    asks a matcher anything (here: whether the grammar is complete, for the min_tokens EOS block)."""
    import json
    import threading
    from concurrent.futures import Future

    from shardbento.engine.base import Constraint

    schema = json.dumps({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]})
    params = SamplingParams(max_tokens=8, min_tokens=4, constraint=Constraint("json_schema", schema))
    sampler = text_model.prompts.sampler(params, [1, 2, 3])
    seen: list[bool] = []
    prefetched: Future[torch.Tensor] = Future()

    class Watched:  # the real matcher, noting whether the masks were done when it was asked
        def __init__(self, matcher) -> None:
            self._matcher = matcher

        def is_accepting(self) -> bool:
            seen.append(prefetched.done())
            return self._matcher.is_accepting()

        def __getattr__(self, name: str):
            return getattr(self._matcher, name)

    masks = sampler.grammars.allowed([sampler.matcher])
    sampler.matcher = Watched(sampler.matcher)
    threading.Timer(0.2, prefetched.set_result, (masks,)).start()  # the grammar thread, finishing late
    logits = torch.randn(1, text_model.model.config.vocab_size)
    select_tokens([sampler], logits, prefetched)
    assert seen and all(seen)


@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.7, "top_k": 2000}],
    ids=["greedy", "top-p", "top-k-past-the-candidates"],
)
def test_sampler_a_constraint_with_no_producible_token_fails_its_row_alone(sampling: dict) -> None:
    """A grammar whose next token lies past the model's output width (a tokenizer with more tokens than
    the model has logits) leaves its row nothing to choose (every logit -inf), greedy or sampled: that
    request gets a 400 naming its field; the other rows of the batch get their tokens."""
    from transformers import AutoTokenizer

    from shardbento.engine.base import Constraint
    from shardbento.engine.grammar import Grammars
    from shardbento.errors import InvalidRequest
    from shardbento.tiny.models import ensure_generated

    tokenizer = AutoTokenizer.from_pretrained(ensure_generated("tiny-llama"))
    width = len(tokenizer) - 8
    grammars = Grammars(tokenizer, {tokenizer.eos_token_id}, logits_width=width)
    beyond = Constraint("lark", f"start: <[{len(tokenizer) - 1}]>", param="structured_outputs")
    within = Constraint("lark", f"start: <[{width - 1}]>", param="structured_outputs")

    def sampler(constraint: Constraint | None) -> RequestSampler:
        params = SamplingParams(max_tokens=4, constraint=constraint, **sampling)
        return RequestSampler(params, eos_ids=set(), decode=str, grammars=grammars)

    rows = [sampler(None), sampler(beyond), sampler(within)]
    logits = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    tokens = select_tokens(rows, logits)
    assert tokens[2] == width - 1
    assert tokens[0] == int(logits[0].argmax()) or sampling
    assert rows[0].failure is None and rows[2].failure is None
    failure = rows[1].failure
    assert isinstance(failure, InvalidRequest) and failure.param == "structured_outputs"
    assert failure.code == "constraint_unsatisfiable" and "past the model's output width" in failure.message
    with pytest.raises(InvalidRequest):  # one request at a time (generate()): the same refusal
        sampler(beyond).select(logits[1])


def test_filter_sorted_orders_ties_by_id_and_leaves_rows_without_top_p_whole() -> None:
    """The sorted way (every GPU row, a CPU's last resort): equal logits come by token id, the order
    the other ways assume; a row with top_p 1 keeps every token beside a row with top_p 0.9 (float
    rounding of the cumulative sum reaches 1 before a peaked row's tail, and cut tokens would move
    where a seeded row's uniform lands)."""
    logits = (torch.randn(2, 3000, generator=torch.Generator().manual_seed(6)) * 6).bfloat16().float()
    flat = torch.zeros(2)
    used = sampling.Used(min_p=False, top_k=False, top_p=True)
    ordered, order = sampling.filter_sorted(logits, flat.long(), torch.tensor([1.0, 0.9]), flat, used)
    values = logits[0][order[0]]
    tied = values[1:] == values[:-1]
    assert tied.sum() > 100  # bfloat16 rounding: many equal logits
    assert bool((order[0][1:][tied] > order[0][:-1][tied]).all())
    assert bool(torch.isfinite(ordered[0]).all())
    assert not bool(torch.isfinite(ordered[1]).all())  # the other row's top_p does cut


def test_sampler_a_top_k_past_the_candidates_measures_top_p_against_its_own_mass(monkeypatch) -> None:
    """A wide vocabulary's row whose top-k reaches past the candidates: top-p is a share of the top-k's
    mass, which the candidates cannot measure, so the row sorts. Top-4 {0, 4, 1, 5} hold 0.71; top_p
    0.45 of that keeps token 0 alone (0.45 of everything would keep token 4 too)."""
    monkeypatch.setattr(sampling, "CANDIDATE_VOCAB", 0)
    monkeypatch.setattr(sampling, "CANDIDATES", 3)
    logits = torch.tensor([0.35, 0.12, 0.08, 0.05, 0.14, 0.10, 0.09, 0.07]).log()
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=4, top_p=0.45, seed=i) for i in range(300)]
    assert set(select_tokens([RequestSampler(p, set(), str) for p in params], logits.expand(300, -1))) == {0}


def test_filter_candidates_leaves_rows_without_top_p_whole() -> None:
    """Float rounding of the cumulative sum reaches 1 before a peaked row's last candidates: a row with
    top_p 1 keeps every candidate (as filter_sorted() keeps every token)."""
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(7)) * 10
    none = torch.zeros(64)
    filtered, _, exact = sampling.filter_candidates(logits, none.long(), torch.ones(64), none, 512)
    assert bool(torch.isfinite(filtered).all())
    assert not bool(exact.any())  # nothing cut: the tokens past the candidates may be kept too


def test_draw_picks_by_cumulative_weight_and_never_a_column_of_weight_zero() -> None:
    """Inverse transform: a uniform u picks the first column whose cumulative weight passes u x the
    row's total. A column of weight 0 is never picked, at the edges either: a uniform of exactly 1 (the
    bound some generators include) takes the last column with weight; a row of zeros takes its first
    column and a row of NaN (a softmax of nothing) its last, never a column past the end."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]] * 5 + [[0.0] * 5, [float("nan")] * 5])
    uniforms = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1.0, 0.5, 0.5], dtype=torch.float64)
    assert sampling.draw(weights, None, uniforms).tolist() == [1, 1, 3, 3, 3, 0, 4]
    ids = torch.tensor([[10, 11, 12, 13, 14]] * 7)
    assert sampling.draw(weights, ids, uniforms).tolist() == [11, 11, 13, 13, 13, 10, 14]
    filtered = torch.tensor(
        [[float("-inf"), 0.0, float("-inf"), 3.0**0.5, float("-inf")], [float("-inf")] * 5]
    )
    assert sampling.weights_of(filtered).tolist()[1] == [0.0] * 5  # nothing left: all 0, not NaN
    assert sampling.weights_of(filtered)[0].nonzero().flatten().tolist() == [1, 3]


def test_draw_gives_each_token_of_a_long_tail_of_tiny_probabilities_its_own_share() -> None:
    """1,000 tokens of weight 1e-8 behind one of weight 1: a uniform landing in that tail picks exactly
    the token whose share it lands in (the exact sums of math.fsum say which). Cumulative sums stored in
    float32 step by 1.2e-7 there, a dozen of those tokens at a time, and would pick another."""
    import math

    weights = torch.tensor([1.0] + [1e-8] * 1000)
    values = weights.double().tolist()
    total = math.fsum(values)
    for share in (0.123, 0.5, 0.777):  # where in the tail the draws land, as a share of the tail
        u = (values[0] + share * (total - values[0])) / total
        target = u * total
        expected = next(i for i in range(len(values)) if math.fsum(values[: i + 1]) > target)
        assert expected > 100  # well inside the tail
        uniform = torch.tensor([u], dtype=torch.float64)
        assert sampling.draw(weights[None, :], None, uniform).item() == expected, share
