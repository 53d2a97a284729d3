"""Model-inference recovery with a small NumPy model on a memory-limited "device".

A two-layer perceptron runs on a simulated device with a memory budget in
bytes.  Before computing, the model checks what the batch needs (weights plus
every layer's activations) against the budget and raises ``OutOfMemoryError``
exactly as a real GPU would (torch raises ``torch.cuda.OutOfMemoryError``);
:class:`~datapunk_recovery.resource.InferenceRecovery` recognises it by its
type name, halves the batch until it fits, and falls back to the CPU when
even one item does not fit.

Needs NumPy, which the library itself never does: install the ``examples``
extra (``pip install 'datapunk-recovery[examples]'``) or ``pip install numpy``.

Run it:  python examples/inference_numpy.py
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

try:
    import numpy as np
except ImportError:
    raise SystemExit(
        "this example needs NumPy: pip install 'datapunk-recovery[examples]'"
    ) from None

from datapunk_recovery._core import events
from datapunk_recovery.resource import InferenceConfig, InferenceRecovery, InferenceResult


class OutOfMemoryError(RuntimeError):
    """A batch does not fit in the device's memory (named as torch names it)."""


@dataclass(frozen=True)
class Device:
    """A device with ``memory`` bytes for one forward pass."""

    name: str
    memory: int

    def allocate(self, nbytes: int) -> None:
        if nbytes > self.memory:
            raise OutOfMemoryError(
                f"{self.name}: tried to allocate {nbytes} bytes; {self.memory} bytes available"
            )


class TinyMLP:
    """``sizes[0]`` inputs -> ReLU hidden layer -> softmax over ``sizes[-1]`` classes."""

    def __init__(self, device: Device, sizes: Sequence[int] = (32, 128, 10), seed: int = 7):
        rng = np.random.default_rng(seed)
        self.device = device
        self.sizes = tuple(sizes)
        self.layers = [
            (rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a), np.zeros(b, np.float32))
            for a, b in zip(self.sizes, self.sizes[1:], strict=False)
        ]

    def on(self, device: Device) -> TinyMLP:
        """The same weights on another device."""
        twin = TinyMLP.__new__(TinyMLP)
        twin.device, twin.sizes, twin.layers = device, self.sizes, self.layers
        return twin

    def memory_needed(self, batch: int) -> int:
        """Bytes a forward pass of ``batch`` rows needs: weights and every activation."""
        weights = sum(w.nbytes + b.nbytes for w, b in self.layers)
        return int(weights + batch * sum(self.sizes) * np.dtype(np.float32).itemsize)

    def __call__(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities, one row per input row."""
        x = np.asarray(batch, dtype=np.float32)
        self.device.allocate(self.memory_needed(len(x)))
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return list(e / e.sum(axis=1, keepdims=True))


def serve(
    model: TinyMLP, fallback: TinyMLP, inputs: list[np.ndarray], bus: events.EventBus
) -> InferenceResult[np.ndarray]:
    """Serve ``inputs`` on ``model``'s device, falling back to ``fallback``'s."""
    recovery: InferenceRecovery[np.ndarray, np.ndarray] = InferenceRecovery(
        model,
        model_name=model.device.name,
        fallbacks=[(fallback.device.name, fallback)],
        config=InferenceConfig(min_batch_size=1),
        name="classifier",
        bus=bus,
    )
    return recovery.run_sync(inputs)


def demo(say: Callable[[str], object] = print) -> dict[str, object]:
    """Two runs: one that fits after splitting, one that needs the CPU.  Returns the facts."""
    log: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(log.append)

    def show(event: events.Event) -> None:
        say(f"  event {event.name}: {_fields(event)}")

    bus.subscribe(show)

    cpu = Device("cpu", memory=64 * 2**20)
    model = TinyMLP(cpu)
    rows = np.random.default_rng(0).standard_normal((64, model.sizes[0])).astype(np.float32)
    inputs = list(rows)
    expected = np.stack(model(inputs))

    # Room for the weights and 16 rows: 64 -> 32 -> 16, then the rest at 16.
    gpu = Device("gpu", memory=model.memory_needed(16))
    say(f"64 rows on a gpu with room for 16 ({gpu.memory} bytes):")
    fitted = serve(model.on(gpu), model, inputs, bus)
    splits = [e for e in log if e.name == "resource.inference_split"]

    # Room for the weights only: not even one row fits, so the CPU serves everything.
    small_gpu = Device("small-gpu", memory=model.memory_needed(0))
    say(f"64 rows on a gpu with room for none ({small_gpu.memory} bytes):")
    log.clear()
    moved = serve(model.on(small_gpu), model, inputs, bus)
    fallbacks = [e for e in log if e.name == "resource.inference_fallback"]

    return {
        "fitted_matches": bool(np.allclose(np.stack(fitted.outputs), expected, atol=1e-6)),
        "fitted_served_by": set(fitted.served_by),
        "split_sizes": [(e.from_size, e.to_size) for e in splits],  # type: ignore[attr-defined]
        "moved_matches": bool(np.allclose(np.stack(moved.outputs), expected, atol=1e-6)),
        "moved_served_by": set(moved.served_by),
        "fallbacks": [(e.from_model, e.to_model) for e in fallbacks],  # type: ignore[attr-defined]
    }


def _fields(event: events.Event) -> str:
    shown = [f for f in dataclasses.fields(event) if f.name not in ("operation", "at")]
    return ", ".join(f"{f.name}={getattr(event, f.name)!r}" for f in shown)


if __name__ == "__main__":
    facts = demo()
    for key, value in facts.items():
        print(f"{key}: {value}")
