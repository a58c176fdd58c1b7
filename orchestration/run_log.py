"""What ``circot run`` prints of a run, and where the rest goes.

The console shows Dagster's log lines at INFO and above in a short form (time, step, message): what
each asset says as it works, its progress lines with rate and ETA, failures. Every event, DEBUG
included (step starts, resource inits, hooks, outputs), goes to the run's log file
``$DAGSTER_HOME/run_logs/<run id>.log``; ``circot run -v`` prints them too. The Dagster UI shows all
of a run's events whatever is printed: the instance stores them apart from these loggers. Runs
launched from the UI or by the daemon name no logger in their config and keep Dagster's default
console logger.
"""

import logging
import sys
import time
from pathlib import Path

import dagster as dg

FOLDER = "run_logs"


class ShortFormatter(logging.Formatter):
    """``HH:MM:SS step: message`` (the level too when it is not INFO; a Dagster event, its type)."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        where = meta.get("step_key") or meta.get("job_name") or record.name
        text = meta.get("orig_message", record.getMessage())
        event = meta.get("dagster_event")
        if event is not None:
            text = f"{event.event_type_value}: {text}"
        level = "" if record.levelno == logging.INFO else f"{record.levelname} "
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{where}: {text}"


@dg.logger({"log_level": dg.Field(str, is_required=False, default_value="INFO")},
           description="Dagster's log lines in a short form on stderr (circot run)")
def short_console_logger(init_context) -> logging.Logger:
    log = logging.Logger("circot.run", level=init_context.logger_config["log_level"].upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ShortFormatter())
    log.addHandler(handler)
    return log


class AppendingHandler(logging.Handler):
    """Each record appended to ``path``, the file open only while it is written: Dagster never tells a
    logger that its run ended, so a handler holding the file would keep it open for the process's life."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


@dg.logger({"folder": dg.Field(str)}, description="every event of the run, DEBUG included, in <folder>/<run id>.log")
def run_file_logger(init_context) -> logging.Logger:
    folder = Path(init_context.logger_config["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    log = logging.Logger("circot.run_file", level=logging.DEBUG)
    handler = AppendingHandler(folder / f"{init_context.run_id}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


LOGGERS = {"console": short_console_logger, "run_file": run_file_logger}


def log_file(home: str | Path, run_id: str) -> Path:
    return Path(home) / FOLDER / f"{run_id}.log"


def logger_config(verbose: bool, home: str | Path | None) -> dict:
    """The ``loggers`` section of a run's config: the short console (DEBUG with ``verbose``), and with
    a Dagster home the run's log file in it."""
    config = {"console": {"config": {"log_level": "DEBUG" if verbose else "INFO"}}}
    if home:
        config["run_file"] = {"config": {"folder": str(Path(home) / FOLDER)}}
    return config
