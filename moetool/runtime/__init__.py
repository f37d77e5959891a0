"""Running models: loading (resident, offloaded, quantized), the executor that feeds text
through a model whole or layer by layer (streamed from disk), and the observers commands
attach to it."""
