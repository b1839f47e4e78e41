"""One module per benchmark; each registers itself in `medvqa.registry.benchmarks`.

`make_benchmark(name, options)` builds a registered benchmark with its options
(e.g. `make_benchmark("slake", {"lang": "zh"})`); `parse_options` reads `KEY=VALUE` flags.
"""

from medvqa.benchmarks._files import make_benchmark, parse_options

__all__ = ["make_benchmark", "parse_options"]
