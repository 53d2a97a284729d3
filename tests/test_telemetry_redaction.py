"""A password planted everywhere it could leak never reaches a log, a label or a span.

The secret goes into operation names (a URL with credentials, a DSN, a
``password=`` pair, an ``Authorization`` and a ``Cookie`` header written as
text), into exception messages and a user rule's reason, and into event
fields holding URLs, DSNs and header maps.  Every exporter then runs, and
everything each one produced is searched for the secret.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from datapunk_recovery import RetryConfig, retry
from datapunk_recovery._core.errors import (
    Classification,
    ErrorCategory,
    register_rule,
    unregister_rule,
)
from datapunk_recovery._core.events import Event, emit
from datapunk_recovery._core.redact import redact_url
from datapunk_recovery.telemetry import (
    CallbackExporter,
    LoggingExporter,
    StatisticsCollector,
    event_fields,
    safe_text,
)
from datapunk_recovery.telemetry.otel import SPAN_EVENTS, OpenTelemetryExporter
from datapunk_recovery.telemetry.prometheus import PrometheusExporter
from datapunk_recovery.telemetry.structlog import StructlogExporter
from datapunk_recovery.testing import fake_clock, instant_retries

SECRET = "hunter2-Zq9"

OPERATION_NAMES = [
    f"GET https://alice:{SECRET}@api.example.com/v1/users",
    f"postgresql://app:{SECRET}@db.internal:5432/orders",
    f"query host=db user=app password={SECRET}",
    f"call with Authorization: Bearer {SECRET}",
    f"call with Cookie: session={SECRET}",
    f"upload x-api-key={SECRET}",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Connected(Event):
    """What a careless network or database module might report."""

    name: ClassVar[str] = "network.connected"
    area: ClassVar[str] = "network"

    url: str
    dsn: str
    headers: Mapping[str, str]


class Leaky(ConnectionError):
    pass


@pytest.fixture
def secret_rule() -> Iterator[None]:
    def rule(exc: BaseException) -> Classification | None:
        if isinstance(exc, Leaky):
            return Classification(ErrorCategory.NETWORK, True, None, f"leaky: {exc} {SECRET}")
        return None

    register_rule(rule, for_type=Leaky)
    yield
    unregister_rule(rule)


def test_the_secret_never_leaves(caplog: pytest.LogCaptureFixture, secret_rule: None) -> None:
    caplog.set_level(logging.DEBUG, logger="datapunk_recovery")
    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    updates: list[Any] = []
    records: list[Mapping[str, Any]] = []
    collector = StatisticsCollector()
    exporters = [
        LoggingExporter(),
        StructlogExporter(),
        PrometheusExporter(registry),
        OpenTelemetryExporter(
            meter_provider=MeterProvider(metric_readers=[reader]),
            span_events={*SPAN_EVENTS, Connected.name},
        ),
        CallbackExporter(on_update=updates.append, on_event=records.append),
        collector,
    ]
    for exporter in exporters:
        exporter.install()
    try:
        with (
            instant_retries(),
            fake_clock(),
            capture_logs() as structured,
            tracer_provider.get_tracer("t").start_as_current_span("request"),
        ):
            for name in OPERATION_NAMES:
                attempts = iter([Leaky(f"reset talking to postgresql://app:{SECRET}@db")])

                @retry(RetryConfig(max_attempts=2), name=name)
                def call(attempts: Iterator[Exception] = attempts) -> None:
                    error = next(attempts, None)
                    if error is not None:
                        raise error

                call()

                @retry(RetryConfig(max_attempts=2), name=name)
                def always_fails() -> None:
                    raise Leaky(f"password={SECRET}")

                with pytest.raises(Leaky):
                    always_fails()
            emit(
                Connected(
                    operation="connect",
                    at=0.0,
                    url=f"https://bob:{SECRET}@api.example.com/",
                    dsn=f"host=db password={SECRET} dbname=app",
                    headers={"Authorization": f"Basic {SECRET}", "Cookie": f"sid={SECRET}"},
                )
            )
    finally:
        for exporter in exporters:
            exporter.close()

    produced = {
        "logs": "\n".join(
            f"{r.getMessage()} {r.__dict__}" for r in caplog.records
        ),
        "structlog": repr(structured),
        "prometheus": generate_latest(registry).decode(),
        "otel metrics": repr(reader.get_metrics_data()),
        "span events": repr(
            [(e.name, e.attributes) for s in spans.get_finished_spans() for e in s.events]
        ),
        "callback updates": repr([(u.metric.name, u.labels) for u in updates]),
        "callback events": repr(records),
        "statistics": repr(collector.statistics()),
    }  # fmt: skip
    failures = [r.getMessage() for r in caplog.records if r.name == "datapunk_recovery.events"]
    assert failures == [], "an exporter failed"
    for where, text in produced.items():
        assert SECRET not in text, f"the secret leaked into {where}"
    # ... and each place did receive the events, redacted rather than dropped
    for where, text in produced.items():
        assert "***" in text, f"{where} shows no redacted value: did it see the events?"
    assert "api.example.com" in produced["prometheus"]


@pytest.mark.parametrize(
    "text",
    [
        *OPERATION_NAMES,
        f"{{'Cookie': 'sid={SECRET}'}}",
        f"Proxy-Authorization: Digest username=x, response={SECRET}",
        f"redis://:{SECRET}@cache:6379/0",
        f"amqp://guest:{SECRET}@mq/",
        f"postgres://app:with/slash{SECRET}@db:5432/app",  # unencoded "/" and "@" in
        f"postgresql://app:p@{SECRET}@db/app",  # a password go whole
        f"postgres://app:{SECRET}@db:notaport/app",  # a malformed URL is still redacted
        f"PGPASSWORD={SECRET} psql",
        f'{{"db_password": "{SECRET}"}}',
        f"client_secret: {SECRET}",
    ],
)
def test_safe_text_removes_the_secret(text: str) -> None:
    assert SECRET not in safe_text(text)
    assert SECRET not in redact_url(text)


def test_event_fields_redact_header_maps() -> None:
    fields = event_fields(
        Connected(
            operation="connect",
            at=1.5,
            url="https://api.example.com/",
            dsn="host=db",
            headers={"Authorization": f"Bearer {SECRET}", "Accept": "json"},
        )
    )
    assert fields["event"] == "network.connected"
    assert fields["area"] == "network"
    assert fields["at"] == 1.5
    assert fields["url"] == "https://api.example.com/"
    assert SECRET not in str(fields["headers"])
    assert "json" in str(fields["headers"])
