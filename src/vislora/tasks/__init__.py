"""Tasks: what the model predicts and how it is scored."""
