"""One error shape on the wire: a worker's event carries the ``ErrorInfo`` the lifecycle keeps,
and the caller's callbacks get an exception naming the remote error's type."""

from __future__ import annotations

from tea_dist.core.errors import BranchTimeoutError, RemoteError
from tea_dist.distributed.messages import BranchEvent
from tea_dist.engine.attempt import ErrorInfo
from tea_dist.engine.lifecycle import AttemptState
from tea_dist.observe.events import FlowContext


def event(error: object) -> BranchEvent:
    return BranchEvent.model_validate(
        {
            "event": "on_flow_error",
            "fanout": "f",
            "index": 0,
            "branch": "a",
            "task_id": "f.0.0",
            "worker": "w/1",
            "attempt": AttemptState(branch="a", dispatched_at=0.0, attempts=1).model_dump(
                mode="json"
            ),
            "error": error,
        }
    )


def test_i3d_an_error_crosses_the_wire_as_the_lifecycles_error_info() -> None:
    info = ErrorInfo.from_exception(KeyError("missing"), node="a")
    sent = event(info)
    received = BranchEvent.model_validate_json(sent.model_dump_json())
    assert received.error == info
    _ctx, error, attempts = received.callback_args(FlowContext(branch="a"))
    assert isinstance(error, RemoteError) and error.error_type == "KeyError"
    assert "missing" in str(error) and attempts == 1


def test_i3d_a_timeout_reaches_callbacks_as_a_timeout() -> None:
    received = BranchEvent.model_validate_json(event(ErrorInfo.timed_out(2.0)).model_dump_json())
    _ctx, error, _attempts = received.callback_args(FlowContext(branch="a"))
    assert isinstance(error, BranchTimeoutError)


def test_i3d_an_error_from_a_worker_of_an_earlier_release_is_read() -> None:
    received = event({"type": "ValueError", "message": "boom", "timeout": False})
    assert received.error is not None
    assert (received.error.type_name, received.error.message) == ("ValueError", "boom")
