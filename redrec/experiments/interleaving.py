"""Team-draft interleaving (Radlinski, Kurup and Joachims 2008): two rankers' lists merged into one,
every shown item credited to the team (arm) that placed it, clicks decide which ranker the user
preferred.

Every user sees both rankers, so the between-user variance an A/B split has to average out (some
users click a lot, others never) cancels within each impression: a preference shows with far
fewer users (Chapelle et al. 2012; Netflix 2017).

The draft is a pure function of the two rankings and a seed; the serving path seeds it with a hash
of (experiment, request id), so a replay of a logged request with the same rankings reproduces
the shown list and its teams exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def draft_seed(experiment: str, request_id: str) -> int:
    """A 64-bit seed from the request, the same on every machine (SHA-256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(f"{experiment}\x1finterleave\x1f{request_id}".encode()).digest()[:8], "big")


def team_draft(a: Sequence[str], b: Sequence[str], k: int, seed: int) -> tuple[list[str], list[int]]:
    """Merge rankings ``a`` and ``b`` into at most ``k`` items; returns (items, teams) with team 0 for
    an item placed by ``a`` and 1 for ``b``.

    The rule of the paper: the team with fewer picks so far picks next (a coin flip when they are
    level), and picks its highest-ranked item not already shown. Hence the teams' counts differ by
    at most one, whatever the overlap of the two lists, and each team picks from its own top ``k``
    (fewer than ``k`` items are shown before any pick, so one of them is still free). A team with
    nothing left to give (a shorter list) stops picking and the other fills up."""
    rng = np.random.default_rng(seed)
    lists = (list(a), list(b))
    pos = [0, 0]
    count = [0, 0]
    shown: list[str] = []
    teams: list[int] = []
    seen: set[str] = set()
    while len(shown) < k:
        if count[0] == count[1]:
            order = (0, 1) if rng.random() < 0.5 else (1, 0)
        else:
            order = (0, 1) if count[0] < count[1] else (1, 0)
        placed = False
        for t in order:
            lst = lists[t]
            while pos[t] < len(lst) and lst[pos[t]] in seen:
                pos[t] += 1
            if pos[t] < len(lst):
                item = lst[pos[t]]
                shown.append(item)
                teams.append(t)
                seen.add(item)
                count[t] += 1
                placed = True
                break
        if not placed:  # both lists exhausted
            break
    return shown, teams


def credit(teams: Sequence[str], items: Sequence[str], clicked: set[str] | Sequence[str]) -> dict[str, int]:
    """Clicks per team: a click on a shown item counts for the team that placed it."""
    clicked = set(clicked)
    out: dict[str, int] = {}
    for item, team in zip(items, teams):
        if item in clicked:
            out[team] = out.get(team, 0) + 1
    return out
