"""``python -m leverplus.repool IN.json OUT.json``: K=64 re-pooling of an RL file (code in
:mod:`leverplus.datagen.repool`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from leverplus.datagen.repool import DEFAULT_K, repool_file
from leverplus.errors import LeverPlusInputError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leverplus.repool",
        description="Give every query of an RL file a pool of exactly K ids (the ICDs its candidates use, padded "
                    "from the anchor's pool) with local pointers into it; written atomically.")
    parser.add_argument("source", help="RL-data JSON to re-pool (legacy global pointers or an earlier K=64 file)")
    parser.add_argument("output", help="the re-pooled RL JSON to write")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="pool size (default 64)")
    parser.add_argument("--pools", default=None,
                        help='anchor pools: {"<qid>": [ids]} or an RL JSON with candidate_pool_ids (default: each '
                             "query's own candidate_pool_ids)")
    parser.add_argument("--fill-range", type=int, default=None, metavar="N",
                        help="pad a pool that is still short from range(N), N = train items (the reference's last "
                             "resort)")
    parser.add_argument("--shot-num", type=int, default=None, help="expected pointer length (default: inferred)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        meta = repool_file(args.source, args.output, k=args.k, pools=args.pools, fill_range=args.fill_range,
                           shot_num=args.shot_num, overwrite=args.overwrite)
    except LeverPlusInputError as e:
        print(f"[leverplus] error: {e}", file=sys.stderr)
        return 2
    print(f"[leverplus.repool] wrote {args.output} (K={meta['repool']['k']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
