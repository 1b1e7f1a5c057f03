"""Batch jobs' inputs and outputs: rows streamed from files, and the predictions file written as they finish."""
