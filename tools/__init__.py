"""Developer tools: benchmarks of training (`tools.bench`) and serving (`tools.bench_serving`)."""
