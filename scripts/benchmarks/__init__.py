"""What the benchmark scripts share: `harness` (subprocess runs, step timing, run order, medians, peer frameworks'
environments) and `lm` (causal-LM runs and perplexities; it loads the LM stack, which `harness` leaves out so that a
probe's resident baseline stays small).

`python scripts/x.py` puts scripts/ on the path, so the scripts import it as `benchmarks`; the tests' pytest
configuration (setup.cfg) puts scripts/ there too."""
