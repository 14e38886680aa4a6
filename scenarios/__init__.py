"""Scenarios: workloads + fault plans + checkers, a runner with an operation history, reports."""
