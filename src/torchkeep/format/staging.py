"""Moving bytes between device memory and a file through a few small reusable host buffers.

A tensor on a GPU is never copied to the host whole: its bytes pass, piece by piece, through two
buffers of ``STAGING_PIECE_BYTES`` (pinned on CUDA). While the caller hashes or writes one piece, the
device-to-host copy of the next one is already in flight on a side stream; loading works the same way
in the other direction. The same code runs with host tensors (the copies are then plain and
synchronous), which is how it is tested on machines without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import xxhash

from torchkeep import _config
from torchkeep.format.layout import byte_view


def is_staged(tensor: torch.Tensor) -> bool:
    """Whether a tensor's bytes pass through the pinned host buffers to reach a file (it lives on a CUDA
    device; tensors of other accelerators are brought to the host whole by ``prepare``)."""
    return tensor.is_cuda


class _Lane:
    """One reusable host buffer and the copy last started into or out of it (CUDA: pinned, with an event)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.event: Any = None

    def wait(self) -> None:
        """Block until the last copy into or out of this buffer has finished."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def start(self, destination: torch.Tensor, source: torch.Tensor, stream: Any) -> None:
        if not self.cuda:
            destination.copy_(source)
            return
        with torch.cuda.stream(stream):
            destination.copy_(source, non_blocking=True)
            self.event = stream.record_event()


def _side_stream(device: torch.device) -> Any:
    """A stream that first waits for the work already queued on the current one (kernels that write the
    tensors about to be copied, or read the destinations about to be overwritten)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def host_pieces(tensors: Sequence[torch.Tensor]) -> Iterator[tuple[int, memoryview]]:
    """The bytes of contiguous tensors of one device, in order, as ``(tensor index, host bytes)`` pieces.

    A yielded view is valid until the next step of the iteration; the copy of the following piece is
    already running (into the other buffer) while the caller uses it.
    """
    piece = _config.STAGING_PIECE_BYTES
    sources: list[tuple[int, torch.Tensor]] = []
    for index, tensor in enumerate(tensors):
        flat = _flat_bytes(tensor)
        sources.extend((index, flat[start : start + piece]) for start in range(0, flat.numel(), piece))
    if not sources:
        return
    stream = _side_stream(sources[0][1].device)
    size = max(s.numel() for _, s in sources)
    ring = [_Lane(size, sources[0][1].device) for _ in range(min(2, len(sources)))]

    def start(i: int) -> torch.Tensor:
        lane = ring[i % len(ring)]
        lane.wait()  # its previous piece (i - 2) was used by the caller already
        host = lane.buffer[: sources[i][1].numel()]
        lane.start(host, sources[i][1], stream)
        return host

    try:
        with torch.no_grad():
            following = start(0)
            for i in range(len(sources)):
                current = following
                ring[i % len(ring)].wait()
                if i + 1 < len(sources):
                    following = start(i + 1)  # in flight while piece i is used
                yield sources[i][0], byte_view(current)
    finally:
        for lane in ring:
            lane.wait()


def staged_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The checksums (``layout.digest``'s) of the tensors that live on a device, read through the staging
    buffers one device at a time; host tensors are left to the planner, which hashes them in place."""
    out: dict[str, str] = {}
    for device in {t.device for t in tensors.values() if is_staged(t)}:
        names = [n for n, t in tensors.items() if t.device == device]
        hashers = [xxhash.xxh3_64() for _ in names]
        for index, view in host_pieces([tensors[n] for n in names]):
            hashers[index].update(view)
        out.update((n, h.hexdigest()) for n, h in zip(names, hashers, strict=True))
    return out


def copy_through_staging(pairs: list[tuple[torch.Tensor, torch.Tensor]], *, lanes: int = 2) -> None:
    """Host sources into destinations on one device, through ``lanes`` buffers of ``STAGING_PIECE_BYTES``.

    Each piece is whole in one buffer, so a tensor larger than a buffer is cut in ranges (one that is too
    large and not contiguous is copied directly, unstaged). The host copy of one piece overlaps the device
    copy of the previous one; the call returns once every byte has arrived.
    """
    if not pairs:
        return
    device = pairs[0][0].device
    piece = _config.STAGING_PIECE_BYTES
    fits = [piece_bytes(d, s) <= piece or (d.is_contiguous() and s.is_contiguous()) for d, s in pairs]
    pieces = split_copies([p for i, p in enumerate(pairs) if fits[i]], piece)
    direct = [p for i, p in enumerate(pairs) if not fits[i]]
    largest = max((piece_bytes(d, s) for d, s in pieces), default=0)
    stream = _side_stream(device)
    with torch.no_grad():
        ring = [_Lane(largest, device) for _ in range(min(lanes, len(pieces)))]
        try:
            for index, (destination, source) in enumerate(pieces):
                lane = ring[index % len(ring)]
                lane.wait()
                host = lane.buffer[: source.numel() * source.element_size()].view(source.dtype).view(source.shape)
                host.copy_(source)  # from the page cache into the (pinned) buffer, on this thread
                lane.start(destination, host, stream)
            for destination, source in direct:
                destination.copy_(source)
        finally:
            for lane in ring:
                lane.wait()


def piece_bytes(destination: torch.Tensor, source: torch.Tensor) -> int:
    """The larger of the two sides' sizes (a cast copy reads and writes different byte counts)."""
    return destination.numel() * max(destination.element_size(), source.element_size())


def split_copies(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], limit: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pieces of at most ``limit`` bytes on either side (never less than one
    element); contiguous tensors are cut in ranges, others stay whole."""
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for destination, source in pairs:
        if piece_bytes(destination, source) <= limit or not (destination.is_contiguous() and source.is_contiguous()):
            pieces.append((destination, source))
            continue
        flat_destination, flat_source = destination.view(-1), source.reshape(-1)
        step = max(1, limit // max(destination.element_size(), source.element_size()))
        for start in range(0, destination.numel(), step):
            pieces.append((flat_destination[start : start + step], flat_source[start : start + step]))
    return pieces
