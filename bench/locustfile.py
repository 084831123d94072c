"""Locust users for ``bench/serving.py``: each posts /recommend for random (user, scenario) pairs.

The pairs come from the JSON file at ``$REDREC_BENCH_REQUESTS`` (``{"k": 10, "requests": [[user,
scenario], ...]}``). ``$REDREC_BENCH_RATE`` (requests per second per user) > 0 paces each user with
``constant_throughput`` (the fixed-rate, open-loop run); unset or 0, users send back to back (the
closed-loop runs). Only a 200 with a list of items counts as a success.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, constant, constant_throughput, task

_SPEC = json.loads(open(os.environ["REDREC_BENCH_REQUESTS"]).read())
_RATE = float(os.environ.get("REDREC_BENCH_RATE") or 0)


class Recommender(FastHttpUser):
    wait_time = constant_throughput(_RATE) if _RATE > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    @task
    def recommend(self) -> None:
        user, scenario = self.rng.choice(_SPEC["requests"])
        body = {"user_id": user, "scenario": scenario, "k": _SPEC["k"]}
        with self.client.post("/recommend", json=body, catch_response=True, name="/recommend") as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
            elif not isinstance((r.json() or {}).get("items"), list):
                r.failure("200 without an items list")
