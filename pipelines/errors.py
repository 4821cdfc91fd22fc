"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


def exception_text(e: BaseException) -> str:
    """The error's text, led by the JVM's exception for a Py4JJavaError (whose own first
    line, "An error occurred while calling o42.x", says nothing); Python's text alone when
    the gateway is gone."""
    text = str(e)
    java = getattr(e, "java_exception", None)
    if java is not None:
        try:
            return f"{java.toString()}\n{text}"
        except Exception:  # noqa: BLE001 - a dead gateway: keep what Py4J said
            return text
    return text


class SparkloomError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 1


class ConfigError(SparkloomError):
    """The configuration is wrong; raised before Spark starts."""

    exit_code = 2


class DataError(SparkloomError):
    """Input data is missing or unusable as a whole (bad rows go to quarantine instead)."""

    exit_code = 3


class ResourceError(SparkloomError):
    """The JVM ran out of something (memory, an executor, its SparkContext): the message
    names the setting to change."""

    exit_code = 5


class TrackingUnavailable(SparkloomError):
    """The MLflow tracking server stopped answering (after MLflow's retries)."""

    exit_code = 7


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, `kill PID`) as an exception, so every `finally` runs and
    the MLflow runs end KILLED instead of staying RUNNING (see pipelines.spark)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.exit_code = signum, 128 + signum
