"""One module per workload of bench/throughput.py: how it runs, its table, its JSON record."""
