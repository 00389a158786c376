"""Fine-tuning with preventative steering, CAFT-style ablation and projection regularisation,
and the finetuning shift (the paper's sections 4.2 and 5, appendix J)."""
