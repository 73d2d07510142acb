"""The tea_dist error tree.

    TeaDistError
    ├── GraphError               building or compiling a graph went wrong
    │   ├── YAMLError            (also a ValueError) a YAML agent file is malformed or invalid
    │   │   └── UnknownStrategyError   (also a ConfigError) a YAML agent names no known strategy
    │   └── NotAllowedError      (final) a worker refuses a callable, module or agent it was
    │                            not allowed
    ├── ConfigError              (also a ValueError) a strategy, policy or setting is invalid
    ├── FinalError               a branch failure another attempt would only repeat: never
    │                            retried, whatever the RetryPolicy says; the errors marked
    │                            (final) here, and on workers CodeMismatchError
    │                            (``tea_dist.distributed.trust``) and SignatureError
    │                            (``tea_dist.distributed.signing``)
    │   └── QuarantinedError     a branch message crashed its worker process too often
    ├── SerializationError       (final) a state value cannot cross to another process
    │   └── StateTooLargeError   a branch state exceeds the configured size limit
    ├── BranchError              a branch failed (raised only with fail_fast/raise_exceptions)
    │   ├── BranchTimeoutError   a branch exceeded its timeout
    │   ├── CircuitOpenError     a branch was refused by an open circuit
    │   └── RemoteError          an error from another process, as type name and message
    ├── MergeError               a fan-in merge helper cannot merge the results
    ├── NodeError                (also a RuntimeError) a node raised outside any branch
    ├── GraphRecursionError      (final) a run took more node steps than its recursion_limit
    ├── BrokerError              the broker or Redis cannot be reached, refused, or stayed away
    ├── NoWorkerError            branches were sent to a queue no live worker consumes
    ├── RunCancelledError        a submitted workflow run was cancelled
    └── RunFailedError           a submitted workflow run failed

Celery, Redis and pickle errors are translated at the boundary (``raise ... from exc``).

Errors cross processes as data: type name, message, and the names of every class the error
is an instance of (``exception_names``). What is decided on another process than the one that
raised the error is decided on those names: a failure is final when ``"FinalError"`` is one.
"""

from __future__ import annotations


class TeaDistError(Exception):
    """Raised for every error tea_dist itself reports; the root of the tree."""


class GraphError(TeaDistError):
    """Raised when a graph is built or compiled wrong: unknown node, no entry point, ..."""


class YAMLError(GraphError, ValueError):
    """Raised when a YAML agent file cannot be read, parsed or validated.

    Also a ``ValueError``, which is what code written for The Edge Agent catches. Its message
    is the first problem; ``problems`` lists every one found in the same pass (one line each).
    """

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems or (message,)


class FinalError(TeaDistError):
    """The base of branch failures that another attempt would only repeat, because the code,
    the message or the state is what is wrong: a branch that raises one is never retried,
    whatever its ``RetryPolicy`` says (decided by name, ``"FinalError"``, where the error is
    only known by the names of its classes)."""


class QuarantinedError(FinalError):
    """Raised (recorded) on a worker for a branch message whose earlier deliveries crashed
    their worker process: it is not run again."""


class NotAllowedError(GraphError, FinalError):
    """Raised when a reference names what its module does not define, or (on a worker) a
    callable, module or YAML agent that the worker's operator did not allow (``--allow`` /
    ``TEA_DIST_ALLOWED`` / ``TEA_DIST_AGENTS_DIR``)."""


class ConfigError(TeaDistError, ValueError):
    """Raised when a configuration value is invalid: unknown strategy, bad policy field.

    Also a ``ValueError``, which is what code written for The Edge Agent catches.
    """


class UnknownStrategyError(YAMLError, ConfigError):
    """Raised when a YAML agent names a parallel strategy that is not registered."""


class SerializationError(FinalError):
    """Raised before dispatch when a state value cannot be serialised for another process.

    ``key`` names the state key at fault and ``flow_index`` the branch's position in its
    fan-out, when known.
    """

    def __init__(
        self, message: str, *, key: str | None = None, flow_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.key = key
        self.flow_index = flow_index


class StateTooLargeError(SerializationError):
    """Raised before dispatch when a branch state is larger than the configured limit."""


class BranchError(TeaDistError):
    """Raised when a branch fails and the run is configured to stop on failure.

    ``branch`` names the branch and ``error_type`` the original exception class.
    """

    def __init__(self, message: str, *, branch: str = "", error_type: str | None = None) -> None:
        super().__init__(message)
        self.branch = branch
        self.error_type = error_type or type(self).__name__


class BranchTimeoutError(BranchError, TimeoutError):
    """Raised (or recorded) when a branch attempt or the whole branch exceeds its timeout."""


class CircuitOpenError(BranchError):
    """Raised (or recorded) when a branch is refused because its circuit is open."""


class RemoteError(BranchError):
    """An exception raised in another process, carried back as type name and message."""


class MergeError(TeaDistError):
    """Raised by a fan-in merge helper when the results cannot be merged as asked."""


class NodeError(TeaDistError, RuntimeError):
    """Raised when a node fails outside any parallel branch (with ``raise_exceptions``).

    Also a ``RuntimeError``, which is what code written for The Edge Agent catches.
    """


class BrokerError(TeaDistError):
    """Raised when the broker or Redis (named by its redacted URL) cannot be reached or refuses
    when a run starts, or stays away longer than ``TEA_DIST_BROKER_GRACE`` during a run."""


class NoWorkerError(TeaDistError):
    """Raised when a branch waits on a queue that no live worker consumes (the queue named)."""


class GraphRecursionError(FinalError):
    """Raised when a walk (the main path, or one branch) would take more node steps than
    ``config["recursion_limit"]`` (default 1000): a cycle without an exit never hangs.

    ``node`` names the node that would have run next and ``limit`` the limit.
    """

    def __init__(self, message: str, *, node: str = "", limit: int = 0) -> None:
        super().__init__(message)
        self.node, self.limit = node, limit


class RunCancelledError(TeaDistError):
    """Raised by ``WorkflowRun.result()`` when the run was cancelled."""


class RunFailedError(TeaDistError):
    """Raised by ``WorkflowRun.result()`` when the run failed; the message says why."""
