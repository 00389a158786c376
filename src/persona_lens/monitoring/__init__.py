"""Using a vector live: guard mode, interactive chat, per-token views, trait-expression
evaluation and the paper's monitoring experiment."""
