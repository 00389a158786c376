"""From a trait to a vector: contrastive rollouts (from a generation backend), judge
filtering, mean difference, layer choice and the report."""
