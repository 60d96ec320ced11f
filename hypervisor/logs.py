# -*- test-case-name: tests.test_logs -*-
"""
Logging: human-readable lines to stderr in the foreground, JSON lines to a file.

The daemon logs with L{twisted.logger}. L{LogFileService} adds a JSON-lines observer
writing C{<logDir>/hypervisor.log} (rotated at 10 MiB, 10 files kept) while it runs;
L{stderr_observer} is the foreground observer C{hypervisor run} gives twistd;
L{LogBuffer} keeps the latest events in memory for the C{/logs} pages.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.logfile import LogFile

from hypervisor.loglevels import filtered

LOG_FILE_NAME = "hypervisor.log"
ROTATE_LENGTH = 10 * 1024 * 1024
MAX_ROTATED_FILES = 10


def stderr_observer() -> ILogObserver:
    """
    A human-readable observer on stderr (twistd's C{--logger} takes this factory).
    """
    return filtered(FileLogObserver(sys.stderr, lambda event: formatEventAsClassicLogText(event)))


@dataclass(frozen=True)
class LogLine:
    """
    One remembered log event.
    """

    time: float
    level: str
    namespace: str
    text: str


class LogBuffer:
    """
    The most recent log events, in memory, for the C{/logs} pages (an observer).
    """

    def __init__(self, max_lines: int = 10000) -> None:
        self.lines: deque[LogLine] = deque(maxlen=max_lines)

    def __call__(self, event: dict) -> None:
        """
        Remember one event.
        """
        text = formatEvent(event)
        if text is None:
            return
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        level = event.get("log_level")
        self.lines.append(
            LogLine(
                time=float(event.get("log_time") or 0.0),
                level=getattr(level, "name", "info"),
                namespace=str(event.get("log_namespace", "-")),
                text=text,
            )
        )

    def since(self, start: float) -> list[LogLine]:
        """
        The lines logged at or after C{start}.
        """
        return [line for line in self.lines if line.time >= start]


class LogFileService(Service):
    """
    Writes every log event as one JSON line to C{<logDir>/hypervisor.log} while running.

    As the Go daemon's flags say: a file is rotated at C{rotate_length} bytes
    (C{-logFileMaxSize}) and old files are deleted beyond C{quota} bytes in all
    (C{-logQuota}); a line is logged at startup (C{-logAtStartup}); and a C{MARK} line
    after C{mark_after} seconds without any log line (C{-idleMarkTimeout}, 0: never).
    """

    name = "logging"
    log = Logger()

    def __init__(
        self,
        directory: str,
        publisher: object = globalLogPublisher,
        buffer: Optional[LogBuffer] = None,
        rotate_length: int = ROTATE_LENGTH,
        quota: int = ROTATE_LENGTH * MAX_ROTATED_FILES,
        log_at_startup: bool = False,
        mark_after: float = 0.0,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self.directory = directory
        self.publisher = publisher
        self.buffer = buffer
        # The buffer behind the daemon's log levels (hypervisor.loglevels).
        self._buffer_observer = filtered(buffer) if buffer is not None else None  # type: ignore[arg-type]
        self.path = os.path.join(directory, LOG_FILE_NAME)
        self.rotate_length = max(1, rotate_length)
        # The file being written counts against the quota too.
        self.max_rotated_files = max(1, quota // self.rotate_length - 1)
        self.log_at_startup = log_at_startup
        self.mark_after = mark_after
        self.clock = clock
        self._last_event = 0.0
        self._mark_call: Optional[IDelayedCall] = None
        self._file: Optional[LogFile] = None
        self._observer: Optional[ILogObserver] = None
        self._opened = False

    def privilegedStartService(self) -> None:
        """
        Open the log file (creating the directory) before privileges are dropped.
        """
        if not self._opened:
            self._opened = True
            try:
                os.makedirs(self.directory, mode=0o755, exist_ok=True)
                self._file = LogFile(
                    LOG_FILE_NAME,
                    self.directory,
                    rotateLength=self.rotate_length,
                    maxRotatedFiles=self.max_rotated_files,
                )
            except OSError as e:
                self.log.error(
                    "cannot write logs to {path}: {why}; logging to stderr only " "(fix -logDir)",
                    path=self.path,
                    why=e,
                )
                return
            self._observer = filtered(jsonFileLogObserver(self._file, recordSeparator=""))  # type: ignore[arg-type]
            self.publisher.addObserver(self._observer)  # type: ignore[attr-defined]
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Start writing (opens the file if privilegedStartService did not run).
        """
        if not self._opened:
            self.privilegedStartService()
        if self._buffer_observer is not None:
            self.publisher.addObserver(self._buffer_observer)  # type: ignore[attr-defined]
        super().startService()
        if self.mark_after > 0:
            self._last_event = self._clock().seconds()
            self.publisher.addObserver(self._seen)  # type: ignore[attr-defined]
            self._mark_call = self._clock().callLater(self.mark_after, self._mark)
        if self.log_at_startup:
            self.log.info("hypervisor starting (pid {pid})", pid=os.getpid())

    def _seen(self, event: dict) -> None:
        """
        A log event (from any thread): only its time is noted.
        """
        self._last_event = self._clock().seconds()

    def _mark(self) -> None:
        """
        The idle check (reactor thread): a MARK line once nothing was logged for
        C{mark_after} seconds; check again when the next one could be due.
        """
        clock = self._clock()
        idle = clock.seconds() - self._last_event
        if idle >= self.mark_after:
            self.log.info("MARK")
            self._last_event = clock.seconds()
            idle = 0.0
        self._mark_call = clock.callLater(self.mark_after - idle, self._mark)

    def _clock(self) -> IReactorTime:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        assert self.clock is not None
        return self.clock

    def stopService(self) -> None:
        """
        Stop writing and close the file.
        """
        super().stopService()
        if self.mark_after > 0:
            self.publisher.removeObserver(self._seen)  # type: ignore[attr-defined]
        if self._mark_call is not None and self._mark_call.active():
            self._mark_call.cancel()
        self._mark_call = None
        if self._buffer_observer is not None:
            self.publisher.removeObserver(self._buffer_observer)  # type: ignore[attr-defined]
        if self._observer is not None:
            self.publisher.removeObserver(self._observer)  # type: ignore[attr-defined]
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._opened = False
