"""One token a step for every sequence: a prompt's prefill gives it its first token, and the step's decode
serves only the sequences that ran before it. Requests sent together therefore finish in the same step
and come back together, and a request that started alone does not run ahead of the rest into their last
steps (where its next prompt would be prefilled beside all of them)."""

from __future__ import annotations

import pytest
from stepper import Stepper, answer

A = list(range(10, 40))
B = [(5 * i) % 900 + 40 for i in range(50)]
C = [(3 * i) % 700 + 60 for i in range(20)]


@pytest.mark.parametrize(
    "model_name", ["text_model", "vision_model"], ids=["mixed-steps", "prefill-then-decode"]
)
def test_every_sequence_gets_one_token_a_step(request, model_name: str) -> None:
    model = request.getfixturevalue(model_name)
    stepper = Stepper(model, max_num_seqs=4)
    assert stepper.runner.mixes == (model_name == "text_model")  # both step paths are covered
    first = stepper.submit(A, max_tokens=6)
    stepper.step()
    assert [len(answer(seq)) for seq in first] == [1]  # the prefill's token only, no decode of its own
    later = stepper.submit(B, C, max_tokens=6)
    stepper.step()
    assert [len(answer(seq)) for seq in first + later] == [2, 1, 1]
    stepper.step()
    assert [len(answer(seq)) for seq in first + later] == [3, 2, 2]
    assert not stepper.errors


def test_the_answers_are_those_of_each_prompt_alone(vision_model) -> None:
    """The pace changes which step computes a token, not the token (the prefill-then-decode path)."""
    together = Stepper(vision_model, max_num_seqs=4)
    first = together.submit(A, max_tokens=5)
    together.step()
    later = together.submit(B, C, max_tokens=5)
    answers = together.finish(first + later)
    alone = [Stepper(vision_model, max_num_seqs=4).run(prompt, max_tokens=5)[0] for prompt in (A, B, C)]
    assert answers == alone
    assert all(len(tokens) == 5 for tokens in answers)
