"""Inference recovery: out-of-memory splits the batch, then falls back; transient errors retry."""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from datapunk_recovery._core import events
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._execution import runtime as _runtime
from datapunk_recovery.resource import (
    InferenceConfig,
    InferenceFallback,
    InferenceFinished,
    InferenceRecovery,
    InferenceSplit,
    is_out_of_memory,
)
from datapunk_recovery.testing import fake_clock

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inference_numpy.py"
QUICK = InferenceConfig(retry=RetryConfig(max_attempts=3, base_delay=0.0))


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError; torch itself is never imported."""


class Device:
    """A model that fits ``room`` items per call, and no item larger than ``largest``."""

    def __init__(self, room: int, largest: int = 10**9) -> None:
        self.room = room
        self.largest = largest
        self.calls: list[list[int]] = []

    def __call__(self, batch: Sequence[int]) -> list[int]:
        self.calls.append(list(batch))
        if len(batch) > self.room or any(x > self.largest for x in batch):
            raise OutOfMemoryError(f"tried to allocate for {len(batch)} items")
        return [x * 2 for x in batch]


def test_out_of_memory_is_recognised_by_type_name_alone() -> None:
    class CudaOOM(OutOfMemoryError): ...

    assert is_out_of_memory(OutOfMemoryError())
    assert is_out_of_memory(CudaOOM())  # a base carries the name
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("out of memory"))  # messages are not read
    assert is_out_of_memory(RuntimeError(), names=["RuntimeError"])
    assert "torch" not in sys.modules


def test_a_batch_that_does_not_fit_is_split_and_merged_in_order() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    device = Device(room=3)
    recovery: InferenceRecovery[int, int] = InferenceRecovery(device, config=QUICK, bus=bus)
    result = recovery.run_sync(list(range(10)))
    assert result.outputs == [x * 2 for x in range(10)]
    assert result.served_by == ("primary",) * 10
    # 10 -> 5 -> 3: then the rest runs at the size that worked.
    assert [len(c) for c in device.calls] == [10, 5, 3, 3, 3, 1]
    splits = [(e.from_size, e.to_size) for e in seen if isinstance(e, InferenceSplit)]
    assert splits == [(10, 5), (5, 3)]
    [done] = [e for e in seen if isinstance(e, InferenceFinished)]
    assert (done.items, done.chunks, done.models) == (10, 4, ("primary",))


def test_when_even_one_item_does_not_fit_the_alternative_serves_the_rest() -> None:
    seen: list[events.Event] = []
    bus = events.EventBus()
    bus.subscribe(seen.append)
    gpu, cpu = Device(room=2, largest=100), Device(room=100)
    recovery: InferenceRecovery[int, int] = InferenceRecovery(
        gpu, model_name="gpu", fallbacks=[("cpu", cpu)], config=QUICK, bus=bus
    )
    result = recovery.run_sync([1, 2, 500, 3])
    assert result.outputs == [2, 4, 1000, 6]
    assert result.served_by == ("gpu", "gpu", "cpu", "cpu")
    assert cpu.calls == [[500, 3]]
    [fallback] = [e for e in seen if isinstance(e, InferenceFallback)]
    assert (fallback.from_model, fallback.to_model, fallback.remaining) == ("gpu", "cpu", 2)


def test_when_every_model_runs_out_of_memory_the_error_says_so() -> None:
    recovery: InferenceRecovery[int, int] = InferenceRecovery(
        Device(room=0), fallbacks=[("small", Device(room=0))], config=QUICK
    )
    with pytest.raises(OutOfMemoryError) as caught:
        recovery.run_sync([1, 2])
    assert "ran out of memory on every model (primary, small)" in caught.value.__notes__[-1]


def test_min_batch_size_stops_the_splitting_early() -> None:
    gpu, cpu = Device(room=3), Device(room=100)
    config = InferenceConfig(min_batch_size=4, retry=QUICK.retry)
    recovery: InferenceRecovery[int, int] = InferenceRecovery(
        gpu, fallbacks=[("cpu", cpu)], config=config
    )
    assert recovery.run_sync(list(range(8))).served_by == ("cpu",) * 8
    assert [len(c) for c in gpu.calls] == [8, 4]


def test_a_transient_error_is_a_plain_retry_of_the_same_chunk() -> None:
    calls: list[list[int]] = []

    def flaky(batch: Sequence[int]) -> list[int]:
        calls.append(list(batch))
        if len(calls) == 1:
            raise ConnectionResetError("model server restarted")
        return list(batch)

    recovery: InferenceRecovery[int, int] = InferenceRecovery(flaky, config=QUICK)
    assert recovery.run_sync([1, 2, 3]).outputs == [1, 2, 3]
    assert calls == [[1, 2, 3], [1, 2, 3]]


def test_other_errors_propagate_at_once() -> None:
    def broken(batch: Sequence[int]) -> list[int]:
        raise ValueError("bad input shape")

    recovery: InferenceRecovery[int, int] = InferenceRecovery(
        broken, fallbacks=[("cpu", Device(room=9))], config=QUICK
    )
    with pytest.raises(ValueError, match="bad input shape"):
        recovery.run_sync([1])


def test_a_model_must_return_one_output_per_input() -> None:
    recovery: InferenceRecovery[int, int] = InferenceRecovery(lambda batch: [0], config=QUICK)
    with pytest.raises(ValueError, match="returned 1 outputs for 2 inputs"):
        recovery.run_sync([1, 2])


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"InferenceConfig.min_batch_size: must be >= 1"):
        InferenceConfig(min_batch_size=0)
    with pytest.raises(ValueError, match=r"InferenceConfig.oom_types"):
        InferenceConfig(oom_types=frozenset())
    with pytest.raises(TypeError, match=r"expected \(name, callable\) pairs"):
        InferenceRecovery(Device(1), fallbacks=[("cpu", "not a model")])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_async_models_are_awaited_and_sync_ones_called() -> None:
    calls: list[int] = []

    async def remote(batch: Sequence[int]) -> list[int]:
        calls.append(len(batch))
        if len(batch) > 2:
            raise MemoryError
        return [-x for x in batch]

    recovery: InferenceRecovery[int, int] = InferenceRecovery(
        remote, fallbacks=[("local", Device(room=9))], config=QUICK
    )
    result = await recovery.run([1, 2, 3, 4])
    assert result.outputs == [-1, -2, -3, -4]
    assert calls == [4, 2, 2]
    with pytest.raises(TypeError, match="is async; use `await run"):
        recovery.run_sync([1])


@pytest.mark.anyio
async def test_a_sync_models_retry_backoff_does_not_block_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def blocking_sleep(seconds: float) -> None:
        raise AssertionError(f"a {seconds} s sleep would block the event loop")

    monkeypatch.setattr(_runtime, "sleep_sync", blocking_sleep)
    calls: list[int] = []

    def flaky(batch: Sequence[int]) -> list[int]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionResetError("model server restarted")
        return list(batch)

    config = InferenceConfig(retry=RetryConfig(max_attempts=2, base_delay=0.25, jitter="none"))
    recovery: InferenceRecovery[int, int] = InferenceRecovery(flaky, config=config)
    with fake_clock() as clock:
        assert (await recovery.run([1, 2])).outputs == [1, 2]
    assert clock.slept == [0.25]
    assert calls == [2, 2]


def test_the_numpy_example_splits_then_falls_back_to_the_cpu() -> None:
    spec = importlib.util.spec_from_file_location("inference_numpy_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up
    try:
        spec.loader.exec_module(example)
        facts = example.demo(say=lambda line: None)
    finally:
        del sys.modules[spec.name]
    assert facts == {
        "fitted_matches": True,
        "fitted_served_by": {"gpu"},
        "split_sizes": [(64, 32), (32, 16)],
        "moved_matches": True,
        "moved_served_by": {"cpu"},
        "fallbacks": [("small-gpu", "cpu")],
    }


# -- a failed attempt's memory is freed before the next one (issue 14, item 4)


class Memory:
    """A device whose memory is freed only when the tensors holding it are collected.

    Each :class:`Tensor` takes one unit while it lives (``__del__`` gives it
    back), like device memory behind a framework's tensors: if anything keeps
    the frames of a failed forward pass alive (the out-of-memory exception's
    traceback does), its tensors keep their units.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak_refused = 0

    def forward(self, batch: Sequence[int]) -> list[int]:
        activations = [Tensor(self) for _ in batch]  # held by this frame
        if self.used > self.capacity:
            self.peak_refused = max(self.peak_refused, self.used)
            raise OutOfMemoryError(f"tried to allocate {len(activations)} units")
        return [x * 2 for x in batch]

    async def forward_async(self, batch: Sequence[int]) -> list[int]:
        return self.forward(batch)


