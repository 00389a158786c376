"""Screening training data before training: score every sample by how far its response moves
the model along a persona vector (the paper's projection difference), rank, flag, report."""
