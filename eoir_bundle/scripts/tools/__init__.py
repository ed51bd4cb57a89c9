"""Developer tools: benchmarks, the lean path's profiler, method comparisons, training plots."""