class Tensor:
    __slots__ = ("memory",)

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        memory.used += 1

    def __del__(self) -> None:
        self.memory.used -= 1


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    # Memory must be free before the next attempt, by reference counting
    # alone: a cycle collected "eventually" is the pitfall itself.
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _cpu(batch: Sequence[int]) -> list[int]:
    return [-1 for _ in batch]


@pytest.mark.usefixtures("no_cycle_collector")
def test_run_sync_frees_the_failed_attempts_memory_before_the_next_attempt() -> None:
    memory = Memory(capacity=16)
    config = InferenceConfig(retry=RetryConfig(max_attempts=2, base_delay=0.0), min_batch_size=16)
    recovery = InferenceRecovery(memory.forward, fallbacks=[("cpu", _cpu)], config=config)
    result = recovery.run_sync(list(range(64)))
    assert result.served_by == ("primary",) * 64  # 64 and 32 refused, 16 fits
    assert result.outputs == [x * 2 for x in range(64)]
    assert memory.used == 0


@pytest.mark.anyio
@pytest.mark.usefixtures("no_cycle_collector")
async def test_run_frees_the_failed_attempts_memory_before_the_next_attempt() -> None:
    for model in ("forward", "forward_async"):
        memory = Memory(capacity=16)
        config = InferenceConfig(
            retry=RetryConfig(max_attempts=2, base_delay=0.0), min_batch_size=16
        )
        recovery = InferenceRecovery(
            getattr(memory, model), fallbacks=[("cpu", _cpu)], config=config
        )
        result = await recovery.run(list(range(64)))
        assert result.served_by == ("primary",) * 64, model
        assert memory.used == 0


@pytest.mark.usefixtures("no_cycle_collector")
def test_when_every_model_runs_out_the_last_error_is_raised_with_its_note() -> None:
    memory = Memory(capacity=4)
    config = InferenceConfig(retry=RetryConfig(max_attempts=1), min_batch_size=8)
    recovery = InferenceRecovery(memory.forward, config=config)
    with pytest.raises(OutOfMemoryError) as caught:
        recovery.run_sync(list(range(16)))
    assert "ran out of memory on every model" in "\n".join(caught.value.__notes__)
    assert "8 item(s) per call" in "\n".join(caught.value.__notes__)
