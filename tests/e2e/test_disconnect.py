"""A client that disconnects before its answer stops its generation, on every generating route (OpenAI's
and the typed APIs): a queued request never takes the slot, a running non-streamed one leaves the batch. One slot (max_num_seqs 1) makes "queued" a state the
test can wait for; the requests are raw sockets, closed when the server shows that state."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability.scenarios import write_catalog
from servers import Server, serve, wait_for
from test_openai_chat import metric

MODEL = "tiny-llama-one-slot"
LONG = 2000  # tokens the running request asks for (~3 s here): still running when the test closes it
ABORTS = ("request_success_total", 'finished_reason="abort"')


@pytest.fixture(scope="module")
def one_slot_server(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = {"max_num_seqs": 1, "max_waiting": 8}
    catalog = write_catalog(tmp_path_factory.mktemp("one-slot"), MODEL, max_model_len=2048, limits=limits)
    with serve(MODEL, log_dir, env={"SHARDBENTO_CATALOG": str(catalog)}) as server:
        yield server


def send(server: Server, path: str, body: dict) -> socket.socket:
    """A POST sent on a socket of its own, its answer never read."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def chat(stream: bool = False, max_tokens: int = 64) -> dict:
    messages = [{"role": "user", "content": "Tell me a long story about trains."}]
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
    }


QUEUED = {
    "chat": ("/v1/chat/completions", chat()),
    "chat-stream": ("/v1/chat/completions", chat(stream=True)),
    "completions": ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64}),
    "responses": ("/v1/responses", {"model": MODEL, "input": "Tell me a story.", "max_output_tokens": 64}),
    "typed-generate": ("/generate", {"prompt": "Once upon a time", "max_tokens": 64}),
    "typed-chat-stream": ("/chat_stream", {"messages": chat()["messages"], "max_tokens": 64}),
}


@pytest.mark.parametrize("kind", QUEUED)
def test_abandoned_request_leaves_queue_and_running_one_leaves_batch(
    one_slot_server: Server, kind: str
) -> None:
    server = one_slot_server
    aborted, started = metric(server, *ABORTS), metric(server, "time_to_first_token_seconds_count")
    generated = metric(server, "generation_tokens_total")
    running = send(server, "/v1/chat/completions", chat(max_tokens=LONG))  # non-streamed, holds the slot
    wait_for(lambda: metric(server, "num_requests_running") == 1, "the long request running")
    path, body = QUEUED[kind]
    queued = send(server, path, body)
    wait_for(lambda: metric(server, "num_requests_waiting") == 1, "the second request queued")
    queued.close()
    wait_for(lambda: metric(server, *ABORTS) == aborted + 1, "the queued request aborted")
    assert metric(server, "num_requests_waiting") == 0
    still_running = metric(server, "num_requests_running") == 1  # on a stalled machine it may be done
    running.close()
    wait_for(lambda: metric(server, "num_requests_running") == 0, "the slot free")
    assert metric(server, "time_to_first_token_seconds_count") == started + 1  # the queued one never ran
    if still_running:  # a running non-streamed request whose client left stops early too
        wait_for(lambda: metric(server, *ABORTS) == aborted + 2, "the running request aborted")
        assert metric(server, "generation_tokens_total") - generated < LONG
