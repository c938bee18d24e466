"""``fairway bench serve``: a serving benchmark client modelled on ``vllm bench serve``.

- :mod:`services.benchmark.workload`: tenants, prompts, and the list of requests to send.
- :mod:`services.benchmark.arrivals`: arrival times (gamma/Poisson, or a trace's own).
- :mod:`services.benchmark.metrics`: latency, throughput, goodput and fairness arithmetic.
- :mod:`services.benchmark.serve`: the HTTP loop and the command line.
- :mod:`services.benchmark.plots`: latency CDFs and per-tenant service (matplotlib).
"""
