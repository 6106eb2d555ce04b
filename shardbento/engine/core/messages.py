"""What crosses the process boundary between the service and its engine ranks; no torch here.

Every message is a frozen dataclass of plain data (a vision prompt's processor outputs are tensors,
which torch's multiprocessing pickler sends through shared memory), so it pickles through
multiprocessing queues and a reader dispatches on its type, never on a string tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from shardbento.catalog import ModelSpec
from shardbento.engine.base import Delta, Prompt, SamplingParams
from shardbento.errors import GenerationFailed, InvalidRequest, ModelNotFound, Overloaded, ShardbentoError
from shardbento.plan.sharding import Plan

MetricOp = tuple[str, str, Any]  # (RequestMetrics attribute, method, argument)
# The runner methods rank 0 mirrors to every follower (the state-changing ones: forwards, row moves).
MirroredMethod = Literal[
    "prefill",
    "mixed",
    "decode",
    "release",
    "drop",
    "clear_rows",
    "store_prefix",
    "drop_prefix",
    "generate",
    "lora_register",
    "lora_place",
    "lora_forget",
]
MIRRORED_METHODS = frozenset(get_args(MirroredMethod))


@dataclass(frozen=True, slots=True)
class RankConfig:
    """What a spawned rank needs to join the world and load its part of the model.

    One rank (world_size 1) holds the whole model, on one device or split by layers over several GPUs
    as the plan says; tensor parallelism runs one rank per GPU (or CPU rank), each with its shard.
    """

    rank: int
    world_size: int
    master_port: int
    spec: ModelSpec
    plan: Plan
    model_path: str
    collective_timeout_s: float = 600.0  # what a collective waits for a peer before it fails
    fault: str | None = None  # test-only: "METHOD@N" makes rank 0's N-th call of METHOD raise
    force_generate: bool = False  # benchmark knob: the one-at-a-time generate() path for every model


@dataclass(frozen=True, slots=True)
class RankChannels:
    """The queues every rank is spawned with.

    `requests` carries Submit(Choices)/Cancel/Stop to rank 0, `results` its StepReports back,
    `control[r - 1]` rank 0's RunnerCalls to follower r (followers wait there, never in a collective,
    while the engine is idle), and `status` each rank's RankReady or RankLoadFailed, once.
    """

    requests: Any
    results: Any
    status: Any
    control: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Service -> rank 0 -> followers: leave the serving loop, meet at the barrier, leave the group."""


@dataclass(frozen=True, slots=True)
class RankReady:
    rank: int
    device: str
    kv_pool_tokens: int | None = None  # the batch's KV pool (None: requests run one at a time)
    devices: tuple[str, ...] = ()  # every device this rank's part of the model is on
    parallel: str = "none"  # how rank 0 holds the model: none, layers, tensor xN


@dataclass(frozen=True, slots=True)
class RankLoadFailed:
    rank: int
    traceback: str


@dataclass(frozen=True, slots=True)
class Submit:
    """Service -> rank 0: one request; `ticket` names it on the way back (request ids may repeat)."""

    ticket: int
    request_id: str
    prompt: Prompt
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
class LoadAdapter:
    """Service -> rank 0: register a LoRA adapter under `name` (every rank reads it from `path`);
    the answer comes back under `ticket` (a finished Delta, or the failure)."""

    ticket: int
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class UnloadAdapter:
    """Service -> rank 0: new requests may no longer name it; those holding it finish first."""

    ticket: int
    name: str


@dataclass(frozen=True, slots=True)
class RunnerCall:
    """Rank 0 -> a follower: replay this method of its runner with these (plain-data) arguments."""

    method: MirroredMethod
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class RankFailure:
    """An exception of rank 0 as plain data: exceptions with keyword fields do not survive pickling."""

    kind: Literal["overloaded", "failed", "invalid", "not_found"]
    message: str
    retry_after_s: int = 1
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> RankFailure:
        if isinstance(exc, Overloaded):
            return cls("overloaded", exc.message, exc.retry_after_s)
        if isinstance(exc, InvalidRequest | ModelNotFound):
            kind = "invalid" if isinstance(exc, InvalidRequest) else "not_found"
            return cls(kind, exc.message, param=exc.param, code=exc.code)
        if isinstance(exc, ShardbentoError):
            return cls("failed", exc.message)
        return cls("failed", f"generation failed: {type(exc).__name__}: {exc}")

    def to_exception(self) -> ShardbentoError:
        if self.kind == "overloaded":
            return Overloaded(self.message, retry_after_s=self.retry_after_s)
        if self.kind in ("invalid", "not_found"):
            error = InvalidRequest if self.kind == "invalid" else ModelNotFound
            return error(self.message, param=self.param, code=self.code)
        return GenerationFailed(self.message)


@dataclass(frozen=True, slots=True)
class StepReport:
    """Rank 0 -> service: one step's (ticket, Delta or failure) items and the metric observations made."""

    items: list[tuple[int, Delta | RankFailure]]
    metrics: list[MetricOp]
