"""The analytic engine: one training step simulated op by op on symbolic tensors, in pure Python.

`architectures/` (one module per model family), `methods/` (one module per fine-tuning method),
`optimizers` and `formulas/` are the concepts; `tape`/`ops` hold the symbolic tensors and PyTorch's per-op saving rules; `context` runs an
architecture's block stack with a method; `record` caches one simulation per structure (affine in
the rank); `budget` counts parameters, gradients and optimizer state; `peaks` finds where memory
peaks; `explain` names every term; `estimator` composes them; `planner` sweeps them under a budget.
Nothing here imports torch.
"""
