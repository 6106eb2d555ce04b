"""What crosses the process boundary between the service and its tensor-parallel ranks; no torch here.

Every message is a frozen dataclass of plain data, so it pickles through multiprocessing queues and a
reader dispatches on its type, never on a string tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shardbento.catalog import ServingLimits
from shardbento.engine.base import Delta, SamplingParams, TokenLogprob
from shardbento.errors import GenerationFailed, Overloaded, ShardbentoError

MetricOp = tuple[str, str, Any]  # (RequestMetrics attribute, method, argument)


@dataclass(frozen=True, slots=True)
class RankConfig:
    """What a spawned rank needs to join the world and load its shard."""

    rank: int
    world_size: int
    master_port: int
    device: str  # "cpu" or "cuda"
    model_path: str
    dtype: str
    kind: str
    trust_remote_code: bool
    cpu_kernels: str  # the catalog's cpu_kernels: "onednn" also keeps freed memory for reuse on CPU
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    limits: ServingLimits
    max_num_seqs: int  # the plan's: KV slots of the batch
    max_model_len: int


@dataclass(frozen=True, slots=True)
class RankChannels:
    """The queues every rank is spawned with; which ones a rank uses depends on its rank and the model kind.

    Text models batch (`lead`): `requests` carries Submit(Choices)/Cancel/Stop to rank 0, `results` its
    StepReports back, and `control[r - 1]` rank 0's RunnerCalls to follower r. Vision models run one
    request at a time through generate() on every rank: `requests` carries GenerateCalls that rank 0
    broadcasts, `results` GeneratedToken/GenerateEnded, `cancel` asks rank 0 to stop all ranks at the
    next step. `status` carries each rank's RankReady or RankLoadFailed, once.
    """

    requests: Any
    results: Any
    status: Any
    cancel: Any
    control: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Service -> rank 0 -> followers: leave the serving loop, meet at the barrier, leave the group."""


@dataclass(frozen=True, slots=True)
class RankReady:
    rank: int
    device: str
    kv_pool_tokens: int | None = None  # text: the batch's KV pool, as every rank allocated it


@dataclass(frozen=True, slots=True)
class RankLoadFailed:
    rank: int
    traceback: str


@dataclass(frozen=True, slots=True)
class Submit:
    """Service -> rank 0: one text request; `ticket` names it on the way back (request ids may repeat)."""

    ticket: int
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class SubmitChoices:
    """Service -> rank 0: the n choices of one prompt, queued together (one prefill serves them all)."""

    choices: tuple[Submit, ...]


@dataclass(frozen=True, slots=True)
class Cancel:
    """Service -> rank 0: the client went away; the request leaves the batch at the next step."""

    ticket: int


@dataclass(frozen=True, slots=True)
class RunnerCall:
    """Rank 0 -> a follower: replay this ModelRunner method with these (plain-data) arguments."""

    method: Literal["prefill", "mixed", "decode", "release", "drop", "store_prefix", "drop_prefix"]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RankFailure:
    """An exception of rank 0 as plain data: exceptions with keyword fields do not survive pickling."""

    kind: Literal["overloaded", "failed"]
    message: str
    retry_after_s: int = 1

    @classmethod
    def of(cls, exc: BaseException) -> RankFailure:
        if isinstance(exc, Overloaded):
            return cls("overloaded", exc.message, exc.retry_after_s)
        if isinstance(exc, ShardbentoError):
            return cls("failed", exc.message)
        return cls("failed", f"generation failed: {type(exc).__name__}: {exc}")

    def to_exception(self) -> ShardbentoError:
        if self.kind == "overloaded":
            return Overloaded(self.message, retry_after_s=self.retry_after_s)
        return GenerationFailed(self.message)


@dataclass(frozen=True, slots=True)
class StepReport:
    """Rank 0 -> service: one step's (ticket, Delta or failure) items and the metric observations made."""

    items: list[tuple[int, Delta | RankFailure]]
    metrics: list[MetricOp]


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """Service -> every rank (vision): identical inputs and the same seed, so the ranks' tokens agree."""

    request_id: str
    inputs: dict[str, Any]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """Rank 0 -> service (vision): one new token of a GenerateCall."""

    request_id: str
    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True, slots=True)
class GenerateEnded:
    """Rank 0 -> service (vision): generate() returned; `error` says why it failed, if it did."""

    request_id: str
    error: str | None = None
