"""The rho allocation experiment: the built-in corpus (`corpus`), the MoE transformer it trains
(`models`), the parameter-allocation law (`allocation`) and the sweep that runs it (`sweep`,
`python -m torch_engram.experiment.sweep`).

Kept apart from the library: nothing in the core package imports it, so `import torch_engram`
needs neither the tokenizer corpus nor the experiment's model code."""
