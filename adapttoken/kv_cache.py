"""The prefix key/value cache (`PrefixKVCache`): each group pass's question-independent keys and
values, kept for the next question on the same groups; and the device memory budget it sizes by."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch


def tensor_bytes(tensors) -> dict[str, int]:
    """Bytes the given tensors hold, per device ("cuda:0", "cpu"): each underlying storage counted
    once, whole (a view keeps all of its storage alive)."""
    out: dict[str, int] = {}
    seen = set()
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        out[str(t.device)] = out.get(str(t.device), 0) + st.nbytes()
    return out


def device_memory_budget(device: torch.device) -> int | None:
    """Bytes this process may allocate on a CUDA device: the card's memory times the per-process
    fraction (torch.cuda.set_per_process_memory_fraction), or None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    frac = 1.0
    if get is not None:
        try:
            frac = float(get(index))
        except Exception:  # noqa: BLE001
            frac = 1.0
    return int(total * frac)


class PrefixKVCache:
    """Key/value states of each group pass's question-independent prefix (system prompt, vision
    start, the group's visual tokens), per decoder layer, so a new question on the same groups runs
    only its own tokens through the language model. The visual tokens come before the question and
    attention is causal, so their keys and values do not depend on the question: exact reuse.

    Kept on the model's device while everything allocated there stays under `fraction` of the
    device's memory budget (`device_memory_budget`); off CUDA at most `cpu_bytes`. A group that
    does not fit there goes to the host tier when `host_bytes` > 0 (CPU memory, copied back to the
    device when a later question uses it: a 10,000-frame video's 79 groups of Qwen2.5-VL-7B hold
    ~63 GB, more than a 24 GB card has); else it is not cached (its next question recomputes it)."""

    def __init__(self, fraction: float = 0.75, cpu_bytes: int = 2 * 2 ** 30, host_bytes: int = 0):
        self.fraction, self.cpu_bytes, self.host_bytes = fraction, cpu_bytes, int(host_bytes)
        # False: keep nothing anywhere (one question per process: the `ask` command); the group
        # passes still run the same calls, so results do not change
        self.keep = True
        self._store: dict = {}
        self._nbytes: dict = {}          # key -> bytes of its states
        self._host: set = set()          # keys whose states live in the host tier
        self._pending: list = []         # (key, future) of copies to the host in flight
        self._stream = None
        self._next_slot = 0
        self.bytes = 0                   # on the device (or, off CUDA, in the primary tier)
        self.host_used = 0
        self.hits = self.stored = self.refused = self.host_stored = 0
        self.host_seconds = 0.0          # spent copying to and from the host tier

    def _to_host(self, key, kv: list) -> list:
        """CPU copies of `kv`. From CUDA the copy must not hold the GPU up: the states go on a side
        stream into one of two reused pinned staging buffers (pinning fresh memory runs at ~2 GB/s:
        63 GB of pinned copies cost a 10,000-frame first question 30 s), and a CPU thread then moves
        them into ordinary memory while the next group pass computes. `_pending` holds each copy's
        future until it is done; get() waits for it."""
        dev = kv[0][0].device
        if dev.type != "cuda":
            return [(k.to("cpu"), v.to("cpu")) for k, v in kv]
        if self._stream is None:
            self._stream = torch.cuda.Stream(dev)
            self._mover = ThreadPoolExecutor(1, thread_name_prefix="adapttoken-kv-host")
            self._staging = [None, None]
            self._slot_free = [None, None]      # future of the copy that last used each slot
        flat = [t for pair in kv for t in pair]
        nbytes = sum(t.numel() * t.element_size() for t in flat)
        slot = self._next_slot
        self._next_slot = 1 - slot
        if self._slot_free[slot] is not None:
            self._slot_free[slot].result()              # its previous copy has left the buffer
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self._staging[slot] = buf
        out = [torch.empty(t.shape, dtype=t.dtype) for t in flat]
        views, off = [], 0
        for t in flat:
            n = t.numel() * t.element_size()
            views.append(buf[off:off + n].view(t.dtype).view(t.shape))
            off += n
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._stream):
            for v_, t in zip(views, flat):
                v_.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)

        held = [flat]                                   # the GPU sources live until the copy is done

        def move(ev=ev, views=views, out=out, held=held):
            ev.synchronize()
            held.clear()
            # `out` may be inference tensors (the caller runs under inference mode, which is
            # per thread): write to them in the same mode here
            with torch.inference_mode(out[0].is_inference()):
                for o, v_ in zip(out, views):
                    o.copy_(v_)

        fut = self._mover.submit(move)
        self._slot_free[slot] = fut
        self._pending.append((key, fut))
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(kv))]

    def _wait(self, key) -> None:
        for i, (k, fut) in enumerate(self._pending):
            if k == key:
                fut.result()
                del self._pending[i]
                return

    def get(self, key, device=None):
        kv = self._store.get(key)
        if kv is None:
            return None
        self.hits += 1
        if key in self._host and device is not None:
            self._wait(key)
            t0 = time.perf_counter()
            kv = [(k.to(device, non_blocking=k.is_pinned()), v.to(device, non_blocking=v.is_pinned()))
                  for k, v in kv]
            self.host_seconds += time.perf_counter() - t0
        return kv

    def room(self, nbytes: int, device: torch.device) -> bool:
        budget = device_memory_budget(device)
        if budget is None:
            return self.bytes + nbytes <= self.cpu_bytes
        return torch.cuda.memory_allocated(device) + nbytes <= self.fraction * budget

    def put(self, key, kv: list, nbytes: int) -> None:
        self._store[key] = kv
        self._nbytes[key] = nbytes
        self.bytes += nbytes
        self.stored += 1

    def offer(self, key, kv: list, nbytes: int, device: torch.device) -> bool:
        """Keep `kv` on the device if there is room, else in the host tier if it has room; False
        when neither has (counted in `refused`)."""
        if not self.keep:
            return False
        if self.room(nbytes, device):
            self.put(key, kv, nbytes)
            return True
        if self.host_used + nbytes <= self.host_bytes:
            t0 = time.perf_counter()
            self._store[key] = self._to_host(key, kv)
            self._nbytes[key] = nbytes
            self.host_seconds += time.perf_counter() - t0
            self._host.add(key)
            self.host_used += nbytes
            self.stored += 1
            self.host_stored += 1
            return True
        self.refused += 1
        return False

    def set_cpu_bytes(self, cpu_bytes: int) -> None:
        """Budget of the states kept off CUDA (the primary tier on a CPU model); states already kept
        beyond it go, the latest first (recomputed when asked again). 0 keeps none: the group
        passes still run the same calls, so results do not change."""
        self.cpu_bytes = int(cpu_bytes)
        for key in reversed(list(self._store)):
            if self.bytes <= self.cpu_bytes:
                break
            kv = self._store[key]
            if key in self._host or (kv and kv[0][0].device.type == "cuda"):
                continue
            del self._store[key]
            self.bytes -= self._nbytes.pop(key, 0)

    def held_bytes(self) -> dict[str, int]:
        """Bytes held now, per device: the states of both tiers and the host tier's pinned staging
        buffers (tensor sizes, not the counters)."""
        flat = [t for kv in self._store.values() for pair in kv for t in pair]
        flat += [b for b in getattr(self, "_staging", None) or () if b is not None]
        return tensor_bytes(flat)

    def _wait_all(self) -> None:
        for _, fut in self._pending:
            try:
                fut.result()             # no copy keeps writing into states being dropped
            except Exception:  # noqa: BLE001 - a failed copy of states nobody will use
                pass
        self._pending.clear()

    def drop(self, device=None) -> None:
        """Drop the states that live on `device` (a torch.device or its string; the host tier's
        are on "cpu"), or everything when None (see clear)."""
        if device is None:
            self.clear()
            return
        want = str(torch.device(device))
        self._wait_all()
        for key in list(self._store):
            kv = self._store[key]
            where = str(kv[0][0].device) if kv else "cpu"
            if where != want and not (want in ("cuda", "cpu") and where.split(":")[0] == want):
                continue
            nbytes = self._nbytes.pop(key, 0)
            del self._store[key]
            if key in self._host:
                self._host.discard(key)
                self.host_used -= nbytes
            else:
                self.bytes -= nbytes
        if want == "cpu" and getattr(self, "_staging", None) is not None:
            self._staging = [None, None]

    def clear(self) -> None:
        self._wait_all()
        self._store.clear()
        self._nbytes.clear()
        self._host.clear()
        self.bytes = self.host_used = 0
        if getattr(self, "_staging", None) is not None:
            self._staging = [None, None]     # the pinned buffers go too (re-made on next use)
