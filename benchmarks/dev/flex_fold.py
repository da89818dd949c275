"""A/B of `pallas_kernels.mod_tiles.FOLD_FACTORS` (issue 16): flex ALiBi on Mosaic with the
softmax scale and log2(e) folded into the score_mod's scalars, or multiplied where the jaxpr
has them, beside the plain kernel in the same process. One process per setting (the kernels
are traced once per process).

Run: python -m benchmarks.dev.flex_fold --fold 0 --json OUT.json [--lengths 4096 8192]
"""

from __future__ import annotations

import argparse
import json

from benchmarks import flex
from jattn.demo import environment
from pallas_kernels import mod_tiles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, choices=(0, 1), required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    mod_tiles.FOLD_FACTORS = bool(args.fold)
    rows = flex.run_cells(
        args.lengths,
        ["fwd", "fwd+bwd"],
        args.repeats,
        on_row=print,
        only=["alibi"],
        peers_like=["flex mosaic", "plain"],
    )
    record = dict(environment=environment(), fold=bool(args.fold), rows=rows)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
