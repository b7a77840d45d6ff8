"""The private attributes of MLflow (and of Lightning's MLflow logger) descent still reads, each with what would
replace it: the one place to look when either library changes them."""

from __future__ import annotations


def logger_started(logger) -> bool:
    """Whether Lightning's MLFlowLogger has opened its run. Its public `experiment` and `run_id` would open one:
    no public accessor says whether it has (a public `MLFlowLogger.initialized` would replace this)."""
    return logger._initialized


def stop_monitor(monitor) -> bool:
    """Stop MLflow's SystemMetricsMonitor thread without writing what it buffered; False if it was not running.
    Its public finish() also flushes the buffered points, which waits for an absent tracking server (minutes):
    a finish(flush=False) would replace this. (mlflow.system_metrics documents only global switches, no per-run
    monitor: the monitor's non-underscore methods descent calls, start, collect/aggregate/publish_metrics, are
    undocumented too.)"""
    if monitor._process is None:
        return False
    monitor._shutdown_event.set()
    monitor._process.join()
    monitor._process = None
    return True
