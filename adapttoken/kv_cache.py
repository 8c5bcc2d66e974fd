"""The prefix key/value cache (`PrefixKVCache`): each group pass's question-independent keys and
values, kept for the next question on the same groups; and the device memory budget it sizes by."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

# The host tier's size when left to the library ("auto"): at most 16 GB and a quarter of the
# machine's memory, only for a model on CUDA (a CPU model keeps its states in `cpu_bytes`).
AUTO_HOST_BYTES = 16 * 10 ** 9
HOST_FORMATS = ("fp8", "exact")
_FP8_MAX = 448.0                 # largest finite float8 e4m3fn value


def physical_memory_bytes() -> int:
    """The machine's memory in bytes (psutil where installed, as in ComfyUI; else sysconf), or 0
    when it cannot be told."""
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - no psutil: fall back to sysconf
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 0


def auto_host_bytes(device: torch.device) -> int:
    """The "auto" host tier: min(16 GB, a quarter of the machine's memory) for a model on CUDA,
    0 elsewhere."""
    if device.type != "cuda":
        return 0
    return min(AUTO_HOST_BYTES, physical_memory_bytes() // 4)


def fp8_pack(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [..., D] as float8 e4m3 values and one float32 scale per row of D (per token and head
    for keys/values [B, heads, T, D]): t ~= values * scale, ~2^-4 relative rounding per element."""
    scale = t.abs().amax(-1, keepdim=True).float().clamp_min(1e-30) / _FP8_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_unpack(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale).to(dtype)


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


def _settle(fut) -> None:
    """Wait for a copy nobody will use (an unused read-ahead, a copy out of states being dropped)
    and drop its error, if any: the states it made are thrown away either way."""
    try:
        fut.result()
    except Exception:  # noqa: BLE001 - a failed copy of states nobody will use
        pass


class PrefixKVCache:
    """Key/value states of each group pass's question-independent prefix (system prompt, vision
    start, the group's visual tokens), per decoder layer, so a new question on the same groups runs
    only its own tokens through the language model. The visual tokens come before the question and
    attention is causal, so their keys and values do not depend on the question: exact reuse.

    Kept on the model's device while everything allocated there stays under `fraction` of the
    device's memory budget (`device_memory_budget`); off CUDA at most `cpu_bytes`. A group that
    does not fit there goes to the host tier when it has room (CPU memory, copied back to the
    device when a later question uses it: a 10,000-frame video's 79 groups of Qwen2.5-VL-7B hold
    ~63 GB, more than a 24 GB card has); else it is not cached (its next question recomputes it).

    host_bytes: the host tier's size in bytes, or "auto" (`auto_host_bytes`: min(16 GB, a quarter
    of the machine's memory) for a model on CUDA, none for a CPU model). host_format: "fp8" keeps
    the host tier's keys and values as float8 e4m3 with one float32 scale per token and head (half
    the bytes, so twice the groups, at ~2^-4 relative rounding of the states: not exact), "exact"
    as they are (bit-identical reuse). The device tier is always exact. Reading a host group back
    also starts copying the next host group (in the order they were stored, which is the order the
    group passes visit them) to the device on a side stream, so the copy hides behind the pass."""

    def __init__(self, fraction: float = 0.75, cpu_bytes: int = 2 * 2 ** 30, host_bytes: int | str = 0,
                 host_format: str = "fp8"):
        self.fraction, self.cpu_bytes = fraction, cpu_bytes
        self.host_bytes = host_bytes if host_bytes == "auto" else int(host_bytes)
        self.host_format = None          # set (and checked) by set_host_format below
        # False: keep nothing anywhere (one question per process: the `ask` command); the group
        # passes still run the same calls, so results do not change
        self.keep = True
        self._store: dict = {}
        self._nbytes: dict = {}          # key -> bytes of its states
        self._host: set = set()          # keys whose states live in the host tier
        self._dtype: dict = {}           # key -> dtype of its states before the fp8 host format
        self._pending: dict = {}         # key -> future of its copy to the host, while in flight
        self._ahead = None               # (key, future of its device copy): the next host group
        self._stream = None
        self._next_slot = 0
        self.bytes = 0                   # on the device (or, off CUDA, in the primary tier)
        self.host_used = 0
        self.hits = self.stored = self.refused = self.host_stored = 0
        self.ahead_hits = 0              # host groups found already copied back by the read-ahead
        self.host_seconds = 0.0          # spent copying to and from the host tier
        self.set_host_format(host_format)

    def _to_host(self, key, parts: list) -> list:
        """CPU copies of `parts` (a list of tuples of tensors). From CUDA the copy must not hold
        the GPU up: the tensors go on a side stream into one of two reused pinned staging buffers
        (pinning fresh memory runs at ~2 GB/s: 63 GB of pinned copies cost a 10,000-frame first
        question 30 s), and a CPU thread then moves them into ordinary memory while the next group
        pass computes. `_pending` holds each copy's future until it is done; get() waits for it."""
        dev = parts[0][0].device
        if dev.type != "cuda":
            return [tuple(t.to("cpu") for t in p) for p in parts]
        if self._stream is None:
            self._stream = torch.cuda.Stream(dev)
            self._mover = ThreadPoolExecutor(1, thread_name_prefix="adapttoken-kv-host")
            self._staging = [None, None]
            self._slot_free = [None, None]      # future of the copy that last used each slot
        flat = [t for p in parts for t in p]
        sizes = [-(-t.numel() * t.element_size() // 16) * 16 for t in flat]    # 16-byte aligned
        nbytes = sum(sizes)
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
        for t, size in zip(flat, sizes):
            n = t.numel() * t.element_size()
            views.append(buf[off:off + n].view(t.dtype).view(t.shape))
            off += size
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
        self._pending[key] = fut
        out_parts, i = [], 0
        for p in parts:
            out_parts.append(tuple(out[i:i + len(p)]))
            i += len(p)
        return out_parts

    def _copy_in(self, key, device, on_side_stream: bool):
        """The host group `key`'s parts copied to `device`: now (blocking), or as a future whose
        copy runs on a thread and a side stream, overlapping the caller's GPU work."""
        parts, moving = self._store[key], self._pending.pop(key, None)
        if not on_side_stream:
            if moving is not None:
                moving.result()
            return [tuple(t.to(device) for t in p) for p in parts]
        if getattr(self, "_in_stream", None) is None:
            self._in_stream = torch.cuda.Stream(device)
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="adapttoken-kv-fetch")

        def fetch(parts=parts, moving=moving, stream=self._in_stream):
            if moving is not None:
                moving.result()
            with torch.cuda.stream(stream):
                out = [tuple(t.to(device, non_blocking=t.is_pinned()) for t in p) for p in parts]
            stream.synchronize()
            return out

        return self._fetcher.submit(fetch)

    def _next_host_key(self, key):
        """The host group stored after `key` (insertion order), or None."""
        later = False
        for k in self._store:
            if later and k in self._host:
                return k
            later = later or k == key
        return None

    def get(self, key, device=None):
        kv = self._store.get(key)
        if kv is None:
            return None
        self.hits += 1
        if key in self._host:
            device = torch.device(device) if device is not None else kv[0][0].device
            t0 = time.perf_counter()
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == key:
                kv = ahead[1].result()
                self.ahead_hits += 1
                for p in kv:                    # made on the side stream, used on this one
                    for t in p:
                        t.record_stream(torch.cuda.current_stream(device))
            else:
                if ahead is not None:
                    _settle(ahead[1])           # an unused read-ahead: let it finish, drop it
                kv = self._copy_in(key, device, False)
            nxt = self._next_host_key(key) if device.type == "cuda" else None
            if nxt is not None:
                self._ahead = (nxt, self._copy_in(nxt, device, True))
            self.host_seconds += time.perf_counter() - t0
            if self.host_format == "fp8":
                dtype = self._dtype[key]
                kv = [(fp8_unpack(kq, ks, dtype), fp8_unpack(vq, vs, dtype)) for kq, ks, vq, vs in kv]
        return kv

    def set_host_format(self, host_format: str) -> None:
        """Switch the host tier's format; its groups kept in the other format are dropped."""
        if host_format not in HOST_FORMATS:
            raise ValueError(f"host_format={host_format!r}: use one of {', '.join(HOST_FORMATS)}")
        if host_format != self.host_format:
            self._wait_all()
            for key in list(self._host):
                self._forget(key)
            self.host_format = host_format

    def _forget(self, key) -> None:
        nbytes = self._nbytes.pop(key, 0)
        del self._store[key]
        self._dtype.pop(key, None)
        if key in self._host:
            self._host.discard(key)
            self.host_used -= nbytes
        else:
            self.bytes -= nbytes

    def host_limit(self, device: torch.device) -> int:
        """The host tier's size in bytes for a model on `device`."""
        return auto_host_bytes(device) if self.host_bytes == "auto" else self.host_bytes

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
        host_nbytes = nbytes
        if self.host_format == "fp8":     # 1 byte per value + a float32 scale per row
            host_nbytes = sum(t.numel() + 4 * (t.numel() // t.shape[-1]) for p in kv for t in p)
        if self.host_used + host_nbytes <= self.host_limit(torch.device(device)):
            t0 = time.perf_counter()
            parts = kv
            if self.host_format == "fp8":
                self._dtype[key] = kv[0][0].dtype
                parts = [(*fp8_pack(k), *fp8_pack(v)) for k, v in kv]
            self._store[key] = self._to_host(key, parts)
            self._nbytes[key] = host_nbytes
            self.host_seconds += time.perf_counter() - t0
            self._host.add(key)
            self.host_used += host_nbytes
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
        if self._ahead is not None:      # a read-ahead copy of the next host group, on the device
            try:
                flat += [t for pair in self._ahead[1].result() for t in pair]
            except Exception:  # noqa: BLE001 - a failed copy holds nothing
                pass
        return tensor_bytes(flat)

    def release_ahead(self) -> None:
        """Let go of a read-ahead nobody took (the group passes stopped before its group, as Lite
        does): one group's states on the device until the next read otherwise."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            _settle(ahead[1])

    def _wait_all(self) -> None:
        futs = list(self._pending.values())
        if self._ahead is not None:
            futs.append(self._ahead[1])
        for fut in futs:
            _settle(fut)                 # no copy keeps writing into states being dropped
        self._pending.clear()
        self._ahead = None

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
            self._forget(key)
        if want == "cpu" and getattr(self, "_staging", None) is not None:
            self._staging = [None, None]

    def clear(self) -> None:
        self._wait_all()
        self._store.clear()
        self._nbytes.clear()
        self._host.clear()
        self._dtype.clear()
        self.bytes = self.host_used = 0
        if getattr(self, "_staging", None) is not None:
            self._staging = [None, None]     # the pinned buffers go too (re-made on next use)
