"""The ground floor under every other package: process signals, torch's thread count, numba's settings and atomic
files. It imports nothing from the project, so datasources, pipelines, models, evaluation and runtime can all use it."""
