"""The helper every cloud provider times and bounds its first byte with
(engine.providers.first_byte), on its own: the SDKs' use of it is tested against the
stand-ins (test_tts_cloud, test_llm_openai, test_stt_openai, test_hung_provider)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from engine.providers.base import ProviderError
from engine.providers.first_byte import FirstByteDeadline


class SdkError(Exception):
    """An SDK's own failure, with the HTTP status it carries."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _map(exc: BaseException) -> ProviderError:
    status = exc.status if isinstance(exc, SdkError) else None
    return ProviderError("vendor", f"mapped {exc}", status=status,
                         retryable=status is None or status >= 500)


def deadline(timeout_s: float = 0.2) -> FirstByteDeadline:
    return FirstByteDeadline("vendor", "llm", timeout_s, (SdkError,), _map)


async def test_a_first_byte_in_time_is_timed() -> None:
    request = deadline().request("m1")
    async with request.first_byte():
        await asyncio.sleep(0.05)
    assert request.first_byte_s is not None and 0.04 < request.first_byte_s < 0.2
    await asyncio.sleep(0.02)
    timing = request.timing()
    assert timing.first_byte_s == request.first_byte_s
    assert timing.total_s > request.first_byte_s
    assert request.timing(produced=False).first_byte_s is None  # an empty reply


async def test_a_missed_deadline_is_a_logged_retryable_provider_error() -> None:
    request = deadline(0.1).request("m1")
    with capture_logs() as logs, pytest.raises(ProviderError) as info:
        async with request.first_byte():
            await asyncio.sleep(5)
    assert str(info.value) == "vendor: timed out: no first token within 0.10s"
    assert info.value.retryable and info.value.status is None
    assert isinstance(info.value.__cause__, TimeoutError)
    assert request.first_byte_s is None
    assert logs == [{"event": "provider.first_byte_timeout", "log_level": "warning",
                     "provider": "vendor", "kind": "llm", "model": "m1", "timeout_s": 0.1}]


async def test_an_sdk_error_is_mapped_and_logged_once() -> None:
    request = deadline().request("m1")
    with capture_logs() as logs, pytest.raises(ProviderError) as info:
        async with request.first_byte():
            raise SdkError(401)
    assert info.value.status == 401 and not info.value.retryable
    assert [(e["event"], e["status"], e["retryable"]) for e in logs] == [
        ("provider.request_failed", 401, False)]


async def test_other_errors_and_cancellation_pass_through() -> None:
    # A TimeoutError the deadline did not raise, and anything outside the SDK's errors,
    # are not the provider's to explain.
    for error in (TimeoutError("socket"), ValueError("bug")):
        with pytest.raises(type(error)):
            async with deadline().request("m1").first_byte():
                raise error

    async def waits() -> None:
        async with deadline(5.0).request("m1").first_byte():
            await asyncio.sleep(5)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0.05)
    task.cancel()  # a barge-in: cancelled, not a timeout
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_stream_cut_after_output_is_logged() -> None:
    request = deadline().request("m1")
    with capture_logs() as logs:
        request.cut(SdkError(502), received_chars=12)
    assert logs == [{"event": "provider.stream_cut", "log_level": "warning",
                     "provider": "vendor", "kind": "llm", "model": "m1",
                     "error": "vendor: mapped HTTP 502", "received_chars": 12}]


def test_a_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        deadline(0)
