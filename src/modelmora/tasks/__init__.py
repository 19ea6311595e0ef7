"""One adapter per task type, each split into pre / core / post."""
