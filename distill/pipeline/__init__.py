"""From teacher to served model: the staged pipeline (`plan`), the stage kinds `distill` provides (`kinds`), the model
card (`card`) and the Hub push (`hub`). `prune` and `quant` register their own stage kinds."""
