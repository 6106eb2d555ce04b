"""Block until a Ray cluster has the expected number of live nodes (the head waits for its workers)."""

from __future__ import annotations

import argparse
import sys
import time


def live_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("num_nodes", type=int, help="nodes expected, head included")
    parser.add_argument("--address", default="auto")
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args()

    import ray

    ray.init(address=args.address, logging_level="WARNING")
    deadline = time.monotonic() + args.timeout_s
    while (found := live_nodes()) < args.num_nodes:
        if time.monotonic() > deadline:
            print(f"only {found} of {args.num_nodes} Ray nodes after {args.timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(2)
    print(f"Ray cluster has {found} nodes")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
