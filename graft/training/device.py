"""Where a network runs: the device, the options that make it faster, and on-device sums.

Nothing here changes what is computed (beyond float16 rounding when mixed precision is on);
it decides where, in which memory layout, and how often the host waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# Any re-iterable source of (inputs, targets) batches: a DataLoader, or cached head inputs.
# Inputs are float (N, ...) tensors, targets int64 class indices (N,), both on any device.
Pairs = Iterable[tuple[torch.Tensor, torch.Tensor]]


def resolve_device(setting: str) -> torch.device:
    """The device ``common.device`` names: ``auto`` picks CUDA, then MPS, then the CPU.

    Any other value (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is passed to :class:`torch.device`,
    which raises RuntimeError for a string it cannot parse.
    """
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_record(device: torch.device) -> dict[str, str]:
    """What a training stage's metrics record of the device it trained on: ``device``, its
    type (``cpu``, ``cuda``, ``mps``), and for CUDA ``device_name``, the GPU's model name
    (the setting ``auto`` alone does not say where a model was trained)."""
    record = {"device": device.type}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
    return record


@dataclass(frozen=True)
class Speed:
    """Device options that change speed, not the maths (beyond float16 rounding with amp).

    ``amp``: float16 autocast with gradient scaling, honoured on CUDA only (elsewhere it would
    be slower or unsupported). ``channels_last``: NHWC memory layout for 4-D inputs.
    """

    amp: bool = False
    channels_last: bool = False

    def inputs(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` moved to ``device`` (without blocking the host where it can), in NHWC
        layout when ``channels_last`` is set and it is a 4-D ``(N, C, H, W)`` batch."""
        tensor = tensor.to(device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def autocast(self, device: torch.device) -> torch.autocast:
        """A context in which ``device``'s ops run in float16 when amp applies, else a no-op."""
        return torch.autocast(device.type, torch.float16, enabled=self.uses_amp(device))

    def uses_amp(self, device: torch.device) -> bool:
        """Whether mixed precision is on for ``device`` (amp asked for, and it is CUDA)."""
        return self.amp and device.type == "cuda"


DEFAULT_SPEED = Speed()  # float32, default memory layout: what runs on every device


class Tally:
    """Summed loss and correct predictions over one pass, kept on ``device``.

    The sums are read once per pass: every read waits for the GPU, so reading per batch would
    stall it every step.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch: ``loss_sum`` is its summed loss (a scalar, nats), ``logits`` its
        ``(N, classes)`` outputs and ``targets`` its ``(N,)`` int64 class indices."""
        self.loss += loss_sum.detach().float()
        self.correct += (logits.argmax(1) == targets).sum()
        self.seen += len(targets)

    def means(
        self, combine: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[float, float]:
        """Mean loss per example (nats) and accuracy (fraction correct) over what was added.

        ``combine`` takes the float64 ``(3,)`` sums (loss, correct, seen) and returns the ones
        to use: the sums over every process of a data-parallel group
        (:meth:`graft.training.group.Group.total`). Raises ZeroDivisionError when nothing was
        added.
        """
        if combine is None:
            return float(self.loss) / self.seen, int(self.correct) / self.seen
        sums = torch.stack(
            (
                self.loss.to(torch.float64),
                self.correct.to(torch.float64),
                torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss.device),
            )
        )
        loss, correct, seen = combine(sums).tolist()
        return loss / seen, int(correct) / int(seen)
