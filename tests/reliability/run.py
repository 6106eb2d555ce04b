"""`make reliability`: the load-and-fault run against real servers, printing the figures docs/operations.md quotes."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]

from load import measure, report  # noqa: E402
from scenarios import corrupt_shard, dead_rank, guarded_catalog, guarded_config, sigterm_drain  # noqa: E402
from servers import serve  # noqa: E402
from soak import soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--skip-tp", action="store_true", help="leave out the dead tensor-parallel rank")
    parser.add_argument(
        "--soak-thousands", type=int, default=4, help="requests in the soak, in thousands (0: none)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shardbento-reliability-"))
    config = guarded_config()
    catalog = guarded_catalog(work / "catalog", config)
    with serve("tiny-llama", work, env=config.env(catalog)) as server:
        figures = measure(
            server.url,
            server.process.pid,
            config.api_key,
            model="tiny-llama",
            max_body_bytes=config.max_body_bytes,
            num_requests=args.requests,
            concurrency=args.concurrency,
        )
        key_logged = config.api_key in server.log()
    print(
        f"== load: {args.requests} requests, concurrency {args.concurrency}, {config.max_in_flight} in flight max"
    )
    print(report(figures))
    print(f"API key in the log    {key_logged}")
    faults = {"corrupt shard": corrupt_shard(work, work), "SIGTERM drain": sigterm_drain(work)}
    if not args.skip_tp:
        faults["dead tensor-parallel rank"] = dead_rank(work)
    for name, seen in faults.items():
        print(f"== fault: {name}\n{json.dumps(seen, indent=2)}")
    soaked = soak(work, num_thousands=args.soak_thousands) if args.soak_thousands >= 2 else None
    if soaked is not None:
        print(f"== soak: {args.soak_thousands},000 streamed /v1 chats after warm-up\n{soaked.report()}")
    print(f"logs in {work}")
    bad = figures.problems or figures.unexpected_5xx or figures.in_flight_after or key_logged
    bad = bad or (soaked is not None and not soaked.levels_off)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
