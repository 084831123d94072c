"""One rank of the cross-rank gather check (tests/test_train.py): run it under
``torchrun --standalone --nproc_per_node 2 tests/gather_worker.py OUT_DIR``.

Each rank calls the trainer's own ``init_distributed("cpu")`` and ``_gather_with_grad(world)`` on
known tensors (rank r: a [4, 3] float tensor filled with r + 1, int64 ids r * 10 + arange(4)),
back-propagates through the gather and writes what it saw to OUT_DIR/rank{r}.json; the test reads
every rank's file and checks it.

Gradient semantics checked (torch.distributed.nn.functional.all_gather): the backward of a gather
sums, over ranks, each rank's gradient with respect to this rank's slice, i.e. the local tensor
receives the gradient of the sum of all ranks' losses. With rank s's loss
``(gathered * coeff * (s + 1)).sum()`` (coeff = arange over the gathered [8, 3]), rank r's local
gradient is ``coeff[4r : 4r + 4] * (1 + 2)``; a gather that dropped the gradient leaves none, one
that only kept the local rank's own loss gives ``coeff[4r : 4r + 4] * (r + 1)``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(out_dir: str) -> None:
    import torch.distributed as dist

    import redrec
    from redrec.train.trainer import _gather_with_grad, init_distributed

    rank, world = init_distributed("cpu")
    gather = _gather_with_grad(world)
    out: dict = {"rank": rank, "world": world, "redrec": redrec.__file__, "gather_is_none": gather is None}
    if gather is not None:
        ids = rank * 10 + torch.arange(4)
        gi = gather(ids)
        out |= {"ids_shape": list(gi.shape), "ids_dtype": str(gi.dtype), "ids": gi.tolist()}

        # a plain sum on every rank: each rank's loss counts every row once
        x = torch.full((4, 3), float(rank + 1), requires_grad=True)
        g = gather(x)
        out |= {"shape": list(g.shape), "values": g.tolist(), "requires_grad": g.requires_grad}
        if g.requires_grad:  # a detached gather: record "no gradient" rather than crash the rank
            g.sum().backward()
        out["grad_sum"] = None if x.grad is None else x.grad.tolist()

        # rank-weighted losses: tells a gather that sums every rank's gradient from one that keeps only its own
        x = torch.full((4, 3), float(rank + 1), requires_grad=True)
        g = gather(x)
        coeff = torch.arange(g.numel(), dtype=g.dtype).reshape(g.shape)
        if g.requires_grad:
            (g * coeff * (rank + 1)).sum().backward()
        out["grad_weighted"] = None if x.grad is None else x.grad.tolist()
    path = Path(out_dir) / f"rank{rank}.json"
    path.write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    # the results are on disk: leave without the interpreter's teardown, where a native thread still
    # joinable is destroyed ("terminate called without an active exception", SIGABRT) about once
    # in 30 runs on 2 cores, after both ranks wrote their results
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
