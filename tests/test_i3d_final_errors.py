"""Never-retried errors are known by their base class, ``FinalError``, not by their names."""

from __future__ import annotations

import pytest

from tea_dist.core.config import RetryPolicy, exception_names
from tea_dist.core.errors import (
    FinalError,
    GraphRecursionError,
    NotAllowedError,
    QuarantinedError,
    SerializationError,
    StateTooLargeError,
    TeaDistError,
)
from tea_dist.distributed.signing import SignatureError
from tea_dist.distributed.trust import CodeMismatchError
from tea_dist.engine.attempt import ErrorInfo
from tea_dist.engine.lifecycle import AttemptState, retry_delay

POLICY = RetryPolicy(max_retries=3, base_delay=0.01)


def _delay(error: ErrorInfo) -> float | None:
    state = AttemptState(branch="b", dispatched_at=0.0, attempts=1)
    return retry_delay(POLICY, state, error, deadline=None, now=0.0)


@pytest.mark.parametrize(
    "cls",
    [
        GraphRecursionError,
        NotAllowedError,
        CodeMismatchError,
        SignatureError,
        SerializationError,
        StateTooLargeError,
        QuarantinedError,
    ],
)
def test_the_final_errors_carry_the_base_class_and_are_never_retried(cls: type) -> None:
    assert issubclass(cls, FinalError) and issubclass(cls, TeaDistError)
    error = ErrorInfo.from_exception(cls("boom"))
    assert error.final
    assert _delay(error) is None


def test_a_final_error_is_known_by_its_class_names_alone_as_it_crosses_processes() -> None:
    class LicenceRevoked(FinalError):
        pass

    # a worker's error arrives as its type name and its classes' names, never as the class
    error = ErrorInfo("LicenceRevoked", "no", names=exception_names(LicenceRevoked))
    assert error.final
    assert _delay(error) is None


def test_an_error_merely_named_like_a_final_one_is_retried() -> None:
    class SerializationError(Exception):  # the user's own, not tea_dist's
        pass

    error = ErrorInfo.from_exception(SerializationError("flaky"))
    assert not error.final
    assert _delay(error) == pytest.approx(0.01)


def test_a_quarantined_branch_message_records_a_final_error() -> None:
    error = ErrorInfo.from_exception(QuarantinedError("branch 'b' crashed its worker twice"))
    assert error.type_name == "QuarantinedError"
    assert "FinalError" in error.names
