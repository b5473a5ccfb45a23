"""Weighted mixtures of data sources: `--data_path a.jsonl:0.7,b.parquet:0.3`.

Syntax: a weight follows the last colon of an item (a file or a directory); an item that exists as a path as
written is a path, so colons inside file names still work. A weight is a positive number (`0.7`, `2`, `1/3`).
Either every item has a weight or none has: `a.jsonl:0.7,b.jsonl` is an error, since b's share would be a guess.

Semantics: the weights are the shares of the training set that come from each source (normalised to sum 1). The
mixture is as large as all sources together (N, the sum of their sizes in samples); source i gives
round(share_i * N) samples (halves round up; so the total can differ from N by rounding). When that is at most the
source's size they are drawn without replacement; otherwise every sample is used as many whole times as fit, plus
a random draw without replacement for the remainder. The draw is reproducible from the run's seed. The order is
deterministic: source by source as given, whole passes in the file's order, then the drawn samples in the file's
order. A sample's second copy gets the id `ID#2`, its third `ID#3`, ... Without weights nothing here runs: all
samples of all sources, in order.
"""

from __future__ import annotations

import copy
import math
import random
from fractions import Fraction
from pathlib import Path

from ..errors import UserError


def split_weight(item: str) -> tuple[str, Fraction | None]:
    """`PATH:WEIGHT` -> (PATH, weight); an item that exists as written, or has no colon, is a path with no weight."""
    if ":" not in item or Path(item).exists():
        return item, None
    path, _, text = item.rpartition(":")
    try:
        weight = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        weight = None
    if weight is not None and weight > 0:
        return path, weight
    if Path(path).exists():
        raise UserError(f"{item}: the weight {text!r} after the last ':' is not a positive number; "
                        f"write PATH:WEIGHT, e.g. {path}:0.5")
    return item, None  # reported as a path that is not found


def check_weights(items: list[tuple[str, Fraction | None]]) -> None:
    """Every item has a weight, or none has."""
    missing = [path for path, weight in items if weight is None]
    if missing and len(missing) < len(items):
        raise UserError(f"a weighted mixture needs a weight on every source (PATH:WEIGHT); none on: {', '.join(missing)}")


def _fmt(weight: Fraction) -> str:
    return f"{float(weight):g}"


def draw(sources: list[tuple[str, Fraction, int]], seed: int) -> tuple[list[list[int]], list[str]]:
    """(for each source, the positions of its samples in the mixture, in order, repeats included; the report lines)
    from (path, weight, number of samples) per source. Indices only, so a tokenized cache can be mixed in place."""
    total = sum(n for _, _, n in sources)
    weight_sum = sum(weight for _, weight, _ in sources)
    rng = random.Random(seed)
    picks, lines = [], []
    for path, weight, n in sources:
        share = weight / weight_sum
        want = math.floor(share * total + Fraction(1, 2))
        passes, rest = divmod(want, n)
        picks.append([i for _ in range(passes) for i in range(n)] + sorted(rng.sample(range(n), rest)))
        if want < n:
            how = f"subsampled, {n - want} not used"
        elif want == n:
            how = "each used once"
        else:
            how = f"repeated: each used {passes}x" + (f", {rest} of them {passes + 1}x" if rest else "")
        lines.append(f"  {path}: weight {_fmt(weight)} (share {float(share):.1%}), {n} samples, {want} used ({how})")
    header = f"mixture of {len(sources)} sources (seed {seed}): {sum(map(len, picks))} samples; the sources hold {total}"
    return picks, [header] + lines


def copy_ids(ids: list[str], picked: list[int], wheres, taken: set) -> list[str]:
    """The ids of a source's picked samples: a sample's second copy is `ID#2`, its third `ID#3`, ...; `taken` (every
    id in use) grows with them. `wheres(i)`: sample i's location, for the message when a copy's id is taken."""
    copies, out = [0] * len(ids), []
    for i in picked:
        copies[i] += 1
        sid = ids[i]
        if copies[i] > 1:
            sid = f"{sid}#{copies[i]}"
            if sid in taken:
                raise UserError(f'{wheres(i)}: a repeated copy of this sample would get the id "{sid}", which another '
                                "sample already has; rename that sample's id")
            taken.add(sid)
        out.append(sid)
    return out


def mix(sources: list[tuple[str, Fraction, list]], seed: int) -> tuple[list, list[str]]:
    """(the mixture, its report lines) from (path, weight, samples) per source; samples are (id, parsed, where)."""
    picks, lines = draw([(path, weight, len(samples)) for path, weight, samples in sources], seed)
    taken = {sid for _, _, samples in sources for sid, _, _ in samples}
    out = []
    for (_, _, samples), picked in zip(sources, picks):
        ids = copy_ids([sid for sid, _, _ in samples], picked, lambda i: samples[i][2], taken)
        seen = set()
        for i, sid in zip(picked, ids):
            _, parsed, where = samples[i]
            out.append((sid, copy.deepcopy(parsed) if i in seen else parsed, where))
            seen.add(i)
    return out, lines
