"""What a run writes: result files (writers), metrics against ground truth, report.html, the multirun summary."""
