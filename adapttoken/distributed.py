"""Several processes, one question: group parallel over model copies, on PyTorch's own engine
(torchrun + torch.distributed: NCCL between GPUs, gloo between CPUs).

Layout. `torchrun --nproc-per-node N` starts N ranks, each holding a whole copy of the model on its
device (GPU LOCAL_RANK, or the CPU); copies work on different groups. With `tp` = T > 1 a copy is
T ranks in tensor parallel (transformers' own tp_plan: each rank holds 1/T of every language-model
layer's heads and MLP; the vision tower is replicated): they run every step together, the attention
probe combines their heads (probe.token_scores over `tp_group`), and only the copy's first rank
contributes results. transformers (5.17-5.24) builds the tensor-parallel mesh over the whole world,
so T = N (one copy); several tensor-parallel copies (N = copies x T) are refused with a message.

Group parallel (one question, R replicas). Group g belongs to replica g % R. Each replica decodes,
encodes (vision tower) and runs the group passes of its own groups only, then every replica's
results (entropy, option probabilities, token ids and probe scores per group: a few hundred KB)
are gathered. Allocation and the answer run on replica 0; the visual features they read
(redundancy removal's embeddings, the kept tokens) come from the replica that computed them, row by
row, through `RowExchange` (a broadcast of the wanted token ids, an all-reduce of the rows in
which only the owner's bytes are non-zero: exact). Rank 0 alone prints and writes.

Lite in rounds. Groups advance in rounds of R (round k: groups kR .. kR+R-1, one per replica); after
each round rank 0 replays the stop rule over the groups in temporal order, exactly as one process
would, and broadcasts the stop point. Groups of the last round after the stop point were computed
but are dropped, so the selection equals the one-process run; the cost is at most R - 1 passes
more than one process (docs/DISTRIBUTED.md).

Failures. The process group has a timeout (ADAPTTOKEN_DIST_TIMEOUT, 100 s by default): a rank
that waits longer on a collective raises instead of hanging, and torchrun ends every rank when one
rank exits with an error. An error on replica 0 after the gather is sent to the other replicas
(they stop serving rows and raise `RemoteError`) before it is raised.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

from .entropy import RIDE_ALONG_GROUPS
from .errors import AdaptTokenError, InputError

DEFAULT_TIMEOUT_S = 100.0

_OP_ROWS, _OP_DONE, _OP_ABORT = 1, 2, 3


class RemoteError(AdaptTokenError):
    """Another rank failed; this one stops too."""


@dataclass
class Layout:
    """Where this process sits: `rank` of `world`, in replica `replica` of `replicas`, holding
    tensor-parallel share `tp_rank` of `tp`. `device` is the rank's model device; `comm_device`
    where collective tensors live (the GPU with NCCL, the CPU with gloo)."""
    rank: int
    world: int
    local_rank: int
    tp: int
    device: torch.device
    backend: str
    tp_group: object = None         # the copy's tensor-parallel process group (None when tp == 1)

    @property
    def replicas(self) -> int:
        return self.world // self.tp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world} (replica {self.replica}/{self.replicas}, "
                f"tp {self.tp_rank}/{self.tp}) on {self.device} via {self.backend}")


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def timeout_seconds() -> float:
    raw = os.environ.get("ADAPTTOKEN_DIST_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InputError(f"ADAPTTOKEN_DIST_TIMEOUT={raw!r} must be a number of seconds") from None


def init(tp: int = 1, device: str | None = "auto") -> Layout:
    """Join the process group torchrun set up (environment variables RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and describe this rank. device "auto": cuda:LOCAL_RANK when CUDA is
    there (NCCL), else the CPU (gloo); "cpu" forces gloo on the CPU."""
    import torch.distributed as dist
    if not launched_by_torchrun():
        raise InputError("not started by torchrun: run `torchrun --nproc-per-node N -m adapttoken ...` "
                         "(WORLD_SIZE and RANK are not set)")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    tp = int(tp)
    if tp < 1 or world % tp:
        raise InputError(f"--tp {tp} must divide the number of processes ({world}): e.g. "
                         f"--nproc-per-node {world} with --tp 1 or --tp {world}")
    if 1 < tp < world:
        raise InputError(f"--tp {tp} with {world} processes would make {world // tp} tensor-parallel "
                         f"copies; transformers builds its tensor-parallel mesh over all processes, "
                         f"so use --tp {world} (one copy over every GPU) or --tp 1 ({world} whole "
                         f"copies), or start one torchrun job per copy")
    use_cuda = torch.cuda.is_available() and str(device) not in ("cpu",)
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()), **kw)
    lay = Layout(rank, world, local, tp, dev, backend)
    if tp > 1:                       # tp == world: the copy's group is the whole world
        lay.tp_group = dist.group.WORLD
    return lay


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


# -- small collectives over the whole world ---------------------------------------------------------

def all_gather_objects(obj, layout: Layout) -> list:
    """Every rank's `obj` (picklable, CPU only), in rank order, on every rank."""
    import torch.distributed as dist
    out = [None] * layout.world
    dist.all_gather_object(out, obj)
    return out


def barrier(layout: Layout) -> None:
    import torch.distributed as dist
    dist.barrier()


def broadcast_object(obj, layout: Layout, src: int = 0):
    import torch.distributed as dist
    box = [obj if layout.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- group results -------------------------------------------------------------------------------

def _pack(score) -> dict:
    """A GroupScore as plain CPU data (what the other ranks need of it)."""
    p = score.pass_
    return {"group": score.group, "entropy": score.entropy, "entropy_max": score.entropy_max,
            "option_probs": score.option_probs, "top": score.top, "gids": p.gids.cpu().numpy(),
            "scores": p.scores.float().cpu().numpy(), "seconds": p.seconds}


def _unpack(d: dict):
    from .entropy import GroupScore
    from .rank import GroupPass
    p = GroupPass(d["group"], torch.from_numpy(d["gids"]), torch.from_numpy(d["scores"]),
                  torch.empty(0), [], d["seconds"])
    return GroupScore(d["group"], d["entropy"], d["entropy_max"], d["option_probs"], p, d["top"])


def owner_of_groups(n_groups: int, layout: Layout) -> np.ndarray:
    """The replica that computes each group (round robin: g % replicas)."""
    return np.arange(n_groups) % layout.replicas


# -- rows of features across replicas --------------------------------------------------------------

class RowExchange:
    """Visual features of any token, on replica 0, from whichever replica computed them.

    Every rank takes part in each request (collectives): rank 0 broadcasts a header (op, n, dim,
    dtype) and the token ids; the tensor-parallel rank 0 of the replica that owns a token's slice
    writes its row, every other rank zeros; an all-reduce over the bytes then leaves every row
    exactly as its owner holds it, on every rank (the other ranks of replica 0 need them too: under
    tensor parallel the answer's forward runs on all of them). Other replicas call `serve()` and
    answer requests until rank 0 says done."""

    _DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

    def __init__(self, layout: Layout, features, slice_owner: np.ndarray):
        self.layout, self.features = layout, features
        self.slice_owner = torch.as_tensor(slice_owner, dtype=torch.long)
        self.requests = 0
        self.rows = 0

    # RemoteFeatures calls this for every tokens() request on replica 0
    def tokens(self, gids: torch.Tensor, hooks=None, columns: int | None = None) -> torch.Tensor:
        dim, dtype = self._row_shape()
        if columns is not None:
            dim = min(dim, int(columns))
        return self._exchange(gids.cpu().long(), dim, dtype, op=_OP_ROWS)

    def _row_shape(self):
        f = self.features
        blk = next((b for b in f._blocks if b is not None), None)
        if blk is None:
            raise RuntimeError("replica 0 holds no features yet: it computes group 0 first")
        return blk.shape[-1], blk.dtype

    def _header(self, op: int, n: int = 0, dim: int = 0, dtype=torch.float32) -> torch.Tensor:
        import torch.distributed as dist
        h = torch.tensor([op, n, dim, self._DTYPES.index(dtype)], dtype=torch.long,
                         device=self.layout.comm_device)
        dist.broadcast(h, src=0)
        return h

    def _exchange(self, gids: torch.Tensor, dim: int, dtype, op: int) -> torch.Tensor:
        h = self._header(op, len(gids), dim, dtype)
        return self._transfer(int(h[1]), dim, dtype, gids).to(self.features.adapter.device)

    def _transfer(self, n: int, dim: int, dtype, gids: torch.Tensor | None = None) -> torch.Tensor:
        """One request's collectives, the same on every rank: rank 0 broadcasts the `n` token ids
        (`gids`, taken on rank 0 only), each rank writes the rows it owns, an all-reduce over the
        bytes completes them (exact: one non-zero contributor per byte)."""
        import torch.distributed as dist
        lay = self.layout
        ids = (gids.to(lay.comm_device) if lay.is_main
               else torch.empty(n, dtype=torch.long, device=lay.comm_device))
        dist.broadcast(ids, src=0)
        out = self._contribute(ids.cpu(), dim, dtype)
        dist.all_reduce(out.view(torch.uint8).reshape(-1), op=dist.ReduceOp.SUM)
        self.requests += 1
        self.rows += n
        return out

    def _contribute(self, ids: torch.Tensor, dim: int, dtype) -> torch.Tensor:
        lay = self.layout
        out = torch.zeros(len(ids), dim, dtype=dtype, device=lay.comm_device)
        if lay.tp_rank != 0 or len(ids) == 0:
            return out
        f = self.features
        owner = self.slice_owner[ids // f.tokens_per_slice]
        mine = torch.nonzero(owner == lay.replica).squeeze(1)
        if len(mine):
            rows = f._gather_rows(ids[mine], dim)
            out[mine.to(out.device)] = rows.to(device=out.device, dtype=dtype)
        return out

    def serve(self) -> None:
        """Answer replica 0's requests until it says done (other replicas)."""
        while True:
            h = self._header(0)
            op, n, dim, code = (int(x) for x in h.tolist())
            if op == _OP_DONE:
                return
            if op == _OP_ABORT:
                raise RemoteError("rank 0 failed while selecting or answering (its message is above); "
                                  "this rank stops too")
            self._transfer(n, dim, self._DTYPES[code])

    def finish(self, ok: bool) -> None:
        """Rank 0: release the servers (done, or abort after an error)."""
        self._header(_OP_DONE if ok else _OP_ABORT)


# -- the parallel selection ------------------------------------------------------------------------

class RemoteFeatures:
    """Replica 0's features store as allocation and the answer see it: every tokens() request goes
    through the RowExchange (rows from whichever copy computed them); everything else is the
    store's own (video, adapter, timer, coordinates...)."""

    def __init__(self, store, exchange: RowExchange):
        self._store, self._exchange = store, exchange

    def tokens(self, gids: torch.Tensor, hooks=None, columns: int | None = None):
        gids = gids.cpu()
        return self._exchange.tokens(gids, hooks, columns), self._store.coords_of(gids)

    def __getattr__(self, name):
        return getattr(self._store, name)


class _RankedView:
    """RankedGroups seen through RemoteFeatures (its groups, question and prompt unchanged)."""

    def __init__(self, ranked, features: RemoteFeatures):
        self._ranked, self.features = ranked, features

    def __getattr__(self, name):
        return getattr(self._ranked, name)


class ParallelQuestion:
    """One question over all ranks. Use as a context manager around select and answer:

        with ParallelQuestion(layout, scored) as pq:
            sel = pq.select(budget=..., ...)      # a Selection on replica 0, None elsewhere
            if sel is not None:
                res = answer(sel)

    On replicas other than 0, `select` returns only after replica 0 has answered (they serve
    feature rows meanwhile). On replica 0, leaving the block releases them (or, after an error,
    makes them raise RemoteError)."""

    def __init__(self, layout: Layout, scored):
        self.layout, self.scored = layout, scored
        ranked = scored.ranked
        self.features = ranked.features
        self.groups = ranked.groups
        n = len(self.groups)
        self.group_owner = owner_of_groups(n, layout)
        owner = np.zeros(self.features.num_slices, dtype=np.int64)
        for g in range(n):
            owner[np.asarray(self.groups.slices[g])] = self.group_owner[g]
        self.exchange = RowExchange(layout, self.features, owner)
        self.passes_run = 0
        self.passes_dropped = 0
        self.rank_stats: list[dict] = []
        self.processed: list[int] = []      # groups whose results the selection uses (every rank)
        self.skipped: list[int] = []
        self._opened = False

    def __enter__(self) -> "ParallelQuestion":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.layout.replica == 0 and self._opened:
            self._opened = False
            if self.layout.is_main:
                self.exchange.finish(exc_type is None)
            else:                      # other tensor-parallel ranks of replica 0 take the header too
                self.exchange._header(0)

    # group passes ----------------------------------------------------------------------------
    def _mine(self) -> list[int]:
        return [g for g in range(len(self.groups)) if self.group_owner[g] == self.layout.replica]

    def _evaluate_all(self, hooks) -> tuple[list, list[int]]:
        """Every group, each replica its own; results gathered to every rank."""
        mine = self._mine()
        if mine:
            slices = np.concatenate([np.asarray(self.groups.slices[g]) for g in mine])
            self.features.ensure(np.sort(slices), hooks)     # decode + encode in temporal order
        local = []
        for i, g in enumerate(mine):
            if hooks is not None:
                hooks.check()
                hooks.report("group pass", i, len(mine))
            local.append(_pack(self.scored.score(g, hooks)))
        self.passes_run = len(mine)
        got = all_gather_objects(local if self.layout.tp_rank == 0 else [], self.layout)
        done = sorted((_unpack(d) for part in got for d in part), key=lambda s: s.group)
        return done, []

    def _evaluate_rounds(self, hooks) -> tuple[list, list[int]]:
        """Lite: rounds of R groups, the stop point replayed in temporal order on rank 0."""
        lay, n = self.layout, len(self.groups)
        R = lay.replicas
        stop = self.scored.stop
        done: list = []
        ran = 0
        try:
            for first in range(0, n, R):
                g = first + lay.replica
                if hooks is not None:
                    hooks.check()
                    hooks.report("group pass", first, n)
                if first == 0 and g < n:
                    self.features.lookahead(self.groups.slices[g])
                nxt = g + R
                if nxt < n:                                   # decode my next group during this one
                    self.features.lookahead(self.groups.slices[nxt])
                # reads for my group also take my next groups' frames when they lie on the way (as one
                # process does: entropy.RIDE_ALONG_GROUPS groups ahead at most)
                ahead = [self.groups.slices[k] for k in range(nxt, min(n, nxt + RIDE_ALONG_GROUPS * R), R)]
                self.features.ride_along(np.concatenate(ahead) if ahead else None)
                local = []
                if g < n:
                    local.append(_pack(self.scored.score(g, hooks)))
                    ran += 1
                got = all_gather_objects(local if lay.tp_rank == 0 else [], lay)
                round_scores = sorted((_unpack(d) for part in got for d in part), key=lambda s: s.group)
                stop_at = None
                if lay.is_main:
                    trial = list(done)
                    for s in round_scores:
                        trial.append(s)
                        if stop.should_stop(trial):
                            stop_at = s.group
                            break
                stop_at = broadcast_object(stop_at, lay)
                if stop_at is None:
                    done.extend(round_scores)
                    continue
                kept = [s for s in round_scores if s.group <= stop_at]
                self.passes_dropped = len(round_scores) - len(kept)
                done.extend(kept)
                break
        finally:
            self.features.drop_lookahead()
        self.passes_run = ran
        skipped = list(range(len(done), n))
        return done, skipped

    def select(self, budget: int, relevance_mode: str = "linear", tau: float = 0.1,
               floor: int = 0, redundancy_threshold: float | None = 0.9, method: str | None = None,
               hooks=None):
        """The group passes on every replica, then (replica 0) the allocation: a Selection there,
        None on the other replicas once replica 0 is done."""
        from .budget import allocate
        if self.scored.stop is None:
            done, skipped = self._evaluate_all(hooks)
        else:
            done, skipped = self._evaluate_rounds(hooks)
        self.processed, self.skipped = [d.group for d in done], list(skipped)
        f = self.features
        stats = {"rank": self.layout.rank, "replica": self.layout.replica,
                 "decoded_frames": f.decoded_frames, "encoded_slices": f.encoded_slices,
                 "group_passes": self.passes_run, "seconds": f.timer.snapshot()}
        self.rank_stats = all_gather_objects(stats, self.layout)
        if self.layout.replica != 0:
            self.exchange.serve()
            return None
        from .entropy import ScoredGroups
        sc = self.scored
        # one copy (tensor parallel over every rank): each rank encoded every slice itself (the
        # vision tower is replicated), so the rows are local; several copies: through the exchange
        feats = RemoteFeatures(f, self.exchange) if self.layout.replicas > 1 else f
        view = ScoredGroups(_RankedView(sc.ranked, feats), sc.mode, sc.tokens, sc.stop)
        view.adopt(done, skipped)
        self._opened = self.layout.replicas > 1
        if method is None:
            method = "lite" if sc.stop is not None else "adapttoken"
        return allocate(view, budget, relevance_mode, tau, floor, redundancy_threshold,
                        hooks=hooks, method=method)

    def report(self) -> dict:
        """What each rank did (for Result.extra['distributed'])."""
        lay = self.layout
        return {"world": lay.world, "replicas": lay.replicas, "tp": lay.tp, "backend": lay.backend,
                "passes_dropped": self.passes_dropped, "row_requests": self.exchange.requests,
                "rows_exchanged": self.exchange.rows,
                "ranks": [s for s in self.rank_stats if s["rank"] % lay.tp == 0]}


def totals(report: dict) -> tuple[int, int, int]:
    """(decoded frames, encoded slices, group passes run) summed over the replicas."""
    r = report["ranks"]
    return (sum(s["decoded_frames"] for s in r), sum(s["encoded_slices"] for s in r),
            sum(s["group_passes"] for s in r))

