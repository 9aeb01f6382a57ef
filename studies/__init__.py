"""Command-line studies over fathom_tune: the only place that parses command lines."""
