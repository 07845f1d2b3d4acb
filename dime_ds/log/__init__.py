"""Console tables and progress; TensorBoard writer (rank 0)."""
