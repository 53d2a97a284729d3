"""Redaction: a secret of any length, in any of the forms it takes, never survives; time is linear.

Every rule is a scan that looks at each character a bounded number of times
(see :mod:`datapunk_recovery._core.redact`), so the hostile inputs below are
checked on their *result* (the secret is gone, the text around it stays),
never on a stopwatch.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from datapunk_recovery import retry
from datapunk_recovery._core.backoff import RetryConfig
from datapunk_recovery._core.durations import DurationError, parse_duration
from datapunk_recovery._core.errors import RecoveryError
from datapunk_recovery._core.events import Event, EventBus, HintIgnored
from datapunk_recovery._core.redact import (
    REDACTED,
    is_secret_name,
    redact_headers,
    redact_text,
    redact_url,
    safe_repr,
)
from datapunk_recovery.config import ConfigError, ServicePolicy, build_config
from datapunk_recovery.network import Endpoint
from datapunk_recovery.testing import instant_retries

LONG = "Zq9" * 400  # 1,200 characters: an RDS IAM token is longer than 255

# Each form a secret takes, with {s} where it goes.
FORMS = [
    "postgresql://app:{s}@db.internal:5432/orders",
    "postgres://app:{s}@db/x?sslmode=require",
    "redis://:{s}@cache:6379/0",
    "rediss://default:{s}@cache:6380",
    "amqp://guest:{s}@mq/vhost",
    "mongodb+srv://u:{s}@cluster0.example.net/db",
    "https://{s}@github.com/org/repo.git",  # a token as the user name
    "host=db user=app password={s} dbname=x",
    "host=db password='{s}' user=app",
    "PGPASSWORD={s}",
    "https://bucket.s3.amazonaws.com/k?X-Amz-Signature={s}&X-Amz-Expires=60",
    "https://acct.blob.core.windows.net/c/b?sv=2021&sig={s}",
    "https://api.example.com/v1?token={s}",
    "https://api.example.com/v1?access_token={s}&page=2",
    "https://maps.example.com/api?key={s}",
    "https://api.example.com/?api_key={s}",
    "https://api.example.com/?apiKey={s}",
    "client_secret: {s}",
    '{{"api_key": "{s}", "user": "bob"}}',
    "{{'password': '{s}'}}",
    "Authorization: Bearer {s}",
    "authorization: Basic {s}",
    "Cookie: session={s}; theme=dark",
    "Set-Cookie: id={s}; Path=/",
    "X-Api-Key: {s}",
    "x-api-key={s}",
    "X-Auth-Token: {s}",
    "{{'Authorization': 'Token {s}'}}",
    "Bearer {s}",
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("secret", ["hunter2-Zq9", "Zq9" * 86, LONG])  # 11, 258, 1,200 chars
def test_a_secret_of_any_length_never_survives(form: str, secret: str) -> None:
    text = form.format(s=secret)
    assert "Zq9" not in redact_text(text)
    assert "Zq9" not in redact_url(text)
    assert REDACTED in redact_text(text)


def test_what_is_not_secret_stays_readable() -> None:
    assert redact_url("postgresql://app:pw@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("https://api.example.com/v1/items?page=2&q=x") == (
        "https://api.example.com/v1/items?page=2&q=x"
    )
    assert redact_text("host=db user=app password=pw dbname=x") == (
        "host=db user=app password=*** dbname=x"
    )
    assert redact_text("?X-Amz-Signature=abc&X-Amz-Expires=60") == (
        "?X-Amz-Signature=***&X-Amz-Expires=60"
    )
    assert redact_text("retry.base_delay: expected seconds") == "retry.base_delay: expected seconds"


def test_a_password_holding_url_characters_goes_whole() -> None:
    assert redact_url("redis://u:p@ss/w?rd#x@cache:6379/0") == "redis://u:***@cache:6379/0"


def test_header_maps_lose_every_credential() -> None:
    headers = {
        "Authorization": "Bearer x",
        "X-Vault-Token": "x",
        "X-Signature": "x",
        "api-key": "x",
        "Accept": "text/plain",
        "Referer": f"https://u:{LONG}@a/",
    }
    cleaned = redact_headers(headers)
    assert [k for k, v in cleaned.items() if v == REDACTED] == list(headers)[:4]
    assert cleaned["Accept"] == "text/plain" and LONG not in cleaned["Referer"]


def test_secret_names_are_read_by_their_words() -> None:
    secret = ["password", "PGPASSWORD", "X-Amz-Signature", "sig", "apiKey", "api_key", "key"]
    secret += ["access_token", "accesstoken", "X-Auth-Token", "JSESSIONID", "session_id"]
    secret += ["client_secret", "X-Amz-Credential", "private_key", "MYSQL_PWD", "Set-Cookie"]
    for name in secret:
        assert is_secret_name(name), name
    plain = ["host", "user", "page", "base_delay", "sslmode", "design", "monkey", "token_type"]
    plain += ["max_tokens", "token_ratio", "key_ttl", "key_prefix", "expires_in", "signal"]
    for name in plain:
        assert not is_secret_name(name), name


def test_configuration_reprs_keep_their_numbers() -> None:
    shown = repr(ServicePolicy())
    assert "max_tokens=10.0" in shown and "token_ratio=0.1" in shown and REDACTED not in shown


def test_configuration_errors_never_show_a_long_password() -> None:
    dsn = f"postgresql://u:{LONG}@db/x"
    with pytest.raises(ConfigError) as caught:
        build_config({"databases": {"x": {"postgress": dsn}}})
    assert "Zq9" not in str(caught.value) and "postgresql://u:***@db/x" in str(caught.value)
    with pytest.raises(TypeError) as typed:
        RetryConfig(base_delay=dsn)  # type: ignore[arg-type]
    assert "Zq9" not in str(typed.value) and "base_delay" in str(typed.value)
    with pytest.raises(TypeError) as address:
        Endpoint("a", dsn.encode())  # type: ignore[arg-type]
    assert "Zq9" not in str(address.value)


# -- hostile inputs: the answer is right (and comes: linear time, no nested repeats) ---------------

HUGE = 100_000


@pytest.mark.parametrize(
    "text",
    [
        "a://" * (HUGE // 4),
        "a://:" * (HUGE // 5) + "@h",
        "x:" + "@" * HUGE,
        "password" + " " * HUGE,
        "a-" * (HUGE // 2) + "=",
        "k" * HUGE + "=v",
        "password='" + "\\" * HUGE,
        "Bearer" + " " * HUGE,
        "token=" + "'" * HUGE,
        "a=" * (HUGE // 2),
    ],
    ids=lambda t: repr(t[:12]),
)
def test_hostile_texts_are_redacted_in_one_pass(text: str) -> None:
    out = redact_text(text)
    assert len(out) <= len(text) + len(REDACTED)


def test_a_huge_secret_in_a_huge_text_is_gone() -> None:
    secret = "S3" * HUGE
    text = f"connect postgresql://app:{secret}@db/x then token={secret}&sig={secret} done"
    out = redact_text(text)
    assert "S3" not in out and out.endswith("done")


_secret = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ23456789", min_size=8, max_size=600)
_noise = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=120, deadline=None)
@given(form=st.sampled_from(FORMS), secret=_secret, before=_noise, after=_noise)
@example(form=FORMS[0], secret="Q" * 300, before="", after="")
def test_no_secret_survives_whatever_surrounds_it(
    form: str, secret: str, before: str, after: str
) -> None:
    assume(secret not in before and secret not in after)
    text = f"{before} {form.format(s=secret)} {after}"
    assert secret not in redact_text(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=":/@?#=&'\" \\abcpasswordtkenXY-_.\n", max_size=400))
def test_any_text_is_redacted_without_error_and_never_grows_much(text: str) -> None:
    out = redact_text(text)
    assert out.count(REDACTED) >= 0
    assert redact_text(out).count(REDACTED) >= out.count(REDACTED)  # stable: nothing comes back


@pytest.mark.parametrize("value", [f"token={LONG}", {"password": LONG}, [f"https://u:{LONG}@h"]])
def test_a_garbage_value_shown_in_an_event_is_redacted_before_it_is_cut(value: object) -> None:
    shown = safe_repr(value)
    assert len(shown) <= 40 and "Zq9" not in shown


def test_a_garbage_retry_hint_event_never_shows_part_of_a_secret() -> None:
    seen: list[Event] = []
    bus = EventBus()
    bus.subscribe(seen.append)

    class Leaky(RecoveryError):
        retry_after = f"token={LONG}"  # type: ignore[assignment]

    calls = iter([Leaky("boom", retryable=True), None])

    def flaky() -> str:
        error = next(calls)
        if error is not None:
            raise error
        return "ok"

    with instant_retries():
        assert retry(RetryConfig(max_attempts=2), bus=bus)(flaky)() == "ok"
    [ignored] = [e for e in seen if isinstance(e, HintIgnored)]
    assert "Zq9" not in ignored.value


def test_a_quote_inside_a_header_value_does_not_end_what_is_hidden() -> None:
    for text in ("X-Api-Key: ab'Zq9", 'Authorization: "Bearer Zq9', 'Cookie: a="b; s=Zq9'):
        assert "Zq9" not in redact_text(text), text
    assert redact_text("{'Authorization': 'Bearer Zq9', 'Accept': 'x'}") == (
        "{'Authorization': ***, 'Accept': 'x'}"
    )


def test_a_dsn_given_for_a_duration_is_quoted_redacted() -> None:
    with pytest.raises(DurationError) as caught:
        parse_duration(f"postgres://u:{LONG}@h/x")
    assert "Zq9" not in str(caught.value) and "postgres://u:***@h/x" in str(caught.value)
