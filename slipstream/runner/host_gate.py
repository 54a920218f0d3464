"""A gate that holds a CUDA stream until the host opens it: work queued behind the gate runs once the host has
written what it reads.

Structured output's masks need the tokens of the step before, which the host reads while the device computes the
forward. Filled before the draw is queued, a mask puts the whole fill between the forward and the next step's
preparation on the host, in series (a constrained step cost 13 ms where an unconstrained one cost 6, H100, lease AK).
Behind a gate, the draw is queued at once, reading its mask from page-locked memory that a thread of the host fills
and then opens the gate, while the host prepares the next step.

The device waits by the driver's stream memory operation (cuStreamWaitValue32: the stream's front end polls a
page-locked word until it reaches the ticket; no kernel spins on an SM). Tickets count up, and the wait compares
cyclically, so they may wrap. Every ticket handed out must be opened, on errors too, and by a thread that is already
running when the wait is queued: a stream held forever hangs every later synchronization, and the host thread that
queued the wait may itself block on the device (a synchronizing copy or free) before it could open it.
"""
from __future__ import annotations

import ctypes
import logging
import time

import torch

log = logging.getLogger(__name__)

_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0


class HostGate:
    """One device's gate. `next_ticket()` hands out a ticket; `wait(ticket)` queues on the current stream a wait for
    it; `open(ticket)` lets every wait up to it through."""

    def __init__(self, device: torch.device, cuda: ctypes.CDLL) -> None:
        self.device = device
        self._wait = cuda.cuStreamWaitValue32_v2  # (the _v2 stream memory operations need no driver option)
        self._word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        ptr = ctypes.c_uint64()
        _check(cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), ctypes.c_void_p(self._word.data_ptr()), 0),
               "cuMemHostGetDevicePointer")
        self._address = ptr.value
        # written through numpy: `open` runs on another thread, outside the inference mode the word may be made in,
        # and a torch write that raised there would leave the stream held
        self._host = self._word.numpy()
        self._ticket = 0

    @classmethod
    def for_device(cls, device: torch.device) -> HostGate | None:
        """A gate on this CUDA device, or None on a CPU (which computes a step as it is queued) or where the driver
        lacks the operations: the caller then fills its masks before it queues the draw."""
        if device.type != "cuda":
            return None
        try:
            gate = cls(device, ctypes.CDLL("libcuda.so.1"))
            if gate._holds():
                return gate
            log.warning("the stream did not wait at the host gate: structured output fills its masks before each draw")
        except (OSError, AttributeError, RuntimeError) as e:
            log.info("no host gate (%s): structured output fills its masks before each draw", e)
        return None

    def _holds(self) -> bool:
        """Whether a copy queued behind a closed gate reads what the host wrote before opening it (a driver that took
        the wait but did not hold the stream would let masks be read before they are written)."""
        src = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        dst = torch.full((1,), -1, dtype=torch.int32, device=self.device)
        ticket = self.next_ticket()
        self.wait(ticket)
        dst.copy_(src, non_blocking=True)
        time.sleep(0.01)  # an idle device runs an unheld copy long before this
        src.numpy()[0] = 1
        self.open(ticket)
        torch.cuda.synchronize(self.device)
        return int(dst[0]) == 1

    def next_ticket(self) -> int:
        self._ticket = (self._ticket + 1) & 0xFFFFFFFF
        return self._ticket

    def wait(self, ticket: int) -> None:
        """Queue on the current stream a wait until `ticket` is open."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(self._wait(ctypes.c_void_p(stream), ctypes.c_uint64(self._address), ctypes.c_uint32(ticket), _WAIT_GEQ),
               "cuStreamWaitValue32")

    def open(self, ticket: int) -> None:
        """Let the waits up to `ticket` through (after everything the host wrote before it: x86 keeps stores in
        order, and the copies behind the gate read page-locked memory when they run)."""
        self._host[0] = ticket - (1 << 32) if ticket >= 1 << 31 else ticket  # (the word is a signed int32)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {result}")
